"""embeddings.evaluate: retrieval metrics on handcrafted vectors, MLP probes, plots, the split source."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.io import read_json
from data.schema import read_table
from data.text import normalize_query
from embeddings import evaluate, export, tables, train
from embeddings.evaluate import (downsample_label, judged_ranking_metrics, oracle_retrieval, pair_cosines, relative_gain,
                                 relevance_matrix,
                                 retrieval_metrics, split_settings,
                                 top_k_products, train_probe)
from embeddings.plots import plot_cosine_histograms, plot_tsne
from embeddings.sampling import split_cold_products, split_queries

IR, MR, HR = 0, 1, 2


def unit(rows) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.float32)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)


PRODUCTS = unit([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]])
QUERIES = unit([[1, 0], [0, 1], [1, 1]])
LABELS = np.array([[HR, 0, MR, 0],     # q0 top-2 = p0 (HR), p1 (unlabelled)
                   [0, MR, 0, HR],     # q1 top-2 = p2 (unlabelled), p1 (MR)
                   [IR, IR, 0, 0]])    # q2: no MR/HR product, skipped


# --- retrieval -----------------------------------------------------------------------------------

def test_top_k_orders_by_cosine_and_breaks_ties_by_index():
    assert top_k_products(QUERIES[:2], PRODUCTS, k=2).tolist() == [[0, 1], [2, 1]]
    tied = top_k_products(unit([[1, 0]]), unit([[0, 1], [1, 0], [0, -1], [1, 0]]), k=3)
    assert tied.tolist() == [[1, 3, 0]]
    assert top_k_products(QUERIES, PRODUCTS, k=10).shape == (3, 4)  # k capped at P


def test_pair_cosines_in_chunks_are_the_cosines_of_the_pairs():
    rng = np.random.default_rng(1)
    queries, products = unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(60, 8)))
    pair_query, pair_product = rng.integers(0, 40, 500), rng.integers(0, 60, 500)
    whole = np.einsum("nd,nd->n", queries[pair_query], products[pair_product])
    for chunk in (1, 7, 500, 1 << 16):
        np.testing.assert_array_equal(pair_cosines(queries, products, pair_query, pair_product, chunk), whole)


def test_top_k_chunks_bound_the_scores_not_the_result():
    rng = np.random.default_rng(0)
    queries, products = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(300, 8)))
    whole = top_k_products(queries, products, k=10, chunk_scores=50 * 300)
    for chunk_scores in (1, 299, 301, 7 * 300):  # one query a chunk (fewer scores than products), 1, 7
        np.testing.assert_array_equal(top_k_products(queries, products, k=10, chunk_scores=chunk_scores), whole)


def test_retrieval_metrics_match_hand_computed_values():
    metrics = retrieval_metrics(QUERIES, PRODUCTS, LABELS, k=2)
    # q0: labels [2, 0] -> graded 2/4, 1 hit of 2 relevant; q1: labels [0, 1] -> graded 1/4, 1 hit of 2
    assert metrics == pytest.approx({"graded_relevance": (0.5 + 0.25) / 2, "recall_at_2": 0.5,
                                     "precision_at_2": 0.5, "n_queries": 2})
    perfect = retrieval_metrics(unit([[1, 0]]), PRODUCTS, np.array([[HR, HR, 0, 0]]), k=2)
    assert perfect == pytest.approx({"graded_relevance": 1.0, "recall_at_2": 1.0, "precision_at_2": 1.0,
                                     "n_queries": 1})


def test_oracle_is_the_expected_score_of_true_grade_rankings_with_random_ties():
    rng = np.random.default_rng(0)
    n_products, k = 40, 10
    truth = np.zeros((3, n_products), dtype=np.int8)
    truth[0, :4], truth[0, 4:20] = 2, 1      # 4 HR, 16 MR: HR certain, MR share 6 slots
    truth[1, :25] = 2                        # 25 HR: 10 slots among them
    truth[2, :3], truth[2, 3:5] = 2, 1       # 5 relevant: 5 slots left for the 35 others
    labels = np.zeros_like(truth)
    labels[0, [1, 7, 30]] = [2, 1, 1]        # an HR, an MR and a product the truth calls IR (label noise)
    labels[1, [0, 24]] = 2
    labels[2, [2, 4, 39]] = [2, 1, 1]
    expected = oracle_retrieval(labels, truth, k)
    assert expected["recall_at_10"] == pytest.approx(np.mean([(1 + 6 / 16) / 3, 10 / 25, (1 + 1 + 5 / 35) / 3]))
    # the same by simulation: sort by grade, break ties at random
    recalls = []
    for _ in range(4000):
        scores = truth + rng.random(truth.shape)
        top = np.argsort(-scores, axis=1)[:, :k]
        hits = np.take_along_axis(labels >= 1, top, axis=1).sum(axis=1)
        recalls.append(np.mean(hits / (labels >= 1).sum(axis=1)))
    assert expected["recall_at_10"] == pytest.approx(np.mean(recalls), abs=0.01)
    assert expected["n_queries"] == 3
    assert oracle_retrieval(labels, np.zeros_like(truth), k) is None  # the truth covers no query


def test_relative_gain_in_blocks_is_the_whole_bootstrap():
    """5,000 queries: the resamples' means are taken a block of 838 resamples at a time."""
    rng = np.random.default_rng(2)
    ours, baseline = rng.random(5000), rng.random(5000)
    rows = np.random.default_rng(7).integers(0, 5000, size=(2000, 5000))
    gains = ours[rows].mean(axis=1) / baseline[rows].mean(axis=1) - 1.0
    assert relative_gain(ours, baseline, seed=7)["ci95"] == [float(v) for v in np.nanpercentile(gains, [2.5, 97.5])]


