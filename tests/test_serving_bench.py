"""serving.bench end to end on the tiny export: a real redis-server and a real HTTP service (few iterations)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.io import read_json
from serving import bench
from tests.serving_fixtures import copy_workdir, serving_workdir  # noqa: F401  (fixture)


@pytest.mark.slow
def test_bench_writes_latency_tables_and_skips_a_rerun(serving_workdir: Path, tmp_path: Path, capsys):
    workdir = copy_workdir(serving_workdir, tmp_path / "bench")
    shutil.copytree(serving_workdir / "serving", workdir / "serving")
    argv = ["--workdir", str(workdir), "--iters", "5", "--warmup", "1", "--candidates", "1", "9",
            "--http-clients", "2", "--http-requests", "6", "--http-candidates", "4"]
    results = bench.main(argv)
    saved = read_json(workdir / "serving" / "bench.json")
    assert saved["latency"].keys() == {"1", "9"} == results["latency"].keys()
    for cell in saved["latency"].values():
        for part in ("encode", "fused", "vectors_model", "redis_fetch", "fetch_and_model"):
            assert cell[part]["n"] == 5 and 0 < cell[part]["p50_ms"] <= cell[part]["p99_ms"]
    assert saved["http"]["requests"] == 6 and saved["http"]["errors"] == 0 and saved["http"]["requests_per_s"] > 0
    md = (workdir / "serving" / "bench.md").read_text()
    assert "| 9 |" in md and "POST /score" in md and "fusion" in md
    assert md in capsys.readouterr().out
    before = (workdir / "serving" / "bench.json").stat().st_mtime_ns
    bench.main(argv)
    assert (workdir / "serving" / "bench.json").stat().st_mtime_ns == before
