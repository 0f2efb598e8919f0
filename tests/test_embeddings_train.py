"""DashCLIP training end to end on tiny data: both stages, checkpoints and resume, skip logic,
export of the frozen tables, the encode API/CLI, and title-only catalogs."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from common.io import read_json
from data.text import normalize_query
from embeddings import encode, evaluate, export, tables, train
from embeddings.runtime import KERNEL_CACHE_CAPACITY, bound_kernel_cache, cpu_bf16_instructions, resolve_autocast

REPO = Path(__file__).resolve().parents[1]

# a few steps of each stage on the tiny synthetic marketplace, with the tiny random backbone
TINY_FLAGS = ["--backbone", "tiny", "--image-size", "32", "--stage1-batch-size", "16", "--stage1-max-steps", "4",
              "--eval-every", "2", "--stage1-eval-max", "32", "--stage2-batch-size", "16", "--stage2-max-steps", "4",
              "--pqc-negatives", "4", "--checkpoint-every", "2", "--stage2-eval-max", "32", "--threads", "1"]


@pytest.fixture
def workdir(tiny_workdir_copy) -> Path:
    """A private run directory holding a copy of the tiny synthetic data."""
    return tiny_workdir_copy


def _model_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "embeddings" / "checkpoints" / "model.pt", weights_only=True)["model"]


def _losses(log: dict, stage: str) -> list[float]:
    return [row["loss"] for row in log[stage]["steps"]]


def _by_hand(workdir: Path) -> None:
    """Make the data hand-placed (no data-set manifest), as a table is about to be edited."""
    (workdir / "data" / "manifest.json").unlink()


def _keep_queries(workdir: Path, n_queries: int) -> None:
    """Cut the relevance table to the first ``n_queries`` distinct queries that have an MR/HR product."""
    _by_hand(workdir)
    path = workdir / "data" / "relevance.parquet"
    relevance = pq.read_table(path)
    positive = relevance.filter(pc.greater_equal(relevance.column("label"), 1))
    keep = sorted(set(positive.column("query").to_pylist()))[:n_queries]
    pq.write_table(relevance.filter(pc.is_in(relevance.column("query"), value_set=pa.array(keep))), path)


# stage 2 on a handful of queries with all tuples in one batch: the random tiny encoders, whose
# [CLS] states start nearly parallel, can fit that in a few steps
STAGE2_FIT = ["--query-eval-fraction", "0", "--pqc-negatives", "2", "--stage2-batch-size", "256",
              "--stage2-epochs", "100", "--stage2-max-steps", "20", "--stage2-lr", "1e-3", "--stage2-head-lr", "1e-2"]


def test_end_to_end_train_export_encode(workdir, caplog):
    caplog.set_level(logging.INFO)
    _keep_queries(workdir, 10)
    result = train.main(["--workdir", str(workdir), *TINY_FLAGS, *STAGE2_FIT])
    ckpt = workdir / "embeddings" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.pt", "stage1.pt"]  # resume files are gone
    log = read_json(workdir / "embeddings" / "train_log.json")
    assert log == result
    stage1 = log["stage1"]
    assert [e["step"] for e in stage1["evals"]] == [0, 2, 4]
    assert stage1["best_step"] in (0, 2, 4) and len(stage1["steps"]) == 4
    assert all(np.isfinite([s["itc"] for s in stage1["steps"]] + [s["itm"] for s in stage1["steps"]]))
    gates = stage1["cross_attention_gates"]  # tiny: gated cross-attention, one gate per layer
    assert len(gates) == 2 and all(-1.0 < g < 1.0 for g in gates.values())
    assert "query_side" in log["stage2"]["steps"][-1]
    losses = _losses(log, "stage2")
    assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5])
    fixed_tuples_loss = [e["pqc_train_loss"] for e in log["stage2"]["evals"]]  # eval mode: no dropout noise
    assert fixed_tuples_loss[-1] < fixed_tuples_loss[0] - 0.15
    config = read_json(workdir / "embeddings" / "config.json")
    assert config["backbone"] == "tiny" and config["query_eval_fraction"] == 0.0 and config["seed"] == 0
    # the cold-start products (10% by default) take no part: neither stage-1 rows nor stage-2 tuples
    assert config["cold_product_fraction"] == 0.1
    assert stage1["n_cold_products"] == log["stage2"]["n_cold_products"] == 40
    assert stage1["n_train_products"] + stage1["n_eval_products"] == 400 - 40

    # a rerun with the same settings skips both stages
    caplog.clear()
    before = (ckpt / "model.pt").stat().st_mtime_ns
    log_written = (workdir / "embeddings" / "train_log.json").stat().st_mtime_ns
    train.main(["--workdir", str(workdir), *TINY_FLAGS, *STAGE2_FIT])
    assert (ckpt / "model.pt").stat().st_mtime_ns == before
    assert (workdir / "embeddings" / "train_log.json").stat().st_mtime_ns == log_written  # nothing new to log
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2

    export.main(["--workdir", str(workdir)])
    products = tables.read_embedding_table(tables.embedding_table_path(workdir, "product"), "product")
    queries = tables.read_embedding_table(tables.embedding_table_path(workdir, "query"), "query")
    catalog = pq.read_table(workdir / "data" / "catalog.parquet").to_pandas()
    assert products.keys[1:] == catalog["product_id"].tolist()
    assert not products.vectors[0].any() and not queries.vectors[0].any()
    np.testing.assert_allclose(np.linalg.norm(products.vectors[1:], axis=1), 1.0, rtol=1e-5)
    expected = {normalize_query(q) for name in ("relevance", "impressions")
                for q in pq.read_table(workdir / "data" / f"{name}.parquet", columns=["query"]).column(0).to_pylist()}
    assert set(queries.keys[1:]) == expected
    assert "model.pt" in products.source and products.source == queries.source

    # the encode API reproduces the exported vectors; the untuned encoder differs
    trained = encode.load_encoder(workdir, "trained")
    some = catalog.iloc[:5]
    np.testing.assert_allclose(trained.products(some), products.vectors[1:6], atol=1e-5)
    some_queries = queries.keys[1:4]
    np.testing.assert_allclose(trained.queries([q.upper() + "!" for q in some_queries]), queries.vectors[1:4],
                               atol=1e-5)
    untuned = encode.load_encoder(workdir, "untuned")
    assert not np.allclose(untuned.queries(some_queries), queries.vectors[1:4], atol=1e-3)

    # retrieval of the trained queries' products improves over the untuned encoders
    relevance = pq.read_table(workdir / "data" / "relevance.parquet").to_pandas()
    relevance["query"] = relevance["query"].map(normalize_query)
    trained_queries = sorted(relevance["query"].unique())
    labels = evaluate.relevance_matrix(relevance, trained_queries, catalog["product_id"].to_numpy())
    pair_query = pd.Index(trained_queries).get_indexer(relevance["query"])
    pair_product = pd.Index(catalog["product_id"]).get_indexer(relevance["product_id"])
    scores = {}
    for name, encoder in (("untuned", untuned), ("trained", trained)):
        query_vecs, product_vecs = encoder.queries(trained_queries), encoder.products(catalog)
        scores[name] = {**evaluate.retrieval_metrics(query_vecs, product_vecs, labels),
                        **evaluate.judged_ranking_metrics(query_vecs, product_vecs, pair_query, pair_product,
                                                          relevance["label"].to_numpy())}
    for metric in ("recall_at_10", "ndcg_at_10", "auc_relevant_vs_ir"):
        assert scores["trained"][metric] > scores["untuned"][metric], (metric, scores)
    for vectors in (trained.images(some), trained.texts(some["title"].tolist())):
        assert vectors.shape == (5, 256)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # one pass over the images gives the product vectors and the image-only ones of images()
    image_out = np.zeros((5, 256), np.float32)
    np.testing.assert_allclose(trained.products(some, image_out=image_out), trained.products(some), atol=1e-6)
    np.testing.assert_allclose(image_out, trained.images(some), atol=1e-5)

    # the CLI embeds a new catalog file and a query list without retraining
    new_catalog = workdir / "new_catalog.parquet"
    pq.write_table(pa.Table.from_pandas(some, preserve_index=False), new_catalog)
    out = workdir / "vectors.parquet"
    encode.main(["--workdir", str(workdir), "--kind", "product", "--input", str(new_catalog), "--out", str(out)])
    written = pq.read_table(out)
    assert written.column("product_id").to_pylist() == some["product_id"].tolist()
    np.testing.assert_allclose(np.stack(written.column("vector").to_numpy(zero_copy_only=False)),
                               products.vectors[1:6], atol=1e-5)
    query_file = workdir / "queries.txt"
    query_file.write_text("Fresh MILK!\n\noat milk\n")
    encode.main(["--workdir", str(workdir), "--kind", "query", "--input", str(query_file), "--out", str(out),
                 "--force"])
    assert pq.read_table(out).column("query").to_pylist() == ["fresh milk", "oat milk"]


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_workdir, tmp_path):
    runs = {}
    for name in ("straight", "interrupted"):
        shutil.copytree(tiny_workdir / "data", tmp_path / name / "data")
        runs[name] = tmp_path / name
    flags = [*TINY_FLAGS, "--stage1-max-steps", "5", "--stage2-max-steps", "5"]
    train.main(["--workdir", str(runs["straight"]), *flags])

    run = runs["interrupted"]
    paused = train.main(["--workdir", str(run), *flags, "--max-steps-this-run", "3"])  # stops inside stage 1
    assert paused["paused"] and paused["stage1"]["steps_done"] == 3
    assert (run / "embeddings" / "checkpoints" / "stage1_last.pt").exists()
    paused = train.main(["--workdir", str(run), *flags, "--max-steps-this-run", "4"])  # ends stage 1, into stage 2
    assert paused["paused"] and paused["stage2"]["steps_done"] == 2
    done = train.main(["--workdir", str(run), *flags])
    assert "paused" not in done

    straight, resumed = _model_state(runs["straight"]), _model_state(run)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    model = Path("embeddings/checkpoints/model.pt")
    assert (runs["straight"] / model).read_bytes() == (run / model).read_bytes()
    log_a, log_b = (read_json(r / "embeddings" / "train_log.json") for r in (runs["straight"], run))
    for stage in ("stage1", "stage2"):
        assert _losses(log_a, stage) == _losses(log_b, stage)
        assert log_a[stage]["evals"] == log_b[stage]["evals"]
    assert log_a["stage1"]["best_step"] == log_b["stage1"]["best_step"]


def test_bf16_autocast_on_cpu_trains_deterministically_and_is_a_setting(tiny_workdir, tmp_path):
    """``--autocast bf16`` runs the encoders in bf16 on CPU: two runs give the same bytes, the
    weights differ from the float32 run's, and a float32 stage-1 checkpoint is not reused for it."""
    runs = {}
    for name in ("fp32", "bf16_a", "bf16_b"):
        shutil.copytree(tiny_workdir / "data", tmp_path / name / "data")
        runs[name] = tmp_path / name
        autocast = "fp32" if name == "fp32" else "bf16"
        train.main(["--workdir", str(runs[name]), *TINY_FLAGS, "--autocast", autocast])
        assert all(np.isfinite(_losses(read_json(runs[name] / "embeddings" / "train_log.json"), "stage2")))
    model = Path("embeddings/checkpoints/model.pt")
    assert (runs["bf16_a"] / model).read_bytes() == (runs["bf16_b"] / model).read_bytes()
    fp32, bf16 = _model_state(runs["fp32"]), _model_state(runs["bf16_a"])
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)
    # the float32 run's outputs are not reused when the precision changes: stage 1 trains again
    train.main(["--workdir", str(runs["fp32"]), *TINY_FLAGS, "--autocast", "bf16"])
    assert (runs["fp32"] / model).read_bytes() == (runs["bf16_a"] / model).read_bytes()


