"""HTTP service for the exported model (FastAPI + uvicorn): scoring, and the retrieve -> rank funnel.

``python -m serving.server --workdir DIR [--host 127.0.0.1] [--port 8000] [--max-candidates 1000]
[--max-body-mb 8] [--max-dense-z 1000] [--threads 1] [--workers 0] [--batch | --no-batch] [--watch-s 1]``

Loads ``DIR/serving/{model.pt, manifest.json, product_ids.parquet, query_ids.parquet,
product_features.parquet}`` (written by :mod:`serving.export`; the files must be one published
export, :mod:`serving.published`) and ``DIR/data/purchases.parquet`` (to turn a ``user_id`` into the
84-day purchase history as of the request time). When ``python -m serving.add_products`` has
published products added since the export, the added set's model, id map, product features and
index are served instead (:func:`serving.published.current_added`). The funnel endpoints also need
the product index (``python -m serving.index``), the DashCLIP tables and the trained DashCLIP
checkpoint (:func:`serving.funnel.load_funnel`); without them the service scores, and the funnel
endpoints answer 503 naming what is missing (``/healthz`` says so too). The model runs with
``import torch, fbgemm_gpu`` only: the service never imports torchrec.

Endpoints:

``POST /score``
    ``{user_id | purchase_history, query, candidates: [{product_id, position?, dense, sparse}], now?}``
    -> ``{scores: [click probability per candidate, in order], meta: {unknown_query,
    unknown_products, unknown_history_products, history_length, now, model}}``. Unknown queries
    and products are scored with row 0 (zeros) and counted in ``meta``.
``POST /retrieve``
    ``{query, k?}`` -> ``{products: [{product_id, cosine}], meta: {query, query_encoded,
    indexed_products, index}}``: the ``k`` (default 10, at most 1000) products nearest to the
    query's DashCLIP vector, best first: the exported query table's row when the normalised query
    is in it, else the trained DashCLIP query encoder's vector (``query_encoded: true``). Row 0 (the
    unknown product) is never a result.
``POST /recommend``
    ``{user_id | purchase_history, query, now?, k?, candidates_n?, features?: {dense: {..},
    sparse: {..}}}`` -> ``{products: [{product_id, cosine, score}], meta: {..ScoreMeta,
    query_encoded, retrieved}}``: retrieves ``candidates_n`` (default 200) products like
    ``/retrieve``, scores them with the fused pCTR model through the same path as ``/score``
    (:meth:`Scorer.probabilities`, micro-batched with concurrent ``/score`` requests) and returns the
    ``k`` (default 10) most likely to be clicked, best first (ties: higher cosine, then lower id).
    The candidates' product-level features (constant per product, or a daily product statistic
    such as past click rate at its latest value) come from the served ``product_features.parquet``;
    the request-level ones (hour, platform, ...) from ``features``, each defaulting to its training
    mean (dense) or most frequent training id (sparse). Which is which was decided from the
    impressions at export (:mod:`serving.funnel`); ``/openapi.json`` lists the request-level ones
    with their defaults and names the product-level ones.
``GET /healthz``
    ``{status: "ok", model, variant, table_dtype, products, added_products, funnel, funnel_error,
    reload_error}``.

Reload (a file watch): every ``--watch-s`` seconds (default 1; 0 = never) each worker process
looks at the manifests of the export, the added set, the product index and the DashCLIP tables
(inode, size, modification time). When one changed and no publication is in progress, it loads
the new files beside the served ones (in a thread, warmed up) and swaps them in between requests,
so ``python -m serving.add_products`` is served within about a second by every worker, with no
restart and no request failing. A reload is refused, and the served files kept, when the new
files do not load, would change the request schema (the feature spec or split: restart), or would
lose the funnel (e.g. an export published before its index is rebuilt); ``/healthz`` then shows
``reload_error``.

Every error has one JSON body, :class:`serving.requests.ErrorResponse`, whose message names each
offending field: ``{"message": "candidates[2].dense.price: Input should be a finite number",
"detail": [{"field": "candidates[2].dense.price", "type": "finite_number", "msg": ...}]}``.
400: the body is not JSON; 404: unknown path; 405: wrong method; 413: too many candidates or a
body over ``--max-body-mb``; 415: a content type other than ``application/json`` (or
``application/*+json``); 422: the rest (missing, unknown, mistyped or out-of-range fields, dense
values beyond ``--max-dense-z`` training stds, ``k`` or ``candidates_n`` out of range, a query
that normalises to nothing for ``/retrieve`` and ``/recommend``); 503: the funnel's files are
missing or do not belong together (``/retrieve``, ``/recommend``). A score that comes out
non-finite anyway is never sent: 500 names the candidate. ``/openapi.json`` describes the request
models exactly (every feature, constraints, defaults, an example) and the error body of every
response code.

Speed: :class:`FastScorePath`, an ASGI middleware in front of FastAPI, answers a well-formed
``POST /score`` (or ``/score/columns``) itself: the body parsed with ``pydantic_core.from_json``,
checked and turned into arrays by :class:`serving.requests.FastRequestParser` (a few vectorised
steps instead of a pydantic model per candidate), scored inline on the event loop (no thread
hand-off; ``--threads`` torch threads, default 1) and answered with ``pydantic_core.to_json``.
Whatever it is not sure of (another content type, a body it declines, a non-finite score) goes to
the FastAPI route, which validates with the pydantic model and gives the documented answer or
error, so both paths answer alike. Requests that are ready at the same moment are scored in one
model call (:class:`MicroBatcher`, no waiting). A request's scores do not depend on its batch but
for float32 rounding (measured: at most 4e-8, none at 64 candidates); ``--no-batch`` gives one
model call per request and bit-for-bit repeatable scores. ``--workers`` processes share the port
(default: one per CPU core; each runs the model with ``--threads`` torch threads, so workers x
threads should not exceed the cores). uvicorn runs httptools and uvloop when installed (they are
dependencies). Every response has a ``server-timing: app;dur=<ms>`` header: the service's own
handling time, from the request's headers to the response (body read, parsing, validation,
batch, model, serialisation), without the kernel's queueing or the HTTP parsing.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint's annotation at runtime and
# the request model is a local class built from the manifest.
import asyncio
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import from_json, to_json
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fbgemm_gpu  # noqa: F401  (registers the fbgemm:: ops the TorchScript model calls)
from common.cli import (DEFAULT_WORKDIR, UserError, available_cores, parse_config, resolve_threads, run_main,
                        threads_field)
from common.io import file_sha256, read_json
from common.provenance import OutputSet
from data.schema import SchemaError
from embeddings.tables import tables_set
from ranking.spec import FeatureSpec, PurchaseIndex
from serving.funnel import Funnel, FunnelUnavailable, load_encoder_once, load_funnel
from serving.index import index_set
from serving.published import (ADDED_FILES, FILES, added_set, current_added, export_set, fp32_query_table,
                               load_served_model, published_export, read_id_map)
from serving.redis_store import free_port
from serving.requests import (DENSE_MAX_Z, EncodedRequest, ErrorResponse, FastRequestParser, ParsedRequest,
                              RecommendedProduct, RecommendMeta, RecommendResponse,
                              RequestEncoder, RetrievedProduct, RetrieveMeta, RetrieveRequest, RetrieveResponse,
                              ScoreRequestBase, ScoreResponse, build_columns_request_model,
                              build_recommend_request_model, build_score_request_model, request_feature_values)

log = logging.getLogger("serving.server")

READY_LINE = "worker ready, pid"  # printed by each worker process once it serves
JSON_TYPES = "application/json or application/*+json"
# status -> (field, type) of the error body for HTTP errors raised outside request validation
HTTP_ERRORS = {404: ("path", "not_found"), 405: ("method", "method_not_allowed"), 413: ("body", "too_large"),
               415: ("content-type", "unsupported_media_type")}


@dataclass
class ServerConfig:
    """Serve the exported ranking model over HTTP (POST /score, /retrieve, /recommend, GET /healthz)."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory (reads DIR/serving, DIR/data)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind"})
    port: int = field(default=8000, metadata={"help": "TCP port", "min": 1, "max": 65535})
    max_candidates: int = field(default=1000, metadata={"help": "most candidates per request (more -> 413)", "min": 1})
    max_body_mb: float = field(default=8.0, metadata={"help": "largest request body in MiB (more -> 413)", "gt": 0.0})
    max_dense_z: float = field(default=DENSE_MAX_Z, metadata={
        "help": "dense values must lie within training mean +- this many training stds (else 422)", "gt": 0.0,
        "lt": float("inf")})
    threads: int = threads_field(of="worker process")
    workers: int = field(default=0, metadata={
        "help": "worker processes sharing the port (0 = one per CPU core)", "min": 0})
    batch: bool = field(default=True, metadata={
        "help": "score the requests that are ready at the same moment in one model call (no waiting)"})
    watch_s: float = field(default=1.0, metadata={
        "help": "seconds between looks at the served files' manifests; a change is loaded and swapped in (0 = never)",
        "min": 0.0})
    log_level: str = field(default="warning", metadata={"help": "uvicorn log level",
                                                        "choices": ["critical", "error", "warning", "info", "debug"]})


