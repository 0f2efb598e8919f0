"""HTTP scoring service for the exported model (FastAPI + uvicorn).

``python -m serving.server --workdir DIR [--host 127.0.0.1] [--port 8000] [--max-candidates 1000] [--threads 1]``

Loads ``DIR/serving/{model.pt, manifest.json, product_ids.parquet, query_ids.parquet}`` (written
by :mod:`serving.export`; the model file's sha256 must match the manifest) and
``DIR/data/purchases.parquet`` (to turn a ``user_id`` into the 84-day purchase history as of the
request time). The model runs with ``import torch, fbgemm_gpu`` only: the service never imports
torchrec.

Endpoints:

``POST /score``
    ``{user_id | purchase_history, query, candidates: [{product_id, position?, dense, sparse}], now?}``
    -> ``{scores: [click probability per candidate, in order], meta: {unknown_query,
    unknown_products, unknown_history_products, history_length, now, model}}``. Unknown queries
    and products are scored with row 0 (zeros) and counted in ``meta``.
``GET /healthz``
    ``{status: "ok", model, variant, table_dtype}``.

Bad requests get a 4xx whose ``message`` names each offending field (``candidates[2].dense.price:
Input should be a finite number``) and whose ``detail`` lists the errors: 400 for a body that is
not JSON, 413 for too many candidates or a body over ``--max-body-mb``, 422 for the rest.
``/openapi.json`` describes the request model exactly (every feature, constraints, an example).
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint's annotation at runtime and
# the request model is a local class built from the manifest.
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import fbgemm_gpu  # noqa: F401  (registers the fbgemm:: ops the TorchScript model calls)
from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import file_sha256, read_json
from data.schema import SchemaError
from ranking.features import FeatureSpec, PurchaseIndex
from serving.redis_store import free_port
from serving.requests import RequestEncoder, ScoreRequestBase, ScoreResponse, build_score_request_model

log = logging.getLogger("serving.server")

SERVING_FILES = ("model.pt", "manifest.json")


@dataclass
class ServerConfig:
    """Serve the exported ranking model over HTTP (POST /score, GET /healthz)."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory (reads DIR/serving, DIR/data)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    max_candidates: int = field(default=1000, metadata={"help": "most candidates per request (more -> 413)"})
    max_body_mb: float = field(default=8.0, metadata={"help": "largest request body in MiB (more -> 413)"})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads per request"})
    log_level: str = field(default="warning", metadata={"help": "uvicorn log level",
                                                        "choices": ["critical", "error", "warning", "info", "debug"]})


def read_id_maps(serving: Path) -> tuple[list[int], list[str]]:
    """``(product_ids, queries)`` in row order (row ``r`` at index ``r - 1``) from the exported id maps."""
    out: list[list] = []
    for name, key in (("product_ids", "product_id"), ("query_ids", "query")):
        path = serving / f"{name}.parquet"
        if not path.exists():
            raise UserError(f"{path}: missing id map (run `python -m serving.export --force`)")
        table = pq.read_table(path)
        if "row_id" not in table.column_names or key not in table.column_names:
            raise UserError(f"{path}: expected columns row_id and {key}, found {table.column_names}")
        rows = table.column("row_id").to_numpy()
        if not np.array_equal(rows, np.arange(1, len(rows) + 1)):
            raise UserError(f"{path}: column 'row_id' must be 1..R-1 in order")
        out.append(table.column(key).to_pylist())
    return out[0], out[1]


class Scorer:
    """The exported model, its feature spec and the purchase history: request in, scores out.

    Thread-safe for concurrent :meth:`score` calls (TorchScript inference, read-only state).
    """

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        serving = self.workdir / "serving"
        for name in SERVING_FILES:
            if not (serving / name).exists():
                raise UserError(f"{serving / name}: missing (run `python -m serving.export --workdir {workdir}` first)")
        self.manifest: dict[str, Any] = read_json(serving / "manifest.json")
        for name, entry in self.manifest["files"].items():
            path = serving / entry["path"]
            if not path.exists() or file_sha256(path) != entry["sha256"]:
                raise UserError(f"{path}: missing or does not match the sha256 in {serving / 'manifest.json'} "
                                f"(a partial export? run `python -m serving.export --force`)")
        self.model_hash: str = self.manifest["files"]["model"]["sha256"][:16]
        product_ids, queries = read_id_maps(serving) if "product_ids" in self.manifest["files"] else ([], [])
        self.spec = FeatureSpec.from_dict({**self.manifest["feature_spec"], "product_ids": product_ids,
                                           "queries": queries})
        self.model = torch.jit.load(str(serving / "model.pt")).eval()
        try:
            purchases = PurchaseIndex.from_workdir(self.workdir)
        except SchemaError as exc:
            raise UserError(str(exc)) from None
        self.encoder = RequestEncoder(self.spec, purchases, default_now=self.manifest["data_max_ts"])

    def request_model(self, max_candidates: int) -> type[ScoreRequestBase]:
        return build_score_request_model(self.spec, max_candidates)

    def score(self, request: ScoreRequestBase) -> ScoreResponse:
        encoded = self.encoder.encode(request)
        with torch.inference_mode():
            probs = torch.sigmoid(self.model(*encoded.fused_inputs()))
        return ScoreResponse(scores=probs.tolist(), meta={**encoded.meta, "model": self.model_hash})


