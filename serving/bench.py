"""Serving latency (paper section 4.3.2): fused tables vs vectors fetched from Redis, and the HTTP service.

``python -m serving.bench --workdir DIR [--iters 200] [--threads 1] [--candidates 1 64 512]
[--http-clients 8] [--http-requests 4000] [--http-candidates 64] [--http-seconds 60]
[--http-sequential 300] [--http-workers 0] [--http-batch | --no-http-batch] [--funnel-candidates 200]
[--funnel-k 10] [--seed 0]``

Needs ``python -m serving.export`` first and the ``redis-server`` binary. Requests are built from
the evaluation-week impressions (a random impression gives the shopper, query and time; the
candidates are random NW impressions' products with their features), validated and encoded by
the service's own code (:mod:`serving.requests`). Per candidate count (1, 64, 512) it times, on
``--threads`` torch threads, ``--iters`` calls after a warm-up:

``encode``         request model -> tensors (id maps, history lookup); shared by both paths.
``fused``          the fused TorchScript model (``serving/model.pt``, tables inside).
``vectors_model``  the vectors TorchScript model (``serving/model_vectors.pt``) on vectors already in memory.
                   It takes the purchase history once per request (``[1, L, d]``, broadcast), while the
                   fused model's EBC pools the same history bag once per candidate.
``redis_fetch``    one ``MGET`` of the query, candidate and history vectors from a real ``redis-server``
                   on localhost (started here on a free port; float32 blobs keyed by id) + decoding.
``fetch_and_model`` fetch + vectors model: the feature-store alternative, end to end.

The same comparison on the funnel, when the export has one (the product index, the DashCLIP
tables and checkpoint), with ``POST /recommend``'s requests (``recommend``, ``--funnel-candidates``
retrieved and ranked): ``retrieve_and_encode`` (kNN retrieval, the candidates' product-level
features, request -> tensors), ``fused`` (that + the fused model) and ``fetch_and_model`` (that +
the Redis fetch + the vectors model), in process like the cells above.

Then the real service (``python -m serving.server`` in a subprocess on a free localhost port,
``--http-workers`` processes, 0 = the server's default), with ``--http-candidates`` candidates per request
in both forms, ``POST /score`` (a list of candidate objects) and ``POST /score/columns`` (one
array per field):

``sequential``  one client, one request at a time (``--http-sequential`` per form), interleaved
                with calls of the model alone (``fused``, in this process) on the same requests:
                client-observed and server-side p50/p99 (the ``server-timing`` header: the
                service's own handling time) against the model's p50, measured side by side.
``load``        ``--http-clients`` keep-alive connections send ``--http-requests`` requests in all
                (stopping after ``--http-seconds``), each its next one as soon as its answer is
                complete: requests/s, p50/p99 (client and server side), errors, and the CPU time
                per request of the service (all its processes, from psutil) and of the load
                generator. The load generator (one thread, non-blocking sockets, request bytes
                built once) runs in this process and shares the machine's cores with the service.

``funnel``      when the service has its funnel (the product index, the DashCLIP tables and
                checkpoint): one client, one request at a time (``--http-sequential`` each), of
                ``POST /retrieve`` (k = ``--funnel-k``) with a query of the query table and with a
                new query (a catalog title, encoded by DashCLIP for the request), and of
                ``POST /recommend`` (retrieve ``--funnel-candidates``, rank, return ``--funnel-k``;
                shopper, query, time and request-level features from a NW impression).

Targets (issue #13; 2-core machine, 64 candidates, 8 clients): >= 1,000 requests/s and p99 <= 25 ms
under load, the one-client server-side p50 within 5x the model's own p50, and ``/recommend``
(200 retrieved, 10 returned, one client) p99 <= 30 ms.

The in-process timings use the export's model (:class:`serving.server.Scorer` without the added
set); the service serves what is published (the added set when there is one).

Writes ``DIR/serving/bench.json`` and ``DIR/serving/bench.md`` (Markdown tables; the report embeds
it) and prints the paper comparison: fusion overhead at p99 (``fused - vectors_model``; paper:
under 4 ms) and the fetch cost relative to the model (``redis_fetch / vectors_model`` at p50;
paper: about 5x).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import selectors
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import pyarrow.parquet as pq
import torch

from common.cli import (DEFAULT_WORKDIR, UserError, check_config, parse_config, resolve_threads, run_main,
                        threads_field)
from common.io import file_sha256, prepare_workdir, read_json, write_json, write_text
from common.provenance import MadeFrom, OutputSet
from common.seed import seed_everything
from data.dataset import input_hashes
from data.schema import SchemaError
from embeddings.tables import EmbeddingTable, embedding_table_path, read_table_keys, tables_set
from ranking.features import ImpressionCache
from serving.index import index_set
from serving.published import ENCODER_CHECKPOINT, added_set, published_export
from serving.redis_store import RedisServer, RedisUnavailable, VectorStore
from serving.funnel import FunnelUnavailable, load_encoder_once, load_funnel
from serving.requests import (EncodedRequest, build_recommend_request_model, feature_key,
                              request_feature_values)
from serving.server import Scorer, ServiceProcess, http_implementation

log = logging.getLogger("serving.bench")

PAPER_FUSION_OVERHEAD_P99_MS = 4.0
PAPER_FETCH_RATIO = 5.0
REQUEST_POOL = 32  # distinct requests per candidate count, cycled through the timed calls
# issue #13: POST /score at 64 candidates, 8 clients, on a 2-core machine
HTTP_TARGET_RPS = 1000.0
HTTP_TARGET_P99_MS = 25.0
HTTP_TARGET_MODEL_RATIO = 5.0  # server-side handling time p50 / the model's own p50, one client
RECOMMEND_TARGET_P99_MS = 30.0  # POST /recommend, 200 retrieved, 10 returned, one client


@dataclass
class ServingBenchConfig:
    """Latency of the exported model: fused tables vs Redis-fetched vectors, and the HTTP service."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory (needs DIR/serving from serving.export)"})
    iters: int = field(default=200, metadata={"help": "timed calls per setting (after --warmup)", "min": 1})
    warmup: int = field(default=20, metadata={"help": "untimed calls per setting", "min": 0})
    threads: int = threads_field(of="process (the bench's and the server's it starts)")
    candidates: list[int] = field(default_factory=lambda: [1, 64, 512], metadata={"help": "candidate counts", "min": 1,
                                                                                  "min_items": 1})
    http_clients: int = field(default=8, metadata={"help": "concurrent HTTP clients in the load test (0 = skip it)",
                                                   "min": 0})
    http_requests: int = field(default=4000, metadata={"help": "total requests of each load test (per form)", "min": 1})
    http_candidates: int = field(default=64, metadata={"help": "candidates per load-test request", "min": 1})
    http_seconds: float = field(default=60.0, metadata={"help": "time cap of each load test", "gt": 0.0})
    http_sequential: int = field(default=300, metadata={
        "help": "one-client requests per form, interleaved with calls of the model alone", "min": 1})
    http_workers: int = field(default=0, metadata={"help": "server worker processes (0 = the server's default)",
                                                   "min": 0})
    http_batch: bool = field(default=True, metadata={"help": "the server batches concurrent requests"})
    funnel_candidates: int = field(default=200, metadata={"help": "POST /recommend: candidates retrieved and ranked",
                                                          "min": 1})
    funnel_k: int = field(default=10, metadata={"help": "POST /retrieve and /recommend: products returned", "min": 1})
    seed: int = field(default=0, metadata={"help": "which impressions make the requests", "min": 0})
    force: bool = field(default=False, metadata={"help": "run again even when bench.json has these settings"})

    def check(self) -> None:
        """The rules between fields (common.cli.check_config runs the per-field ones first)."""
        if self.funnel_k > self.funnel_candidates:
            raise UserError(f"--funnel-k ({self.funnel_k}) must not exceed --funnel-candidates "
                            f"({self.funnel_candidates})")


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """``{p50_ms, p99_ms, mean_ms, n}`` of a list of durations in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(len(ms))}


def time_interleaved(calls: dict[str, Callable[[int], object]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Durations (seconds) of every ``calls[name](i)`` for ``i`` in ``range(iters)``, after ``warmup``
    untimed rounds. The calls take turns within each round, so a burst of load from elsewhere on
    the machine hits every path alike and their ratios stay fair."""
    for i in range(warmup):
        for fn in calls.values():
            fn(i)
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(iters):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn(i)
            out[name].append(time.perf_counter() - start)
    return out


