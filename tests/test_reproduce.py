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


def test_ranking_section_handles_a_slice_without_impressions(tmp_path: Path) -> None:
    """Real sources where every user has a purchase history leave ``nw_nohist`` empty (None metrics)."""
    from experiments.report import ranking_section

    def slice_(auc: float | None) -> dict:
        return {"auc_mean": auc, "auc_std": None if auc is None else 0.01, "norm_logloss_mean": None if auc is None
                else 0.9, "norm_logloss_std": None if auc is None else 0.01, "p_value_vs_dcn": None,
                "impressions": 0 if auc is None else 100}

    results = {v: {"nw": slice_(auc), "nw_hist": slice_(auc), "nw_nohist": slice_(None)}
               for v, auc in (("dcn", 0.70), ("dcn_pq", 0.72), ("dcn_pq_hist", 0.75), ("dcn_pq_hist_random", 0.71))}
    (tmp_path / "ranking").mkdir()
    (tmp_path / "ranking" / "results.json").write_text(json.dumps(results))
    section = ranking_section(tmp_path)
    assert "No metrics for this slice (0 impressions: none, or only one class)" in section and "| dcn_pq_hist | 0.7500 ± 0.0100 | +5.00 pt" in section
    assert "AUC dcn_pq_hist > dcn_pq > dcn on NW" in section and "users with history gain more" not in section


def test_demo_preset_trains_real_sources_one_stage2_epoch() -> None:
    from experiments.presets import PRESETS

    def train_cmd(source: str) -> tuple[str, ...]:
        cfg = reproduce.ReproduceConfig(workdir="runs/x", source=source)
        return next(s for s in reproduce.plan_stages(cfg, PRESETS["demo"]) if s.name == "embeddings").commands[0]

    assert train_cmd("completejourney")[-2:] == ("--stage2-epochs", "1")
    assert train_cmd("fashion")[-2:] == ("--stage2-epochs", "1")
    assert "--stage2-epochs" not in train_cmd("synth:demo")
