"""HTTP scoring service for the exported model (FastAPI + uvicorn).

``python -m serving.server --workdir DIR [--host 127.0.0.1] [--port 8000] [--max-candidates 1000]
[--max-body-mb 8] [--max-dense-z 1000] [--threads 1]``

Loads ``DIR/serving/{model.pt, manifest.json, product_ids.parquet, query_ids.parquet}`` (written
by :mod:`serving.export`; the files must be one published export, :mod:`serving.published`) and
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

Every error has one JSON body, :class:`serving.requests.ErrorResponse`, whose message names each
offending field: ``{"message": "candidates[2].dense.price: Input should be a finite number",
"detail": [{"field": "candidates[2].dense.price", "type": "finite_number", "msg": ...}]}``.
400: the body is not JSON; 404: unknown path; 405: wrong method; 413: too many candidates or a
body over ``--max-body-mb``; 415: a content type other than ``application/json`` (or
``application/*+json``); 422: the rest (missing, unknown, mistyped or out-of-range fields, dense
values beyond ``--max-dense-z`` training stds). A score that comes out non-finite anyway is never
sent: 500 names the candidate. ``/openapi.json`` describes the request model exactly (every
feature, constraints, an example) and the error body of every response code.
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
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fbgemm_gpu  # noqa: F401  (registers the fbgemm:: ops the TorchScript model calls)
from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import read_json
from data.schema import SchemaError
from ranking.features import FeatureSpec, PurchaseIndex
from serving.published import published_export
from serving.redis_store import free_port
from serving.requests import (DENSE_MAX_Z, ErrorResponse, RequestEncoder, ScoreRequestBase, ScoreResponse,
                              build_score_request_model)

log = logging.getLogger("serving.server")

JSON_TYPES = "application/json or application/*+json"
# status -> (field, type) of the error body for HTTP errors raised outside request validation
HTTP_ERRORS = {404: ("path", "not_found"), 405: ("method", "method_not_allowed"), 413: ("body", "too_large"),
               415: ("content-type", "unsupported_media_type")}


@dataclass
class ServerConfig:
    """Serve the exported ranking model over HTTP (POST /score, GET /healthz)."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory (reads DIR/serving, DIR/data)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    max_candidates: int = field(default=1000, metadata={"help": "most candidates per request (more -> 413)"})
    max_body_mb: float = field(default=8.0, metadata={"help": "largest request body in MiB (more -> 413)"})
    max_dense_z: float = field(default=DENSE_MAX_Z, metadata={
        "help": "dense values must lie within training mean +- this many training stds (else 422)"})
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


class NonFiniteScoreError(Exception):
    """The model scored these candidates (indices into the request) with NaN or infinity."""

    def __init__(self, candidates: list[int]) -> None:
        super().__init__(f"non-finite scores for candidates {candidates}")
        self.candidates = candidates