def build_requests(cache: ImpressionCache, spec, count: int, candidates: int,
                   rng: np.random.Generator) -> list[dict]:
    """``count`` JSON request bodies from NW impressions (see module docstring)."""
    eval_rows = np.asarray(cache.split_index("eval"))
    if len(eval_rows) == 0:
        raise UserError(f"{cache.directory}: no NW impressions to build benchmark requests from")
    cols = cache.columns
    dense_keys = [feature_key(c) for c in spec.dense_names]
    sparse_keys = [feature_key(c) for c in spec.sparse_names]
    bodies = []
    for _ in range(count):
        anchor = int(rng.choice(eval_rows))
        rows = np.sort(rng.choice(eval_rows, size=candidates, replace=candidates > len(eval_rows)))
        dense, sparse, products = cols["dense"][rows], cols["sparse"][rows], cols["product_id"][rows]
        bodies.append({
            "user_id": int(cols["user_id"][anchor]), "query": cache.query_text(int(cols["query_code"][anchor])),
            "now": int(cols["ts"][anchor]),
            "candidates": [{"product_id": int(products[i]),
                            "dense": {k: float(v) for k, v in zip(dense_keys, dense[i])},
                            "sparse": {k: int(v) for k, v in zip(sparse_keys, sparse[i])}} for i in range(candidates)],
        })
    return bodies


def model_tables(scorer: Scorer) -> tuple[EmbeddingTable, EmbeddingTable]:
    """The fp32 tables of the exported model's checkpoint, keyed like the exported id maps."""
    from ranking.model import load_model
    from serving.export import table_vectors

    model = load_model(scorer.workdir / scorer.manifest["checkpoint"]["path"])
    if model.table_tower is None:
        raise UserError(f"variant {scorer.manifest['variant']} has no tables: nothing to fetch from a feature store")
    product, query = table_vectors(model)
    spec = scorer.spec
    return (EmbeddingTable("product", spec.product_keys, product.numpy()),
            EmbeddingTable("query", spec.query_keys, query.numpy()))


