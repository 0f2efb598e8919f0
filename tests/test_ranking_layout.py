"""The ranking stage's workdir layout and the time protocol: the documented paths and values."""
from __future__ import annotations

from pathlib import Path

from data import protocol
from ranking import layout
from ranking.model import trained_set
from ranking.train import results_set


def test_run_directories_and_sets_follow_the_documented_layout(tmp_path: Path) -> None:
    assert layout.run_rel("dcn_pq_hist", 3) == "ranking/dcn_pq_hist/seed3"
    assert layout.run_dir(tmp_path, "dcn", 0) == tmp_path / "ranking" / "dcn" / "seed0"
    assert layout.cache_dir(tmp_path, "abc") == tmp_path / "ranking" / "cache" / "abc"
    assert layout.BENCH_JSON_REL == "ranking/bench.json"
    run = trained_set(tmp_path, "dcn_pq", 2)
    assert run.files == ["ranking/dcn_pq/seed2/model.pt", "ranking/dcn_pq/seed2/metrics.json"]
    assert run.manifest_path == tmp_path / "ranking" / "dcn_pq" / "seed2" / "manifest.json"
    results = results_set(tmp_path)
    assert results.files == ["ranking/results.json", "ranking/results.md"]
    assert results.manifest_path == tmp_path / "ranking" / "results.manifest.json"


def test_protocol_constants() -> None:
    assert (protocol.HISTORY_DAYS, protocol.EVAL_DAYS, protocol.DAY_S) == (84, 7, 86_400)