class Scorer:
    """The exported model, its feature spec and the purchase history: request in, scores out.

    Thread-safe for concurrent :meth:`score` calls (TorchScript inference, read-only state).
    """

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        serving = self.workdir / "serving"
        published_export(self.workdir).verify()  # the files of one export, or a one-line error
        self.manifest: dict[str, Any] = read_json(serving / "manifest.json")
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

    def request_model(self, max_candidates: int, max_dense_z: float = DENSE_MAX_Z) -> type[ScoreRequestBase]:
        return build_score_request_model(self.spec, max_candidates, max_dense_z)

    def score(self, request: ScoreRequestBase) -> ScoreResponse:
        """Click probabilities of the request's candidates; :class:`NonFiniteScoreError` if any is NaN or infinite."""
        encoded = self.encoder.encode(request)
        with torch.inference_mode():
            probs = torch.sigmoid(self.model(*encoded.fused_inputs()))
        bad = torch.nonzero(~torch.isfinite(probs)).flatten().tolist()
        if bad:
            raise NonFiniteScoreError(bad)
        return ScoreResponse(scores=probs.tolist(), meta={**encoded.meta, "model": self.model_hash})


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or streamed) raises a 413
    :class:`HTTPException` when the endpoint reads it, so the app's error handler shapes the response
    (FastAPI's own ``max_body_size`` answers a declared oversize body in plain text)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        declared = int(length) if length.isdigit() else 0
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared > self.max_bytes:
                raise self._too_large()
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body over {self.max_bytes} bytes")


def _field_path(loc: Sequence[Any]) -> str:
    """``("body", "candidates", 3, "dense", "price")`` -> ``candidates[3].dense.price``."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _error_response(status: int, errors: list[dict], headers: dict[str, str] | None = None) -> JSONResponse:
    """An :class:`ErrorResponse` from pydantic-style errors (``loc``, ``type``, ``msg``)."""
    detail = [{"field": _field_path(e.get("loc", ())), "type": e.get("type", ""), "msg": e.get("msg", "")}
              for e in errors]
    message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail)
    body = ErrorResponse(message=message, detail=detail)
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def require_json(request: Request) -> None:
    """Refuse (415) a body whose content type is not JSON, before the body is validated."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPException(415, f"expected {JSON_TYPES}, got {content_type or 'no content type'!r}")


def _error_doc(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry with the :class:`ErrorResponse` body."""
    return {"model": ErrorResponse, "description": description}


def create_app(scorer: Scorer, max_candidates: int = 1000, max_body_mb: float = 8.0,
               max_dense_z: float = DENSE_MAX_Z) -> FastAPI:
    """The FastAPI app serving ``scorer`` (see module docstring)."""
    ScoreRequest = scorer.request_model(max_candidates, max_dense_z)  # noqa: N806  (a class)
    app = FastAPI(title="dashrec scoring service", version=str(scorer.manifest["manifest_version"]),
                  description=f"pCTR scores from the exported {scorer.manifest['variant']} model "
                              f"(seed {scorer.manifest['seed']}, {scorer.manifest['table_dtype']} tables). "
                              f"Every error response has the ErrorResponse body.")
    app.add_middleware(BodySizeLimit, max_bytes=int(max_body_mb * 2**20))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        field_name, kind = HTTP_ERRORS.get(exc.status_code, ("request", "http_error"))
        return _error_response(exc.status_code, [{"loc": (field_name,), "type": kind,
                                                  "msg": f"{request.method} {request.url.path}: {exc.detail}"}],
                               headers=exc.headers)

    @app.exception_handler(NonFiniteScoreError)
    async def non_finite_score(request: Request, exc: NonFiniteScoreError) -> JSONResponse:
        log.error("%s (model %s)", exc, scorer.model_hash)
        return _error_response(500, [{"loc": ("body", "candidates", i), "type": "non_finite_score",
                                      "msg": "the model's score is not finite (dense values far outside the "
                                             "training range?)"} for i in exc.candidates])

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

    other_errors = {"4XX": _error_doc("any other client error: 404 unknown path, 405 wrong method")}

    @app.post("/score", response_model=ScoreResponse, summary="Score candidates for a shopper and a query",
              dependencies=[Depends(require_json)],
              responses={400: _error_doc("body is not JSON"),
                         413: _error_doc(f"more than {max_candidates} candidates, or a body over {max_body_mb:g} MiB"),
                         415: _error_doc(f"content type is not {JSON_TYPES}"),
                         422: _error_doc("a field is missing, unknown, of the wrong type or out of range"),
                         500: _error_doc("the model scored a candidate with NaN or infinity (nothing is returned)"),
                         **other_errors})
    def score(body: ScoreRequest) -> ScoreResponse:
        return scorer.score(body)

    @app.get("/healthz", summary="Liveness and the model served", responses=other_errors)
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
    if (cfg.max_candidates < 1 or cfg.threads < 1 or not cfg.max_body_mb > 0 or not 0 < cfg.max_dense_z < float("inf")
            or not 0 < cfg.port < 65536):
        raise UserError("--max-candidates and --threads must be >= 1, --max-body-mb > 0, --max-dense-z finite > 0, "
                        "--port in 1..65535")
    torch.set_num_threads(cfg.threads)
    scorer = Scorer(cfg.workdir)
    app = create_app(scorer, cfg.max_candidates, cfg.max_body_mb, cfg.max_dense_z)
    print(f"serving {scorer.manifest['variant']} (model {scorer.model_hash}) on http://{cfg.host}:{cfg.port}",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


if __name__ == "__main__":
    run_main(main)