class NonFiniteScoreError(Exception):
    """The model scored these candidates (indices into the request) with NaN or infinity."""

    def __init__(self, candidates: list[int]) -> None:
        super().__init__(f"non-finite scores for candidates {candidates}")
        self.candidates = candidates


class Scorer:
    """The served model, its feature spec and the purchase history: request in, scores out.

    Serves the export, or the added set when ``with_added`` and one is published for this export
    (:func:`serving.published.current_added`): the same weights with the added products' rows in
    the product table. Thread-safe for concurrent :meth:`score` calls (TorchScript inference,
    read-only state).
    """

    def __init__(self, workdir: str | Path, with_added: bool = True) -> None:
        self.workdir = Path(workdir)
        serving = self.workdir / "serving"
        published_export(self.workdir).verify()  # the files of one export, or a one-line error
        self.manifest: dict[str, Any] = read_json(serving / "manifest.json")
        has_tables = "product_ids" in self.manifest["files"]
        self.added: dict[str, Any] | None = current_added(self.workdir) if with_added and has_tables else None
        model_path = self.workdir / ADDED_FILES["model"] if self.added else serving / "model.pt"
        self.model_hash: str = file_sha256(model_path)[:16]
        self.spec = FeatureSpec.from_dict(self.manifest["feature_spec"])
        if has_tables:
            self.spec = self.spec.with_keys(
                read_id_map(self.workdir / ADDED_FILES["product_ids"] if self.added else serving / "product_ids.parquet",
                            "product"),
                read_id_map(serving / "query_ids.parquet", "query"))
        # the export's tensors mapped from model_weights.pt: one copy in memory for every worker
        self.model = load_served_model(model_path, None if self.added else serving / FILES["model_weights"])
        # the funnel's query vectors when the model holds the fp32 table: one copy for scoring and retrieval
        self.query_table: np.ndarray | None = fp32_query_table(self.model, self.manifest)
        try:
            purchases = PurchaseIndex.from_workdir(self.workdir)
        except SchemaError as exc:
            raise UserError(str(exc)) from None
        self.encoder = RequestEncoder(self.spec, purchases, default_now=self.manifest["data_max_ts"])

    def request_model(self, max_candidates: int, max_dense_z: float = DENSE_MAX_Z) -> type[ScoreRequestBase]:
        return build_score_request_model(self.spec, max_candidates, max_dense_z)

    def columns_request_model(self, max_candidates: int,
                              max_dense_z: float = DENSE_MAX_Z) -> type[ScoreRequestBase]:
        return build_columns_request_model(self.spec, max_candidates, max_dense_z)

    def probabilities(self, encoded: Sequence[EncodedRequest]) -> list[torch.Tensor]:
        """Click probabilities of each request's candidates, all requests in one model call (rows are
        independent: a request's scores do not depend on the others but for float32 rounding)."""
        if len(encoded) == 1:
            inputs = encoded[0].fused_inputs()
        else:
            inputs = tuple(torch.cat(parts) for parts in zip(*(e.fused_inputs() for e in encoded)))
        with torch.inference_mode():
            probs = torch.sigmoid(self.model(*inputs))
        return list(torch.split(probs, [len(e.product_ids) for e in encoded])) if len(encoded) > 1 else [probs]

    def warm_up(self, sizes: Sequence[int] = (1, 64, 1, 64)) -> None:
        """Run the model on placeholder inputs: TorchScript profiles and optimises its graph in the
        first calls (~0.5-1 s), which would otherwise be a worker's first request."""
        spec = self.spec
        with torch.inference_mode():
            for rows in sizes:
                dense = torch.tensor([spec.dense_mean] * rows, dtype=torch.float32).reshape(rows, len(spec.dense_names))
                self.model(dense, torch.zeros(rows, len(spec.sparse_names), dtype=torch.int64),
                           torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64),
                           torch.full((rows, spec.history_len), -1, dtype=torch.int64))

    def response(self, encoded: EncodedRequest, probs: torch.Tensor) -> ScoreResponse:
        """The response body; :class:`NonFiniteScoreError` if any score is NaN or infinite."""
        bad = torch.nonzero(~torch.isfinite(probs)).flatten().tolist()
        if bad:
            raise NonFiniteScoreError(bad)
        return ScoreResponse(scores=probs.tolist(), meta={**encoded.meta, "model": self.model_hash})

    def score(self, request: ScoreRequestBase) -> ScoreResponse:
        """Click probabilities of the request's candidates; :class:`NonFiniteScoreError` if any is NaN or infinite."""
        encoded = self.encoder.encode(request)
        return self.response(encoded, self.probabilities([encoded])[0])

    def request_schema(self) -> tuple[Any, Any]:
        """What the request models are built from: the feature spec (without id maps) and the feature split."""
        return self.manifest["feature_spec"], self.manifest.get("features")