def bench_models(cfg: ServingBenchConfig, scorer: Scorer, store: VectorStore, cache: ImpressionCache,
                 vectors_model: torch.jit.ScriptModule) -> dict[str, dict]:
    """Timings per candidate count (see module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    request_model = scorer.request_model(max(cfg.candidates))
    results: dict[str, dict] = {}
    for n in cfg.candidates:
        bodies = build_requests(cache, scorer.spec, REQUEST_POOL, n, rng)
        parsed = [request_model.model_validate(b) for b in bodies]
        encoded: list[EncodedRequest] = [scorer.encoder.encode(r) for r in parsed]
        in_memory = [store.model_inputs(e) for e in encoded]  # vectors fetched once, for the model-only timing
        pick = len(encoded)
        with torch.inference_mode():
            timings = time_interleaved({
                "encode": lambda i: scorer.encoder.encode(parsed[i % pick]),
                "fused": lambda i: scorer.model(*encoded[i % pick].fused_inputs()),
                "vectors_model": lambda i: vectors_model(*in_memory[i % pick]),
                "redis_fetch": lambda i: store.model_inputs(encoded[i % pick]),
                "fetch_and_model": lambda i: vectors_model(*store.model_inputs(encoded[i % pick])),
            }, cfg.iters, cfg.warmup)
        results[str(n)] = {name: percentiles(t) for name, t in timings.items()}
        r = results[str(n)]
        r["history_length_mean"] = float(np.mean([e.meta["history_length"] for e in encoded]))
        r["fusion_overhead_p99_ms"] = r["fused"]["p99_ms"] - r["vectors_model"]["p99_ms"]
        r["fusion_overhead_p50_ms"] = r["fused"]["p50_ms"] - r["vectors_model"]["p50_ms"]
        r["fetch_over_model_p50"] = r["redis_fetch"]["p50_ms"] / r["vectors_model"]["p50_ms"]
        r["fetch_path_over_fused_p50"] = r["fetch_and_model"]["p50_ms"] / r["fused"]["p50_ms"]
        log.info("%d candidates: fused p50 %.3f ms, fetch+model p50 %.3f ms", n, r["fused"]["p50_ms"],
                 r["fetch_and_model"]["p50_ms"])
    return results


def bench_recommend_paths(cfg: ServingBenchConfig, scorer: Scorer, store: VectorStore, cache: ImpressionCache,
                          vectors_model: torch.jit.ScriptModule) -> dict:
    """``POST /recommend``'s work in process, fused tables against the Redis fetch (module docstring);
    ``{"skipped": why}`` without a funnel."""
    try:
        funnel = load_funnel(cfg.workdir, scorer.spec, scorer.manifest, None, lambda: load_encoder_once(cfg.workdir),
                             scorer.query_table)
    except FunnelUnavailable as exc:
        return {"skipped": str(exc)}
    request_model = build_recommend_request_model(scorer.spec, scorer.manifest["features"], cfg.funnel_candidates)
    bodies = recommend_requests(cfg, cache, scorer, np.random.default_rng([cfg.seed, 3]))
    parsed = [request_model.model_validate(b) for b in bodies]

    def candidates(i: int) -> EncodedRequest:
        request = parsed[i % len(parsed)]
        found = funnel.retrieve(request.query, request.candidates_n)
        dense, sparse = funnel.features.arrays(found.product_ids, *request_feature_values(request))
        return scorer.encoder.encode_arrays(request, found.product_ids, dense, sparse)

    with torch.inference_mode():
        timings = time_interleaved({
            "retrieve_and_encode": candidates,
            "fused": lambda i: scorer.model(*candidates(i).fused_inputs()),
            "fetch_and_model": lambda i: vectors_model(*store.model_inputs(candidates(i))),
        }, cfg.iters, cfg.warmup)
    result = {"candidates": cfg.funnel_candidates, **{name: percentiles(t) for name, t in timings.items()}}
    result["fetch_path_over_fused_p50"] = result["fetch_and_model"]["p50_ms"] / result["fused"]["p50_ms"]
    log.info("/recommend in process: fused p50 %.3f ms, fetch path p50 %.3f ms", result["fused"]["p50_ms"],
             result["fetch_and_model"]["p50_ms"])
    return result


def columns_body(body: dict) -> dict:
    """The same request with its candidates column-wise (``POST /score/columns``)."""
    rows = body["candidates"]
    columns: dict = {"product_id": [c["product_id"] for c in rows]}
    for group in ("dense", "sparse"):
        columns[group] = {key: [c[group][key] for c in rows] for key in rows[0][group]}
    return {**body, "candidates": columns}


def host_port(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://`` URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 80)


def http_request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    """A complete HTTP/1.1 keep-alive POST of a JSON body."""
    return (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class _Response:
    """Incremental reader of one HTTP/1.1 response with a ``content-length``."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self._size: int | None = None

    def feed(self, data: bytes) -> bool:
        """Add received bytes; True once the response is complete."""
        self.buffer += data
        if self._size is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if "content-length" not in self.headers:
                raise ConnectionError(f"HTTP {self.status} without content-length")
            self._size = end + 4 + int(self.headers["content-length"])
        return len(self.buffer) >= self._size

    @property
    def body(self) -> bytes:
        return bytes(self.buffer[self.buffer.find(b"\r\n\r\n") + 4:])

    def server_ms(self) -> float | None:
        """``dur`` of the ``server-timing`` header (the service's own handling time), if any."""
        timing = self.headers.get("server-timing", "")
        for part in timing.split(";"):
            if part.strip().startswith("dur="):
                return float(part.strip()[4:])
        return None