def test_relative_gain_is_paired_and_its_interval_covers_the_estimate():
    rng = np.random.default_rng(1)
    baseline = rng.random(400)
    same = relative_gain(baseline, baseline, seed=0)
    assert same["relative"] == 0 and same["ci95"] == [0, 0]  # paired: identical scores never differ
    better = relative_gain(baseline * 1.2, baseline, seed=0)
    assert better["relative"] == pytest.approx(0.2) and better["ci95"] == pytest.approx([0.2, 0.2])
    noisy = relative_gain(baseline + rng.normal(0.05, 0.3, 400), baseline, seed=0)
    low, high = noisy["ci95"]
    assert low < noisy["relative"] < high and high - low > 0.05
    assert relative_gain(baseline + 0.1, baseline, seed=0) == relative_gain(baseline + 0.1, baseline, seed=0)
    with pytest.raises(ValueError):
        relative_gain(baseline, baseline[:-1], seed=0)


def test_judged_ranking_ranks_labelled_candidates_only():
    # q0 judges p0 HR, p2 MR, p3 IR (cosines 1, 0, -1: ideal order); q1 judges p1 MR, p0 IR, p3 HR with
    # cosines 0.6, 0, 0 (the p0/p3 tie goes to pair order: p0 first); q2 has IR pairs only (skipped).
    pair_query = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pair_product = np.array([0, 2, 3, 1, 0, 3, 0, 1])
    pair_label = np.array([HR, MR, IR, MR, IR, HR, IR, IR])
    ideal_q1 = 3 + 1 / np.log2(3)
    metrics = judged_ranking_metrics(QUERIES, PRODUCTS, pair_query, pair_product, pair_label)
    # AUC: relevant cosines [1, 0, .6, 0] vs IR [-1, 0, .71, .99]: 4 + 1.5 + 2 + 1.5 wins of 16
    # every product of q0 and q1 is in their top 10 (P = 4), 3 of 4 judged for each
    assert metrics == pytest.approx({"ndcg_at_10": (1 + (1 + 3 / 2) / ideal_q1) / 2, "auc_relevant_vs_ir": 9 / 16,
                                     "judged_share_of_top_10": 0.75, "n_queries": 2})
    cut = judged_ranking_metrics(QUERIES, PRODUCTS, pair_query, pair_product, pair_label, k=2)
    # top 2: q0 -> p0 (judged), p1 (not); q1 -> p2 (not), p1 (judged)
    assert cut["ndcg_at_2"] == pytest.approx((1 + 1 / ideal_q1) / 2) and cut["judged_share_of_top_2"] == 0.5
    # the shared full-catalog rankings give the same metrics as ranking here
    ranked = top_k_products(QUERIES, PRODUCTS, k=2)
    assert judged_ranking_metrics(QUERIES, PRODUCTS, pair_query, pair_product, pair_label, k=2, top=ranked) == cut
    with pytest.raises(ValueError, match="no query has an MR or HR pair"):
        judged_ranking_metrics(QUERIES, PRODUCTS, pair_query[6:], pair_product[6:], pair_label[6:])


