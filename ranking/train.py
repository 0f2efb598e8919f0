"""Train and evaluate the ranking variants over seeds; write the paper's Table 2.

``python -m ranking.train --workdir DIR --variant NAME|all [--seeds 5] [--epochs N] [--batch-size B] [--lr LR] [--force]``

``torchrun --nproc_per_node N -m ranking.train ... [--sharding auto|table_wise|row_wise|column_wise|data_parallel] [--pg-timeout-s 120]``
trains each variant/seed sharded over the N ranks (:mod:`ranking.distributed`); rank 0 logs the
plan and writes the same files (``model.pt`` unsharded, metrics over the full evaluation week).

Reads ``DIR/data/{impressions,purchases}.parquet`` and, for variants with tables,
``DIR/embeddings/{product,query}_table.parquet``. Writes

* ``DIR/ranking/<variant>/seed<k>/model.pt`` (:func:`ranking.model.load_model` reads it) and
  ``metrics.json`` (per-slice AUC / normalized logloss and the settings fingerprint);
* ``DIR/ranking/results.json``: ``results[variant][slice]`` with ``auc_mean``, ``auc_std``,
  ``norm_logloss_mean``, ``norm_logloss_std``, ``p_value_vs_dcn`` (paired t-test on per-seed AUC,
  null for ``dcn``), relative gains over ``dcn`` and the per-seed values; merged with the
  variants already there, so variants can run one at a time;
* ``DIR/ranking/results.md``: Table 2 (rows = variants, AUC and normalized logloss per slice).

Seed ``k`` trains from scratch with everything seeded by ``k`` (deterministic on CPU for a
fixed ``--threads``; ``--workers`` processes run variant/seed jobs in parallel without changing
any number). Early stopping (default) holds out the last week before the evaluation week
(``valid``), checks its logloss ``--checks-per-epoch`` times an epoch and keeps the best
parameters; the evaluation week is never used for any choice. A variant/seed whose
``metrics.json`` has the same settings fingerprint is skipped unless ``--force``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main, setup_logging
from common.io import file_sha256, prepare_workdir, read_json, write_json, write_text
from common.seed import seed_everything
from data.schema import SchemaError, table_path as data_table_path
from embeddings.tables import EmbeddingTable, table_path
from ranking import distributed
from ranking.features import HISTORY_LEN, FeatureSpec, ImpressionCache, PurchaseIndex, RankingData, build_spec
from ranking.metrics import SLICES, log_loss, mean_std, paired_p_value, slice_metrics
from ranking.model import ModelConfig, RankingModel, build_model, build_tables, save_model
from ranking.plain import PlainInputModel
from ranking.tables import load_tables, sparse_gradient_parameters, trainable_parameters
from ranking.variants import BASELINE, VARIANTS, Variant, resolve_variants

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Train the ranking variants (paper Table 2) over seeds and write DIR/ranking/results.{json,md}."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    variant: str = field(default="all", metadata={"help": f"'all' or a comma list of: {', '.join(VARIANTS)}"})
    seeds: int = field(default=5, metadata={"help": "seeds 0..N-1, each trained from scratch"})
    epochs: int = field(default=4, metadata={"help": "passes over the training split (at most, with early stopping)"})
    early_stopping: bool = field(default=True, metadata={
        "help": "hold out the last week of the training split, keep the parameters with its best logloss"})
    checks_per_epoch: int = field(default=4, metadata={"help": "validation checks per epoch (early stopping)"})
    patience: int = field(default=3, metadata={"help": "stop after this many checks without a better validation logloss"})
    batch_size: int = field(default=2048, metadata={"help": "training batch size"})
    lr: float = field(default=2e-3, metadata={"help": "learning rate"})
    optimizer: Literal["adam", "adagrad"] = field(default="adam", metadata={"help": "optimizer of the trainable parameters"})
    history_len: int = field(default=HISTORY_LEN, metadata={"help": "cap of the purchase-history bag (most recent kept)"})
    eval_batch_size: int = field(default=8192, metadata={"help": "evaluation batch size"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per training job (1 is fastest for these "
                                                      "small models; results are deterministic per thread count)"})
    workers: int = field(default=2, metadata={"help": "variant/seed jobs trained in parallel processes"})
    force: bool = field(default=False, metadata={"help": "retrain finished variant/seed runs"})
    sharding: Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"] = field(default="auto", metadata={
        "help": "under torchrun (WORLD_SIZE > 1): torchrec planner's plan, or one sharding type for every table"})
    pg_timeout_s: float = field(default=120.0, metadata={
        "help": "under torchrun: seconds a collective waits before failing (a dead rank stops the others)"})


@dataclass
class Inputs:
    """Everything a run reads, loaded once for all variants and seeds."""

    data: RankingData
    base_spec: FeatureSpec
    tables: tuple[EmbeddingTable, EmbeddingTable] | None
    fingerprints: dict[str, str]  # variant name -> settings fingerprint


def load_inputs(cfg: TrainConfig, variants: Sequence[Variant]) -> Inputs:
    """Open the feature cache, the purchases and (when a variant needs them) the tables."""
    workdir = Path(cfg.workdir)
    try:
        tables = None
        if any(v.uses_tables for v in variants):  # first: a missing table fails before the cache pass
            tables = load_tables(table_path(workdir, "product"), table_path(workdir, "query"))
        cache = ImpressionCache.open(workdir)
        purchases = PurchaseIndex.from_workdir(workdir)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    base_spec = build_spec(cache.meta, history_len=cfg.history_len)
    data = RankingData(cache, purchases, base_spec.with_tables(*tables) if tables else base_spec)
    shared = {"cache": cache.meta.key, "purchases": file_sha256(data_table_path(workdir, "purchases")),
              "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "optimizer": cfg.optimizer,
              "early_stopping": cfg.early_stopping, "checks_per_epoch": cfg.checks_per_epoch, "patience": cfg.patience,
              "history_len": cfg.history_len, "model": asdict(ModelConfig())}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # sharded runs use fused table optimizers: not the same run
        shared["distributed"] = {"world_size": int(os.environ["WORLD_SIZE"]), "sharding": cfg.sharding}
    table_hashes = ({kind: file_sha256(table_path(workdir, kind)) for kind in ("product", "query")} if tables else {})
    fingerprints = {}
    for v in variants:
        settings = {**shared, "variant": v.name, "tables": table_hashes if v.uses_tables else {}}
        fingerprints[v.name] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Inputs(data, base_spec, tables, fingerprints)


def make_optimizers(model: nn.Module, optimizer: str, lr: float) -> list[torch.optim.Optimizer]:
    """The optimizers of every parameter except the frozen tables: ``adam`` = Adam on the dense
    parameters + SparseAdam (lazy Adam) on sparse-gradient tables; ``adagrad`` = one Adagrad."""
    sparse = sparse_gradient_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in trainable_parameters(model) if id(p) not in sparse_ids]
    if optimizer == "adagrad":
        return [torch.optim.Adagrad(dense + sparse, lr=lr)]
    if optimizer != "adam":
        raise ValueError(f"unknown optimizer {optimizer!r}; expected adam or adagrad")
    return [torch.optim.Adam(dense, lr=lr)] + ([torch.optim.SparseAdam(sparse, lr=lr)] if sparse else [])


def train_model(model: RankingModel, data: RankingData, cfg: TrainConfig, seed: int,
                progress: bool = True) -> dict:
    """Train in place with binary cross-entropy on clicks.

    With ``cfg.early_stopping``: fit on the ``fit`` split, measure logloss on ``valid`` (the last
    week before the evaluation week) ``cfg.checks_per_epoch`` times an epoch, stop after
    ``cfg.patience`` checks without improvement and restore the best parameters. Without it:
    all of ``train`` for ``cfg.epochs`` epochs. Returns the history (losses per check).
    """
    plain = PlainInputModel(model).train()
    optimizers = make_optimizers(model, cfg.optimizer, cfg.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    split = "fit" if cfg.early_stopping else "train"
    steps = -(-data.num_rows(split) // cfg.batch_size)
    check_every = -(-steps // cfg.checks_per_epoch) if cfg.early_stopping else steps
    history: dict = {"train_loss": [], "valid_logloss": [], "checks_per_epoch": cfg.checks_per_epoch if cfg.early_stopping else 1}
    best_loss, best_state, since_best = float("inf"), None, 0
    total, count = 0.0, 0
    for epoch in range(cfg.epochs):
        rng = np.random.default_rng([seed, epoch])
        bar = tqdm(data.batches(split, cfg.batch_size, shuffle=True, rng=rng), total=steps,
                   disable=None if progress else True,
                   desc=f"{model.variant} seed {seed} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for step, batch in enumerate(bar):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(plain(*batch.inputs()), batch.labels)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
            if (step + 1) % check_every and step + 1 != steps:
                continue
            history["train_loss"].append(total / count)
            total, count = 0.0, 0
            if not cfg.early_stopping:
                continue
            labels, probs, _ = predict(model, data, "valid", cfg.eval_batch_size)
            plain.train()
            history["valid_logloss"].append(log_loss(labels, probs))
            if history["valid_logloss"][-1] < best_loss:
                best_loss, since_best = history["valid_logloss"][-1], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
        log.info("%s seed %d epoch %d: train loss %.5f%s", model.variant, seed, epoch + 1, history["train_loss"][-1],
                 f", valid logloss {history['valid_logloss'][-1]:.5f}" if cfg.early_stopping else "")
        if cfg.early_stopping and since_best >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
        history["best_check"] = int(np.argmin(history["valid_logloss"]))
        history["best_epoch"] = (history["best_check"] + 1) / cfg.checks_per_epoch
    return history


@torch.no_grad()
def predict(model: RankingModel, data: RankingData, split: str = "eval",
            batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, click probabilities, has_history)`` over ``split`` in cache order."""
    plain = PlainInputModel(model).eval()
    labels, probs, hist = [], [], []
    for batch in data.batches(split, batch_size):
        probs.append(torch.sigmoid(plain(*batch.inputs())).numpy())
        labels.append(batch.labels.numpy())
        hist.append(batch.has_history.numpy())
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(hist)