class RawConnection:
    """One blocking keep-alive connection (a lean client: raw socket, pre-built request bytes)."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, data: bytes) -> _Response:
        self.sock.sendall(data)
        response = _Response()
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            if response.feed(chunk):
                return response

    def close(self) -> None:
        self.sock.close()


def load_test(url: str, bodies: list[bytes], clients: int, total: int, seconds: float) -> dict:
    """``clients`` keep-alive connections POST ``bodies`` (cycled) to ``url`` until ``total`` requests
    or ``seconds``: each sends its next request as soon as its previous answer is complete.

    A lean load generator, so that it takes little of the CPU it shares with the service: one thread,
    non-blocking sockets (``selectors``), the request bytes built once. Returns requests/s, the
    client-observed p50/p99, the service's own handling time (``server-timing``) p50/p99, errors
    and this process's CPU time per request.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [http_request_bytes(host, port, parts.path, b) for b in bodies]
    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    state = {"issued": 0}
    deadline = time.monotonic() + seconds

    class Client:
        sock: socket.socket
        out: memoryview
        response: _Response
        start: float

    def connect(client: Client) -> None:
        client.sock = socket.create_connection((host, port))
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sock.setblocking(False)
        selector.register(client.sock, selectors.EVENT_WRITE, client)

    def next_request(client: Client) -> bool:
        if state["issued"] >= total or time.monotonic() > deadline:
            selector.unregister(client.sock)
            client.sock.close()
            return False
        client.out = memoryview(requests[state["issued"] % len(requests)])
        state["issued"] += 1
        client.response = _Response()
        client.start = time.perf_counter()
        selector.modify(client.sock, selectors.EVENT_WRITE, client)
        return True

    def fail(client: Client, problem: str) -> bool:
        errors.append(problem)
        selector.unregister(client.sock)
        client.sock.close()
        connect(client)
        return next_request(client)

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    active = 0
    for _ in range(clients):
        client = Client()
        connect(client)
        active += next_request(client)
    while active:
        events = selector.select(timeout=30.0)
        if not events:
            errors.extend(["no answer within 30 s"] * active)
            break
        for key, mask in events:
            client = key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    sent = client.sock.send(client.out)
                    client.out = client.out[sent:]
                    if not client.out:
                        selector.modify(client.sock, selectors.EVENT_READ, client)
                    continue
                chunk = client.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                if not client.response.feed(chunk):
                    continue
            except (OSError, ValueError) as exc:
                active -= not fail(client, f"{type(exc).__name__}: {exc}")
                continue
            response = client.response
            if response.status == 200:
                latencies.append(time.perf_counter() - client.start)
                ms = response.server_ms()
                if ms is not None:
                    server_ms.append(ms / 1e3)
            else:
                errors.append(f"HTTP {response.status}: {response.body[:200]!r}")
            active -= not next_request(client)
    wall = time.perf_counter() - wall_start
    done = len(latencies) + len(errors)
    out = {"clients": clients, "requests": done, "errors": len(errors), "error_examples": errors[:3],
           "seconds": wall, "requests_per_s": done / wall,
           "client_cpu_ms_per_request": (time.process_time() - cpu_start) / max(done, 1) * 1e3}
    if latencies:
        out.update(percentiles(latencies))
    if server_ms:
        out["server"] = percentiles(server_ms)
    return out


