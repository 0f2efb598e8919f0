"""Train and evaluate the ranking variants over seeds; write the paper's Table 2.

``python -m ranking.train --workdir DIR --variant NAME|all [--seeds 5] [--epochs N] [--batch-size B] [--lr LR] [--force]``

``torchrun --nproc_per_node N -m ranking.train ... [--sharding auto|table_wise|row_wise|column_wise|data_parallel] [--pg-timeout-s 120]``
trains each variant/seed sharded over the N ranks (:mod:`ranking.distributed`); rank 0 logs the
plan and writes the same files (``model.pt`` unsharded, metrics over the full evaluation week).

The flags are :class:`ranking.config.RankingTrainConfig`, the architecture flags (``--dcn-deep-sizes
128 64``, ``--table-proj-dim 32``, ...) included. One early-stopping loop (:func:`fit`) trains a
:class:`Ranker`: a :class:`LocalRanker` in a single process, a
:class:`ranking.distributed.ShardedRanker` under torchrun.

Reads ``DIR/data/{impressions,purchases}.parquet`` and, for variants with tables,
``DIR/embeddings/{product,query}_table.parquet`` (their vectors memory-mapped by every worker from
``DIR/embeddings/mapped/``: :func:`ranking.tables.mapped_tables`). Writes

* per variant/seed, one :class:`common.provenance.OutputSet` (manifest
  ``DIR/ranking/<variant>/seed<k>/manifest.json``): ``model.pt`` (:func:`ranking.model.load_model`
  reads it; a variant with frozen tables names the table files instead of holding a copy of them,
  so a run's checkpoints hold the tables only for the variants that train them) and
  ``metrics.json`` (history and per-slice AUC / normalized logloss), published together. The
  set is made from the SHA-256 of the impressions and purchases tables, of the product and query
  tables for variants with tables, and the settings that change what is trained, the
  architecture included (not ``--threads``, ``--workers`` or ``--eval-batch-size``). Neither
  file holds wall times or file names (the train and eval seconds are logged): the same settings
  and inputs give byte-identical files (on CPU, for a fixed ``--threads``), so the stages that
  read them skip.
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
any number, as many as fit ``--max-memory-gb`` or the available memory, the jobs that train
tables after the others (:func:`job_plan`); they die with the main process, see
:func:`die_with_parent`). Early stopping
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
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import psutil
import torch
from torch import nn
from tqdm import tqdm

from common.cli import UserError, parse_config, resolve_threads, run_main, setup_logging
from common.distributed import DistEnv, close_process_group, current_env, init_from_env
from common.io import prepare_workdir, read_json, write_json, write_text
from common.provenance import MadeFrom, OutputSet
from common.seed import seed_everything
from data.dataset import input_hashes
from data.protocol import EVAL_DAYS, HISTORY_DAYS
from data.schema import SchemaError
from embeddings.tables import EmbeddingTable, tables_set
from ranking import layout
from ranking.config import TABLE_OPTIMIZERS, RankingTrainConfig
from ranking.distributed import ShardedRanker
from ranking.features import CACHE_VERSION, VALID_DAYS, ImpressionCache, RankingBatch, RankingData, build_spec
from ranking.metrics import SLICES, log_loss, mean_std, paired_p_value, slice_metrics
from ranking.optim import RowWiseAdagrad
from ranking.model import RankingModel, build_model, build_tables, save_model, trained_set
from ranking.plain import PlainInputModel
from ranking.spec import FeatureSpec, PurchaseIndex
from ranking.tables import frozen_parameter_names, mapped_tables, sparse_gradient_parameters, trainable_parameters
from ranking.variants import BASELINE, VARIANTS, Variant, resolve_variants

log = logging.getLogger(__name__)


DATA_TABLES = ("impressions", "purchases")
INPUTS_KEY = "inputs"  # the key of results.json holding the input hashes (the others are variants)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def results_set(workdir: str | Path) -> OutputSet:
    """The output set of Table 2: ``results.json`` and ``results.md``."""
    return OutputSet(workdir, layout.RESULTS_MANIFEST_REL, [layout.RESULTS_JSON_REL, layout.RESULTS_MD_REL],
                     what="python -m ranking.train")


def training_settings(cfg: RankingTrainConfig) -> dict:
    """The settings that change what a run trains (not threads, workers or the evaluation batch size)."""
    settings = {name: getattr(cfg, name) for name in (
        "epochs", "early_stopping", "checks_per_epoch", "patience", "batch_size", "lr", "optimizer", "history_len",
        "table_optimizer")}
    settings.update(model=asdict(cfg.model_only()),
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
    def of(cls, cfg: RankingTrainConfig, with_tables: bool) -> "Provenance":
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
        """The :class:`MadeFrom` of ``variant`` trained with ``seed`` (the table optimizer only for a
        variant that trains its tables: the others are the same run whatever it is)."""
        settings = {k: v for k, v in self.settings.items() if k != "table_optimizer" or variant.train_tables}
        return MadeFrom(self.inputs(variant.uses_tables), {**settings, "variant": variant.name, "seed": seed})


@dataclass
class Inputs:
    """Everything a run reads, loaded once for all variants and seeds."""

    data: RankingData
    base_spec: FeatureSpec
    tables: tuple[EmbeddingTable, EmbeddingTable] | None


def map_tables(cfg: RankingTrainConfig, with_tables: bool,
               provenance: Provenance) -> tuple[EmbeddingTable, EmbeddingTable] | None:
    """The tables of the files ``provenance`` hashed with their vectors mapped from the table cache
    (:func:`ranking.tables.mapped_tables`, written on the first call: processes training at once
    share them); None when not ``with_tables``."""
    if not with_tables:
        return None
    try:
        return mapped_tables(cfg.workdir, provenance.tables)
    except SchemaError as exc:
        raise UserError(str(exc)) from None


def load_inputs(cfg: RankingTrainConfig, variants: Sequence[Variant], provenance: Provenance,
                tables: tuple[EmbeddingTable, EmbeddingTable] | None = None) -> Inputs:
    """Open the feature cache, the purchases and (when a variant needs them and ``tables`` are not
    given, already mapped) the tables (:func:`map_tables`)."""
    workdir = Path(cfg.workdir)
    if tables is None:  # first: a missing table fails before the cache pass
        tables = map_tables(cfg, any(v.uses_tables for v in variants), provenance)
    try:
        cache = ImpressionCache.open(workdir)
        purchases = PurchaseIndex.from_workdir(workdir)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    base_spec = build_spec(cache.meta, history_len=cfg.history_len)
    data = RankingData(cache, purchases, base_spec.with_tables(*tables) if tables else base_spec)
    return Inputs(data, base_spec, tables)


def make_optimizers(model: nn.Module, optimizer: str, lr: float,
                    table_optimizer: str = "rowwise_adagrad") -> list[torch.optim.Optimizer]:
    """The optimizers of every parameter except the frozen tables: ``adam`` = Adam on the dense
    parameters, ``adagrad`` = Adagrad on them; the sparse-gradient tables (the trainable DashCLIP
    tables) get :class:`ranking.optim.RowWiseAdagrad` (``table_optimizer="rowwise_adagrad"``: one
    accumulator per row) or, with ``"same"``, SparseAdam (lazy Adam, two moments the size of the
    table) under ``adam`` and the same Adagrad under ``adagrad``.

    The dense Adam is torch's fused one (one kernel over every parameter instead of a Python loop
    of per-parameter steps: the same update up to float rounding) when the parameters are float
    tensors on CPU or CUDA."""
    if optimizer not in ("adam", "adagrad"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected adam or adagrad")
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"unknown table optimizer {table_optimizer!r}; expected one of {TABLE_OPTIMIZERS}")
    sparse = sparse_gradient_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in trainable_parameters(model) if id(p) not in sparse_ids]
    tables: list[torch.optim.Optimizer] = []
    if sparse and table_optimizer == "rowwise_adagrad":
        tables, sparse = [RowWiseAdagrad(sparse, lr=lr)], []
    if optimizer == "adagrad":
        return [torch.optim.Adagrad(dense + sparse, lr=lr)] + tables
    fused = bool(dense) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in dense)
    return [torch.optim.Adam(dense, lr=lr, fused=fused or None)] + (
        [torch.optim.SparseAdam(sparse, lr=lr)] if sparse else []) + tables


class Ranker(Protocol):
    """A model in training: in this process (:class:`LocalRanker`) or sharded over the ranks of a
    torchrun job (:class:`ranking.distributed.ShardedRanker`). :func:`fit` and :func:`predictions`
    drive either. ``step`` and ``predict`` take the GLOBAL batch, the same on every rank; on a
    sharded ranker they and ``unsharded`` are collective (every rank calls them in the same order).
    """

    @property
    def world_size(self) -> int:
        """Processes that train the model together (1 for a single process)."""

    @property
    def is_main(self) -> bool:
        """Whether this process logs and publishes (rank 0)."""

    def step(self, batch: RankingBatch) -> float:
        """One optimizer step (train mode) on binary cross-entropy over ``batch`` (``B`` rows);
        returns the batch's mean loss."""

    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """Click probabilities ``[B]`` of ``batch`` (eval mode, no gradients)."""

    def snapshot(self, into: Any = None) -> Any:
        """A copy of the current parameters and buffers, only for :meth:`restore`; written into
        ``into`` (an earlier snapshot, no longer needed) when given, so that a run holds at most one."""

    def restore(self, snapshot: Any) -> None:
        """Set the parameters and buffers of a :meth:`snapshot`."""

    def unsharded(self) -> RankingModel | None:
        """The trained weights as one single-process :class:`RankingModel` (None on ranks other than 0)."""