def test_retrieval_metrics_default_cutoff_is_ten_and_sparse_labels_work():
    rng = np.random.default_rng(0)
    products = unit(rng.standard_normal((50, 8)))
    queries = products[:5] + 0.01  # each query sits on its own product
    labels = np.zeros((5, 50), dtype=np.int8)
    labels[np.arange(5), np.arange(5)] = HR
    labels[0, 40] = MR
    from scipy import sparse
    metrics = retrieval_metrics(unit(queries), products, sparse.csr_matrix(labels))
    assert set(metrics) == {"graded_relevance", "recall_at_10", "precision_at_10", "n_queries"}
    assert metrics["precision_at_10"] >= 0.1 - 1e-9
    assert metrics["recall_at_10"] >= 0.9
    with pytest.raises(ValueError, match="labels must be"):
        retrieval_metrics(queries, products, labels[:, :10])
    with pytest.raises(ValueError, match="no query has an MR or HR product"):
        retrieval_metrics(queries, products, np.zeros((5, 50)))


def test_relevance_matrix_keeps_the_highest_label_and_ignores_unknown_keys():
    pairs = pd.DataFrame({"query": ["milk", "milk", "cheese", "bread", "cheese"],
                          "product_id": [10, 10, 20, 10, 99], "label": [MR, HR, IR, HR, HR]})
    matrix = relevance_matrix(pairs, ["cheese", "milk"], np.array([10, 20]))
    assert matrix.toarray().tolist() == [[0, 0], [HR, 0]]
    assert matrix.nnz == 1  # IR is not stored


# --- probes --------------------------------------------------------------------------------------

def blobs(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)) * 3
    labels = np.repeat(np.arange(n_classes), n_per_class)
    return (centres[labels] + spread * rng.standard_normal((len(labels), dim))).astype(np.float32), labels


def test_probe_beats_chance_on_separable_vectors_and_not_on_noise():
    features, labels = blobs(60, 3, 16, 1.0, seed=0)
    names = np.array(["dairy", "snacks", "bakery"])[labels]
    result = train_probe(features, names, seed=0, epochs=30)
    assert result.macro_f1 > 0.9
    assert set(result.per_class_recall) == {"bakery", "dairy", "snacks"}
    assert (result.n_train, result.n_test, result.n_classes) == (144, 36, 3)
    noise = train_probe(np.random.default_rng(1).standard_normal((180, 16)).astype(np.float32), names,
                        seed=0, epochs=30)
    assert noise.macro_f1 < 0.6


def test_probe_is_deterministic_and_leaves_the_global_rng_alone():
    features, labels = blobs(20, 4, 8, 2.5, seed=2)
    state = torch.get_rng_state()
    first = train_probe(features, labels, seed=5, epochs=10)
    assert torch.equal(torch.get_rng_state(), state)
    assert train_probe(features, labels, seed=5, epochs=10) == first


