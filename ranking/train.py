"""Train and evaluate the ranking variants over seeds; write the paper's Table 2.

``python -m ranking.train --workdir DIR --variant NAME|all [--seeds 5] [--epochs N] [--batch-size B] [--lr LR] [--force]``

``torchrun --nproc_per_node N -m ranking.train ... [--sharding auto|table_wise|row_wise|column_wise|data_parallel] [--pg-timeout-s 120]``
trains each variant/seed sharded over the N ranks (:mod:`ranking.distributed`); rank 0 logs the
plan and writes the same files (``model.pt`` unsharded, metrics over the full evaluation week).

Reads ``DIR/data/{impressions,purchases}.parquet`` and, for variants with tables,
``DIR/embeddings/{product,query}_table.parquet``. Writes

* per variant/seed, one :class:`common.provenance.OutputSet` (manifest
  ``DIR/ranking/<variant>/seed<k>/manifest.json``): ``model.pt`` (:func:`ranking.model.load_model`
  reads it) and ``metrics.json`` (history and per-slice AUC / normalized logloss), published
  together. The set is made from the SHA-256 of the impressions and purchases tables, of the
  product and query tables for variants with tables, and the settings that change what is
  trained (not ``--threads``, ``--workers`` or ``--eval-batch-size``). Neither file holds wall
  times or file names (the train and eval seconds are logged): the same settings and inputs give
  byte-identical files (on CPU, for a fixed ``--threads``), so the stages that read them skip.
* ``DIR/ranking/results.json`` and ``results.md`` (one set, manifest
  ``DIR/ranking/results.manifest.json``): ``results["inputs"]`` = the hashes of the data tables
  (and of the tables, when a variant with tables is listed) and ``results[variant][slice]`` with
  ``auc_mean``, ``auc_std``, ``norm_logloss_mean``, ``norm_logloss_std``, ``p_value_vs_dcn``
  (paired t-test on per-seed AUC, null for ``dcn``), relative gains over ``dcn`` and the
  per-seed values. Variants already in ``results.json`` are kept, so variants can run one at a
  time, but only when they were trained on the same data (and tables) as this run; the others
  are dropped with a warning naming the changed input. Every variant listed is therefore
  evaluated on the same evaluation week, which makes the paired tests meaningful.

Seed ``k`` trains from scratch with everything seeded by ``k`` (deterministic on CPU for a
fixed ``--threads``; ``--workers`` processes run variant/seed jobs in parallel without changing
any number; they die with the main process, see :func:`die_with_parent`). Early stopping
(default) holds out the last week before the evaluation week (``valid``), checks its logloss
``--checks-per-epoch`` times an epoch and keeps the best parameters; the evaluation week is
never used for any choice. A variant/seed whose set is complete and made from the same inputs
and settings is skipped unless ``--force``. A run whose training loss, validation logloss,
evaluation predictions or parameters are not finite publishes nothing and ends with one
``error:`` line naming the variant, seed and value; earlier files stay as they were.
"""
from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main, setup_logging
from common.io import prepare_workdir, read_json, write_json, write_text
from common.provenance import MadeFrom, OutputSet
from common.seed import seed_everything
from data.dataset import input_hashes
from data.schema import SchemaError
from embeddings.tables import EmbeddingTable, table_path, tables_set
from ranking import distributed
from ranking.features import (CACHE_VERSION, EVAL_DAYS, HISTORY_LEN, VALID_DAYS, FeatureSpec, ImpressionCache,
                              PurchaseIndex, RankingData, build_spec)
from ranking.metrics import SLICES, log_loss, mean_std, paired_p_value, slice_metrics
from ranking.model import ModelConfig, RankingModel, build_model, build_tables, save_model, trained_set
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


DATA_TABLES = ("impressions", "purchases")
INPUTS_KEY = "inputs"  # the key of results.json holding the input hashes (the others are variants)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def results_set(workdir: str | Path) -> OutputSet:
    """The output set of Table 2: ``results.json`` and ``results.md``."""
    return OutputSet(workdir, "ranking/results.manifest.json", ["ranking/results.json", "ranking/results.md"],
                     what="python -m ranking.train")


