"""experiments.ablation: rows on the same data, stage 1 shared where the settings match, one table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import ablation
from experiments.presets import PRESETS


def test_row_figures_pick_dashclip_and_the_best_untuned_encoder():
    metrics = {"retrieval": {"dashclip": {"recall_at_10": 0.3}, "untuned_text": {"recall_at_10": 0.2},
                             "untuned_image": {"recall_at_10": 0.25}, "random": {"recall_at_10": 0.9}},
               "aisle_f1": {"dashclip": 0.8, "untuned": 0.7}}
    figures = ablation.row_figures(metrics)
    assert figures["R@10 labels"] == {"dashclip": 0.3, "best_untuned": 0.25}  # random is not an encoder
    assert figures["aisle F1"] == {"dashclip": 0.8, "best_untuned": 0.7}
    assert figures["R@10 cold start"] == {"dashclip": None, "best_untuned": None}
    table = ablation.markdown({"x": {"change": "c", "figures": figures}})
    assert "| x | c | 0.300 (+20%) |" in table and "n/a" in table


def test_unknown_row_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(ablation.UserError, match="--rows: unknown"):
        ablation.main(["--workdir", str(tmp_path), "--rows", "bogus"])


@pytest.mark.slow
def test_rows_that_differ_in_stage_2_share_one_stage_1(tmp_path: Path, tiny_workdir: Path):
    import shutil

    shutil.copytree(tiny_workdir / "data", tmp_path / "data")
    flags = [f for f in PRESETS["tiny"].embeddings_train]
    results = ablation.main(["--workdir", str(tmp_path), "--rows", "gated_cross_attention,query_side_negatives",
                             "--flags", " ".join(flags)])
    assert list(results) == ["gated_cross_attention", "query_side_negatives"]
    rows = tmp_path / "ablation"
    first, second = (rows / name / "embeddings" / "checkpoints" / "stage1.pt" for name in results)
    assert first.stat().st_ino == second.stat().st_ino  # the same checkpoint, not a retrained copy
    assert "stage 1: " in (rows / "query_side_negatives" / "logs" / "query_side_negatives.log").read_text()
    assert (rows / "gated_cross_attention" / "data" / "catalog.parquet").stat().st_ino == \
        (tmp_path / "data" / "catalog.parquet").stat().st_ino
    saved = json.loads((rows / "ablation.json").read_text())
    assert saved["query_side_negatives"]["figures"]["R@10 labels"]["dashclip"] is not None
    assert "| query_side_negatives |" in (rows / "ablation.md").read_text()