def run_seed(variant: Variant, seed: int, inputs: Inputs, cfg: TrainConfig, out_dir: Path,
             progress: bool = True) -> dict:
    """Train one variant from scratch with ``seed``, evaluate it, write model.pt + metrics.json."""
    torch.set_num_threads(cfg.threads)
    seed_everything(seed)
    spec = inputs.data.spec if variant.uses_tables else inputs.base_spec
    tables = build_tables(variant, spec, inputs.tables, torch.Generator().manual_seed(seed))
    model = build_model(variant, spec, ModelConfig(), tables)
    env = distributed.current_env()
    if env is not None:  # torchrun: DMP-sharded training, full-split predictions on every rank
        run = distributed.run_sharded(model, inputs.data, cfg, seed, env, progress)
        history, train_s, eval_s = run.history, run.train_seconds, run.eval_seconds
        labels, probs, has_history = run.labels, run.probs, run.has_history
        model = build_model(variant, spec, ModelConfig(), build_tables(variant, spec))
        if not env.is_main:
            return {}
        model.load_state_dict(run.state)  # the unsharded weights: model.pt as in a single-process run
    else:
        start = time.perf_counter()
        history = train_model(model, inputs.data, cfg, seed, progress)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        labels, probs, has_history = predict(model, inputs.data, "eval", cfg.eval_batch_size)
        eval_s = time.perf_counter() - start
    metrics = {"variant": variant.name, "seed": seed, "fingerprint": inputs.fingerprints[variant.name],
               "history": history, "train_seconds": train_s, "eval_seconds": eval_s,
               "train_impressions": inputs.data.num_rows("train"),
               "world_size": env.world_size if env is not None else 1,
               "slices": slice_metrics(labels, probs, has_history, spec.train_click_rate)}
    save_model(model.eval(), out_dir / "model.pt")
    write_json(_clean(metrics), out_dir / "metrics.json")
    nw = metrics["slices"]["nw"]
    log.info("%s seed %d: NW AUC %.4f, normalized logloss %.4f (train %.1f s, eval %.1f s)",
             variant.name, seed, nw["auc"], nw["norm_logloss"], train_s, eval_s)
    return metrics