def test_probe_drops_singleton_classes_and_needs_two_classes():
    features, labels = blobs(10, 2, 4, 0.5, seed=3)
    features = np.vstack([features, np.zeros((1, 4), np.float32)])
    result = train_probe(features, np.append(labels, 7), seed=0, epochs=5)
    assert result.n_classes == 2 and result.n_train + result.n_test == 20
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_probe(features[:10], labels[:10], seed=0)


def test_query_sample_is_seeded_sorted_and_only_drawn_when_needed():
    sample = evaluate.sample_queries(1000, 100, seed=3)
    assert len(sample) == len(set(sample.tolist())) == 100 and np.all(np.diff(sample) > 0) and sample.max() < 1000
    np.testing.assert_array_equal(sample, evaluate.sample_queries(1000, 100, seed=3))
    assert not np.array_equal(sample, evaluate.sample_queries(1000, 100, seed=4))
    assert evaluate.sample_queries(100, 100, seed=3) is None and evaluate.sample_queries(1000, 0, seed=3) is None


def test_downsample_keeps_half_of_one_label():
    labels = np.array([IR] * 10 + [MR] * 3 + [HR] * 2 + [IR])
    rows = downsample_label(labels, IR, 0.5, np.random.default_rng(0))
    assert (labels[rows] == IR).sum() == 5 and (labels[rows] != IR).sum() == 5
    assert np.all(np.diff(rows) > 0)


# --- plots and split source ----------------------------------------------------------------------

def test_plots_write_png_files(tmp_path):
    features, labels = blobs(15, 12, 8, 0.5, seed=4)
    aisles = np.array([f"aisle {i}" for i in labels])
    path = plot_tsne({"untuned": features, "dashclip": features * 2}, aisles, tmp_path / "tsne.png", seed=0,
                     max_points=100)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cos = np.random.default_rng(0).uniform(-1, 1, 50)
    hist = plot_cosine_histograms({"untuned": (cos, labels[:50] % 3), "dashclip": (cos, labels[:50] % 3)},
                                  tmp_path / "hist.png")
    assert hist.stat().st_size > 1000
    assert plot_tsne({"x": features[:3]}, aisles[:3], tmp_path / "none.png", seed=0) is None


def test_split_settings_come_from_the_training_config(tmp_path):
    fallback = split_settings(tmp_path, seed=3)
    assert fallback["seed"] == 3 and fallback["source"].startswith("defaults")
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "config.json").write_text(json.dumps({"seed": 7, "query_eval_fraction": 0.25}))
    recorded = split_settings(tmp_path, seed=3)
    assert (recorded["seed"], recorded["eval_fraction"], recorded["cold_fraction"]) == (7, 0.25, 0.0)
    assert recorded["source"] == "embeddings/config.json"
    assert fallback["cold_fraction"] == train.EmbeddingsTrainConfig.cold_product_fraction


# --- the command, end to end on the tiny synthetic data ------------------------------------------

TRAIN_FLAGS = ["--backbone", "tiny", "--image-size", "32", "--stage1-batch-size", "16", "--stage1-max-steps", "2",
               "--eval-every", "2", "--stage1-eval-max", "32", "--stage2-batch-size", "16", "--stage2-max-steps", "2",
               "--pqc-negatives", "4", "--stage2-eval-max", "32"]
EVAL_FLAGS = ["--probe-epochs", "3", "--tsne-points", "120"]