def training_settings(cfg: TrainConfig) -> dict:
    """The settings that change what a run trains (not threads, workers or the evaluation batch size)."""
    settings = {name: getattr(cfg, name) for name in (
        "epochs", "early_stopping", "checks_per_epoch", "patience", "batch_size", "lr", "optimizer", "history_len")}
    settings.update(model=asdict(ModelConfig()),
                    features={"cache_version": CACHE_VERSION, "eval_days": EVAL_DAYS, "valid_days": VALID_DAYS})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # sharded runs use fused table optimizers: not the same run
        settings["distributed"] = {"world_size": int(os.environ["WORLD_SIZE"]), "sharding": cfg.sharding}
    return settings


@dataclass(frozen=True)
class Provenance:
    """What this invocation's runs are made from: data and table hashes and the training settings."""

    data: dict[str, str | None]
    tables: dict[str, str | None]
    settings: dict

    @classmethod
    def of(cls, cfg: TrainConfig, with_tables: bool) -> "Provenance":
        """Hash the inputs in ``cfg.workdir`` (checking the published sets). The tables must be
        usable ``with_tables``; otherwise unusable tables count as absent (no variant with tables
        then stays in results.json)."""
        try:
            tables = tables_set(cfg.workdir).hashes()
        except UserError:
            if with_tables:
                raise
            tables = dict.fromkeys(tables_set(cfg.workdir).files)
        return cls(input_hashes(cfg.workdir, DATA_TABLES), tables, training_settings(cfg))

    def inputs(self, with_tables: bool) -> dict[str, str | None]:
        """The data hashes, plus the table hashes ``with_tables``."""
        return {**self.data, **(self.tables if with_tables else {})}

    def made_from(self, variant: Variant, seed: int) -> MadeFrom:
        """The :class:`MadeFrom` of ``variant`` trained with ``seed``."""
        return MadeFrom(self.inputs(variant.uses_tables), {**self.settings, "variant": variant.name, "seed": seed})


@dataclass
class Inputs:
    """Everything a run reads, loaded once for all variants and seeds."""

    data: RankingData
    base_spec: FeatureSpec
    tables: tuple[EmbeddingTable, EmbeddingTable] | None


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
    return Inputs(data, base_spec, tables)


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
            if cfg.early_stopping:
                labels, probs, _ = predict(model, data, "valid", cfg.eval_batch_size)
                plain.train()
                history["valid_logloss"].append(log_loss(labels, probs))
                if history["valid_logloss"][-1] < best_loss:
                    best_loss, since_best = history["valid_logloss"][-1], 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    since_best += 1
            if not math.isfinite(history["train_loss"][-1]):
                break  # diverged: run_seed refuses to publish the run
        log.info("%s seed %d epoch %d: train loss %.5f%s", model.variant, seed, epoch + 1, history["train_loss"][-1],
                 f", valid logloss {history['valid_logloss'][-1]:.5f}" if cfg.early_stopping else "")
        if (cfg.early_stopping and since_best >= cfg.patience) or not math.isfinite(history["train_loss"][-1]):
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