class SpilledTensor:
    """A tensor's bytes in an unnamed temporary file, gone with this object (or with the process,
    however it ends): how a snapshot keeps a trainable table without a second copy in memory."""

    def __init__(self, tensor: torch.Tensor, directory: Path) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)
        self.write(tensor)

    def write(self, tensor: torch.Tensor) -> None:
        """Keep ``tensor``'s values (replacing the ones kept before)."""
        self.file.seek(0)
        self.file.write(memoryview(tensor.detach().contiguous().numpy()).cast("B"))
        self.file.flush()

    def read_into(self, tensor: torch.Tensor) -> None:
        """Write the kept values into ``tensor`` (contiguous, of the kept shape and dtype)."""
        self.file.seek(0)
        view = memoryview(tensor.detach().numpy()).cast("B")
        if self.file.readinto(view) != len(view):
            raise RuntimeError(f"snapshot file {self.file.name}: fewer bytes than the {tuple(tensor.shape)} tensor")


class LocalRanker:
    """A :class:`RankingModel` trained in this process through :class:`PlainInputModel`: the
    single-process :class:`Ranker`. ``optimizers`` (:func:`make_optimizers`) own every parameter
    that ``step`` updates; without any, ``step`` updates nothing. With ``spill_dir``, snapshots
    keep the trainable tables in temporary files there (:class:`SpilledTensor`) instead of
    copies in memory."""

    world_size: int = 1
    is_main: bool = True

    def __init__(self, model: RankingModel, optimizers: Sequence[torch.optim.Optimizer] = (),
                 spill_dir: Path | None = None) -> None:
        self.model = model
        self.plain = PlainInputModel(model)
        self.optimizers = list(optimizers)
        self.loss_fn = nn.BCEWithLogitsLoss()
        sparse = {id(p) for p in sparse_gradient_parameters(model)}
        self.spilled = {name for name, p in model.named_parameters() if id(p) in sparse} if spill_dir else set()
        self.spill_dir = spill_dir

    def step(self, batch: RankingBatch) -> float:
        """One step of every optimizer on the mean BCE of ``batch`` (``B`` rows); returns that loss."""
        self.plain.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.plain(*batch.inputs()), batch.labels)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss.item()

    @torch.no_grad()
    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """Click probabilities ``[B]`` (eval mode, no gradients)."""
        self.plain.eval()
        return torch.sigmoid(self.plain(*batch.inputs()))

    @torch.no_grad()
    def snapshot(self, into: dict[str, torch.Tensor | SpilledTensor] | None = None
                 ) -> dict[str, torch.Tensor | SpilledTensor]:
        """A copy of every entry of the model's ``state_dict`` that training changes (not the frozen
        tables, which may hold millions of rows; trainable tables in files with ``spill_dir``), in
        ``into``'s tensors and files when given."""
        frozen = set(frozen_parameter_names(self.model))
        live = {k: v for k, v in self.model.state_dict().items() if k not in frozen}
        if into is None:
            return {k: SpilledTensor(v, self.spill_dir) if k in self.spilled else v.clone() for k, v in live.items()}
        for k, v in live.items():
            kept = into[k]
            kept.write(v) if isinstance(kept, SpilledTensor) else kept.copy_(v)
        return into

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor | SpilledTensor]) -> None:
        """Write a :meth:`snapshot` back into the model's weights."""
        state = self.model.state_dict()
        for k, v in snapshot.items():
            v.read_into(state[k]) if isinstance(v, SpilledTensor) else state[k].copy_(v)

    def unsharded(self) -> RankingModel:
        """The model itself (it is not sharded)."""
        return self.model


