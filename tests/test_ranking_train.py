"""End to end: ``python -m ranking.train`` on the tiny synthetic profile with random tables."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from common.cli import UserError, run_main
from common.io import read_json
from data.schema import read_table
from data.text import normalize_query
from embeddings.tables import build_table, embedding_table_path, read_embedding_table, write_table
from ranking import layout, train
from ranking.config import RankerConfig
from ranking.features import ImpressionCache, RankingData
from ranking.metrics import SLICES, log_loss, roc_auc
from ranking.model import TABLE_WEIGHTS, load_model, trained_set
from ranking.spec import PurchaseIndex
from ranking.tables import PRODUCT_TABLE, QUERY_TABLE
from ranking.variants import VARIANTS

FAST = ["--epochs", "2", "--checks-per-epoch", "2", "--patience", "2", "--batch-size", "256", "--eval-batch-size", "512",
        "--threads", "1", "--workers", "1"]
REPO = Path(__file__).resolve().parents[1]


def write_random_tables(workdir: Path, dim: int = 16, query_dim: int | None = None, seed: int = 0) -> None:
    """Random product/query tables keyed like embeddings.export's (catalog ids; relevance + impression queries)."""
    rng = np.random.default_rng(seed)
    ids = read_table(workdir, "catalog", columns=["product_id"]).column("product_id").to_pylist()
    queries = sorted({normalize_query(q) for name in ("relevance", "impressions")
                      for q in pc.unique(read_table(workdir, name, columns=["query"]).column("query")).to_pylist()})
    write_table(build_table("product", ids, rng.normal(size=(len(ids), dim)), "test:random"),
                embedding_table_path(workdir, "product"))
    write_table(build_table("query", queries, rng.normal(size=(len(queries), query_dim or dim)), "test:random"),
                embedding_table_path(workdir, "query"))


@pytest.mark.slow
def test_all_variants_two_seeds_end_to_end(tiny_workdir_copy, caplog):
    workdir = tiny_workdir_copy
    write_random_tables(workdir)
    argv = ["--workdir", str(workdir), "--variant", "all", "--seeds", "2", *FAST, "--workers", "2"]
    results = train.main(argv)  # two spawned worker processes; the forced rerun below runs in-process
    on_disk = json.loads((workdir / layout.RESULTS_JSON_REL).read_text())
    assert on_disk == json.loads(json.dumps(results))
    for variant in VARIANTS:
        for name in SLICES:
            entry = on_disk[variant][name]
            for key in ("auc_mean", "auc_std", "norm_logloss_mean", "norm_logloss_std", "p_value_vs_dcn"):
                assert key in entry, (variant, name, key)
            assert entry["seeds"] == [0, 1]
        assert 0.0 < on_disk[variant]["nw"]["auc_mean"] < 1.0
        assert (on_disk[variant]["nw"]["p_value_vs_dcn"] is None) == (variant == "dcn")
        for seed in (0, 1):
            assert (layout.run_dir(workdir, variant, seed) / layout.MODEL_FILE).exists()
    table = (workdir / layout.RESULTS_MD_REL).read_text()
    assert all(f"| {v} |" in table for v in VARIANTS) and "nw_hist AUC" in table

    # the saved model reloads and scores exactly what the metrics were computed from
    model = load_model(layout.run_dir(workdir, "dcn_pq_hist", 1) / layout.MODEL_FILE)
    data = RankingData(ImpressionCache.open(workdir), PurchaseIndex.from_workdir(workdir), model.spec)
    labels, probs, hist = train.predict(model, data, "eval")
    metrics = json.loads((layout.run_dir(workdir, "dcn_pq_hist", 1) / layout.METRICS_FILE).read_text())
    assert roc_auc(labels, probs) == pytest.approx(metrics["slices"]["nw"]["auc"], abs=1e-12)
    assert int(hist.sum()) == metrics["slices"]["nw_hist"]["impressions"]
    # early stopping kept the parameters of the best validation check
    valid = metrics["history"]["valid_logloss"]
    assert len(valid) >= 2 and metrics["history"]["best_check"] == int(np.argmin(valid))
    labels, probs, _ = train.predict(model, data, "valid")
    assert log_loss(labels, probs) == pytest.approx(min(valid), rel=1e-6)

    # finished runs are skipped; a forced rerun of one seed is deterministic
    mtime = (layout.run_dir(workdir, "dcn", 0) / layout.MODEL_FILE).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        train.main(["--workdir", str(workdir), "--variant", "dcn", "--seeds", "1", *FAST])
    assert "skipping" in caplog.text
    assert (layout.run_dir(workdir, "dcn", 0) / layout.MODEL_FILE).stat().st_mtime_ns == mtime
    results = [workdir / rel for rel in (layout.RESULTS_JSON_REL, layout.RESULTS_MD_REL, layout.RESULTS_MANIFEST_REL)]
    published = [path.stat().st_mtime_ns for path in results]
    caplog.clear()
    with caplog.at_level("INFO"):  # the same command again: nothing to train, the same results, nothing written
        train.main(["--workdir", str(workdir), "--variant", "dcn", "--seeds", "1", *FAST])
    assert "left as they are" in caplog.text and [path.stat().st_mtime_ns for path in results] == published
    seed0 = layout.run_dir(workdir, "dcn_pq_hist_random", 0)
    before = {name: (seed0 / name).read_bytes() for name in (layout.MODEL_FILE, layout.METRICS_FILE)}  # trained by a worker
    merged = train.main(["--workdir", str(workdir), "--variant", "dcn_pq_hist_random", "--seeds", "1", "--force", *FAST])
    assert {name: (seed0 / name).read_bytes() for name in before} == before
    assert set(merged) == {"inputs", *VARIANTS}  # merged with the variants already there (same data and tables)