def served_sets(workdir: Path) -> tuple[OutputSet, ...]:
    """The sets the service reads (constructing them reads no file)."""
    return export_set(workdir, True), added_set(workdir), index_set(workdir), tables_set(workdir)


def served_signature(workdir: Path) -> tuple:
    """``(inode, size, mtime_ns)`` of each served set's manifest (None when absent): what the watch compares."""
    signature = []
    for rel in (out.manifest_rel for out in served_sets(workdir)):
        try:
            stat = (workdir / rel).stat()
            signature.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except FileNotFoundError:
            signature.append(None)
    return tuple(signature)


def publication_in_progress(workdir: Path) -> bool:
    """A served set is being published (its journal exists): read it later. (Reading it now would
    roll the publication back: :meth:`common.provenance.OutputSet.recover`.)"""
    return any(out.journal_path.exists() for out in served_sets(workdir))


@dataclass
class Served:
    """What the service serves: the scorer, the funnel (None, with the reason, when its files are
    missing or do not belong together) and the manifests' signature when they were loaded."""

    scorer: Scorer
    funnel: Funnel | None = None
    funnel_error: str | None = "not loaded"
    signature: tuple = ()

    def require_funnel(self) -> Funnel:
        if self.funnel is None:
            raise FunnelUnavailable(f"retrieval is not available: {self.funnel_error}")
        return self.funnel

    def warm_up(self) -> None:
        self.scorer.warm_up()
        if self.funnel is not None:
            self.funnel.warm_up()


