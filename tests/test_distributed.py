"""Sharded ranking (ranking.distributed) with 2 gloo processes on CPU against the unsharded model.

Each test starts two real ranks: ``python tests/test_distributed.py SCENARIO ...`` with the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), bounded by a
timeout; rank 0 writes what it measured to a JSON file the test checks.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a rank script
    sys.path.insert(0, str(REPO))

from embeddings.tables import build_table  # noqa: E402
from ranking import layout  # noqa: E402
from ranking.features import RankingBatch  # noqa: E402
from ranking.model import RankerConfig, build_model, build_tables  # noqa: E402
from ranking.spec import FeatureSpec  # noqa: E402
from ranking.variants import get_variant  # noqa: E402

pytestmark = pytest.mark.slow
RANK_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world_size: int = 2, timeout: float = RANK_TIMEOUT_S,
           module: bool = False) -> list[subprocess.CompletedProcess]:
    """Run ``world_size`` ranks of this file (or ``python -m`` a module) with a torchrun-like environment."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, *(["-m"] if module else [__file__]), *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def tiny_model(variant: str = "dcn_pq_hist"):
    """A small model with frozen random tables (16-dim), 2 dense and 2 sparse features; same on every rank."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    spec = FeatureSpec(dense_names=["dense_a", "dense_b"], dense_mean=[0.0, 1.0], dense_std=[1.0, 2.0],
                       sparse_names=["sparse_a", "sparse_b"], sparse_num_embeddings=[10, 7], train_click_rate=0.3,
                       history_len=5, table_dim=16)
    tables = (build_table("product", list(range(100, 140)), rng.normal(size=(40, 16))),
              build_table("query", [f"query {i}" for i in range(24)], rng.normal(size=(24, 16))))
    spec = spec.with_tables(*tables)
    v = get_variant(variant)
    return build_model(v, spec, RankerConfig(), build_tables(v, spec, tables, torch.Generator().manual_seed(0)))


def tiny_batch(batch_size: int = 13, seed: int = 1, first_row: int = 0) -> RankingBatch:
    """A global batch (odd size: ranks get 7 and 6 rows) with empty and full history bags; table rows
    from ``first_row`` on (1: no lookup of the all-zero row 0, where the cosine's gradient is ~1/eps)."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(first_row, 41, (batch_size, 5), generator=g)
    history[torch.rand(batch_size, 5, generator=g) < 0.4] = -1
    return RankingBatch(dense=torch.randn(batch_size, 2, generator=g), sparse_ids=torch.randint(0, 12, (batch_size, 2), generator=g),
                        product_rows=torch.randint(first_row, 41, (batch_size,), generator=g),
                        query_rows=torch.randint(first_row, 25, (batch_size,), generator=g), history_rows=history,
                        labels=(torch.rand(batch_size, generator=g) < 0.4).float(),
                        has_history=(history >= 0).any(dim=1))


# ---------------------------------------------------------------------------------------- rank side

def _rank_match(cases: str, out: str) -> None:
    """For each ``variant:sharding`` case: forward + one SGD step sharded vs unsharded on the same
    global batch. Rank 0 writes per case the largest differences, the change of the frozen tables
    and which rows of the DashCLIP tables the step changed and the batch looked up."""
    from common.distributed import close_process_group, init_from_env
    from ranking import distributed
    from ranking.plain import PlainInputModel
    from ranking.optim import RowWiseAdagrad
    from ranking.tables import (PRODUCT_TABLE, QUERY_TABLE, frozen_parameter_names, sparse_gradient_parameters,
                                trainable_parameters)

    env = init_from_env(timeout_s=30)
    results = {}
    for case in cases.split(","):
        variant, sharding, table_optimizer = (case.split(":") + ["same"])[:3]
        trains_tables = get_variant(variant).train_tables
        model, batch, lr = tiny_model(variant), tiny_batch(first_row=1 if trains_tables else 0), 0.5
        reference = copy.deepcopy(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        shapes = distributed.table_shapes(model)
        ranker = distributed.ShardedRanker.wrap(model, env, sharding, optimizer="sgd", lr=lr,
                                                table_optimizer=table_optimizer)
        loaded = distributed.unsharded_state_dict(ranker.dmp, env)  # the weights made it into the shards
        plain = PlainInputModel(reference).train()
        sharded_probs = ranker.predict(batch)
        ref_probs = torch.sigmoid(plain(*batch.inputs())).detach()
        sharded_loss = ranker.step(batch)
        ref_loss = torch.nn.functional.binary_cross_entropy_with_logits(plain(*batch.inputs()), batch.labels)
        ref_loss.backward()
        tables = sparse_gradient_parameters(reference) if table_optimizer == "rowwise_adagrad" else []
        torch.optim.SGD([p for p in trainable_parameters(reference) if not any(p is t for t in tables)], lr=lr).step()
        if tables:  # the single-process row-wise Adagrad: what fbgemm's fused EXACT_ROWWISE_ADAGRAD must do
            RowWiseAdagrad(tables, lr=lr).step()
        unsharded = ranker.unsharded()
        if env.is_main:
            after, ref_state = unsharded.state_dict(), reference.state_dict()
            table_key = "table_tower.tables.ebc.embedding_bags.{}.weight".format
            seen = {PRODUCT_TABLE: torch.cat([batch.product_rows, batch.history_rows[batch.history_rows >= 0]]),
                    QUERY_TABLE: batch.query_rows}
            results[case] = {
                "loaded": max(float((loaded[k] - before[k]).abs().max()) for k in before),
                "forward": float((sharded_probs - ref_probs).abs().max()), "loss": abs(sharded_loss - float(ref_loss)),
                "state": {k: float((after[k] - ref_state[k]).abs().max()) for k in ref_state},
                "keys_equal": sorted(after) == sorted(ref_state),
                "frozen": {k: float((after[k] - before[k]).abs().max()) for k in frozen_parameter_names(reference)},
                "changed": {k: float((ref_state[k] - before[k]).abs().max()) for k in ref_state},
                "rows_changed": {t: torch.nonzero((after[table_key(t)] != before[table_key(t)]).any(dim=1)).flatten().tolist()
                                 for t in seen},
                "rows_seen": {t: sorted(set(rows.tolist())) for t, rows in seen.items()},
                "summary": distributed.plan_summary(ranker.plan, shapes, env.world_size)}
    if env.is_main:
        Path(out).write_text(json.dumps(results))
    close_process_group()  # rank 1 waits for rank 0's writing: a rank that exits first can abort its peer


def _rank_fail(out: str) -> None:
    """Rank 1 is stuck (never joins the collective) and then raises; rank 0 must fail on the
    process-group timeout (2 s), well before rank 1 ends, and records how long it waited."""
    import time

    from common.distributed import init_from_env

    env = init_from_env(timeout_s=2)
    if env.rank == 1:
        time.sleep(8)
        raise RuntimeError("rank 1 fails on purpose")
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
    except RuntimeError as exc:
        Path(out).write_text(json.dumps({"waited_s": time.monotonic() - start, "error": str(exc)}))
        raise


# ---------------------------------------------------------------------------------------- tests

SHARDINGS = ["table_wise", "row_wise", "column_wise", "data_parallel", "auto"]
FINETUNE_SHARDINGS = ["row_wise", "table_wise"]


def test_sharded_forward_and_step_match_unsharded(tmp_path):
    out = tmp_path / "result.json"
    cases = ([f"dcn_pq_hist:{s}" for s in SHARDINGS] + [f"dcn_pq_hist_finetune:{s}" for s in FINETUNE_SHARDINGS]
             + [f"dcn_pq_hist_finetune:{s}:rowwise_adagrad" for s in FINETUNE_SHARDINGS])
    procs = launch(["match", ",".join(cases), str(out)])
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(cases)
    for case, r in results.items():
        variant, sharding = case.split(":")[:2]
        assert r["keys_equal"], case
        assert r["loaded"] == 0.0, case  # DMP re-initialises tables; shard_model copies the weights in
        assert r["forward"] < 1e-5 and r["loss"] < 1e-5, (case, r["forward"], r["loss"])
        worst = max(r["state"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (case, worst)
        # the step did move the trainable sparse tables and the dense layers (so the match means something)
        assert r["changed"]["dcn_tower.sparse_ebc.embedding_bags.t_sparse_a.weight"] > 1e-4
        assert r["changed"]["head.1.weight"] > 1e-4
        expected = "" if sharding == "auto" else f": {sharding}, kernel {'dense' if sharding == 'data_parallel' else 'fused'}"
        assert expected in r["summary"] and "rank 1" in r["summary"] and "KiB" in r["summary"], r["summary"]
        if variant == "dcn_pq_hist":
            assert len(r["frozen"]) == 2 and all(d == 0.0 for d in r["frozen"].values()), (case, r["frozen"])
            assert r["rows_changed"] == {"product_table": [], "query_table": []}, case
        else:  # fine-tuned by the fused row-wise kernels: exactly the rows the batch looked up moved
            assert r["frozen"] == {}, case
            assert r["rows_changed"] == r["rows_seen"], case
            assert 0 < len(r["rows_seen"]["product_table"]) < 40 and 0 < len(r["rows_seen"]["query_table"]) < 24, r


def test_failing_rank_does_not_hang_the_other(tmp_path):
    out = tmp_path / "rank0.json"
    procs = launch(["fail", str(out)], timeout=60)
    assert procs[1].returncode != 0 and "rank 1 fails on purpose" in procs[1].stderr
    assert procs[0].returncode != 0, procs[0].stderr[-2000:]
    rank0 = json.loads(out.read_text())
    assert rank0["waited_s"] < 6, rank0  # the 2 s timeout, not rank 1's 8 s
    assert "timed out" in rank0["error"].lower() or "timeout" in rank0["error"].lower(), rank0["error"]


def test_torchrun_style_cli_writes_the_single_process_checkpoint(tiny_workdir_copy, tmp_path):
    """2 ranks of ``python -m ranking.train`` (row-wise tables): rank 0 writes model.pt in the
    single-process format; its metrics (over the full evaluation week) are what a single process
    computes from that model.pt, and what a single-process training run on the same data and seed
    gets (Adagrad, the optimizer fbgemm has fused on CPU); the frozen DashCLIP rows are the table
    files' rows; serving.export turns it into the same served model."""
    from ranking import train
    from ranking.features import ImpressionCache, RankingData
    from ranking.spec import PurchaseIndex
    from ranking.metrics import log_loss, slice_metrics
    from ranking.model import load_model
    from ranking.plain import PlainInputModel
    from test_ranking_train import write_random_tables

    workdir = tiny_workdir_copy
    write_random_tables(workdir)
    flags = ["--variant", "dcn_pq_hist", "--seeds", "1", "--epochs", "1", "--checks-per-epoch", "2",
             "--batch-size", "256", "--eval-batch-size", "512", "--optimizer", "adagrad"]
    single_dir = tmp_path / "single"
    shutil.copytree(workdir, single_dir)
    procs = launch(["ranking.train", "--workdir", str(workdir), *flags, "--sharding", "row_wise", "--pg-timeout-s", "60"],
                   module=True, timeout=150)
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    assert "row_wise, kernel fused, ranks [0, 1]" in procs[0].stderr and "table memory per rank" in procs[0].stderr
    assert "sharding plan" not in procs[1].stderr  # logged once, on rank 0
    run_dir = layout.run_dir(workdir, "dcn_pq_hist", 0)
    metrics = json.loads((run_dir / layout.METRICS_FILE).read_text())
    assert metrics["world_size"] == 2 and len(metrics["history"]["valid_logloss"]) == 2
    model = load_model(run_dir / layout.MODEL_FILE)
    data = RankingData(ImpressionCache.open(workdir), PurchaseIndex.from_workdir(workdir), model.spec)
    labels, probs, hist = train.predict(model, data, "eval")
    single = slice_metrics(labels, probs, hist, model.spec.train_click_rate)
    for name, values in single.items():
        assert values["impressions"] == metrics["slices"][name]["impressions"]
        assert values["auc"] == pytest.approx(metrics["slices"][name]["auc"], abs=1e-6)
        assert values["logloss"] == pytest.approx(metrics["slices"][name]["logloss"], abs=1e-6)
    # early stopping restored the best check's shards: model.pt scores the validation week at the best logloss
    valid = metrics["history"]["valid_logloss"]
    labels, probs, _ = train.predict(model, data, "valid")
    assert log_loss(labels, probs) == pytest.approx(min(valid), abs=1e-6)
    assert metrics["history"]["best_check"] == int(np.argmin(valid))
    train.main(["--workdir", str(single_dir), *flags, "--threads", "1"])
    single_run = json.loads((layout.run_dir(single_dir, "dcn_pq_hist", 0) / layout.METRICS_FILE).read_text())
    # the same algorithm: equal up to the rounding of the all-reduced gradients, which training
    # amplifies (after half an epoch ~1e-5 relative, after one epoch ~1e-3 on the tiny data)
    single_valid = single_run["history"]["valid_logloss"]
    assert single_valid[0] == pytest.approx(valid[0], rel=1e-4)
    np.testing.assert_allclose(single_valid, valid, rtol=5e-3)
    for name, values in single_run["slices"].items():
        assert values["auc"] == pytest.approx(metrics["slices"][name]["auc"], abs=5e-3)
        assert values["logloss"] == pytest.approx(metrics["slices"][name]["logloss"], rel=5e-3)
    from embeddings.tables import embedding_table_path, read_embedding_table
    product = torch.tensor(read_embedding_table(embedding_table_path(workdir, "product"), "product").vectors)
    assert torch.equal(model.table_tower.tables.ebc.embedding_bags["product_table"].weight, product)

    # serving.export reads the sharded run's model.pt like a single-process one: the TorchScript file
    # scores exactly what the checkpoint scores, and the NW AUC is the run's own
    from serving import export
    manifest = export.main(["--workdir", str(workdir), "--variant", "dcn_pq_hist", "--threads", "1"])
    assert manifest["parity"]["fused_max_abs_diff"] <= export.PARITY_TOLERANCE
    served = torch.jit.load(str(workdir / "serving" / "model.pt"))
    inputs = data.batch(np.arange(64)).inputs()
    with torch.no_grad():
        np.testing.assert_allclose(served(*inputs).numpy(), PlainInputModel(model).eval()(*inputs).numpy(), atol=1e-5)
    assert manifest["nw_auc"]["fp32"] == pytest.approx(metrics["slices"]["nw"]["auc"], abs=1e-6)


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    {"match": _rank_match, "fail": _rank_fail}[scenario](*rest)