def test_unknown_variant_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "ranking.train", "--variant", "dcn_bogus", "--workdir", "/nonexistent"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dcn_bogus" in lines[0] and "dcn_pq_hist_random" in lines[0], proc.stderr


def _cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(train.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_or_mismatched_tables_name_the_file(tiny_workdir_copy, capsys):
    workdir = tiny_workdir_copy
    argv = ["--workdir", str(workdir), "--variant", "dcn_pq", "--seeds", "1", *FAST]
    line = _cli_error(argv, capsys)
    assert "embeddings/product_table.parquet" in line and "missing embedding table" in line
    write_random_tables(workdir, dim=16, query_dim=8)
    line = _cli_error(argv, capsys)
    assert "embeddings/query_table.parquet" in line and "dimension 8 does not match" in line


@pytest.mark.parametrize("table_optimizer", ["same", "rowwise_adagrad"])
def test_finetune_moves_exactly_the_table_rows_it_trains_on(tiny_workdir_copy, table_optimizer, tmp_path):
    """dcn_pq_hist_finetune starts from the table files and its row-sparse updates (SparseAdam, or
    the row-wise Adagrad) change exactly the rows that training batches look up; dcn_pq_hist's
    frozen tables stay the files' rows."""
    workdir = tiny_workdir_copy
    write_random_tables(workdir)
    results = train.main(["--workdir", str(workdir), "--variant", "dcn_pq_hist,dcn_pq_hist_finetune", "--seeds", "1",
                          *FAST, "--epochs", "1", "--no-early-stopping", "--table-optimizer", table_optimizer])
    def settings(variant):
        return read_json(layout.run_dir(workdir, variant, 0) / layout.RUN_MANIFEST_FILE)["made_from"]["settings"]
    assert settings("dcn_pq_hist_finetune")["table_optimizer"] == table_optimizer
    assert "table_optimizer" not in settings("dcn_pq_hist")  # frozen tables: the same run either way
    files = {PRODUCT_TABLE: read_embedding_table(embedding_table_path(workdir, "product"), "product").vectors,
             QUERY_TABLE: read_embedding_table(embedding_table_path(workdir, "query"), "query").vectors}
    finetuned, frozen = (load_model(layout.run_dir(workdir, v, 0) / layout.MODEL_FILE)
                         for v in ("dcn_pq_hist_finetune", "dcn_pq_hist"))
    data = RankingData(ImpressionCache.open(workdir), PurchaseIndex.from_workdir(workdir), finetuned.spec)
    seen: dict[str, set[int]] = {PRODUCT_TABLE: set(), QUERY_TABLE: set()}
    for batch in data.batches("train", 4096):  # without early stopping every step trains on the train split
        seen[PRODUCT_TABLE].update(batch.product_rows.tolist() + batch.history_rows[batch.history_rows >= 0].tolist())
        seen[QUERY_TABLE].update(batch.query_rows.tolist())
    for table, vectors in files.items():
        def weights(model):
            return model.table_tower.tables.ebc.embedding_bags[table].weight.detach().numpy()
        np.testing.assert_array_equal(weights(frozen), vectors)
        changed = set(np.flatnonzero((weights(finetuned) != vectors).any(axis=1)).tolist())
        assert 0 < len(seen[table]) < len(vectors) and changed == seen[table], table
    auc = results["dcn_pq_hist_finetune"]["nw"]["auc_mean"]
    assert math.isfinite(auc) and 0.0 < auc < 1.0
    if table_optimizer == "same":
        frozen_tables_are_named_not_held(workdir, files, tmp_path)


def frozen_tables_are_named_not_held(workdir: Path, files: dict[str, np.ndarray], tmp_path: Path) -> None:
    """dcn_pq_hist's checkpoint names the table files (relative to itself) instead of holding them;
    the finetuned one holds its tables. A moved workdir still loads; changed tables are one line."""
    paths = {v: layout.run_dir(workdir, v, 0) / layout.MODEL_FILE for v in ("dcn_pq_hist", "dcn_pq_hist_finetune")}
    frozen, finetuned = (torch.load(paths[v], weights_only=True, mmap=True) for v in paths)
    assert frozen["frozen_tables"]["workdir"] == "../../.." and not set(TABLE_WEIGHTS) & set(frozen["state_dict"])
    assert "frozen_tables" not in finetuned and set(TABLE_WEIGHTS) <= set(finetuned["state_dict"])
    table_bytes = sum(v.nbytes for v in files.values())
    assert paths["dcn_pq_hist"].stat().st_size + table_bytes <= paths["dcn_pq_hist_finetune"].stat().st_size
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    shutil.rmtree(moved / "embeddings" / "mapped")  # a plain cache: made again from the table files
    model = load_model(layout.run_dir(moved, "dcn_pq_hist", 0) / layout.MODEL_FILE)
    for table, vectors in files.items():
        np.testing.assert_array_equal(model.table_tower.tables.ebc.embedding_bags[table].weight.numpy(), vectors)
    write_random_tables(moved, seed=1)
    with pytest.raises(UserError) as error:
        load_model(layout.run_dir(moved, "dcn_pq_hist", 0) / layout.MODEL_FILE)
    message = str(error.value)
    assert "\n" not in message and "python -m ranking.train" in message
    assert "embeddings/product_table.parquet with sha256" in message and str(moved / "embeddings") in message
    alone = tmp_path / "alone" / "ranking" / "dcn_pq_hist" / "seed0"  # the checkpoint without its workdir
    alone.mkdir(parents=True)
    shutil.copy(paths["dcn_pq_hist"], alone / layout.MODEL_FILE)
    with pytest.raises(UserError, match=r"which is missing \(a checkpoint with frozen tables stays inside"):
        load_model(alone / layout.MODEL_FILE)


def test_architecture_flags_build_the_model_and_decide_reuse(tiny_workdir_copy, caplog):
    workdir = tiny_workdir_copy
    argv = ["--workdir", str(workdir), "--variant", "dcn", "--seeds", "1", *FAST, "--epochs", "1"]
    small = ["--sparse-embedding-dim", "4", "--dcn-deep-sizes", "16", "8", "--head-sizes", "8"]
    train.main([*argv, *small])
    out = trained_set(workdir, "dcn", 0)
    model = load_model(out.path(out.files[0]))
    assert model.config == RankerConfig(sparse_embedding_dim=4, dcn_deep_sizes=[16, 8], head_sizes=[8])
    assert model.dcn_tower.out_features == 8 and model.head[1].in_features == 8
    assert out.manifest()["made_from"]["settings"]["model"]["dcn_deep_sizes"] == [16, 8]
    for flags, reused in ((small, True), ([], False)):  # the architecture is part of what a run is made from
        caplog.clear()
        with caplog.at_level("INFO"):
            train.main([*argv, *flags])
        assert ("skipping" in caplog.text) == reused
    assert load_model(out.path(out.files[0])).config == RankerConfig()


@pytest.mark.parametrize("flags, message", [
    (["--head-sizes"], "--head-sizes must be one or more values >= 1, got []"),
    (["--table-deep-sizes", "16", "0"], "--table-deep-sizes must be one or more values >= 1, got [16, 0]"),
    (["--table-proj-dim", "0"], "--table-proj-dim must be >= 1, got 0"),
])
def test_bad_architecture_flags_are_one_line(flags, message, capsys):
    assert _cli_error(["--workdir", "/nonexistent", *flags], capsys) == f"error: {message}"


def test_bench_times_every_model_batch_by_batch(tiny_workdir_copy):
    """``ranking.bench`` runs (no timing is checked): every variant and both torchrec references,
    wall-clock and CPU rates, and each variant's ratios to its reference of the same run."""
    from ranking import bench

    workdir = tiny_workdir_copy
    write_random_tables(workdir)
    rows = bench.main(["--workdir", str(workdir), "--batch-size", "256", "--steps", "2", "--warmup", "1",
                       "--sparse-embedding-dim", "4", "--dcn-deep-sizes", "16", "8", "--table-deep-sizes", "16", "8",
                       "--head-sizes", "8"])
    on_disk = json.loads((workdir / layout.BENCH_JSON_REL).read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rows)) and on_disk["steps"] == 2
    assert [r["model"] for r in rows] == [*VARIANTS, *bench.REFERENCES.values()]
    for r in rows:
        assert min(r["train_samples_per_s"], r["eval_samples_per_s"], r["train_samples_per_cpu_s"],
                   r["eval_samples_per_cpu_s"]) > 0
    by_name = {r["model"]: r for r in rows}
    for name, variant in VARIANTS.items():
        row, reference = by_name[name], by_name[bench.REFERENCES[variant.uses_tables]]
        assert row["reference"] == reference["model"]
        for kind in ("train", "eval"):
            assert row[f"{kind}_vs_reference"] == pytest.approx(
                row[f"{kind}_samples_per_s"] / reference[f"{kind}_samples_per_s"])
            assert row[f"{kind}_vs_reference_cpu"] == pytest.approx(
                row[f"{kind}_samples_per_cpu_s"] / reference[f"{kind}_samples_per_cpu_s"])