def make_ranker(model: RankingModel, cfg: RankingTrainConfig, env: DistEnv | None) -> Ranker:
    """``model`` ready to train with ``cfg.optimizer`` at ``cfg.lr``: in this process, or sharded
    (``cfg.sharding``) over the ranks of ``env`` (which consumes ``model``)."""
    if env is None:
        return LocalRanker(model, make_optimizers(model, cfg.optimizer, cfg.lr, cfg.table_optimizer),
                           spill_dir=Path(cfg.workdir) / layout.ROOT)
    return ShardedRanker.wrap(model, env, cfg.sharding, cfg.optimizer, cfg.lr, cfg.table_optimizer)


def fit(ranker: Ranker, data: RankingData, cfg: RankingTrainConfig, seed: int, name: str,
        progress: bool = True) -> dict:
    """Train ``ranker`` (the model of variant ``name``) in place with binary cross-entropy on clicks.

    Batches of ``cfg.batch_size`` in an order seeded by ``(seed, epoch)``, the same on every rank.
    With ``cfg.early_stopping``: fit on the ``fit`` split, measure logloss on ``valid`` (the last
    week before the evaluation week; over the full split on every rank, so all ranks decide
    alike) ``cfg.checks_per_epoch`` times an epoch, stop after ``cfg.patience`` checks without
    improvement and restore the best check's parameters. Without it: all of ``train`` for
    ``cfg.epochs`` epochs. Stops at a non-finite training loss (:func:`run_seed` then publishes
    nothing). Returns the history (losses per check, the best check).
    """
    split = "fit" if cfg.early_stopping else "train"
    steps = -(-data.num_rows(split) // cfg.batch_size)
    check_every = -(-steps // cfg.checks_per_epoch) if cfg.early_stopping else steps
    history: dict = {"train_loss": [], "valid_logloss": [], "checks_per_epoch": cfg.checks_per_epoch if cfg.early_stopping else 1}
    best_loss, best_state, since_best = float("inf"), None, 0
    total, count = 0.0, 0
    ranks = f" ({ranker.world_size} ranks)" if ranker.world_size > 1 else ""
    for epoch in range(cfg.epochs):
        rng = np.random.default_rng([seed, epoch])
        bar = tqdm(data.batches(split, cfg.batch_size, shuffle=True, rng=rng), total=steps,
                   disable=None if progress and ranker.is_main else True,
                   desc=f"{name} seed {seed} epoch {epoch + 1}/{cfg.epochs}{ranks}", unit="batch", leave=False)
        for step, batch in enumerate(bar):
            total += ranker.step(batch) * len(batch)
            count += len(batch)
            if (step + 1) % check_every and step + 1 != steps:
                continue
            history["train_loss"].append(total / count)
            total, count = 0.0, 0
            if cfg.early_stopping:
                labels, probs, _ = predictions(ranker, data, "valid", cfg.eval_batch_size)
                history["valid_logloss"].append(log_loss(labels, probs))
                if history["valid_logloss"][-1] < best_loss:
                    best_loss, since_best = history["valid_logloss"][-1], 0
                    best_state = ranker.snapshot(best_state)
                else:
                    since_best += 1
            if not math.isfinite(history["train_loss"][-1]):
                break  # diverged (sharded: the all-reduced loss, so every rank stops here)
        if ranker.is_main:
            log.info("%s seed %d epoch %d%s: train loss %.5f%s", name, seed, epoch + 1, ranks, history["train_loss"][-1],
                     f", valid logloss {history['valid_logloss'][-1]:.5f}" if cfg.early_stopping else "")
        if (cfg.early_stopping and since_best >= cfg.patience) or not math.isfinite(history["train_loss"][-1]):
            break
    if best_state is not None:
        ranker.restore(best_state)
        history["best_check"] = int(np.argmin(history["valid_logloss"]))
        history["best_epoch"] = (history["best_check"] + 1) / cfg.checks_per_epoch
    return history


def predictions(ranker: Ranker, data: RankingData, split: str = "eval",
                batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, click probabilities, has_history)`` over the full ``split`` in cache order (on
    every rank of a sharded ranker)."""
    labels, probs, hist = [], [], []
    for batch in data.batches(split, batch_size):
        probs.append(ranker.predict(batch).numpy())
        labels.append(batch.labels.numpy())
        hist.append(batch.has_history.numpy())
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(hist)


def predict(model: RankingModel, data: RankingData, split: str = "eval",
            batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`predictions` of a trained ``model`` (left in eval mode)."""
    return predictions(LocalRanker(model), data, split, batch_size)


def non_finite(history: dict, probs: np.ndarray) -> str | None:
    """The first value of a finished run that is not finite (training loss, validation logloss,
    evaluation predictions), described; None when all are."""
    for key in ("train_loss", "valid_logloss"):
        values = history[key]
        bad = next((i for i, x in enumerate(values) if not math.isfinite(x)), None)
        if bad is not None:
            return f"{key.replace('_', ' ')} {values[bad]} at check {bad + 1}"
    if not np.isfinite(probs).all():
        return f"click probability of {int((~np.isfinite(probs)).sum())} of {len(probs)} evaluation impressions"
    return None


def non_finite_parameters(model: nn.Module) -> str | None:
    """The first floating-point parameter or buffer of ``model`` that is not finite, described;
    None when all are. Checked 4M values at a time (a table of millions of rows would take a
    quarter of its size in flags at once)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not all(bool(torch.isfinite(chunk).all())
                                                  for chunk in tensor.detach().reshape(-1).split(1 << 22)):
            return f"model parameter {name}"
    return None


def run_seed(variant: Variant, seed: int, inputs: Inputs, cfg: RankingTrainConfig, made_from: MadeFrom,
             progress: bool = True) -> dict:
    """Train one variant from scratch with ``seed`` (:func:`fit`; sharded under torchrun), evaluate
    it on the full evaluation week and publish its set (model.pt + metrics.json,
    :func:`ranking.model.trained_set`) as made from ``made_from``; returns the metrics ({} on
    ranks other than 0). Raises :class:`UserError`, publishing nothing, when a value is not
    finite (:func:`non_finite`, :func:`non_finite_parameters`)."""
    torch.set_num_threads(resolve_threads(cfg.threads))
    seed_everything(seed)
    spec = inputs.data.spec if variant.uses_tables else inputs.base_spec
    tables = build_tables(variant, spec, inputs.tables, torch.Generator().manual_seed(seed))
    ranker = make_ranker(build_model(variant, spec, cfg.model_only(), tables), cfg, current_env())
    start = time.perf_counter()
    history = fit(ranker, inputs.data, cfg, seed, variant.name, progress)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    labels, probs, has_history = predictions(ranker, inputs.data, "eval", cfg.eval_batch_size)
    eval_s = time.perf_counter() - start
    _refuse_non_finite(variant, seed, non_finite(history, probs))  # on every rank: all stop alike
    model = ranker.unsharded()  # model.pt as in a single-process run, whatever the world size
    if model is None:
        return {}
    _refuse_non_finite(variant, seed, non_finite_parameters(model))
    metrics = _clean({"variant": variant.name, "seed": seed, "history": history,
                      "train_impressions": inputs.data.num_rows("train"), "world_size": ranker.world_size,
                      "slices": slice_metrics(labels, probs, has_history, spec.train_click_rate)})
    out = trained_set(cfg.workdir, variant.name, seed)
    model_rel, metrics_rel = out.files
    with out.publish(made_from) as staged:
        # frozen tables are named, not held: the checkpoint maps them from the table files it was made from
        save_model(model.eval(), staged[model_rel], tables_from=(Path(cfg.workdir), made_from.inputs))
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
             f"the {HISTORY_DAYS} days before (nw_hist) and the others (nw_nohist); impressions: {sizes}. Mean ± std over up "
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


def _init_worker(cfg: RankingTrainConfig, variant_names: list[str], provenance: Provenance, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    setup_logging()
    torch.set_num_threads(resolve_threads(cfg.threads))
    _WORKER.update(cfg=cfg, provenance=provenance,
                   inputs=load_inputs(cfg, [VARIANTS[n] for n in variant_names], provenance))


def _run_job(job: tuple[str, int]) -> dict:
    variant, seed = VARIANTS[job[0]], job[1]
    return run_seed(variant, seed, _WORKER["inputs"], _WORKER["cfg"], _WORKER["provenance"].made_from(variant, seed),
                    progress=False)


WORKER_BASE_BYTES = 1 << 30  # a worker's own memory beside tables it trains: torch, keys, id maps, purchases
# and what grows with the impressions (split indices, the purchase index, batch buffers): 0.68 -> 0.83 GB per
# frozen-table worker while the impression cache grew 0.033 -> 0.33 GB (synth:paper at scale 0.01 and 0.1)
WORKER_BYTES_PER_CACHE_BYTE = 0.5
MEMORY_HEADROOM = 0.9  # the workers are planned within this share of the memory: the sizes are estimates


def affordable_workers(requested: int, own_bytes: int, shared_bytes: int, available_bytes: int) -> int:
    """The most of ``requested`` workers, at least 1, that fit in ``available_bytes``: each holds
    ``own_bytes`` of its own beside the ``shared_bytes`` they all map together."""
    return int(max(1, min(requested, (available_bytes - shared_bytes) // max(own_bytes, 1))))


def worker_bytes(trains_tables: bool, table_bytes: int, cache_bytes: int) -> int:
    """The memory a worker holds of its own: :data:`WORKER_BASE_BYTES`, a share of the impression cache's
    size (:data:`WORKER_BYTES_PER_CACHE_BYTE`) and, when its jobs train tables, its copy of them."""
    return int(WORKER_BASE_BYTES + WORKER_BYTES_PER_CACHE_BYTE * cache_bytes + (table_bytes if trains_tables else 0))


def workers_for(requested: int, trains_tables: bool, table_bytes: int, cache_bytes: int, memory_bytes: int) -> int:
    """Workers, at most ``requested``, for jobs that train their tables or not (:func:`affordable_workers`):
    each holds :func:`worker_bytes` beside the mapped tables (``table_bytes``) and impression cache
    (``cache_bytes``) that the workers share, within :data:`MEMORY_HEADROOM` of ``memory_bytes``."""
    return affordable_workers(requested, worker_bytes(trains_tables, table_bytes, cache_bytes),
                              table_bytes + cache_bytes, int(MEMORY_HEADROOM * memory_bytes))


def job_plan(cfg: RankingTrainConfig, jobs: list[tuple[str, int]],
             tables: tuple[EmbeddingTable, EmbeddingTable] | None,
             cache: ImpressionCache) -> list[tuple[list[tuple[str, int]], int]]:
    """``jobs`` in the groups :func:`run_jobs` trains one after the other, each with its worker count
    (1 = this process; always 1 under torchrun, whose ranks are the workers): the jobs with frozen or
    no tables, then those that train tables, which hold a copy of them per worker and so may get
    fewer workers within the memory (:func:`workers_for`: ``--max-memory-gb``, else what is available
    now); groups with the same count run as one. At most ``cfg.workers``; fewer change no number,
    only the wall time; a cut is logged."""
    requested = 1 if current_env() is not None else max(1, min(cfg.workers, len(jobs)))
    table_bytes = sum(int(t.vectors.nbytes) for t in tables) if tables else 0
    cache_bytes = sum(int(column.nbytes) for column in cache.columns.values())
    available = psutil.virtual_memory().available
    memory = min(available, int(cfg.max_memory_gb * 1e9)) if cfg.max_memory_gb > 0 else available
    plan: list[tuple[list[tuple[str, int]], int]] = []  # (jobs, the most workers the memory holds for them)
    for trains_tables in (False, True):
        group = [job for job in jobs if VARIANTS[job[0]].train_tables == trains_tables]
        if not group:
            continue
        workers = workers_for(requested, trains_tables, table_bytes, cache_bytes, memory)
        if workers < min(requested, len(group)):
            log.info("ranking: %d worker(s), not %d, for the %d job(s) that %s: %.1f GB of memory for the workers, "
                     "each needs about %.1f GB of its own beside %.1f GB they share (the same numbers, a longer "
                     "wall time)", workers, min(requested, len(group)), len(group),
                     "train tables" if trains_tables else "do not train tables", memory / 1e9,
                     worker_bytes(trains_tables, table_bytes, cache_bytes) / 1e9, (table_bytes + cache_bytes) / 1e9)
        if plan and plan[-1][1] == workers:
            plan[-1][0].extend(group)
        else:
            plan.append((group, workers))
    return [(group, min(workers, len(group))) for group, workers in plan]


def run_jobs(cfg: RankingTrainConfig, variants: list[Variant], inputs: Inputs | None, provenance: Provenance,
             jobs: list[tuple[str, int]], workers: int) -> list[dict]:
    """Train ``jobs`` ((variant, seed) pairs): in this process with ``inputs`` (``workers`` 1), or
    over ``workers`` spawned processes that load their own (``inputs`` may then be None; each runs
    one job at a time with ``cfg.threads`` threads; same numbers either way)."""
    if not jobs:
        return []
    if workers == 1:
        assert inputs is not None, "a run in this process needs its inputs"
        return [run_seed(VARIANTS[name], seed, inputs, cfg, provenance.made_from(VARIANTS[name], seed))
                for name, seed in jobs]
    context = multiprocessing.get_context("spawn")  # fork after torch started its threads can deadlock
    initargs = (cfg, [v.name for v in variants], provenance, os.getpid())
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        return list(tqdm(pool.imap_unordered(_run_job, jobs), total=len(jobs), desc=f"ranking jobs ({workers} workers)",
                         unit="run", disable=None))


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(RankingTrainConfig, argv)  # checks the flags, --variant included
    variants = resolve_variants(cfg.variant)
    workdir = prepare_workdir(cfg.workdir, layout.ROOT, *(layout.run_rel(v.name, k) for v in variants
                                                          for k in range(cfg.seeds)))
    env = init_from_env(cfg.pg_timeout_s)
    if env is not None and not env.is_main:
        torch.distributed.barrier()  # rank 0 builds the feature cache first
    provenance = Provenance.of(cfg, any(v.uses_tables for v in variants))
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
    # first: a missing table fails before the cache pass; mapped here, the workers started next find them
    tables = map_tables(cfg, any(VARIANTS[name].uses_tables for name, _ in jobs), provenance)
    try:
        cache = ImpressionCache.open(workdir)  # built here once (first by rank 0 under torchrun)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    if env is not None and env.is_main:
        torch.distributed.barrier()
    if jobs and cfg.early_stopping and min(len(cache.split_index("fit")), len(cache.split_index("valid"))) == 0:
        raise UserError(f"{cfg.workdir}: early stopping needs impressions both before and in the week before the "
                        f"evaluation week (fit {len(cache.split_index('fit'))}, valid "
                        f"{len(cache.split_index('valid'))}); pass --no-early-stopping")
    log.info("ranking: %d train / %d eval impressions; variants %s, seeds %d", len(cache.split_index("train")),
             len(cache.split_index("eval")), ", ".join(v.name for v in variants), cfg.seeds)
    for group, workers in job_plan(cfg, jobs, tables, cache):
        # workers load their own inputs (the tables and the cache they map are shared, the rest is not): this
        # process loads them only to train here, and lets them go before workers start
        inputs = load_inputs(cfg, variants, provenance, tables) if workers == 1 else None
        for metrics in run_jobs(cfg, variants, inputs, provenance, group, workers):
            if metrics:  # empty on ranks other than 0
                finished[metrics["variant"], metrics["seed"]] = metrics
        del inputs
    del tables
    if env is not None:
        close_process_group()
        if not env.is_main:
            return {}
    trained = {v.name: summarize_variant([finished[v.name, seed] for seed in range(cfg.seeds)]) for v in variants}
    results = merge_results(trained, previous_results(workdir), provenance)
    out = results_set(workdir)
    json_rel, md_rel = out.files
    listed = [name for name in VARIANTS if name in results]
    # written on every run: the same results leave the files as they are
    with out.publish(MadeFrom(results[INPUTS_KEY], {"variants": listed}), keep_same=True) as staged:
        write_json(results, staged[json_rel])
        write_text(results_markdown(results), staged[md_rel])
    log.info("results in %s and %s (variants %s)", out.path(json_rel), out.path(md_rel), ", ".join(listed))
    return results


if __name__ == "__main__":
    run_main(main)