@pytest.mark.slow
def test_evaluate_command_end_to_end(tiny_workdir_copy, caplog):
    workdir = tiny_workdir_copy
    train.main(["--workdir", str(workdir), *TRAIN_FLAGS])
    export.main(["--workdir", str(workdir)])
    metrics = evaluate.main(["--workdir", str(workdir), *EVAL_FLAGS])

    out = workdir / "embeddings"
    assert read_json(out / "metrics.json") == json.loads(json.dumps(metrics))
    systems = {"random", "untuned_text", "untuned_image", "untuned", "dashclip"}
    scored = ("graded_relevance", "recall_at_10", "precision_at_10")
    for view in (metrics["retrieval"], metrics["retrieval_table1"]["systems"],
                 metrics["cold_start"]["retrieval"]["systems"]):
        assert set(view) == systems
        assert all(0.0 <= scores[k] <= 1.0 for scores in view.values() for k in scored)

    # the paper's Table 1 protocol: the seen products of the held-out pairs
    config = read_json(out / "config.json")
    catalog = read_table(workdir, "catalog").to_pandas()
    _, heldout = split_queries(read_table(workdir, "relevance").to_pandas(), config["query_eval_fraction"],
                               config["seed"])
    cold = split_cold_products(catalog, config["cold_product_fraction"], config["seed"])
    table1 = metrics["retrieval_table1"]
    assert table1["n_products"] == heldout.loc[~heldout["product_id"].isin(cold), "product_id"].nunique()
    assert table1["n_cold_excluded"] == heldout.loc[heldout["product_id"].isin(cold), "product_id"].nunique() > 0
    assert 0 < table1["chance"]["recall_at_10"] < 1
    # cold start: the products training left out (10% by default), every baseline, the probe near chance for random
    cold_start = metrics["cold_start"]
    assert config["cold_product_fraction"] == 0.1 and cold_start["n_products"] == len(cold) == 40
    assert metrics["split"]["n_cold_products"] == 40 and cold_start["retrieval"]["n_products"] == 40
    assert 0 < cold_start["retrieval"]["systems"]["dashclip"]["n_queries"] <= metrics["split"]["n_heldout_queries"]
    assert set(cold_start["aisle_f1"]) == systems and all(0 <= v <= 1 for v in cold_start["aisle_f1"].values())
    assert cold_start["aisle_probe"]["dashclip"]["n_test"] == 40
    assert cold_start["aisle_probe"]["dashclip"]["n_train"] == len(catalog) - 40
    assert cold_start["aisle_f1"]["random"] < 0.35  # 24 aisles: chance is about 0.04
    assert "systems" in cold_start["retrieval_complete"]
    # complete judgments from the synthetic generator: every held-out query, far more relevant products
    complete, judged = metrics["retrieval_complete"]["dashclip"], metrics["retrieval"]["dashclip"]
    assert complete["n_queries"] == metrics["split"]["n_heldout_queries"] >= judged["n_queries"]
    assert complete["precision_at_10"] >= judged["precision_at_10"]
    assert "With complete judgments" in (workdir / "embeddings" / "metrics.md").read_text()
    # the relevance oracle of the label views: the same queries, above chance
    oracle = metrics["retrieval_oracle"]
    assert oracle["n_queries"] == judged["n_queries"]
    assert oracle["recall_at_10"] > metrics["retrieval"]["random"]["recall_at_10"]
    assert table1["oracle"]["n_queries"] == table1["systems"]["dashclip"]["n_queries"]
    assert (workdir / "embeddings" / "metrics.md").read_text().count(evaluate.ORACLE_ROW) >= 3
    # DashCLIP against the best untuned system of each view, with bootstrap intervals
    gain = metrics["retrieval_gain"]
    assert set(gain) == {"labels", "complete", "table1", "cold_start"}
    assert gain["table1"]["n_queries"] == table1["systems"]["dashclip"]["n_queries"]
    for view in gain.values():
        assert view["baseline"].startswith("untuned")
        low, high = view["recall_at_10"]["ci95"]
        assert low <= view["recall_at_10"]["relative"] <= high
    assert "### DashCLIP against the best untuned encoder" in (workdir / "embeddings" / "metrics.md").read_text()
    for task in ("aisle_f1", "relevance_f1"):
        assert set(metrics[task]) == {"untuned", "dashclip"} and all(0 <= v <= 1 for v in metrics[task].values())
    assert set(metrics["relevance_probe"]["dashclip"]["per_class_recall"]) == {"IR", "MR", "HR"}
    # the held-out queries are those training left out
    assert metrics["split"]["source"] == "embeddings/config.json"
    assert metrics["split"]["eval_fraction"] == config["query_eval_fraction"]
    _, heldout = split_queries(read_table(workdir, "relevance").to_pandas(), config["query_eval_fraction"],
                               config["seed"])
    assert metrics["split"]["n_heldout_queries"] == heldout["query"].map(normalize_query).nunique()
    markdown = (out / "metrics.md").read_text()
    assert "| DashCLIP (trained) |" in markdown and "Recall@10" in markdown and "macro F1" in markdown
    assert "## Retrieval, paper Table 1 protocol" in markdown and "## Cold start" in markdown
    from experiments import report
    rendered = report.table1_protocol_section(workdir) + report.cold_start_section(workdir)
    assert "DashCLIP (image-text) | 0.667" in rendered and "### Aisle probe" in rendered
    assert sorted(metrics["plots"]) == ["plots/cosine_by_relevance.png", "plots/tsne.png"]
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in metrics["plots"])

    # made from the trained model, the data and the exported product table (whose vectors it used)
    made_from = evaluate.published_metrics(workdir).manifest()["made_from"]
    exported = tables.tables_set(workdir).verify()
    assert made_from["inputs"]["embeddings/product_table.parquet"] == exported["embeddings/product_table.parquet"]
    assert {"data/catalog.parquet", "data/relevance.parquet", "embeddings/checkpoints/model.pt",
            "embeddings/config.json"} <= made_from["inputs"].keys()

    caplog.set_level("INFO")
    assert evaluate.main(["--workdir", str(workdir), *EVAL_FLAGS]) == read_json(out / "metrics.json")
    assert "up to date" in caplog.text

    # a sample of the held-out queries (--max-queries): every view scores those alone
    n_all = metrics["split"]["n_heldout_queries"]
    assert metrics["split"]["n_heldout_queries_all"] == n_all
    sampled = evaluate.main(["--workdir", str(workdir), *EVAL_FLAGS, "--max-queries", str(n_all // 2)])
    assert sampled["split"]["n_heldout_queries"] == n_all // 2 and sampled["split"]["n_heldout_queries_all"] == n_all
    assert sampled["retrieval_complete"]["dashclip"]["n_queries"] == n_all // 2
    assert sampled["split"]["n_heldout_pairs"] < metrics["split"]["n_heldout_pairs"]
    assert f"a seeded sample of the {n_all} held-out queries" in (out / "metrics.md").read_text()
    assert f"a seeded sample of {n_all // 2} of the {n_all} held-out queries" in report.retrieval_section(workdir)
    assert "seeded sample" not in rendered  # the run over every held-out query says nothing of a sample


def test_evaluate_command_reports_missing_inputs_in_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "embeddings.evaluate", "--workdir", str(tmp_path)],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "catalog.parquet" in proc.stderr


def test_complete_judgments_that_cover_no_held_out_query_are_no_view(tmp_path: Path):
    """The `paper` profile writes a complete-judgment file without rows: no view, not an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.dataset import RELEVANCE_TRUTH_FILE

    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / RELEVANCE_TRUTH_FILE
    products = np.array([1, 2, 3], dtype=np.int64)
    pq.write_table(pa.table({"query": pa.array([], pa.string()), "product_id": pa.array([], pa.int64()),
                             "label": pa.array([], pa.int8())}), path)
    assert evaluate.complete_judgments(tmp_path, ["red tea"], products) is None
    pq.write_table(pa.table({"query": ["Red  Tea", "other"], "product_id": [2, 3],
                             "label": pa.array([2, 1], pa.int8())}), path)
    labels = evaluate.complete_judgments(tmp_path, ["red tea"], products)
    assert labels.shape == (1, 3) and labels.toarray()[0].tolist() == [0, 2, 0]