def _cpu_seconds(processes: Sequence[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of each live process, by pid."""
    out = {}
    for proc in processes:
        try:
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return out


def service_cpu(service: ServiceProcess, run: Callable[[], dict]) -> dict:
    """``run()``'s result plus the service's CPU time per request (all its processes) and each worker's share."""
    parent = psutil.Process(service.pid)
    processes = [parent, *(p for p in parent.children(recursive=True)
                           if "resource_tracker" not in " ".join(p.cmdline()))]  # multiprocessing's helper
    before = _cpu_seconds(processes)
    result = run()
    after = _cpu_seconds(processes)
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    total = sum(used.values())
    result["server_cpu_ms_per_request"] = total / max(result["requests"], 1) * 1e3
    # what the machine's cores could serve with nothing else running: CPU time is what other jobs'
    # load inflates least (wall-clock figures on a shared machine measure the sharing)
    # (the workers can use at most min(workers, cores) cores, and the load generator needs its share)
    server_ms, client_ms = result["server_cpu_ms_per_request"], result["client_cpu_ms_per_request"]
    cores = os.cpu_count() or 1
    result["cpu_capacity_requests_per_s"] = min(cores * 1e3 / (server_ms + client_ms),
                                                min(cores, service.worker_count) * 1e3 / server_ms) if server_ms > 0 else 0.0
    workers = sorted((v for pid, v in used.items() if pid != parent.pid or len(processes) == 1), reverse=True)
    result["worker_cpu_shares"] = [round(v / total, 3) if total > 0 else 0.0 for v in workers]
    return result


def sequential(service: ServiceProcess, forms: dict[str, list[bytes]], encoded: list[EncodedRequest],
               scorer: Scorer, count: int) -> dict:
    """One client, one request at a time, interleaved with calls of the model alone on the same
    requests in this process (so a burst of load from elsewhere hits both alike): the latency of
    the HTTP path without queueing, against the model's own."""
    host, port = host_port(service.url)
    requests = {path: [http_request_bytes(host, port, path, b) for b in bodies] for path, bodies in forms.items()}
    connections = {path: RawConnection(host, port) for path in forms}
    client: dict[str, list[float]] = {path: [] for path in forms}
    server: dict[str, list[float]] = {path: [] for path in forms}
    model: list[float] = []
    errors: list[str] = []
    try:
        with torch.inference_mode():
            for i in range(count):
                inputs = encoded[i % len(encoded)].fused_inputs()
                start = time.perf_counter()
                scorer.model(*inputs)
                model.append(time.perf_counter() - start)
                for path, connection in connections.items():
                    start = time.perf_counter()
                    response = connection.request(requests[path][i % len(requests[path])])
                    elapsed = time.perf_counter() - start
                    if response.status != 200:
                        errors.append(f"{path}: HTTP {response.status}: {response.body[:200]!r}")
                        continue
                    client[path].append(elapsed)
                    ms = response.server_ms()
                    if ms is not None:
                        server[path].append(ms / 1e3)
    finally:
        for connection in connections.values():
            connection.close()
    out: dict = {"requests": count, "errors": len(errors), "error_examples": errors[:3],
                 "model": percentiles(model)}
    for path in forms:
        if client[path]:
            out[path] = {"client": percentiles(client[path]),
                         **({"server": percentiles(server[path])} if server[path] else {})}
    return out


def timed_requests(service: ServiceProcess, path: str, bodies: list[bytes], count: int) -> dict:
    """``count`` POSTs of ``bodies`` (cycled) to ``path`` on one keep-alive connection, one at a time:
    client-observed and server-side (``server-timing``) p50/p99, and the errors."""
    host, port = host_port(service.url)
    requests = [http_request_bytes(host, port, path, b) for b in bodies]
    connection = RawConnection(host, port)
    client: list[float] = []
    server: list[float] = []
    errors: list[str] = []
    try:
        for i in range(count):
            start = time.perf_counter()
            response = connection.request(requests[i % len(requests)])
            elapsed = time.perf_counter() - start
            if response.status != 200:
                errors.append(f"{path}: HTTP {response.status}: {response.body[:200]!r}")
                continue
            client.append(elapsed)
            ms = response.server_ms()
            if ms is not None:
                server.append(ms / 1e3)
    finally:
        connection.close()
    out: dict = {"path": path, "requests": count, "errors": len(errors), "error_examples": errors[:3]}
    if client:
        out["client"] = percentiles(client)
    if server:
        out["server"] = percentiles(server)
    return out


def recommend_requests(cfg: ServingBenchConfig, cache: ImpressionCache, scorer: Scorer,
                       rng: np.random.Generator) -> list[dict]:
    """JSON bodies of ``POST /recommend``: the user, query, time and request features of
    :data:`REQUEST_POOL` evaluation-week impressions drawn from ``rng``."""
    eval_rows = np.asarray(cache.split_index("eval"))
    cols, spec = cache.columns, scorer.spec
    split = scorer.manifest["features"]
    names = {"dense": spec.dense_names, "sparse": spec.sparse_names}
    convert = {"dense": float, "sparse": int}
    recommend = []
    for anchor in rng.choice(eval_rows, size=REQUEST_POOL):
        features = {kind: {e["field"]: convert[kind](cols[kind][anchor, names[kind].index(e["column"])])
                           for e in split["request"] if e["kind"] == kind} for kind in ("dense", "sparse")}
        recommend.append({"user_id": int(cols["user_id"][anchor]), "query": cache.query_text(int(cols["query_code"][anchor])),
                          "now": int(cols["ts"][anchor]), "k": cfg.funnel_k, "candidates_n": cfg.funnel_candidates,
                          "features": features})
    return recommend


def funnel_requests(cfg: ServingBenchConfig, cache: ImpressionCache, scorer: Scorer,
                    rng: np.random.Generator) -> dict[str, list[dict]]:
    """JSON bodies of the funnel rows (see the module docstring): ``recommend``
    (:func:`recommend_requests`), ``retrieve`` (their queries that the query table holds) and
    ``retrieve_encoded`` (catalog titles that it does not)."""
    recommend = recommend_requests(cfg, cache, scorer, rng)
    known = read_table_keys(embedding_table_path(cfg.workdir, "query"), "query")[1]
    in_table = [{"query": body["query"], "k": cfg.funnel_k} for body, row in
                zip(recommend, known.rows([body["query"] for body in recommend], normalized=True)) if row]
    titles = rng.permutation(np.array(pq.read_table(Path(cfg.workdir) / "data" / "catalog.parquet", columns=["title"])
                                      .column(0).to_pylist(), dtype=object)).tolist()
    new = [t for t, row in zip(titles, known.rows(titles)) if not row]
    return {"retrieve": in_table, "retrieve_encoded": [{"query": t, "k": cfg.funnel_k} for t in new[:REQUEST_POOL]],
            "recommend": recommend}


def bench_funnel(cfg: ServingBenchConfig, service: ServiceProcess, cache: ImpressionCache, scorer: Scorer) -> dict:
    """One client: ``POST /retrieve`` (query in the table, and encoded for the request) and
    ``POST /recommend``, ``--http-sequential`` requests each after a warm-up."""
    bodies = funnel_requests(cfg, cache, scorer, np.random.default_rng([cfg.seed, 2]))
    paths = {"retrieve": "/retrieve", "retrieve_encoded": "/retrieve", "recommend": "/recommend"}
    rows = {}
    for name, path in paths.items():
        encoded = [json.dumps(b).encode() for b in bodies[name]]
        if not encoded:
            continue
        timed_requests(service, path, encoded, min(len(encoded), 20))  # warm-up
        rows[name] = timed_requests(service, path, encoded, cfg.http_sequential)
    p99 = rows["recommend"].get("client", {}).get("p99_ms", float("inf"))
    return {"candidates": cfg.funnel_candidates, "k": cfg.funnel_k, "rows": rows,
            "target": {"recommend_p99_ms": RECOMMEND_TARGET_P99_MS, "value": p99,
                       "met": p99 <= RECOMMEND_TARGET_P99_MS},
            "errors": sum(r["errors"] for r in rows.values())}


def bench_http(cfg: ServingBenchConfig, scorer: Scorer, cache: ImpressionCache) -> dict:
    """The service under load (see module docstring)."""
    rng = np.random.default_rng([cfg.seed, 1])
    requests = build_requests(cache, scorer.spec, REQUEST_POOL, cfg.http_candidates, rng)
    forms = {"/score": [json.dumps(b).encode() for b in requests],
             "/score/columns": [json.dumps(columns_body(b)).encode() for b in requests]}
    request_model = scorer.request_model(cfg.http_candidates)
    encoded = [scorer.encoder.encode(request_model.model_validate(b)) for b in requests]
    with ServiceProcess(scorer.workdir, cfg.threads, max(cfg.http_candidates, cfg.funnel_candidates),
                        workers=cfg.http_workers, batch=cfg.http_batch) as service:
        warm = max(cfg.http_clients * 4, 8)
        for path, bodies in forms.items():  # every worker's first requests, and the model in this process
            load_test(f"{service.url}{path}", bodies, cfg.http_clients, warm, cfg.http_seconds)
        with torch.inference_mode():
            for e in encoded[:4]:
                scorer.model(*e.fused_inputs())
        alone = sequential(service, forms, encoded, scorer, cfg.http_sequential)
        load = {path: service_cpu(service, lambda path=path, bodies=bodies: load_test(
                    f"{service.url}{path}", bodies, cfg.http_clients, cfg.http_requests, cfg.http_seconds))
                for path, bodies in forms.items()}
        health = httpx.get(f"{service.url}/healthz", timeout=30.0).json()
        funnel = bench_funnel(cfg, service, cache, scorer) if health["funnel"] else {"skipped": health["funnel_error"]}
    model_p50 = alone["model"]["p50_ms"]
    rows, rows_load = alone.get("/score", {}), load["/score"]
    ratios = {"server_p50_over_model_p50": rows.get("server", {}).get("p50_ms", float("nan")) / model_p50,
              "client_p50_over_model_p50": rows.get("client", {}).get("p50_ms", float("nan")) / model_p50,
              "load_server_p50_over_model_p50": rows_load.get("server", {}).get("p50_ms", float("nan")) / model_p50}
    targets = {"requests_per_s": {"target": HTTP_TARGET_RPS, "value": rows_load["requests_per_s"],
                                  "met": rows_load["requests_per_s"] >= HTTP_TARGET_RPS},
               "p99_ms": {"target": HTTP_TARGET_P99_MS, "value": rows_load.get("p99_ms", float("nan")),
                          "met": rows_load.get("p99_ms", float("inf")) <= HTTP_TARGET_P99_MS},
               "server_p50_over_model_p50": {"target": HTTP_TARGET_MODEL_RATIO,
                                             "value": ratios["server_p50_over_model_p50"],
                                             "met": ratios["server_p50_over_model_p50"] <= HTTP_TARGET_MODEL_RATIO}}
    return {"candidates": cfg.http_candidates, "clients": cfg.http_clients, "workers": service.worker_count,
            "batch": cfg.http_batch, "http_implementation": http_implementation(), "sequential": alone,
            "load": load, "ratios": ratios, "targets": targets, "funnel": funnel,
            "errors": alone["errors"] + sum(r["errors"] for r in load.values()) + funnel.get("errors", 0)}



def markdown(results: dict) -> str:
    """``bench.md``: the latency table, the paper comparison and the load test."""
    env = results["environment"]
    load = env["load_average_1min"]
    lines = [f"Command: `{results['command']}`. Machine: {env['cpu_count']} CPU cores (1-minute load average "
             f"{load['start']:.1f} at the start, {load['end']:.1f} at the end), {env['machine']}, "
             f"torch {env['torch']} with {results['settings']['threads']} intra-op thread(s); model "
             f"`{results['model']['variant']}` ({results['model']['table_dtype']} tables, "
             f"{results['model']['product_rows']} x {results['model']['table_dim']} product table). "
             f"{results['settings']['iters']} timed calls per cell, the paths taking turns; milliseconds, p50 / p99.", "",
             "| candidates | encode request | fused model (tables inside) | vectors model | Redis fetch (MGET) "
             "| fetch + vectors model | fusion overhead p99 (ms) | fetch / model p50 |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in results["latency"].items():
        cell = lambda k: f"{r[k]['p50_ms']:.3f} / {r[k]['p99_ms']:.3f}"  # noqa: E731
        lines.append(f"| {n} | {cell('encode')} | {cell('fused')} | {cell('vectors_model')} | {cell('redis_fetch')} "
                     f"| {cell('fetch_and_model')} | {r['fusion_overhead_p99_ms']:+.3f} | {r['fetch_over_model_p50']:.1f}x |")
    cmp = results["paper_comparison"]
    lines += ["", f"Paper: fusing the tables adds under {PAPER_FUSION_OVERHEAD_P99_MS:g} ms at p99; here at most "
                  f"{cmp['max_fusion_overhead_p99_ms']:+.3f} ms. Paper: fetching costs about {PAPER_FETCH_RATIO:g}x "
                  f"the model's own latency; here the Redis fetch is {cmp['fetch_over_model_p50_min']:.1f}x to "
                  f"{cmp['fetch_over_model_p50_max']:.1f}x the vectors model (p50), and fetch + model is "
                  f"{cmp['fetch_path_over_fused_p50_min']:.1f}x to {cmp['fetch_path_over_fused_p50_max']:.1f}x "
                  f"the fused model. The vectors model pools the purchase history once per request; the fused "
                  f"model pools the same bag once per candidate inside its EBC."]
    lines += recommend_paths_markdown(results["recommend_paths"])
    http = results.get("http")
    if http:
        seq, load, ratios = http["sequential"], http["load"], http["ratios"]
        model = seq["model"]

        def ms(part: dict, key: str) -> str:
            return f"{part[key]:.2f}" if key in part else "n/a"

        lines += ["", f"HTTP service: {http['workers']} worker process(es), {http['http_implementation']}, "
                      f"{'batching concurrent requests' if http['batch'] else 'one model call per request'}; "
                      f"{http['candidates']} candidates per request. Model alone (same requests, interleaved with "
                      f"the one-client requests): p50 {model['p50_ms']:.3f} / p99 {model['p99_ms']:.3f} ms. "
                      f"Server side = the service's `server-timing` (its own handling time).", "",
                  "| POST | clients | requests | errors | requests/s | client p50 / p99 ms | server p50 / p99 ms "
                  "| server CPU ms/request | load generator CPU ms/request | CPU-bound capacity requests/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for path in ("/score", "/score/columns"):
            part = seq.get(path)
            if part:
                server = part.get("server", {})
                lines.append(f"| {path} | 1 | {part['client']['n']} | - | - | {ms(part['client'], 'p50_ms')} / "
                             f"{ms(part['client'], 'p99_ms')} | {ms(server, 'p50_ms')} / {ms(server, 'p99_ms')} "
                             f"| - | - | - |")
        for path, part in load.items():
            server = part.get("server", {})
            lines.append(f"| {path} | {part['clients']} | {part['requests']} | {part['errors']} "
                         f"| {part['requests_per_s']:.0f} | {ms(part, 'p50_ms')} / {ms(part, 'p99_ms')} "
                         f"| {ms(server, 'p50_ms')} / {ms(server, 'p99_ms')} | {part['server_cpu_ms_per_request']:.2f} "
                         f"| {part['client_cpu_ms_per_request']:.3f} | {part['cpu_capacity_requests_per_s']:.0f} |")
        met = lambda t: "met" if t["met"] else "NOT met"  # noqa: E731
        t = http["targets"]
        lines += ["", f"One client: /score server side p50 = {ratios['server_p50_over_model_p50']:.1f}x the model "
                      f"(client-observed {ratios['client_p50_over_model_p50']:.1f}x; target <= "
                      f"{t['server_p50_over_model_p50']['target']:g}x: {met(t['server_p50_over_model_p50'])}). "
                      f"{http['clients']} clients: {t['requests_per_s']['value']:.0f} requests/s (target >= "
                      f"{t['requests_per_s']['target']:,.0f}: {met(t['requests_per_s'])}), p99 "
                      f"{t['p99_ms']['value']:.1f} ms (target <= {t['p99_ms']['target']:g}: {met(t['p99_ms'])}). "
                      f"The load generator shares the {env['cpu_count']} cores with the service (CPU per request "
                      f"above); the 1-minute load average says how busy the machine was otherwise. CPU-bound "
                      f"capacity = the lesser of cores / (service + load generator CPU time per request) and "
                      f"min(workers, cores) / service CPU time per request: an estimate of this machine's "
                      f"requests/s with nothing else running (CPU time is what others' load inflates least)."]
        lines += funnel_markdown(http["funnel"])
    return "\n".join(lines) + "\n"


def recommend_paths_markdown(paths: dict) -> list[str]:
    """``bench.md``'s lines on ``POST /recommend``'s work with fused tables and with the Redis fetch."""
    if "skipped" in paths:
        return ["", f"/recommend, fused tables against the Redis fetch: not measured, no funnel: {paths['skipped']}"]
    cell = lambda k: f"{paths[k]['p50_ms']:.3f} / {paths[k]['p99_ms']:.3f}"  # noqa: E731
    return ["", f"The same comparison on POST /recommend's work in process (retrieve {paths['candidates']} by kNN, "
                f"their product-level features, encode, rank; p50 / p99 ms):", "",
            "| retrieve + encode | + fused model | + Redis fetch + vectors model | fetch path / fused p50 |",
            "|---|---|---|---|",
            f"| {cell('retrieve_and_encode')} | {cell('fused')} | {cell('fetch_and_model')} "
            f"| {paths['fetch_path_over_fused_p50']:.2f}x |"]


def funnel_markdown(funnel: dict) -> list[str]:
    """``bench.md``'s lines on ``POST /retrieve`` and ``POST /recommend``."""
    if "skipped" in funnel:
        return ["", f"Funnel (POST /retrieve, /recommend): not measured, the service has no funnel: "
                    f"{funnel['skipped']}"]
    titles = {"retrieve": "/retrieve, query in the table", "retrieve_encoded": "/retrieve, query encoded by DashCLIP",
              "recommend": f"/recommend, retrieve {funnel['candidates']}, rank, return {funnel['k']}"}
    lines = ["", f"Funnel, one client, one request at a time (k = {funnel['k']}); milliseconds:", "",
             "| POST | requests | errors | client p50 / p99 | server p50 / p99 |", "|---|---|---|---|---|"]
    for name, row in funnel["rows"].items():
        client, server = row.get("client", {}), row.get("server", {})
        cell = lambda part: (f"{part['p50_ms']:.2f} / {part['p99_ms']:.2f}" if part else "n/a")  # noqa: E731
        lines.append(f"| {titles[name]} | {row['requests']} | {row['errors']} | {cell(client)} | {cell(server)} |")
    target = funnel["target"]
    lines += ["", f"/recommend p99 {target['value']:.1f} ms (target <= {target['recommend_p99_ms']:g} ms: "
                  f"{'met' if target['met'] else 'NOT met'})."]
    return lines


def run(cfg: ServingBenchConfig, argv: Sequence[str] | None = None) -> dict:
    check_config(cfg)  # also when called with a config built in code
    cfg = replace(cfg, threads=resolve_threads(cfg.threads))  # the count measured, recorded
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per health check
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force")}
    out = bench_set(prepare_workdir(cfg.workdir, "serving"))
    json_rel, md_rel = out.files
    made_from = MadeFrom({**served_hashes(cfg.workdir), **input_hashes(cfg.workdir, ["impressions", "purchases"])},
                         settings)
    if not cfg.force and out.current(made_from):
        log.info("%s is complete for this export and these settings; skipping (--force runs again)", out.path(json_rel))
        print(out.path(md_rel).read_text())
        return read_json(out.path(json_rel))
    scorer = Scorer(cfg.workdir, with_added=False)
    try:
        cache = ImpressionCache.open(cfg.workdir)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    product, query = model_tables(scorer)
    try:
        redis = RedisServer().start()
    except RedisUnavailable as exc:
        raise UserError(f"the fetch benchmark needs a real Redis: {exc}") from None
    load_before = os.getloadavg()[0]
    try:
        store = VectorStore(redis.client(), dim=product.dim, namespace=f"dashrec:{scorer.model_hash}")
        loaded = store.load(product) + store.load(query)
        del product, query  # in Redis now; the HTTP service's workers load their own model later
        log.info("loaded %d vectors into redis-server on port %d", loaded, redis.port)
        vectors_model = torch.jit.load(str(scorer.workdir / "serving" / "model_vectors.pt")).eval()
        latency = bench_models(cfg, scorer, store, cache, vectors_model)
        recommend_paths = bench_recommend_paths(cfg, scorer, store, cache, vectors_model)
    finally:
        redis.stop()
    http = bench_http(cfg, scorer, cache) if cfg.http_clients > 0 else None
    overhead = [r["fusion_overhead_p99_ms"] for r in latency.values()]
    ratios = [r["fetch_over_model_p50"] for r in latency.values()]
    path_ratios = [r["fetch_path_over_fused_p50"] for r in latency.values()]
    results = {
        "command": shlex.join(["python", "-m", "serving.bench", *(argv if argv is not None else sys.argv[1:])]),
        "settings": settings,
        "environment": {"cpu_count": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "redis_server": redis.binary,
                        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}},
        "model": {"variant": scorer.manifest["variant"], "seed": scorer.manifest["seed"],
                  "table_dtype": scorer.manifest["table_dtype"], "sha256": scorer.manifest["files"]["model"]["sha256"],
                  "product_rows": scorer.spec.num_product_rows, "query_rows": scorer.spec.num_query_rows,
                  "table_dim": scorer.spec.table_dim, "history_len": scorer.spec.history_len},
        "latency": latency,
        "recommend_paths": recommend_paths,
        "paper_comparison": {
            "paper_fusion_overhead_p99_ms_below": PAPER_FUSION_OVERHEAD_P99_MS, "paper_fetch_ratio": PAPER_FETCH_RATIO,
            "max_fusion_overhead_p99_ms": max(overhead), "fetch_over_model_p50_min": min(ratios),
            "fetch_over_model_p50_max": max(ratios), "fetch_path_over_fused_p50_min": min(path_ratios),
            "fetch_path_over_fused_p50_max": max(path_ratios)},
        "http": http,
    }
    table = markdown(results)
    with out.publish(made_from) as staged:
        write_json(results, staged[json_rel])
        write_text(table, staged[md_rel])
    print(table)
    return results


def served_hashes(workdir: str | Path) -> dict[str, str]:
    """SHA-256 of what the service serves: the export, and the product index, the added set, the
    DashCLIP tables and checkpoint where they are published."""
    hashes = dict(published_export(workdir).verify())
    for out in (index_set(workdir), added_set(workdir), tables_set(workdir)):
        if out.manifest() is not None:
            hashes.update(out.verify())
    checkpoint = Path(workdir) / ENCODER_CHECKPOINT
    if checkpoint.is_file():
        hashes[ENCODER_CHECKPOINT] = file_sha256(checkpoint)
    return hashes


def bench_set(workdir: str | Path) -> OutputSet:
    """The output set of the benchmark: ``bench.json`` and ``bench.md``, made from the export set's hashes."""
    return OutputSet(workdir, "serving/bench.manifest.json", ["serving/bench.json", "serving/bench.md"],
                     what="python -m serving.bench")


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_config(ServingBenchConfig, argv), argv)


if __name__ == "__main__":
    run_main(main)