def test_workers_are_cut_to_what_the_available_memory_holds():
    gb = 1 << 30
    assert train.affordable_workers(2, own_bytes=5 * gb, shared_bytes=7 * gb, available_bytes=22 * gb) == 2
    assert train.affordable_workers(4, own_bytes=5 * gb, shared_bytes=7 * gb, available_bytes=22 * gb) == 3
    assert train.affordable_workers(2, own_bytes=5 * gb, shared_bytes=7 * gb, available_bytes=11 * gb) == 1
    assert train.affordable_workers(2, own_bytes=5 * gb, shared_bytes=20 * gb, available_bytes=11 * gb) == 1  # never 0


def test_jobs_that_train_tables_get_fewer_workers_when_their_copies_do_not_fit():
    """The paper's size (tables 3.9 GB, impression cache 3.1 GB): in 12 GB one worker; in 16 GB two
    train the frozen variants and one the variants that copy the tables; in 24 GB two each."""
    gb = 10**9
    sizes = dict(table_bytes=int(3.9 * gb), cache_bytes=int(3.1 * gb))
    assert train.workers_for(2, False, memory_bytes=12 * gb, **sizes) == 1
    assert train.workers_for(2, False, memory_bytes=16 * gb, **sizes) == 2
    assert train.workers_for(2, True, memory_bytes=16 * gb, **sizes) == 1
    assert train.workers_for(2, True, memory_bytes=24 * gb, **sizes) == 2
    assert train.workers_for(2, True, memory_bytes=6 * gb, **sizes) == 1  # never 0