def _field_path(loc: Sequence[Any]) -> str:
    """``("body", "candidates", 3, "dense", "price")`` -> ``candidates[3].dense.price``."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _error_response(status: int, errors: list[dict]) -> JSONResponse:
    detail = [{"field": _field_path(e.get("loc", ())), "type": e.get("type", ""), "msg": e.get("msg", "")}
              for e in errors]
    message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail)
    return JSONResponse(status_code=status, content={"message": message, "detail": detail})


def create_app(scorer: Scorer, max_candidates: int = 1000, max_body_mb: float = 8.0) -> FastAPI:
    """The FastAPI app serving ``scorer`` (see module docstring)."""
    ScoreRequest = scorer.request_model(max_candidates)  # noqa: N806  (a class)
    app = FastAPI(title="dashrec scoring service", version=str(scorer.manifest["manifest_version"]),
                  description=f"pCTR scores from the exported {scorer.manifest['variant']} model "
                              f"(seed {scorer.manifest['seed']}, {scorer.manifest['table_dtype']} tables).",
                  max_body_size=int(max_body_mb * 2**20))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(400, [{"loc": ("body",), "type": "json_invalid",
                                          "msg": "request body is not valid JSON"}])
        if any(e.get("type") == "too_long" and tuple(e.get("loc", ()))[-1:] == ("candidates",) for e in errors):
            return _error_response(413, [{"loc": ("body", "candidates"), "type": "too_long",
                                          "msg": f"at most {max_candidates} candidates per request"}])
        return _error_response(422, errors)

    @app.post("/score", response_model=ScoreResponse, summary="Score candidates for a shopper and a query",
              responses={400: {"description": "body is not JSON"}, 413: {"description": "too many candidates"},
                         422: {"description": "a field is missing, unknown, of the wrong type or out of range"}})
    def score(body: ScoreRequest) -> ScoreResponse:
        return scorer.score(body)

    @app.get("/healthz", summary="Liveness and the model served")
    def healthz() -> dict:
        return {"status": "ok", "model": scorer.model_hash, "variant": scorer.manifest["variant"],
                "table_dtype": scorer.manifest["table_dtype"]}

    return app


class ServiceProcess:
    """``python -m serving.server`` on a free localhost port in a subprocess; a context manager."""

    def __init__(self, workdir: Path, threads: int, max_candidates: int, start_timeout_s: float = 120.0) -> None:
        self.workdir, self.threads, self.max_candidates = workdir, threads, max_candidates
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> "ServiceProcess":
        import httpx

        argv = [sys.executable, "-m", "serving.server", "--workdir", str(self.workdir), "--port", str(self.port),
                "--threads", str(self.threads), "--max-candidates", str(self.max_candidates)]
        self._log = open(self.workdir / "serving" / "server.log", "w")
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=root)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                self.__exit__()
                tail = (self.workdir / "serving" / "server.log").read_text()[-800:]
                raise UserError(f"the scoring service exited with code {self._proc.returncode}: {tail}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise UserError(f"the scoring service did not answer /healthz within {self.start_timeout_s:.0f} s")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    cfg = parse_config(ServerConfig, argv)
    if cfg.max_candidates < 1 or cfg.threads < 1 or not cfg.max_body_mb > 0 or not 0 < cfg.port < 65536:
        raise UserError("--max-candidates and --threads must be >= 1, --max-body-mb > 0, --port in 1..65535")
    torch.set_num_threads(cfg.threads)
    scorer = Scorer(cfg.workdir)
    app = create_app(scorer, cfg.max_candidates, cfg.max_body_mb)
    print(f"serving {scorer.manifest['variant']} (model {scorer.model_hash}) on http://{cfg.host}:{cfg.port}",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


if __name__ == "__main__":
    run_main(main)
