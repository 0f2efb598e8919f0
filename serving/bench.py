"""Serving latency (paper section 4.3.2): fused tables vs vectors fetched from Redis, and the HTTP service.

``python -m serving.bench --workdir DIR [--iters 200] [--threads 1] [--candidates 1 64 512]
[--http-clients 8] [--http-requests 400] [--http-candidates 64] [--http-seconds 60] [--seed 0]``

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

Then a bounded load test of the real service (``python -m serving.server`` in a subprocess on a
free localhost port): ``--http-clients`` threads with their own ``httpx`` client send
``--http-requests`` requests of ``--http-candidates`` candidates in total (stopping after
``--http-seconds``), and it reports requests/s, p50/p99 and errors.

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
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import prepare_workdir, read_json, write_json, write_text
from common.provenance import MadeFrom, OutputSet
from common.seed import seed_everything
from data.dataset import input_hashes
from data.schema import SchemaError
from embeddings.tables import EmbeddingTable
from ranking.features import ImpressionCache
from serving.published import published_export
from serving.redis_store import RedisServer, RedisUnavailable, VectorStore
from serving.requests import EncodedRequest, feature_key
from serving.server import Scorer, ServiceProcess

log = logging.getLogger("serving.bench")

PAPER_FUSION_OVERHEAD_P99_MS = 4.0
PAPER_FETCH_RATIO = 5.0
REQUEST_POOL = 32  # distinct requests per candidate count, cycled through the timed calls


@dataclass
class BenchConfig:
    """Latency of the exported model: fused tables vs Redis-fetched vectors, and the HTTP service."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory (needs DIR/serving from serving.export)"})
    iters: int = field(default=200, metadata={"help": "timed calls per setting (after --warmup)"})
    warmup: int = field(default=20, metadata={"help": "untimed calls per setting"})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (bench process and server)"})
    candidates: list[int] = field(default_factory=lambda: [1, 64, 512], metadata={"help": "candidate counts"})
    http_clients: int = field(default=8, metadata={"help": "concurrent HTTP clients in the load test (0 = skip it)"})
    http_requests: int = field(default=400, metadata={"help": "total requests of the load test"})
    http_candidates: int = field(default=64, metadata={"help": "candidates per load-test request"})
    http_seconds: float = field(default=60.0, metadata={"help": "time cap of the load test"})
    seed: int = field(default=0, metadata={"help": "which impressions make the requests"})
    force: bool = field(default=False, metadata={"help": "run again even when bench.json has these settings"})


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
    cols, queries = cache.columns, cache.queries
    dense_keys = [feature_key(c) for c in spec.dense_names]
    sparse_keys = [feature_key(c) for c in spec.sparse_names]
    bodies = []
    for _ in range(count):
        anchor = int(rng.choice(eval_rows))
        rows = np.sort(rng.choice(eval_rows, size=candidates, replace=candidates > len(eval_rows)))
        dense, sparse, products = cols["dense"][rows], cols["sparse"][rows], cols["product_id"][rows]
        bodies.append({
            "user_id": int(cols["user_id"][anchor]), "query": queries[int(cols["query_code"][anchor])],
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
    return (EmbeddingTable("product", [None, *spec.product_ids], product.numpy()),
            EmbeddingTable("query", [None, *spec.queries], query.numpy()))


def bench_models(cfg: BenchConfig, scorer: Scorer, store: VectorStore, cache: ImpressionCache) -> dict[str, dict]:
    """Timings per candidate count (see module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    request_model = scorer.request_model(max(cfg.candidates))
    vectors_model = torch.jit.load(str(scorer.workdir / "serving" / "model_vectors.pt")).eval()
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


def load_test(url: str, bodies: list[bytes], clients: int, total: int, seconds: float) -> dict:
    """``clients`` threads POST ``bodies`` (cycled) to ``url`` until ``total`` requests or ``seconds``."""
    import httpx

    lock = threading.Lock()
    state = {"issued": 0}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(timeout=30.0) as client:
            while True:
                with lock:
                    if state["issued"] >= total or time.monotonic() > deadline:
                        return
                    i = state["issued"]
                    state["issued"] += 1
                start = time.perf_counter()
                try:
                    resp = client.post(url, content=bodies[i % len(bodies)],
                                       headers={"content-type": "application/json"})
                    ok = resp.status_code == 200
                    problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, problem = False, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors.append(problem)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out = {"clients": clients, "requests": len(latencies) + len(errors), "errors": len(errors),
           "error_examples": errors[:3], "seconds": wall, "requests_per_s": (len(latencies) + len(errors)) / wall}
    if latencies:
        out.update(percentiles(latencies))
    return out


def bench_http(cfg: BenchConfig, scorer: Scorer, cache: ImpressionCache) -> dict:
    rng = np.random.default_rng([cfg.seed, 1])
    bodies = [json.dumps(b).encode() for b in build_requests(cache, scorer.spec, REQUEST_POOL, cfg.http_candidates, rng)]
    with ServiceProcess(scorer.workdir, cfg.threads, max(cfg.http_candidates, 1)) as service:
        result = load_test(f"{service.url}/score", bodies, cfg.http_clients, cfg.http_requests, cfg.http_seconds)
    result["candidates"] = cfg.http_candidates
    return result


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
    http = results.get("http")
    if http:
        lines += ["", "| HTTP load test | clients | candidates | requests | errors | requests/s | p50 ms | p99 ms |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| POST /score (uvicorn, localhost) | {http['clients']} | {http['candidates']} | {http['requests']} "
                  f"| {http['errors']} | {http['requests_per_s']:.1f} | {http.get('p50_ms', float('nan')):.2f} "
                  f"| {http.get('p99_ms', float('nan')):.2f} |"]
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig, argv: Sequence[str] | None = None) -> dict:
    for flag in ("iters", "threads", "http_requests", "http_candidates"):
        if getattr(cfg, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(cfg, flag)}")
    if cfg.warmup < 0 or cfg.http_clients < 0 or not cfg.http_seconds > 0:
        raise UserError("--warmup and --http-clients must be >= 0 and --http-seconds > 0")
    if not cfg.candidates or min(cfg.candidates) < 1:
        raise UserError(f"--candidates must be counts >= 1, got {cfg.candidates}")
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per load-test request
    scorer = Scorer(cfg.workdir)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force")}
    out = bench_set(prepare_workdir(cfg.workdir, "serving"))
    json_rel, md_rel = out.files
    made_from = MadeFrom({**published_export(cfg.workdir).verify(),
                          **input_hashes(cfg.workdir, ["impressions", "purchases"])}, settings)
    if not cfg.force and out.current(made_from):
        log.info("%s is complete for this export and these settings; skipping (--force runs again)", out.path(json_rel))
        print(out.path(md_rel).read_text())
        return read_json(out.path(json_rel))
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
        log.info("loaded %d vectors into redis-server on port %d", loaded, redis.port)
        latency = bench_models(cfg, scorer, store, cache)
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


def bench_set(workdir: str | Path) -> OutputSet:
    """The output set of the benchmark: ``bench.json`` and ``bench.md``, made from the export set's hashes."""
    return OutputSet(workdir, "serving/bench.manifest.json", ["serving/bench.json", "serving/bench.md"],
                     what="python -m serving.bench")


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_config(BenchConfig, argv), argv)


if __name__ == "__main__":
    run_main(main)