def _clean(obj):
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def summarize_variant(per_seed: list[dict]) -> dict[str, dict]:
    """Per slice: mean/std over seeds plus the per-seed values (``seeds`` lists their ids)."""
    out = {}
    for name in SLICES:
        auc = [m["slices"][name]["auc"] for m in per_seed]
        nll = [m["slices"][name]["norm_logloss"] for m in per_seed]
        valid = all(x is not None and x == x for x in auc + nll)
        auc_mean, auc_std = mean_std(auc) if valid else (None, None)
        nll_mean, nll_std = mean_std(nll) if valid else (None, None)
        out[name] = {"auc_mean": auc_mean, "auc_std": auc_std, "norm_logloss_mean": nll_mean,
                     "norm_logloss_std": nll_std, "auc_per_seed": auc, "norm_logloss_per_seed": nll,
                     "seeds": [m["seed"] for m in per_seed], "impressions": per_seed[0]["slices"][name]["impressions"]}
    return out


def add_comparisons(results: dict[str, dict]) -> dict[str, dict]:
    """Set ``p_value_vs_dcn`` (paired on common seeds) and relative gains over ``dcn`` for every variant."""
    base = results.get(BASELINE)
    for variant, slices in results.items():
        for name, r in slices.items():
            b = base.get(name) if base else None
            if variant == BASELINE or not b or r["auc_mean"] is None or b["auc_mean"] is None:
                r.update(p_value_vs_dcn=None, auc_gain_vs_dcn=None, norm_logloss_gain_vs_dcn=None)
                continue
            common = sorted(set(r["seeds"]) & set(b["seeds"]))
            r["p_value_vs_dcn"] = paired_p_value(_on_seeds(r, "auc_per_seed", common), _on_seeds(b, "auc_per_seed", common))
            r["auc_gain_vs_dcn"] = r["auc_mean"] / b["auc_mean"] - 1
            r["norm_logloss_gain_vs_dcn"] = 1 - r["norm_logloss_mean"] / b["norm_logloss_mean"]
    return results