class EncoderOnce:
    """The trained DashCLIP encoder of ``workdir``, loaded the first time a funnel needs it (then kept:
    a new checkpoint needs a restart)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._loaded: tuple[Any, str] | None = None

    def __call__(self) -> tuple[Any, str] | None:
        if self._loaded is None:
            self._loaded = load_encoder_once(self.workdir)
        return self._loaded


def load_served(workdir: str | Path, encoder: EncoderOnce) -> Served:
    """The served files of ``workdir`` loaded and checked (see the module docstring), not yet warmed up."""
    workdir = Path(workdir)
    signature = served_signature(workdir)
    scorer = Scorer(workdir)
    try:
        funnel = load_funnel(workdir, scorer.spec, scorer.manifest, scorer.added, encoder, scorer.query_table)
    except FunnelUnavailable as exc:
        log.warning("POST /retrieve and /recommend are not available: %s", exc)
        return Served(scorer, None, str(exc), signature)
    return Served(scorer, funnel, None, signature)


class MicroBatcher:
    """Scores the requests that are ready at the same moment in one model call, on the event loop.

    :meth:`score` queues a request and, for the first of a round, schedules :meth:`flush` with
    ``call_soon``: it runs once the loop has run every callback already due, i.e. after every
    request whose body had arrived got parsed and queued. No request waits for others to arrive:
    alone, a request is scored at once. A call has at most ``max_rows`` candidates (a request
    bigger than that goes alone). The model runs inline: one worker process per core is the
    parallelism, with no thread hand-offs and no GIL contention.
    """

    def __init__(self, scorer: Scorer, max_rows: int, enabled: bool = True) -> None:
        self.scorer, self.max_rows, self.enabled = scorer, max_rows, enabled
        self._queue: list[tuple[EncodedRequest, asyncio.Future]] = []
        self.calls = 0  # model calls so far (for tests and logs)

    async def score(self, encoded: EncodedRequest) -> torch.Tensor:
        if not self.enabled:
            self.calls += 1
            return self.scorer.probabilities([encoded])[0]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((encoded, future))
        if len(self._queue) == 1:
            loop.call_soon(self.flush)
        return await future

    def flush(self) -> None:
        queue, self._queue = self._queue, []
        start = 0
        while start < len(queue):
            end, rows = start + 1, len(queue[start][0].product_ids)
            while end < len(queue) and rows + len(queue[end][0].product_ids) <= self.max_rows:
                rows += len(queue[end][0].product_ids)
                end += 1
            chunk, start = queue[start:end], end
            self.calls += 1
            try:
                results = self.scorer.probabilities([encoded for encoded, _ in chunk])
            except Exception as exc:  # noqa: BLE001  (handed to each waiting request)
                for _, future in chunk:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), probs in zip(chunk, results):
                if not future.done():
                    future.set_result(probs)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` first, then the connection's own."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


def _timing_header(start: float) -> tuple[bytes, bytes]:
    return b"server-timing", f"app;dur={(time.perf_counter() - start) * 1e3:.3f}".encode()


class FastScorePath:
    """ASGI middleware: answers a well-formed scoring request without FastAPI's per-request machinery.

    ``forms`` maps a path to its parser (:class:`FastRequestParser` ``.rows`` or ``.columns``). A
    ``POST`` there with ``content-type: application/json`` and a ``content-length`` within
    ``max_bytes`` is read, parsed with ``pydantic_core.from_json`` and, if the parser accepts it,
    encoded, scored through the :class:`MicroBatcher` and answered here. Everything else (and a
    request whose scores are not all finite) goes to ``app`` with the body replayed, so the
    FastAPI route gives its documented answer or error. Every response gets a ``server-timing``
    header (see the module docstring).
    """

    def __init__(self, app: ASGIApp, batcher: MicroBatcher, forms: dict[str, Callable[[Any], ParsedRequest | None]],
                 max_bytes: int) -> None:
        self.app, self.batcher, self.forms, self.max_bytes = app, batcher, forms, max_bytes
        self.answered = 0  # requests answered here (the rest went to the FastAPI routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parse = self.forms.get(scope["path"]) if scope["method"] == "POST" else None
        if parse is not None and self._fast_headers(scope["headers"]):
            messages = await self._read(receive)
            body = self._body(messages)
            answer = await self._answer(parse, body) if body is not None else None
            if answer is not None:
                self.answered += 1
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode()),
                    _timing_header(start)]})
                await send({"type": "http.response.body", "body": answer})
                return
            receive = _replay(messages, receive)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), _timing_header(start)]}
            await send(message)

        await self.app(scope, receive, timed_send)

    def _fast_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        content_type = length = None
        for name, value in headers:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
        return (content_type is not None and content_type.split(b";", 1)[0].strip().lower() == b"application/json"
                and length is not None and length.isdigit() and int(length) <= self.max_bytes)

    @staticmethod
    async def _read(receive: Receive) -> list[Message]:
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                return messages

    def _body(self, messages: list[Message]) -> bytes | None:
        if messages[-1]["type"] != "http.request":
            return None
        body = b"".join(m.get("body", b"") for m in messages)
        return body if len(body) <= self.max_bytes else None

    async def _answer(self, parse: Callable[[Any], ParsedRequest | None], body: bytes) -> bytes | None:
        """The response body, or None to leave the request to the FastAPI route."""
        try:
            parsed = parse(from_json(body))
        except ValueError:  # not JSON: the route answers 400
            return None
        except Exception:  # noqa: BLE001  (a parser bug must not change the answer: the route gives it)
            log.exception("fast path: the parser failed; leaving the request to the route")
            return None
        if parsed is None:
            return None
        scorer = self.batcher.scorer  # (the served one: a reload swaps it)
        try:
            encoded = scorer.encoder.encode_arrays(parsed.head, parsed.product_ids, parsed.dense, parsed.sparse)
        except Exception:  # noqa: BLE001
            log.exception("fast path: encoding failed; leaving the request to the route")
            return None
        try:
            probs = await self.batcher.score(encoded)
        except Exception:  # noqa: BLE001  (the route runs the model again and answers as it does)
            log.exception("fast path: the model failed; leaving the request to the route")
            return None
        scores = probs.numpy()
        if not np.isfinite(scores).all():
            return None
        return to_json({"scores": scores.tolist(), "meta": {**encoded.meta, "model": scorer.model_hash}})


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


class ServedWatch:
    """A worker's file watch (see the module docstring): every ``interval_s`` seconds, when the served
    sets' manifests changed and no publication is in progress, ``load()`` them in a thread, check that
    they keep the request schema and the funnel, warm them up and ``swap`` them in (on the event loop,
    between requests). A load that fails is logged and kept in ``error``; the served files stay."""

    def __init__(self, workdir: Path, load: Callable[[], Served], swap: Callable[[Served], None],
                 current: Callable[[], Served], interval_s: float) -> None:
        self.workdir, self.load, self.swap, self.current, self.interval_s = workdir, load, swap, current, interval_s
        self.error: str | None = None
        self._failed: tuple | None = None  # the signature whose load failed (tried again once it changes)

    def _load_checked(self, served: Served) -> Served:
        new = self.load()
        if new.scorer.request_schema() != served.scorer.request_schema():
            raise UserError("the new export has another feature spec or feature split (the request schema): "
                            "restart the service to serve it")
        if served.funnel is not None and new.funnel is None:
            raise UserError(f"the new files would leave retrieval unavailable: {new.funnel_error}")
        new.warm_up()
        return new

    async def check(self) -> bool:
        """Look once; True when new files were swapped in."""
        served = self.current()
        signature = served_signature(self.workdir)
        if signature in (served.signature, self._failed) or publication_in_progress(self.workdir):
            return False
        try:
            new = await asyncio.to_thread(self._load_checked, served)
        except Exception as exc:  # noqa: BLE001  (whatever the files are, the served ones stay)
            self._failed, self.error = signature, str(exc) if isinstance(exc, UserError) else repr(exc)
            log.error("reload refused, still serving model %s: %s", served.scorer.model_hash, self.error)
            return False
        self.swap(new)
        self.error = None
        log.warning("reloaded: model %s, %d products (%d added), retrieval %s", new.scorer.model_hash,
                    new.scorer.spec.num_product_rows - 1, (new.scorer.added or {}).get("added_products", 0),
                    "available" if new.funnel is not None else f"not available ({new.funnel_error})")
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()


def create_app(served: Served, max_candidates: int = 1000, max_body_mb: float = 8.0,
               max_dense_z: float = DENSE_MAX_Z, batch: bool = True, reload: Callable[[], Served] | None = None,
               watch_s: float = 0.0) -> FastAPI:
    """The FastAPI app serving ``served`` (see module docstring), with :class:`FastScorePath` in front.
    With ``reload`` (a loader of the served files as they are on disk) and ``watch_s`` > 0, a
    :class:`ServedWatch` swaps in new files."""
    scorer = served.scorer
    ScoreRequest = scorer.request_model(max_candidates, max_dense_z)  # noqa: N806  (a class)
    ScoreColumnsRequest = scorer.columns_request_model(max_candidates, max_dense_z)  # noqa: N806
    split = scorer.manifest.get("features") or {"product": [], "request": []}
    RecommendRequest = build_recommend_request_model(scorer.spec, split, max_candidates, max_dense_z)  # noqa: N806
    batcher = MicroBatcher(scorer, max_rows=max(max_candidates, 1024), enabled=batch)

    def swap(new: Served) -> None:
        app.state.served = new
        batcher.scorer = new.scorer
        gc.freeze()  # the new model and tables, like the first ones (see lifespan)

    watch = (ServedWatch(scorer.workdir, reload, swap, lambda: app.state.served, watch_s)
             if reload is not None and watch_s > 0 else None)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # the model, tables and modules live as long as the process: move them out of the garbage
        # collector's reach, so that a full collection (~0.1-0.4 s over ~270k objects) never stalls requests
        app.state.served.warm_up()
        gc.freeze()
        print(f"{READY_LINE} {os.getpid()}", flush=True)
        task = asyncio.create_task(watch.run()) if watch is not None else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(title="dashrec scoring service", version=str(scorer.manifest["manifest_version"]),
                  description=f"pCTR scores from the exported {scorer.manifest['variant']} model "
                              f"(seed {scorer.manifest['seed']}, {scorer.manifest['table_dtype']} tables), and "
                              f"the retrieve -> rank funnel over the DashCLIP product index. Every error response "
                              f"has the ErrorResponse body.", lifespan=lifespan)
    app.state.served, app.state.batcher, app.state.watch = served, batcher, watch
    max_bytes = int(max_body_mb * 2**20)
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)
    parser = FastRequestParser(scorer.spec, max_candidates, max_dense_z)
    app.add_middleware(FastScorePath, batcher=batcher, forms={"/score": parser.rows, "/score/columns": parser.columns},
                       max_bytes=max_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        field_name, kind = HTTP_ERRORS.get(exc.status_code, ("request", "http_error"))
        return _error_response(exc.status_code, [{"loc": (field_name,), "type": kind,
                                                  "msg": f"{request.method} {request.url.path}: {exc.detail}"}],
                               headers=exc.headers)

    @app.exception_handler(NonFiniteScoreError)
    async def non_finite_score(request: Request, exc: NonFiniteScoreError) -> JSONResponse:
        log.error("%s (model %s)", exc, batcher.scorer.model_hash)
        return _error_response(500, [{"loc": ("body", "candidates", i), "type": "non_finite_score",
                                      "msg": "the model's score is not finite (dense values far outside the "
                                             "training range?)"} for i in exc.candidates])

    @app.exception_handler(FunnelUnavailable)
    async def funnel_unavailable(request: Request, exc: FunnelUnavailable) -> JSONResponse:
        return _error_response(503, [{"loc": ("funnel",), "type": "unavailable", "msg": str(exc)}])

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(400, [{"loc": ("body",), "type": "json_invalid",
                                          "msg": "request body is not valid JSON"}])
        # too many candidates: the list (rows) or any column (columns) over max_candidates
        if any(e.get("type") == "too_long" and tuple(e.get("loc", ()))[:2] == ("body", "candidates") for e in errors):
            return _error_response(413, [{"loc": ("body", "candidates"), "type": "too_long",
                                          "msg": f"at most {max_candidates} candidates per request"}])
        return _error_response(422, errors)

    other_errors = {"4XX": _error_doc("any other client error: 404 unknown path, 405 wrong method")}
    json_errors = {400: _error_doc("body is not JSON"),
                   413: _error_doc(f"a body over {max_body_mb:g} MiB"),
                   415: _error_doc(f"content type is not {JSON_TYPES}")}
    score_errors = {**json_errors,
                    413: _error_doc(f"more than {max_candidates} candidates, or a body over {max_body_mb:g} MiB"),
                    422: _error_doc("a field is missing, unknown, of the wrong type or out of range"),
                    500: _error_doc("the model scored a candidate with NaN or infinity (nothing is returned)"),
                    **other_errors}
    unavailable = _error_doc("retrieval is not available: the product index, the DashCLIP tables or the "
                             "trained DashCLIP checkpoint is missing or does not belong to the served model "
                             "(the message says which)")
    retrieve_errors = {**json_errors, 422: _error_doc("a field is missing, unknown, of the wrong type or out of "
                                                      "range, or the query normalises to nothing"),
                       503: unavailable, **other_errors}
    recommend_errors = {**json_errors, 422: _error_doc("a field is missing, unknown, of the wrong type or out of "
                                                       "range (k above candidates_n, a product-level feature in "
                                                       "features), or the query normalises to nothing"),
                        500: _error_doc("the model scored a candidate with NaN or infinity (nothing is returned)"),
                        503: unavailable, **other_errors}

    # The routes run inline on the event loop, like the fast path: they see the requests that
    # FastScorePath leaves to them (other JSON content types, whole-float ids, errors).
    @app.post("/score", response_model=ScoreResponse, summary="Score candidates for a shopper and a query",
              dependencies=[Depends(require_json)], responses=score_errors)
    async def score(body: ScoreRequest) -> ScoreResponse:
        return batcher.scorer.score(body)

    @app.post("/score/columns", response_model=ScoreResponse,
              summary="Score candidates given column-wise (one array per field)",
              description="The same as POST /score with `candidates` as `{product_id: [..], position?: [..], "
                          "dense: {<feature>: [..]}, sparse: {<feature>: [..]}}`: the Candidate fields, one "
                          "array each, one value per candidate. Errors name the column and index "
                          "(`candidates.dense.price[3]`).",
              dependencies=[Depends(require_json)], responses=score_errors)
    async def score_columns(body: ScoreColumnsRequest) -> ScoreResponse:
        return batcher.scorer.score(body)

    @app.post("/retrieve", response_model=RetrieveResponse, summary="The products nearest to a query (DashCLIP)",
              description="The k products whose DashCLIP vectors are nearest (cosine) to the query's, best first. "
                          "The query's vector is the exported query table's row when the normalised query is in "
                          "it, else the trained DashCLIP query encoder computes it (meta.query_encoded). Row 0, "
                          "the unknown product, is never a result.",
              dependencies=[Depends(require_json)], responses=retrieve_errors)
    async def retrieve(body: RetrieveRequest) -> RetrieveResponse:
        funnel = app.state.served.require_funnel()
        found = funnel.retrieve(body.query, body.k)
        return RetrieveResponse(
            products=[RetrievedProduct(product_id=p, cosine=c) for p, c in zip(found.product_ids.tolist(),
                                                                               found.cosines.tolist())],
            meta=RetrieveMeta(query=found.query, query_encoded=found.encoded, indexed_products=len(funnel.index),
                              index=funnel.index.kind))

    @app.post("/recommend", response_model=RecommendResponse,
              summary="Retrieve candidates for a query, rank them for the shopper, return the best k",
              description="Retrieves candidates_n products like POST /retrieve, scores them with the pCTR model "
                          "(the path of POST /score) and returns the k with the highest click probability, best "
                          "first. Product-level features ("
                          + (", ".join(e["field"] for e in split["product"]) or "none")
                          + ") come from the served per-product file (defaults for a product without "
                            "impressions); the request-level ones from `features`, each with its default.",
              dependencies=[Depends(require_json)], responses=recommend_errors)
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        served_now = app.state.served
        funnel = served_now.require_funnel()
        found = funnel.retrieve(body.query, body.candidates_n)
        dense, sparse = funnel.features.arrays(found.product_ids, *request_feature_values(body))
        encoded = served_now.scorer.encoder.encode_arrays(body, found.product_ids, dense, sparse)
        probs = (await batcher.score(encoded)).numpy()
        bad = np.flatnonzero(~np.isfinite(probs)).tolist()
        if bad:
            raise NonFiniteScoreError(bad)
        best = np.lexsort((found.product_ids, -found.cosines, -probs))[:body.k]
        return RecommendResponse(
            products=[RecommendedProduct(product_id=int(found.product_ids[i]), cosine=float(found.cosines[i]),
                                         score=float(probs[i])) for i in best],
            meta=RecommendMeta(**encoded.meta, model=served_now.scorer.model_hash, query_encoded=found.encoded,
                               retrieved=len(found.product_ids)))

    @app.get("/healthz", summary="Liveness and what is served", responses=other_errors)
    async def healthz() -> dict:
        served_now: Served = app.state.served
        scorer_now = served_now.scorer
        return {"status": "ok", "model": scorer_now.model_hash, "variant": scorer_now.manifest["variant"],
                "table_dtype": scorer_now.manifest["table_dtype"], "products": scorer_now.spec.num_product_rows - 1,
                "added_products": (scorer_now.added or {}).get("added_products", 0),
                "funnel": served_now.funnel is not None, "funnel_error": served_now.funnel_error,
                "reload_error": watch.error if watch is not None else None}

    return app


class ServiceProcess:
    """``python -m serving.server`` on a free localhost port in a subprocess; a context manager."""

    def __init__(self, workdir: Path, threads: int, max_candidates: int, start_timeout_s: float = 120.0,
                 workers: int = 1, batch: bool = True) -> None:
        self.workdir, self.threads, self.max_candidates = workdir, threads, max_candidates
        self.workers, self.batch = workers, batch
        self.worker_count = workers or default_workers()
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> "ServiceProcess":
        import httpx

        argv = [sys.executable, "-m", "serving.server", "--workdir", str(self.workdir), "--port", str(self.port),
                "--threads", str(self.threads), "--max-candidates", str(self.max_candidates),
                "--workers", str(self.workers), "--batch" if self.batch else "--no-batch"]
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
                if (self._ready_workers() >= self.worker_count
                        and httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200):
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise UserError(f"the scoring service did not answer /healthz within {self.start_timeout_s:.0f} s")
            time.sleep(0.1)

    def _ready_workers(self) -> int:
        """Workers that serve (else the first one up would accept every connection of a load test)."""
        return (self.workdir / "serving" / "server.log").read_text().count(READY_LINE)

    @property
    def pid(self) -> int:
        """The server's process id (with ``workers`` > 1, the supervisor of the worker processes)."""
        assert self._proc is not None
        return self._proc.pid

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