def non_finite(history: dict, probs: np.ndarray, model: nn.Module | None = None) -> str | None:
    """The first value of a finished run that is not finite (training loss, validation logloss,
    evaluation predictions, ``model``'s parameters and buffers), described; None when all are."""
    for key in ("train_loss", "valid_logloss"):
        values = history[key]
        bad = next((i for i, x in enumerate(values) if not math.isfinite(x)), None)
        if bad is not None:
            return f"{key.replace('_', ' ')} {values[bad]} at check {bad + 1}"
    if not np.isfinite(probs).all():
        return f"click probability of {int((~np.isfinite(probs)).sum())} of {len(probs)} evaluation impressions"
    for name, tensor in (model.state_dict().items() if model is not None else ()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"model parameter {name}"
    return None


def run_seed(variant: Variant, seed: int, inputs: Inputs, cfg: TrainConfig, made_from: MadeFrom,
             progress: bool = True) -> dict:
    """Train one variant from scratch with ``seed``, evaluate it and publish its set (model.pt +
    metrics.json, :func:`ranking.model.trained_set`) as made from ``made_from``; returns the
    metrics ({} on ranks other than 0). Raises :class:`UserError`, publishing nothing, when a
    value is not finite (:func:`non_finite`)."""
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
        _refuse_non_finite(variant, seed, non_finite(history, probs))  # on every rank: all stop alike
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
    _refuse_non_finite(variant, seed, non_finite(history, probs, model))
    metrics = _clean({"variant": variant.name, "seed": seed, "history": history,
                      "train_impressions": inputs.data.num_rows("train"),
                      "world_size": env.world_size if env is not None else 1,
                      "slices": slice_metrics(labels, probs, has_history, spec.train_click_rate)})
    out = trained_set(cfg.workdir, variant.name, seed)
    model_rel, metrics_rel = out.files
    with out.publish(made_from) as staged:
        save_model(model.eval(), staged[model_rel])
        write_json(metrics, staged[metrics_rel])
    nw = metrics["slices"]["nw"]
    log.info("%s seed %d: NW AUC %s, normalized logloss %s (train %.1f s, eval %.1f s)", variant.name, seed,
             _number(nw["auc"]), _number(nw["norm_logloss"]), train_s, eval_s)
    return metrics


def _refuse_non_finite(variant: Variant, seed: int, problem: str | None) -> None:
    if problem is not None:
        raise UserError(f"ranking {variant.name} seed {seed}: {problem} is not finite; nothing written for this run "
                        f"(check the dense features for NaN/inf or huge values, or lower --lr)")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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
    """Set ``p_value_vs_dcn`` (paired on common seeds) and relative gains over ``dcn`` for every
    variant of ``results`` (``{variant: {slice: summary}}``). Only pass variants evaluated on the
    same evaluation set (:func:`merge_results` makes sure): the test pairs their per-seed AUCs."""
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


def merge_results(trained: dict[str, dict], previous: dict, provenance: Provenance) -> dict:
    """``results.json`` of this run: the variants summarised now (``trained``, ``{variant: {slice:
    summary}}``) and those of the ``previous`` results.json made from the same data (and, for a
    variant with tables, the same tables) as this run; each other one is dropped with a warning.
    Adds the comparisons with ``dcn`` and the input hashes (``results["inputs"]``)."""
    recorded = previous.get(INPUTS_KEY, {})
    kept: dict[str, dict] = {}
    for name in VARIANTS:
        if name in trained:
            kept[name] = trained[name]
        elif name in previous:
            changed = [rel for rel, digest in provenance.inputs(VARIANTS[name].uses_tables).items()
                       if recorded.get(rel) != digest]
            if changed:
                log.warning("results.json: dropping %s, trained on other inputs than this run (changed: %s); "
                            "rerun it with `python -m ranking.train --variant %s`", name, ", ".join(changed), name)
            else:
                kept[name] = previous[name]
    inputs = provenance.inputs(any(VARIANTS[name].uses_tables for name in kept))
    return {INPUTS_KEY: inputs, **add_comparisons(kept)}


def previous_results(workdir: str | Path) -> dict:
    """The published ``results.json`` ({} when there is none, or when it is not an intact set)."""
    out = results_set(workdir)
    json_rel = out.files[0]
    if out.manifest() is None and not out.path(json_rel).exists():
        return {}
    try:
        out.verify()
    except UserError as exc:
        log.warning("%s; results.json starts afresh with this run's variants", exc)
        return {}
    return read_json(out.path(json_rel))


def results_markdown(results: dict) -> str:
    """Table 2 layout: one row per variant; per slice ROC-AUC and normalized logloss (mean ± std
    over seeds) with the relative gain over ``dcn`` in brackets (logloss gain = reduction)."""
    order = [v for v in VARIANTS if v in results]
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
    inputs = ", ".join(f"`{rel}` {digest[:12] if digest else 'absent'}" for rel, digest in results[INPUTS_KEY].items())
    lines = ["# Ranking: paper Table 2 layout", "",
             f"ROC-AUC and normalized logloss (NLL = logloss / logloss of always predicting the training click "
             f"rate; lower is better) on the evaluation week (nw), its impressions whose user bought something in "
             f"the 84 days before (nw_hist) and the others (nw_nohist); impressions: {sizes}. Mean ± std over up "
             f"to {seeds} seeds; in brackets the relative gain over dcn (for NLL: the relative reduction). "
             f"p: paired t-test of per-seed nw AUC against dcn. Every variant was trained and evaluated on the "
             f"same inputs (SHA-256): {inputs}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(mean: float | None, std: float | None, gain: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" + ("" if gain is None else f" ({gain * 100:+.2f}%)")


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process die with ``parent_pid``, the process that started it.

    On Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill it when its parent dies, so a
    ``kill -9`` of ``ranking.train`` does not leave workers training and publishing seed sets. The
    signal follows the parent *thread* that created the worker: the pool's workers are created by
    the main thread, which lives as long as the process. A parent that died before the request
    took effect (the worker was re-parented) is caught by the pid check right after it. Elsewhere
    only that check runs.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os._exit(1)


_WORKER: dict = {}


def _init_worker(cfg: TrainConfig, variant_names: list[str], provenance: Provenance, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    setup_logging()
    torch.set_num_threads(cfg.threads)
    _WORKER.update(cfg=cfg, provenance=provenance, inputs=load_inputs(cfg, [VARIANTS[n] for n in variant_names]))


def _run_job(job: tuple[str, int]) -> dict:
    variant, seed = VARIANTS[job[0]], job[1]
    return run_seed(variant, seed, _WORKER["inputs"], _WORKER["cfg"], _WORKER["provenance"].made_from(variant, seed),
                    progress=False)


def run_jobs(cfg: TrainConfig, variants: list[Variant], inputs: Inputs, provenance: Provenance,
             jobs: list[tuple[str, int]]) -> list[dict]:
    """Train ``jobs`` ((variant, seed) pairs): in this process, or over ``cfg.workers`` spawned
    processes (each single-job-at-a-time with ``cfg.threads`` threads; same numbers either way)."""
    workers = min(cfg.workers, len(jobs))
    if workers <= 1 or distributed.current_env() is not None:  # under torchrun the ranks are the workers
        return [run_seed(VARIANTS[name], seed, inputs, cfg, provenance.made_from(VARIANTS[name], seed))
                for name, seed in jobs]
    context = multiprocessing.get_context("spawn")  # fork after torch started its threads can deadlock
    initargs = (cfg, [v.name for v in variants], provenance, os.getpid())
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
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
    workdir = prepare_workdir(cfg.workdir, "ranking", *(f"ranking/{v.name}/seed{k}" for v in variants
                                                        for k in range(cfg.seeds)))
    env = distributed.init_from_env(cfg.pg_timeout_s)
    if env is not None and not env.is_main:
        torch.distributed.barrier()  # rank 0 builds the feature cache first
    provenance = Provenance.of(cfg, any(v.uses_tables for v in variants))
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
            out = trained_set(workdir, variant.name, seed)
            if not cfg.force and out.current(provenance.made_from(variant, seed)):
                log.info("%s seed %d: complete for these inputs and settings; skipping (--force redoes it)",
                         variant.name, seed)
                finished[variant.name, seed] = read_json(out.path(out.files[1]))
            else:
                jobs.append((variant.name, seed))
    for metrics in run_jobs(cfg, variants, inputs, provenance, jobs):
        if metrics:  # empty on ranks other than 0
            finished[metrics["variant"], metrics["seed"]] = metrics
    if env is not None:
        torch.distributed.destroy_process_group()
        if not env.is_main:
            return {}
    trained = {v.name: summarize_variant([finished[v.name, seed] for seed in range(cfg.seeds)]) for v in variants}
    results = merge_results(trained, previous_results(workdir), provenance)
    out = results_set(workdir)
    json_rel, md_rel = out.files
    listed = [name for name in VARIANTS if name in results]
    with out.publish(MadeFrom(results[INPUTS_KEY], {"variants": listed})) as staged:
        write_json(results, staged[json_rel])
        write_text(results_markdown(results), staged[md_rel])
    log.info("wrote %s and %s (variants %s)", out.path(json_rel), out.path(md_rel), ", ".join(listed))
    return results


if __name__ == "__main__":
    run_main(main)