def test_job_plan_on_small_data_is_the_requested_workers_capped_by_the_jobs(tiny_workdir_copy):
    """On the tiny data the memory is no limit: the requested workers, capped by the jobs, and the
    frozen and table-training jobs in one group; a budget below two workers' needs runs them here."""
    cfg = train.RankingTrainConfig(workdir=str(tiny_workdir_copy), workers=3)
    write_random_tables(tiny_workdir_copy)
    tables = train.map_tables(cfg, True, train.Provenance.of(cfg, True))
    table_bytes = sum(t.vectors.nbytes for t in tables)
    # mapped here, before any worker starts: the workers find the files
    mapped = sorted(p.name.split("-")[0] for p in (tiny_workdir_copy / "embeddings" / "mapped").iterdir())
    assert mapped == ["product", "query"] and table_bytes > 0
    cache = ImpressionCache.open(cfg.workdir)
    both = [("dcn_pq_hist", 0), ("dcn_pq_hist_finetune", 0)]
    assert train.job_plan(cfg, both, tables, cache) == [(both, 2)]
    assert train.job_plan(cfg, [("dcn_pq_hist", s) for s in range(5)], tables, cache) == [
        ([("dcn_pq_hist", s) for s in range(5)], 3)]
    assert train.job_plan(cfg, [("dcn_pq_hist", 0)], tables, cache) == [([("dcn_pq_hist", 0)], 1)]
    assert train.job_plan(cfg, [], tables, cache) == []
    small = train.RankingTrainConfig(workdir=str(tiny_workdir_copy), workers=3, max_memory_gb=1.5)
    assert train.job_plan(small, both, tables, cache) == [(both, 1)]
