"""The one-command reproduction: every stage on the tiny synthetic profile, then the report."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import reproduce

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: Path) -> Path:
    workdir = tmp_path_factory.mktemp("reproduce")
    shutil.copytree(tiny_workdir / "data", workdir / "data")  # the data stage then finds it complete
    reproduce.main(["--workdir", str(workdir), "--source", "synth:tiny", "--seeds", "2"])
    return workdir


def test_every_stage_runs_and_the_report_has_every_section(tiny_run: Path) -> None:
    report = (tiny_run / "report.md").read_text()
    for heading in ("## Data", "## Retrieval (paper Table 1 layout)", "## Aisle-category and relevance",
                    "## Ranking (paper Table 2 layout)", "## Feature importance", "## Serving latency", "## Plots"):
        assert heading in report, heading
    assert "has not run" not in report
    for variant in ("dcn", "dcn_pq", "dcn_pq_hist", "dcn_pq_hist_random"):
        assert f"| {variant} |" in report
    for png in ("tsne", "importance"):
        assert f"({'embeddings/plots' if png == 'tsne' else 'importance'}/{png}.png)" in report
    record = json.loads((tiny_run / "reproduce.json").read_text())
    assert set(record["stage_seconds"]) == {"data", "embeddings", "ranking", "importance", "serving"}


def test_rerun_skips_complete_stages_and_publish_copies_plots(tiny_run: Path, tmp_path: Path) -> None:
    model = tiny_run / "ranking" / "dcn_pq_hist" / "seed1" / "model.pt"
    before = model.stat().st_mtime_ns
    reproduce.main(["--workdir", str(tiny_run), "--source", "synth:tiny", "--seeds", "2",
                    "--stages", "ranking", "--publish", str(tmp_path / "pub")])
    assert model.stat().st_mtime_ns == before  # the finished seed was skipped, not retrained
    assert "skipping" in (tiny_run / "logs" / "ranking.log").read_text()
    published = (tmp_path / "pub" / "report.md").read_text()
    assert (tmp_path / "pub" / "embeddings" / "plots" / "tsne.png").exists()
    assert "## Ranking" in published


def test_bad_source_and_stage_are_one_line_errors(tmp_path: Path) -> None:
    for argv, needle in ((["--source", "synth:tiny", "--stages", "bogus"], "--stages"),
                         (["--source", "nowhere"], "--source 'nowhere'")):
        proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--workdir", str(tmp_path), *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
