"""serving.bench end to end on the tiny export: a real Redis-compatible server and a real HTTP service
with two worker processes (few iterations)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.io import read_json
from serving import bench
from tests.serving_fixtures import copy_workdir, serving_workdir  # noqa: F401  (fixture)


def test_columns_body_is_the_same_request_column_wise():
    body = {"user_id": 1, "query": "milk", "candidates": [
        {"product_id": 3, "dense": {"price": 1.5, "hour": 2.0}, "sparse": {"store": 4}},
        {"product_id": 5, "dense": {"price": 2.5, "hour": 3.0}, "sparse": {"store": 6}}]}
    assert bench.columns_body(body) == {"user_id": 1, "query": "milk", "candidates": {
        "product_id": [3, 5], "dense": {"price": [1.5, 2.5], "hour": [2.0, 3.0]}, "sparse": {"store": [4, 6]}}}


def test_raw_response_reader_and_server_timing():
    response = bench._Response()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\nserver-timing: app;dur=1.25\r\n\r\n"
    assert not response.feed(head + b'{"a"')
    assert response.feed(b':[1]}')
    assert response.status == 200 and json.loads(response.body) == {"a": [1]} and response.server_ms() == 1.25


@pytest.mark.slow
def test_bench_writes_latency_tables_and_skips_a_rerun(serving_workdir: Path, tmp_path: Path, capsys):
    workdir = copy_workdir(serving_workdir, tmp_path / "bench")
    shutil.copytree(serving_workdir / "serving", workdir / "serving")
    argv = ["--workdir", str(workdir), "--iters", "5", "--warmup", "1", "--candidates", "1", "9",
            "--http-clients", "2", "--http-requests", "6", "--http-candidates", "4", "--http-sequential", "3",
            "--http-workers", "2", "--funnel-candidates", "20", "--funnel-k", "5"]
    results = bench.main(argv)
    saved = read_json(workdir / "serving" / "bench.json")
    assert saved["latency"].keys() == {"1", "9"} == results["latency"].keys()
    for cell in saved["latency"].values():
        for part in ("encode", "fused", "vectors_model", "redis_fetch", "fetch_and_model"):
            assert cell[part]["n"] == 5 and 0 < cell[part]["p50_ms"] <= cell[part]["p99_ms"]
    paths = saved["recommend_paths"]  # the fused-vs-fetch comparison on /recommend's work, 20 retrieved
    assert paths["candidates"] == 20 and paths["fetch_path_over_fused_p50"] > 0
    for part in ("retrieve_and_encode", "fused", "fetch_and_model"):
        assert paths[part]["n"] == 5 and 0 < paths[part]["p50_ms"] <= paths[part]["p99_ms"]
    http = saved["http"]
    assert http["workers"] == 2 and http["errors"] == 0 and http["candidates"] == 4
    for path in ("/score", "/score/columns"):
        load = http["load"][path]
        assert load["requests"] == 6 and load["errors"] == 0 and load["requests_per_s"] > 0
        # CPU times come in clock ticks (10 ms): six short requests may round to zero
        assert 0 < load["server"]["p50_ms"] <= load["p50_ms"] and load["server_cpu_ms_per_request"] >= 0
        assert load["cpu_capacity_requests_per_s"] >= 0
        assert len(load["worker_cpu_shares"]) == 2
        seq = http["sequential"][path]
        assert seq["client"]["n"] == seq["server"]["n"] == 3 and seq["server"]["p50_ms"] <= seq["client"]["p99_ms"]
    assert http["sequential"]["model"]["n"] == 3 and http["ratios"]["server_p50_over_model_p50"] > 0
    assert set(http["targets"]) == {"requests_per_s", "p99_ms", "server_p50_over_model_p50"}
    funnel = http["funnel"]
    assert (funnel["candidates"], funnel["k"], funnel["errors"]) == (20, 5, 0)
    assert set(funnel["rows"]) == {"retrieve", "retrieve_encoded", "recommend"}
    for row in funnel["rows"].values():
        assert row["requests"] == 3 and 0 < row["server"]["p50_ms"] <= row["client"]["p99_ms"]
    assert funnel["target"]["recommend_p99_ms"] == 30.0 and funnel["target"]["value"] == \
        funnel["rows"]["recommend"]["client"]["p99_ms"]
    md = (workdir / "serving" / "bench.md").read_text()
    assert "| 9 |" in md and "| /score | 2 | 6 | 0 |" in md and "| /score/columns |" in md and "fusion" in md
    assert "| /recommend, retrieve 20, rank, return 5 | 3 | 0 |" in md and "/retrieve, query encoded" in md
    assert "POST /recommend's work in process (retrieve 20 by kNN" in md
    assert md in capsys.readouterr().out
    before = (workdir / "serving" / "bench.json").stat().st_mtime_ns
    bench.main(argv)
    assert (workdir / "serving" / "bench.json").stat().st_mtime_ns == before
