"""Cold start: the product split kept out of both training stages, the evaluation views built on it
(and on the paper's Table 1 protocol), and their report sections. Unit-level: no training run."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.cli import UserError, check_config
from common.provenance import MadeFrom
from data.schema import read_table
from embeddings import train
from embeddings.config import EmbeddingsTrainConfig
from embeddings.evaluate import (Rankings, chance_retrieval, cold_start_views, pool_retrieval, retrieval_metrics,
                                 split_settings, train_probe)
from embeddings.sampling import split_cold_products, split_queries
from experiments import report

IR, MR, HR = 0, 1, 2


def unit(rows) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.float32)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def catalog(tiny_workdir) -> pd.DataFrame:
    return read_table(tiny_workdir, "catalog").to_pandas()[["product_id", "aisle", "title"]]


# --- the split -----------------------------------------------------------------------------------

def test_cold_split_is_stratified_by_aisle(catalog):
    cold = split_cold_products(catalog, 0.1, seed=0)
    assert cold.dtype == np.int64 and np.all(np.diff(cold) > 0)
    assert len(cold) == round(0.1 * len(catalog)) and set(cold) <= set(catalog["product_id"])
    per_aisle = catalog.assign(cold=catalog["product_id"].isin(cold)).groupby("aisle")["cold"].agg(["sum", "size"])
    share = 0.1 * per_aisle["size"]
    assert ((per_aisle["sum"] == np.floor(share)) | (per_aisle["sum"] == np.ceil(share))).all()
    assert (per_aisle["sum"] < per_aisle["size"]).all()  # every aisle keeps seen products


def test_cold_split_is_seeded_and_independent_of_row_order(catalog):
    cold = split_cold_products(catalog, 0.1, seed=0)
    shuffled = catalog.sample(frac=1.0, random_state=5)
    np.testing.assert_array_equal(split_cold_products(shuffled, 0.1, seed=0), cold)
    other = split_cold_products(catalog, 0.1, seed=1)
    assert len(other) == len(cold) and len(set(other) & set(cold)) < len(cold) // 2
    assert len(split_cold_products(catalog, 0.0, seed=0)) == 0
    # growing the fraction keeps the cold products of the smaller one (same per-aisle hash order)
    assert set(cold) <= set(split_cold_products(catalog, 0.3, seed=0))


def test_cold_split_never_empties_an_aisle_and_rejects_bad_input():
    small = pd.DataFrame({"product_id": [1, 2, 3, 4, 5, 6], "aisle": ["a", "b", "b", "c", "c", "c"]})
    cold = split_cold_products(small, 0.9, seed=0)
    by_aisle = small[small["product_id"].isin(cold)]["aisle"].value_counts().to_dict()
    assert by_aisle == {"b": 1, "c": 2}  # the single product of aisle a stays seen
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_cold_products(small, 1.0)
    with pytest.raises(ValueError, match="aisle"):
        split_cold_products(small[["product_id"]], 0.1)


# --- training never touches cold products --------------------------------------------------------

def test_stage1_rows_leave_out_cold_products_and_products_without_images():
    has_image = np.ones(100, dtype=bool)
    has_image[::7] = False
    cold = np.zeros(100, dtype=bool)
    cold[::5] = True
    train_rows, eval_rows = train.stage1_rows(has_image, cold, seed=0, eval_fraction=0.1, eval_max=256)
    assert not set(train_rows) & set(eval_rows)
    used = np.concatenate([train_rows, eval_rows])
    assert not cold[used].any() and has_image[used].all()
    assert len(used) == int((has_image & ~cold).sum()) and len(eval_rows) == round(0.1 * len(used))
    # without cold products: the split of earlier versions
    with_image = np.flatnonzero(has_image)
    shuffled = np.random.default_rng([0, 1]).permutation(with_image)
    n_eval = round(0.1 * len(with_image))
    old = np.sort(shuffled[n_eval:]), np.sort(shuffled[:n_eval])
    new = train.stage1_rows(has_image, np.zeros(100, dtype=bool), seed=0, eval_fraction=0.1, eval_max=256)
    assert all(np.array_equal(a, b) for a, b in zip(old, new))


def test_stage2_tuples_and_stage1_rows_of_the_trainer_exclude_cold_products(tiny_workdir_copy, catalog):
    cfg = EmbeddingsTrainConfig(workdir=str(tiny_workdir_copy), backbone="tiny", pqc_negatives=4, device="cpu")
    trainer = train.Trainer(cfg)
    cold = split_cold_products(catalog, cfg.cold_product_fraction, cfg.seed)
    np.testing.assert_array_equal(trainer.cold_products, cold)
    relevance = read_table(tiny_workdir_copy, "relevance").to_pandas()
    train_tuples, eval_tuples, negative_products = trainer._tuples(relevance)
    assert len(train_tuples) and len(eval_tuples)
    assert not np.isin(train_tuples.product_id, cold).any() and not np.isin(eval_tuples.product_id, cold).any()
    # the query-side negatives come from the same filtered pairs
    assert (negative_products >= 0).any() and not np.isin(negative_products, cold).any()
    # the exclusion does something: the same relevance table gives cold products tuples when nothing is cold
    unfiltered = train.Trainer(EmbeddingsTrainConfig(**{**cfg.__dict__, "cold_product_fraction": 0.0}))
    assert np.isin(unfiltered._tuples(relevance)[0].product_id, cold).any()
    # the query split is the whole table's, as the evaluation recomputes it; cold rows leave both sides
    train_df, eval_df = train.stage2_relevance(relevance, cold, cfg.query_eval_fraction, cfg.seed)
    split_train, split_eval = split_queries(relevance, cfg.query_eval_fraction, cfg.seed)
    assert set(eval_df["query"]) <= set(split_eval["query"]) and set(train_df["query"]) <= set(split_train["query"])
    assert len(train_df) + len(eval_df) == int((~relevance["product_id"].isin(cold)).sum())

    images = types.SimpleNamespace(has_image=np.ones(len(trainer.catalog), dtype=bool))
    rows = np.concatenate(trainer.split_stage1(images))
    seen = trainer.catalog["product_id"].to_numpy()[rows]
    assert not np.isin(seen, cold).any() and len(rows) == len(catalog) - len(cold)


def test_cold_fraction_is_a_training_setting_of_both_stages():
    cfg = EmbeddingsTrainConfig()
    assert cfg.cold_product_fraction == 0.1
    for stage in ("1", "2"):
        assert cfg.settings(stage)["cold_product_fraction"] == 0.1
    other = EmbeddingsTrainConfig(cold_product_fraction=0.2)
    assert MadeFrom({}, other.settings("1")).key() != MadeFrom({}, cfg.settings("1")).key()
    with pytest.raises(UserError, match="--cold-product-fraction"):
        check_config(EmbeddingsTrainConfig(cold_product_fraction=1.0))


def test_evaluation_takes_the_cold_fraction_training_recorded(tmp_path, catalog):
    (tmp_path / "embeddings").mkdir()
    config = tmp_path / "embeddings" / "config.json"
    config.write_text(json.dumps({"seed": 4, "query_eval_fraction": 0.2, "cold_product_fraction": 0.15}))
    assert split_settings(tmp_path, seed=0)["cold_fraction"] == 0.15
    config.write_text(json.dumps({"seed": 4, "query_eval_fraction": 0.2}))  # trained before the setting existed
    split = split_settings(tmp_path, seed=0)
    assert split["cold_fraction"] == 0.0
    view = cold_start_views(Rankings({}), catalog, np.zeros(len(catalog), dtype=bool), None, None, split, None, None)
    assert view["n_products"] == 0 and "trained on every product" in view["skipped"]


# --- pooled retrieval and chance ------------------------------------------------------------------

def test_chance_matches_random_vectors_on_a_large_pool():
    rng = np.random.default_rng(0)
    n_queries, n_products = 3000, 200
    labels = np.zeros((n_queries, n_products), dtype=np.int8)
    for q in range(n_queries):
        picked = rng.choice(n_products, 12, replace=False)
        labels[q, picked[:4]], labels[q, picked[4:8]], labels[q, picked[8:]] = HR, MR, IR
    chance = chance_retrieval(labels)
    assert chance == pytest.approx({"graded_relevance": 10 * 12 / (200 * 20), "recall_at_10": 10 / 200,
                                    "precision_at_10": 8 / 200, "n_queries": n_queries})
    random = retrieval_metrics(unit(rng.standard_normal((n_queries, 16))), unit(rng.standard_normal((n_products, 16))),
                               labels)
    for metric in ("graded_relevance", "recall_at_10", "precision_at_10"):
        assert random[metric] == pytest.approx(chance[metric], rel=0.1), metric
    small = chance_retrieval(np.array([[HR, 0, MR], [0, 0, 0]]), k=10)  # fewer products than k: all are returned
    assert small == pytest.approx({"graded_relevance": 3 / 20, "recall_at_10": 1.0, "precision_at_10": 0.2,
                                   "n_queries": 1})


def test_pool_retrieval_scores_the_pool_only_or_says_why_not():
    from scipy import sparse

    products = unit([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]])
    vectors = {f"{system}_{kind}": (products if kind != "query" else unit([[1, 0], [0, 1]]))
               for system in ("random", "untuned", "dashclip") for kind in ("query", "product")}
    vectors.update(untuned_text=products, untuned_image=products)
    labels = sparse.csr_matrix(np.array([[0, HR, 0, 0], [0, 0, MR, 0]], dtype=np.int8))
    rankings = Rankings(vectors, k=1)
    view = pool_retrieval(rankings, labels, np.array([1, 2]))
    assert view["n_products"] == 2 and set(view["systems"]) == {"random", "untuned_text", "untuned_image",
                                                                   "untuned", "dashclip"}
    assert view["systems"]["dashclip"] == pytest.approx({"graded_relevance": 0.75, "recall_at_1": 1.0,
                                                         "precision_at_1": 1.0, "n_queries": 2})
    assert view["chance"]["recall_at_1"] == pytest.approx(0.5)
    assert "skipped" in pool_retrieval(rankings, labels, np.array([0, 3]))
    # the rankings are shared: scoring the same pool again ranks nothing anew and agrees with retrieval_metrics
    cached = dict(rankings._top)
    assert rankings.metrics("dashclip", labels, np.array([1, 2])) == view["systems"]["dashclip"]
    assert rankings._top.keys() == cached.keys() and all(rankings._top[key] is cached[key] for key in cached)
    assert rankings.metrics("untuned", labels) == retrieval_metrics(vectors["untuned_query"], products, labels, k=1)


def test_probe_on_given_test_rows_trains_on_the_others():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 8)) * 3
    labels = np.repeat(np.array(["a", "b", "c", "d"]), 40)
    features = (centres[np.repeat(np.arange(4), 40)] + rng.standard_normal((160, 8))).astype(np.float32)
    test_rows = np.arange(0, 120, 4)  # classes a, b, c only
    result = train_probe(features, labels, seed=0, epochs=20, test_rows=test_rows)
    assert (result.n_train, result.n_test, result.n_classes) == (130, 30, 3)
    assert set(result.per_class_recall) == {"a", "b", "c"} and result.macro_f1 > 0.9
    noise = train_probe(rng.standard_normal((160, 8)).astype(np.float32), labels, seed=0, epochs=20,
                        test_rows=test_rows)
    assert noise.macro_f1 < 0.6
    # a test row of a class no training row has is dropped
    alone = train_probe(features, np.append(labels[:-1], "e"), seed=0, epochs=2, test_rows=np.array([0, 159]))
    assert alone.n_test == 1 and alone.n_train == 158


# --- the report ----------------------------------------------------------------------------------

def _scores(recall: float, n: int = 20) -> dict:
    return {"graded_relevance": recall / 2, "recall_at_10": recall, "precision_at_10": recall / 4, "n_queries": n}


def _probe(f1: float) -> dict:
    return {"macro_f1": f1, "per_class_recall": {}, "n_train": 90, "n_test": 10, "n_classes": 5}


def _metrics() -> dict:
    systems = {"random": _scores(0.05), "untuned_text": _scores(0.3), "untuned_image": _scores(0.2),
               "untuned": _scores(0.25), "dashclip": _scores(0.5)}
    pool = {"n_products": 80, "chance": _scores(0.06), "systems": systems}
    return {"retrieval": systems, "split": {"n_cold_products": 10}, "counts": {"products": 100},
            "retrieval_table1": {**pool, "pool": "...", "n_cold_excluded": 3},
            "cold_start": {"fraction": 0.1, "seed": 0, "n_products": 10, "n_aisles": 5, "retrieval": pool,
                           "aisle_f1": {k: v for k, v in zip(systems, (0.1, 0.5, 0.3, 0.4, 0.6))},
                           "aisle_probe": {k: _probe(v) for k, v in zip(systems, (0.1, 0.5, 0.3, 0.4, 0.6))}}}


def _write(root: Path, metrics: dict) -> Path:
    (root / "embeddings").mkdir(parents=True, exist_ok=True)
    (root / "embeddings" / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_report_puts_the_papers_table1_beside_ours_and_renders_cold_start(tmp_path):
    root = _write(tmp_path, _metrics())
    table1 = report.table1_protocol_section(root)
    assert "## Retrieval, paper Table 1 protocol" in table1 and "paper (DoorDash, private data)" in table1
    assert "| DashCLIP (ours, trained) | 0.2500 | 0.5000 | 0.1250 | DashCLIP (image-text) | 0.667 | 0.743 | 0.515 |" \
        in table1
    assert "| CLIP ViT-B/32 (image) | 0.529 | 0.666 | 0.325 |" in table1
    assert "| ours (best of random and the untuned encoders) | +66.7% | +66.7% | +66.7% |" in table1
    assert "best of its 7 baselines | +26.1% | +11.6% | +58.5% |" in table1 and "**Agrees in direction**" in table1
    cold = report.cold_start_section(root)
    assert "10 products (10% of the catalog" in cold and "| Random vectors (chance) | 0.1000 |" in cold
    assert "Chance (uniformly random ranking, expected)" in cold and cold.count("**Holds**") == 2
    full = report.retrieval_section(root)
    assert "## Retrieval (paper Table 1 layout)" in full and "| Untuned multimodal fusion |" in full
    assert "Relevance oracle" not in full + table1  # only with complete judgments

    with_oracle = _metrics()
    with_oracle["retrieval_oracle"] = _scores(0.7)
    with_oracle["retrieval_table1"]["oracle"] = _scores(0.8)
    root = _write(tmp_path / "oracle", with_oracle)
    assert "| Relevance oracle (true grades, ties at random, expected) | 0.3500 | 0.7000 | 0.1750 |" \
        in report.retrieval_section(root)
    assert "| Relevance oracle (true grades, ties at random, expected) | 0.4000 | 0.8000 | 0.2000 | — |" \
        in report.table1_protocol_section(root)

    skipped = _metrics()
    skipped["cold_start"] = {"fraction": 0.0, "seed": 0, "n_products": 0, "skipped": "trained on every product"}
    del skipped["retrieval_table1"]
    root = _write(tmp_path / "old", skipped)
    assert "Not evaluated: trained on every product." in report.cold_start_section(root)
    assert "--force" in report.table1_protocol_section(root)
    assert "has not run" in report.cold_start_section(tmp_path / "nothing")