def test_training_autocast_auto_is_recorded_as_the_precision_it_chose(tiny_workdir, tmp_path):
    """``--autocast auto`` is bf16 on CUDA and on CPUs with bf16 instructions, float32 on others; the
    run records the precision it chose, so a run asking for that precision by name reuses it."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    chosen = resolve_autocast("auto", cpu)
    assert chosen == ("bf16" if cpu_bf16_instructions() else "fp32")
    assert resolve_autocast("auto", cuda) == "bf16" and resolve_autocast("fp32", cuda) == "fp32"
    assert resolve_autocast("bf16", cpu) == "bf16"
    shutil.copytree(tiny_workdir / "data", tmp_path / "data")
    train.main(["--workdir", str(tmp_path), *TINY_FLAGS, "--autocast", "auto"])
    assert read_json(tmp_path / "embeddings" / "config.json")["autocast"] == chosen
    model = tmp_path / "embeddings" / "checkpoints" / "model.pt"
    trained = model.stat().st_mtime_ns
    train.main(["--workdir", str(tmp_path), *TINY_FLAGS, "--autocast", chosen])
    assert model.stat().st_mtime_ns == trained  # both stages reused


def test_kernel_cache_bound_is_a_default_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    bound_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"


def test_training_on_two_threads_is_byte_identical_and_states_only_the_products_it_reads(tiny_workdir, tmp_path,
                                                                                          caplog):
    """Two threads: two runs give the same bytes (the deterministic kernels are on inside ``main`` and
    off again after). Under a step budget shorter than an epoch stage 2 encodes the states of the
    products its batches read, not of every product with a tuple."""
    caplog.set_level(logging.INFO)
    model = Path("embeddings/checkpoints/model.pt")
    runs = []
    for name in ("a", "b"):
        shutil.copytree(tiny_workdir / "data", tmp_path / name / "data")
        train.main(["--workdir", str(tmp_path / name), *TINY_FLAGS, "--threads", "2"])
        runs.append((tmp_path / name / model).read_bytes())
    assert runs[0] == runs[1]
    assert not torch.are_deterministic_algorithms_enabled()
    budget = next(r.getMessage() for r in caplog.records if "the step budget reads" in r.getMessage())
    read, total = (int(w) for w in budget.split() if w.isdigit())
    assert 4 * 16 <= read < total  # 4 steps of 16 tuples (and the probe) of all the training tuples


def test_query_states_cache_every_query_when_they_fit_else_the_ones_training_reads():
    from embeddings.config import DashCLIPConfig
    from embeddings.inputs import TokenStore
    from embeddings.models import build_dashclip

    model, tokenizer, _ = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, freeze_fraction=0.5))
    model.eval()
    tokens = TokenStore(tokenizer, [f"query number {i}" for i in range(40)], 16)
    every_mb = 40 * int(tokens.lengths.max()) * model.query_encoder.width * 4 / 2**20
    needed = np.array([1, 5, 7])
    store = train.QueryPrefixStore(model, tokens, torch.device("cpu"), contextlib.nullcontext, every_mb / 2,
                                   needed=needed)
    assert store.cache is not None and store.cache.shape[0] == 3
    states, mask = store.batch(np.array([5, 1]))
    direct, direct_mask = store._compute(np.array([5, 1]))
    torch.testing.assert_close(states, direct.float())
    torch.testing.assert_close(mask, direct_mask)
    with pytest.raises(ValueError, match="outside the cached"):
        store.batch(np.array([2]))
    roomy = train.QueryPrefixStore(model, tokens, torch.device("cpu"), contextlib.nullcontext, every_mb * 2,
                                   needed=needed)
    assert roomy.cache.shape[0] == 40
    assert train.QueryPrefixStore(model, tokens, torch.device("cpu"), contextlib.nullcontext, 0.0).cache is None


def test_query_states_of_a_query_read_with_a_typo_come_from_its_text_not_the_cache():
    from embeddings.config import DashCLIPConfig
    from embeddings.inputs import TokenStore
    from embeddings.models import build_dashclip

    model, tokenizer, _ = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, freeze_fraction=0.5))
    model.eval()
    texts = ["oat milk", "whole milk", "sparkling water bottles", "rye bread"]
    tokens = TokenStore(tokenizer, texts, 16)
    for cache_mb in (0.0, 64.0):  # computed per batch, and cached for queries 0..2 (3 is not cached)
        store = train.QueryPrefixStore(model, tokens, torch.device("cpu"), contextlib.nullcontext, cache_mb,
                                       needed=np.array([0, 1, 2]))
        assert (store.cache is not None) == (cache_mb > 0)
        indices = np.array([0, 3, 2])
        states, mask = store.batch(indices, [None, "rye bred", "sparklign water bottles"])
        alone = TokenStore(tokenizer, ["oat milk", "rye bred", "sparklign water bottles"], 16)
        direct, direct_mask = store._states(*alone.batch(np.arange(3)))
        assert mask.shape == direct_mask.shape and torch.equal(mask, direct_mask)
        valid = direct_mask[..., None].bool()  # the states at padded positions depend on the batch
        torch.testing.assert_close(states.masked_fill(~valid, 0), direct.float().masked_fill(~valid, 0))
        same, same_mask = store.batch(np.array([0, 1]), [None, None])  # no typo: the stored states
        plain, plain_mask = store.batch(np.array([0, 1]))
        assert torch.equal(same, plain) and torch.equal(same_mask, plain_mask)


@pytest.mark.parametrize("augmentation, recorded, logged", [
    (("--pqc-query-typo-rate", "1"), {"pqc_query_typo_rate": 1.0}, "typo augmentation"),
    (("--pqc-title-query-rate", "1"), {"pqc_title_query_rate": 1.0}, "title-span queries"),
    (("--pqc-title-query-rate", "1", "--pqc-title-query-context"),
     {"pqc_title_query_rate": 1.0, "pqc_title_query_context": True}, "the query's words the title lacks"),
    (("--pqc-title-query-rate", "1", "--pqc-title-query-brand-share", "0.5"),
     {"pqc_title_query_rate": 1.0, "pqc_title_query_brand_share": 0.5}, "their product's brand")])
def test_query_augmentation_is_a_stage2_setting_that_trains_deterministically_and_resumes(
        tiny_workdir, tmp_path, caplog, augmentation, recorded, logged):
    """Typos and title-span queries (with or without the query's own modifiers, brands for some):
    stage 1 is reused, stage 2 retrains and ends elsewhere than without them; a run paused inside stage 2 and resumed
    gives the same bytes (what a step reads is drawn from the seed and the step)."""
    caplog.set_level(logging.INFO)
    runs = {}
    for name in ("plain", "paused"):
        shutil.copytree(tiny_workdir / "data", tmp_path / name / "data")
        runs[name] = tmp_path / name
    model = Path("embeddings/checkpoints/model.pt")
    train.main(["--workdir", str(runs["plain"]), *TINY_FLAGS])
    without = (runs["plain"] / model).read_bytes()
    caplog.clear()
    flags = [*TINY_FLAGS, *augmentation]
    train.main(["--workdir", str(runs["plain"]), *flags])
    messages = [r.getMessage() for r in caplog.records]
    assert any("stage 1" in m and "skipping" in m for m in messages)
    assert any(logged in m for m in messages)
    augmented = (runs["plain"] / model).read_bytes()
    assert augmented != without
    config = read_json(runs["plain"] / "embeddings" / "config.json")
    assert {field: config[field] for field in recorded} == recorded

    paused = train.main(["--workdir", str(runs["paused"]), *flags, "--max-steps-this-run", "6"])  # 2 stage-2 steps
    assert paused["paused"] and paused["stage2"]["steps_done"] == 2
    train.main(["--workdir", str(runs["paused"]), *flags])
    assert (runs["paused"] / model).read_bytes() == augmented


def test_brand_spans_read_the_catalog_brand_and_fall_back_to_spans_where_it_is_null(tiny_workdir, tmp_path, caplog):
    """``--pqc-title-query-brand-share 1``: every title-span query is its product's brand, so the model
    differs from spans alone; a catalog whose brands are all null trains exactly as spans alone."""
    caplog.set_level(logging.INFO)
    spans = ["--pqc-title-query-rate", "1"]
    models = {}
    brands = [*spans, "--pqc-title-query-brand-share", "1"]
    for name, flags, null_brands in (("spans", spans, False), ("brands", brands, False), ("null", brands, True)):
        shutil.copytree(tiny_workdir / "data", tmp_path / name / "data")
        if null_brands:
            _by_hand(tmp_path / name)
            path = tmp_path / name / "data" / "catalog.parquet"
            catalog = pq.read_table(path)
            catalog = catalog.set_column(catalog.column_names.index("brand"), pa.field("brand", pa.string()),
                                         pa.nulls(catalog.num_rows, pa.string()))
            pq.write_table(catalog, path)
        caplog.clear()
        train.main(["--workdir", str(tmp_path / name), *TINY_FLAGS, *flags])
        models[name] = (tmp_path / name / "embeddings" / "checkpoints" / "model.pt").read_bytes()
    assert models["brands"] != models["spans"]
    assert models["null"] == models["spans"]
    assert any("0 of " in r.getMessage() and "have a brand" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("flags", [("--pqc-title-query-context",), ("--pqc-title-query-brand-share", "0.3")])
def test_title_span_options_without_title_spans_are_refused(tmp_path, flags):
    from common.cli import UserError

    with pytest.raises(UserError, match="need --pqc-title-query-rate > 0"):
        train.main(["--workdir", str(tmp_path), *TINY_FLAGS, *flags])
    assert not (tmp_path / "embeddings").exists()


def test_a_stage2_step_reads_typos_of_its_positive_queries_and_brand_spans_in_their_place():
    from embeddings.config import EmbeddingsTrainConfig

    stage = object.__new__(train.Stage2)  # the attributes step_queries reads, without models or data
    stage.query_text = ["oat milk", "rye bread", "sparkling water", "whole milk", "sourdough bread", "cola"]
    stage.tuple_queries = np.array([[0, 1, 2], [3, 4, 0]])  # positive first; query 0 is also a negative
    stage.tuple_rows = np.array([0, 1])
    stage.product_title = ["Moolo Oat Milk 64 fl oz Carton", "Boorra Sourdough Bread 24 oz Bag"]
    stage.product_brand = ["Moolo", None]
    picked = np.array([0, 1])
    stage.cfg = EmbeddingsTrainConfig(pqc_query_typo_rate=1.0)
    query_index, title_query, texts = stage.step_queries(picked, step=3)
    assert sorted(texts) == [0, 3] and not title_query.any()  # every positive, no negative (1, 2, 4)
    assert all(texts[q] != stage.query_text[q] and len(texts[q].split()) == 2 for q in texts)
    assert np.array_equal(query_index, stage.tuple_queries)
    assert stage.step_queries(picked, step=3)[2] == texts  # drawn from (seed, step)
    stage.cfg = EmbeddingsTrainConfig(pqc_title_query_rate=1.0, pqc_title_query_brand_share=1.0)
    query_index, title_query, texts = stage.step_queries(picked, step=3)
    assert title_query.all() and np.array_equal(query_index[:, 0], [6, 7])  # new indices after the queries
    assert np.array_equal(query_index[:, 1:], stage.tuple_queries[:, 1:])
    assert texts[6] == "moolo"  # the brand; the product without one keeps a span of its title
    assert 1 <= len(texts[7].split()) <= 3 and texts[7] in "boorra sourdough bread 24 oz bag"


def test_items_drawn_are_the_batches_of_the_planned_steps():
    for n_items, batch, steps in ((100, 16, 3), (100, 16, 6), (100, 16, 13), (7, 7, 4)):
        expected = np.unique(np.concatenate([train.batch_at(np.arange(n_items), batch, 5, s) for s in range(steps)]))
        assert np.array_equal(train.items_drawn(n_items, batch, 5, steps), expected)


def test_stage2_log_share_is_each_product_share_of_the_tuples():
    # state rows 0..3; tuples of row 1 (x3), row 0 (x1) and two tuples whose product has no state (-1)
    share = train.Stage2.log_share(np.array([1, 0, 1, -1, 1, -1]), 4)
    assert share.dtype == np.float32
    np.testing.assert_allclose(np.exp(share), [1 / 6, 3 / 6, 1 / 6, 1 / 6], rtol=1e-6)  # no tuple: counted as one


def test_tuple_query_matrices_index_queries_in_order_of_first_use():
    def tuples(queries, positive, negatives):
        negatives = np.array(negatives, dtype=np.int32)
        return train.PQCTuples(np.array(queries, dtype=object), np.arange(len(positive)), np.array(positive, np.int32),
                               np.ones(len(positive), np.int8), negatives, np.zeros_like(negatives, np.int8))

    first = tuples(["b", "c", "d"], [2, 0], [[0, 1], [1, 2]])  # d | b c, then b | c d
    second = tuples(["a", "c"], [1], [[0, 1]])  # c | a c
    text, (m1, m2) = train.tuple_query_matrices([first, second])
    assert text == ["d", "b", "c", "a"]
    assert m1.tolist() == [[0, 1, 2], [1, 2, 0]] and m2.tolist() == [[2, 3, 2]] and m1.dtype == np.int32


def test_title_only_catalog(workdir, caplog):
    caplog.set_level(logging.INFO)
    path = workdir / "data" / "catalog.parquet"
    catalog = pq.read_table(path)
    catalog = catalog.set_column(catalog.column_names.index("image"), pa.field("image", pa.binary()),
                                 pa.nulls(catalog.num_rows, pa.binary()))
    _by_hand(workdir)
    pq.write_table(catalog, path)
    train.main(["--workdir", str(workdir), *TINY_FLAGS])
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "stage 1 skipped" in messages and "no image" in messages
    log = read_json(workdir / "embeddings" / "train_log.json")
    assert log["stage1"]["skipped"] and len(log["stage2"]["steps"]) == 4
    export.main(["--workdir", str(workdir)])
    products = tables.read_embedding_table(tables.embedding_table_path(workdir, "product"), "product")
    assert len(products.keys) == catalog.num_rows + 1
    np.testing.assert_allclose(np.linalg.norm(products.vectors[1:], axis=1), 1.0, rtol=1e-5)
    encoder, first = encode.load_encoder(workdir), catalog.to_pandas().iloc[:3]
    image_out = np.zeros((3, 256), np.float32)
    encoder.products(first, image_out=image_out)
    assert not encoder.images(first).any() and not image_out.any()  # no image, no image vector


def test_stage2_alone_needs_stage1(workdir):
    from common.cli import UserError

    with pytest.raises(UserError, match="stage-1 output"):
        train.main(["--workdir", str(workdir), *TINY_FLAGS, "--stage", "2"])


def test_cli_reports_missing_data_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "embeddings.train", "--workdir", str(tmp_path), "--backbone", "tiny"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "catalog.parquet" in proc.stderr
    assert "Traceback" not in proc.stderr
