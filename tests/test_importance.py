"""Feature importance (ranking.importance, ranking.attribution): Captum permutation / ablation / IG over
feature groups.

One tiny model is trained once for the module: the tiny synthetic workdir, random embedding
tables, and a planted dense feature ``dense_click_signal`` that is a noisy copy of the click
label (so one group is known to be strongly predictive). A feature the model provably cannot
use is made by setting its normalisation std to infinity (its normalised value is then 0 for
every row).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.cli import run_main
from data.dataset import MANIFEST
from data.schema import feature_columns, table_path
from data.text import normalize_query
from embeddings.tables import build_table, embedding_table_path, write_table
from ranking import importance, layout, train
from ranking.attribution.groups import build_inputs
from ranking.attribution.interaction import InteractionInputModel, embed_batch
from ranking.attribution.methods import ablation_importance, batched_forward, ig_importance, permutation_importance
from ranking.features import ImpressionCache, RankingData
from ranking.model import load_model
from ranking.plain import PlainInputModel
from ranking.spec import PurchaseIndex

SIGNAL = "dense_click_signal"
TABLE_GROUPS = ["query_embedding", "product_embedding", "purchase_history", "cosine_product_query",
                "cosine_product_history"]


def _random_tables(workdir: Path, dim: int = 8) -> None:
    products = pq.read_table(table_path(workdir, "catalog"), columns=["product_id"]).column(0).to_numpy()
    queries = sorted({normalize_query(q) for name in ("impressions", "relevance")
                      for q in pq.read_table(table_path(workdir, name), columns=["query"]).column(0).to_pylist()})
    rng = np.random.default_rng(0)
    write_table(build_table("product", products, rng.normal(size=(len(products), dim))),
                embedding_table_path(workdir, "product"))
    write_table(build_table("query", queries, rng.normal(size=(len(queries), dim))),
                embedding_table_path(workdir, "query"))


@pytest.fixture(scope="module")
def trained(tiny_workdir: Path, tmp_path_factory) -> Path:
    """A copy of the tiny workdir with the planted signal, random tables and a trained dcn_pq_hist."""
    workdir = tmp_path_factory.mktemp("importance")
    shutil.copytree(Path(tiny_workdir) / "data", workdir / "data")
    path = table_path(workdir, "impressions")
    impressions = pq.read_table(path)
    clicked = impressions.column("clicked").to_numpy().astype(np.float32)
    signal = clicked + np.random.default_rng(1).normal(0.0, 0.35, len(clicked)).astype(np.float32)
    pq.write_table(impressions.append_column(pa.field(SIGNAL, pa.float32()), pa.array(signal)), path)
    (workdir / MANIFEST).unlink()  # the edited tables are taken as placed by hand
    _random_tables(workdir)
    train.main(["--workdir", str(workdir), "--variant", "dcn_pq_hist", "--seeds", "1", "--epochs", "3",
                "--batch-size", "256", "--lr", "0.01", "--threads", "1"])
    return workdir


def _eval_data(workdir: Path, model) -> tuple[RankingData, np.ndarray]:
    cache = ImpressionCache.open(workdir)
    return RankingData(cache, PurchaseIndex.from_workdir(workdir), model.spec), np.asarray(cache.split_index("eval"))


def test_interaction_input_model_reproduces_the_plain_model_and_groups_partition_the_inputs(trained: Path):
    model = load_model(layout.run_dir(trained, "dcn_pq_hist", 0) / layout.MODEL_FILE)
    data, rows = _eval_data(trained, model)
    batch = data.batch(rows)
    plain = PlainInputModel(model).eval()
    vectors = embed_batch(plain, *batch.inputs())
    with torch.no_grad():
        expected = plain(*batch.inputs())
        got = InteractionInputModel(model).eval()(**vectors)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    inputs = build_inputs(model, data, rows, batch_size=64)  # several embedding batches
    torch.testing.assert_close(inputs.tensors["product"], vectors["product"])
    masks = inputs.feature_masks()
    ids = torch.cat([m.flatten() for m in masks]).unique().tolist()
    assert ids == list(range(len(inputs.groups)))  # every column in exactly one group, ids global
    cos = dict(zip(inputs.names, masks))["cosine_pq"]
    assert cos.shape == (1,)  # a 1-D input gets a (1,) mask
    # The baseline request: zero vectors, zero cosines, train-mean dense features.
    assert float(inputs.baselines["product"].abs().sum()) == 0.0 and float(inputs.baselines["cosine_ph"]) == 0.0
    torch.testing.assert_close(inputs.baselines["dense"], model.dcn_tower.dense_mean)


def test_irrelevant_feature_scores_zero_and_planted_signal_scores_high(trained: Path):
    model = load_model(layout.run_dir(trained, "dcn_pq_hist", 0) / layout.MODEL_FILE)
    hour = model.spec.dense_names.index("dense_hour")
    with torch.no_grad():
        model.dcn_tower.dense_std[hour] = float("inf")  # normalised dense_hour == 0: the model cannot use it
    data, rows = _eval_data(trained, model)
    inputs = build_inputs(model, data, rows, batch_size=4096)
    vmodel = InteractionInputModel(model).eval()
    with torch.no_grad():
        logits = batched_forward(vmodel, inputs, 4096)(*inputs.captum_inputs()).double().numpy()
    names = [g.name for g in inputs.groups]
    results = {
        "permutation": permutation_importance(vmodel, inputs, logits, repeats=2, seed=0, batch_size=4096),
        "ablation": ablation_importance(vmodel, inputs, logits, batch_size=4096),
        "ig": ig_importance(vmodel, inputs, np.arange(len(rows)), steps=8, batch_size=4096),
    }
    for method, result in results.items():
        assert result.scores[names.index("dense_hour")] == pytest.approx(0.0, abs=1e-9), method
        assert result.attribution[names.index("dense_hour")] == pytest.approx(0.0, abs=1e-9), method
        assert result.scores[names.index(SIGNAL)] > 0.0, method
    assert results["permutation"].scores[names.index(SIGNAL)] > 0.1
    assert results["ablation"].scores[names.index(SIGNAL)] > 0.1
    assert results["permutation"].ranks()[names.index(SIGNAL)] == 1


def test_permutation_cli_writes_every_group_ranked_deterministic_and_skips(trained: Path):
    argv = ["--workdir", str(trained), "--repeats", "3", "--threads", "1", "--force"]
    report = importance.main(argv)
    dense, sparse = feature_columns(pq.read_schema(table_path(trained, "impressions")).names)
    assert list(report["groups"]) == TABLE_GROUPS + dense + sparse
    assert sorted(g["rank"] for g in report["groups"].values()) == list(range(1, len(report["groups"]) + 1))
    assert report["metric"] == "auc_drop" and report["method"] == "permutation" and report["seed"] == 0
    signal = report["groups"][SIGNAL]
    assert signal["rank"] == 1 and signal["score"] > 0.1 and signal["score_std"] >= 0 and signal["attribution"] > 0
    assert 0.5 < report["baseline_auc"] <= 1.0
    out = trained / "importance"
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| 1 | {SIGNAL} |" in (out / "importance.md").read_text()

    stamp = (out / "importance.json").stat().st_mtime_ns
    shutil.rmtree(trained / "ranking" / "cache")
    assert importance.main(argv[:-1]) == report  # same settings: skipped
    assert (out / "importance.json").stat().st_mtime_ns == stamp
    assert not (trained / "ranking" / "cache").exists()  # a skip reads hashes only: no features, no model
    again = importance.main(argv)  # --force recomputes the same numbers
    assert {g: v["score"] for g, v in again["groups"].items()} == {g: v["score"] for g, v in report["groups"].items()}


def test_method_all_runs_the_three_methods_and_reports_their_agreement(trained: Path):
    report = importance.main(["--workdir", str(trained), "--method", "all", "--repeats", "2", "--ig-steps", "8",
                              "--max-rows", "150", "--threads", "1"])
    assert report["methods"] == ["permutation", "ablation", "ig"] and report["rows"] == 150
    groups = list(report["groups"])
    for method, result in report["by_method"].items():
        assert list(result) == groups
        assert sorted(v["rank"] for v in result.values()) == list(range(1, len(groups) + 1)), method
    assert report["by_method"]["ablation"][SIGNAL]["score"] > 0.1
    assert set(report["agreement"]) == {"permutation_vs_ablation", "permutation_vs_ig", "ablation_vs_ig"}
    for pair in report["agreement"].values():
        assert -1.0 <= pair["spearman"] <= 1.0 and pair["groups"] == len(groups)
    md = (trained / "importance" / "importance.md").read_text()
    assert "ig mean_abs_attribution" in md and "permutation_vs_ablation" in md


@pytest.mark.parametrize("argv, expected", [
    (["--variant", "nope"], "unknown ranking variant 'nope'"),
    (["--model-seed", "7"], "seed7/model.pt: missing ranking model; run `python -m ranking.train"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, argv: list[str], expected: str):
    with pytest.raises(SystemExit) as exc:
        run_main(importance.main, ["--workdir", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_model_seed_picks_the_model_and_seed_draws_the_rows(trained: Path):
    """``--model-seed`` says which trained run is explained; ``--seed`` only draws the rows and permutations."""
    argv = ["--workdir", str(trained), "--repeats", "1", "--max-rows", "150", "--threads", "1", "--force"]
    first = importance.main([*argv, "--model-seed", "0", "--seed", "0"])
    other = importance.main([*argv, "--seed", "5"])
    model = (layout.run_dir(trained, "dcn_pq_hist", 0) / layout.MODEL_FILE).relative_to(trained)
    assert first["model"] == other["model"] == str(model)
    assert first["seed"] == other["seed"] == 0  # the seed the explained model was trained with
    assert (other["settings"]["model_seed"], other["settings"]["seed"]) == (0, 5)
    assert first["baseline_auc"] != other["baseline_auc"]  # the same model on other rows