def _on_seeds(slice_result: dict, key: str, seeds: list[int]) -> list[float]:
    return [slice_result[key][slice_result["seeds"].index(s)] for s in seeds]


def results_markdown(results: dict[str, dict]) -> str:
    """Table 2 layout: one row per variant; per slice ROC-AUC and normalized logloss (mean ± std
    over seeds) with the relative gain over ``dcn`` in brackets (logloss gain = reduction)."""
    order = [v for v in VARIANTS if v in results] + [v for v in results if v not in VARIANTS]
    head = ["variant"]
    for name in SLICES:
        head += [f"{name} AUC", f"{name} NLL"]
    head.append("p (nw AUC vs dcn)")
    rows = []
    for v in order:
        row = [v]
        for name in SLICES:
            r = results[v][name]
            row += [_cell(r["auc_mean"], r["auc_std"], r.get("auc_gain_vs_dcn")),
                    _cell(r["norm_logloss_mean"], r["norm_logloss_std"], r.get("norm_logloss_gain_vs_dcn"))]
        p = results[v]["nw"].get("p_value_vs_dcn")
        row.append("—" if p is None else f"{p:.2g}")
        rows.append(row)
    seeds = max(len(results[v]["nw"]["seeds"]) for v in order)
    sizes = ", ".join(f"{name} {results[order[0]][name]['impressions']:,}" for name in SLICES)
    lines = ["# Ranking: paper Table 2 layout", "",
             f"ROC-AUC and normalized logloss (NLL = logloss / logloss of always predicting the training click "
             f"rate; lower is better) on the evaluation week (nw), its impressions whose user bought something in "
             f"the 84 days before (nw_hist) and the others (nw_nohist); impressions: {sizes}. Mean ± std over up "
             f"to {seeds} seeds; in brackets the relative gain over dcn (for NLL: the relative reduction). "
             f"p: paired t-test of per-seed nw AUC against dcn.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(mean: float | None, std: float | None, gain: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" + ("" if gain is None else f" ({gain * 100:+.2f}%)")


def seed_done(out_dir: Path, fingerprint: str) -> dict | None:
    """The finished metrics of a seed directory when its fingerprint matches."""
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.exists() or not (out_dir / "model.pt").exists():
        return None
    metrics = read_json(metrics_path)
    return metrics if metrics.get("fingerprint") == fingerprint else None


_WORKER: dict = {}


def _init_worker(cfg: TrainConfig, variant_names: list[str]) -> None:
    setup_logging()
    torch.set_num_threads(cfg.threads)
    _WORKER.update(cfg=cfg, inputs=load_inputs(cfg, [VARIANTS[n] for n in variant_names]))


def _run_job(job: tuple[str, int]) -> dict:
    name, seed = job
    cfg: TrainConfig = _WORKER["cfg"]
    out_dir = Path(cfg.workdir) / "ranking" / name / f"seed{seed}"
    return _clean(run_seed(VARIANTS[name], seed, _WORKER["inputs"], cfg, out_dir, progress=False))


def run_jobs(cfg: TrainConfig, variants: list[Variant], inputs: Inputs, jobs: list[tuple[str, int]]) -> list[dict]:
    """Train ``jobs`` ((variant, seed) pairs): in this process, or over ``cfg.workers`` spawned
    processes (each single-job-at-a-time with ``cfg.threads`` threads; same numbers either way)."""
    workers = min(cfg.workers, len(jobs))
    if workers <= 1 or distributed.current_env() is not None:  # under torchrun the ranks are the workers
        return [_clean(run_seed(VARIANTS[name], seed, inputs, cfg, Path(cfg.workdir) / "ranking" / name / f"seed{seed}"))
                for name, seed in jobs]
    context = multiprocessing.get_context("spawn")  # fork after torch started its threads can deadlock
    with context.Pool(workers, initializer=_init_worker, initargs=(cfg, [v.name for v in variants])) as pool:
        return list(tqdm(pool.imap_unordered(_run_job, jobs), total=len(jobs), desc=f"ranking jobs ({workers} workers)",
                         unit="run", disable=None))


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(TrainConfig, argv)
    variants = resolve_variants(cfg.variant)
    if not variants:
        raise UserError(f"--variant {cfg.variant!r}: no variant named")
    for flag in ("seeds", "epochs", "batch_size", "eval_batch_size", "history_len", "threads", "workers",
                 "checks_per_epoch", "patience"):
        if getattr(cfg, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(cfg, flag)}")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    root = prepare_workdir(cfg.workdir, "ranking") / "ranking"
    env = distributed.init_from_env(cfg.pg_timeout_s)
    if env is not None and not env.is_main:
        torch.distributed.barrier()  # rank 0 builds the feature cache first
    inputs = load_inputs(cfg, variants)
    if env is not None and env.is_main:
        torch.distributed.barrier()
    if cfg.early_stopping and min(inputs.data.num_rows("fit"), inputs.data.num_rows("valid")) == 0:
        raise UserError(f"{cfg.workdir}: early stopping needs impressions both before and in the week before the "
                        f"evaluation week (fit {inputs.data.num_rows('fit')}, valid {inputs.data.num_rows('valid')}); "
                        f"pass --no-early-stopping")
    log.info("ranking: %d train / %d eval impressions, %d purchases; variants %s, seeds %d",
             inputs.data.num_rows("train"), inputs.data.num_rows("eval"), len(inputs.data.purchases),
             ", ".join(v.name for v in variants), cfg.seeds)
    finished: dict[tuple[str, int], dict] = {}
    jobs = []
    for variant in variants:
        for seed in range(cfg.seeds):
            done = None if cfg.force else seed_done(root / variant.name / f"seed{seed}", inputs.fingerprints[variant.name])
            if done is not None:
                log.info("%s seed %d: finished with the same settings; skipping (--force redoes it)", variant.name, seed)
                finished[variant.name, seed] = done
            else:
                jobs.append((variant.name, seed))
    for metrics in run_jobs(cfg, variants, inputs, jobs):
        if metrics:  # empty on ranks other than 0
            finished[metrics["variant"], metrics["seed"]] = metrics
    if env is not None:
        torch.distributed.destroy_process_group()
        if not env.is_main:
            return {}
    results_path = root / "results.json"
    results = read_json(results_path) if results_path.exists() else {}
    for variant in variants:
        results[variant.name] = summarize_variant([finished[variant.name, seed] for seed in range(cfg.seeds)])
    results = add_comparisons(results)
    write_json(results, results_path)
    write_text(results_markdown(results), root / "results.md")
    log.info("wrote %s and %s", results_path, root / "results.md")
    return results


if __name__ == "__main__":
    run_main(main)