WORKER_CONFIG_ENV = "DASHREC_SERVER_CONFIG"
# uvicorn's supervisor kills a worker that does not answer its ping within this time, and a worker
# starting on a busy machine (importing torch, loading the model) can take far more than its 5 s default
WORKER_HEALTHCHECK_S = 120


def default_workers() -> int:
    """One worker process per CPU core this process may run on."""
    return available_cores()


def http_implementation() -> str:
    """What uvicorn's ``http="auto"``, ``loop="auto"`` pick: httptools and uvloop when installed."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{http} + {'uvloop' if importlib.util.find_spec('uvloop') else 'asyncio'}"


def build_app(cfg: ServerConfig) -> FastAPI:
    """One worker's app: its torch threads set, the served files loaded."""
    torch.set_num_threads(resolve_threads(cfg.threads))
    workdir, encoder = Path(cfg.workdir), EncoderOnce(Path(cfg.workdir))
    return create_app(load_served(workdir, encoder), cfg.max_candidates, cfg.max_body_mb, cfg.max_dense_z,
                      cfg.batch, reload=lambda: load_served(workdir, encoder), watch_s=cfg.watch_s)


def worker_app() -> FastAPI:
    """uvicorn's app factory in each worker process (``--workers`` > 1): the config comes from the parent."""
    return build_app(ServerConfig(**json.loads(os.environ[WORKER_CONFIG_ENV])))


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    cfg = parse_config(ServerConfig, argv)
    workers = cfg.workers or default_workers()
    options = {"host": cfg.host, "port": cfg.port, "log_level": cfg.log_level,
               "access_log": cfg.log_level in ("info", "debug")}
    if workers == 1:
        app = build_app(cfg)
        scorer_manifest, model_hash = app.state.served.scorer.manifest, app.state.served.scorer.model_hash
    else:
        scorer = Scorer(cfg.workdir)  # a bad export fails here, once, before any worker starts
        scorer_manifest, model_hash = scorer.manifest, scorer.model_hash
        del scorer
    print(f"serving {scorer_manifest['variant']} (model {model_hash}) on http://{cfg.host}:{cfg.port}: "
          f"{workers} worker(s), {resolve_threads(cfg.threads)} torch thread(s) each, {http_implementation()} HTTP, "
          f"{'batched' if cfg.batch else 'one model call per request'}", flush=True)
    if workers == 1:
        uvicorn.run(app, **options)
    else:
        os.environ[WORKER_CONFIG_ENV] = json.dumps(asdict(cfg))
        uvicorn.run("serving.server:worker_app", factory=True, workers=workers,
                    timeout_worker_healthcheck=WORKER_HEALTHCHECK_S, **options)


if __name__ == "__main__":
    run_main(main)
