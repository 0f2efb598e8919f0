"""Train DashCLIP: ``python -m embeddings.train --workdir DIR [--backbone mini] [--stage 1|2|all] ...``

Stage 1, continual pretraining on the catalog (BLIP-style): each step embeds a batch of
(image, title) pairs, takes the symmetric ITC loss, mines one hard negative title per image and
one hard negative image per title from the ITC similarities, and takes the ITM loss of the
positives and both negatives through the image-grounded text encoder. One addition to the paper
(``--multimodal-itc-weight``, 0 turns it off): the product embeddings of the positives (multimodal
projection of the grounded [CLS]) are contrasted with the batch's title and image embeddings.
Without it, ITM alone turns the grounded [CLS] into a match detector that forgets the product
(demo data, one epoch: a linear aisle probe on the grounded [CLS] fell from 0.86 to 0.44 accuracy;
with it, 0.89), and stage 2 can only re-project that [CLS]. A held-out share of the
products gives an ITM eval loss every ``--eval-every`` steps (with a fixed negative-sampling seed,
so evaluations are comparable); the best evaluation's weights are kept and training stops after
``--patience`` evaluations without improvement.

Stage 2, product-query alignment: the product encoders are frozen, so the grounded [CLS] of every
product is computed once; the multimodal projection, the query encoder (first layers frozen) and
the query projection are trained with the PQC loss on tuples of
:func:`embeddings.sampling.build_pqc_tuples` over the training side of
:func:`embeddings.sampling.split_queries`, plus (``--pqc-in-batch-weight``, 0 = the paper) the
symmetric in-batch contrast of products and their positive queries, which PQC alone lacks (see
:func:`embeddings.steps.stage2_losses`), and (``--query-side-negatives``, 0 = the paper) the
query-side contrast: each tuple's positive query ranks its product above products that query is
labelled lower for (:func:`embeddings.sampling.sample_negative_products`), often the same type of
another brand or variant, which is the order retrieval ranks in. With ``--pqc-query-typo-rate``
(0 = the paper) each step reads a random share of the batch's distinct positive queries (wherever
they appear in the batch) with one character-level typo
(:func:`embeddings.sampling.corrupt_queries`, drawn from the seed and the step), their frozen
states computed from the changed text, never read from the query cache; the logged PQC losses read
the queries as labelled. With ``--pqc-title-query-rate`` (0 = the paper)
each step replaces the positive query of a random share of the tuples with 1-3 consecutive words of
the product's own title (:func:`embeddings.sampling.title_spans`), read the same way, so the query
encoder also learns catalog words no training query names; with ``--pqc-title-query-context`` the
span keeps the replaced query's words that the title lacks ("6 pack", "for home"), and with
``--pqc-title-query-brand-share`` a share of the spans is the product's brand (the catalog's
``brand`` column, where not null), so brand-only queries are learnt for every brand. At the start of
stage 2 the query encoder is initialised from the stage-1 text encoder. Both stages' step losses are in
:mod:`embeddings.steps`; this module runs the loop around them.

The architecture's own departures from the paper (``--pooling``, ``--cross-attention``,
:class:`embeddings.config.DashCLIPConfig`; ``auto`` picks them per backbone): the mini backbone hands
on the mean of MiniLM's token states (how that sentence encoder was pretrained) instead of its
[CLS], and its new cross-attention blocks enter through gates that start at zero, so the grounded
encoder starts as the text encoder and stage 1 opens the image path only as far as the losses
reward it. ``python -m experiments.ablation`` measures each change.

Cold start (``--cold-product-fraction``, default 0.1; 0 turns it off): the products of
:func:`embeddings.sampling.split_cold_products` (stratified by aisle, seeded by ``--seed``) take no
part in either stage. Stage 1 neither trains on nor early-stops with their (image, title) pairs
(:func:`stage1_rows`); stage 2 drops their relevance pairs after the query split
(:func:`stage2_relevance`), so no tuple has them as its product and no proxy negative comes from
their HR queries. ``embeddings.evaluate`` recomputes the same split from ``config.json`` and scores
retrieval and the aisle probe on them.

Outputs under ``DIR/embeddings/`` (:class:`embeddings.runtime.Paths`), each stage's published as
one :class:`common.provenance.OutputSet` (:func:`embeddings.runtime.stage_set`):
``checkpoints/stage1.pt`` (stage-1 weights; manifest ``stage1.manifest.json``),
``checkpoints/model.pt`` (the trained model that ``embeddings.encode`` loads) with ``config.json``
(the settings it was trained with; manifest ``model.manifest.json``), and ``train_log.json``
(losses per step, eval losses, best step, wall times). Stage 1 is made from the catalog and its
settings, stage 2 from the catalog, the relevance table, ``stage1.pt`` and its settings; a stage
whose output is made from exactly these is skipped (``--force`` redoes it). Before anything is
cleared or trained, the tables the pending stages read are validated (images decoded); a training
loss that is not finite stops the run with an error and publishes nothing.

While a stage runs, ``checkpoints/stage{1,2}_last.pt`` hold everything needed to resume (model,
optimizer, scheduler, RNG states, step); a rerun made from the same inputs and settings continues
from there (``--no-resume`` restarts). Every checkpoint holds tensors, numbers, strings, lists and
dicts only: it loads with ``torch.load(weights_only=True)``
(:func:`embeddings.runtime.load_checkpoint` refuses anything else), and the published ones are
byte-identical for the same data, settings and seed on CPU (wall times live in ``train_log.json``).

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) both stages train data-parallel with
DDP over the N ranks (:mod:`embeddings.distributed`): the batch sizes stay the global batch, each
rank computes its block of it, the contrastive terms span the global batch, stage-1 hard negatives
are mined over the global batch, and a step equals the single-process step on the same global
batch. Rank 0 writes every file, in the single-process format (a run of any world size resumes
it); evaluations are rank 0's numbers on every rank. Every rank reads ``DIR`` (the data, the
stage-1 checkpoint, a resumed checkpoint): on several nodes it must be on shared storage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from common.cli import UserError, parse_config, resolve_threads, run_main
from common.distributed import close_process_group, init_from_env
from common.io import json_text, prepare_workdir, read_json, write_json
from common.provenance import MadeFrom
from common.seed import deterministic_kernels
from data import schema
from data.dataset import data_set, input_hashes
from embeddings.config import EmbeddingsTrainConfig
from embeddings.distributed import (Shard, broadcast_from_main, check_batch_split, data_parallel, dropout_seed,
                                    global_batch_size, itc_loss, local_contrast, mean_over_ranks)
from embeddings.inputs import ImageStore, TokenStore
from embeddings.losses import ITCLoss, ITMLoss, PQCLoss
from embeddings.models import DashCLIP, build_dashclip
from embeddings.runtime import (MODEL_CHECKPOINT, RUN_CONFIG, STAGE1_CHECKPOINT, Paths, autocast, load_checkpoint,
                                bound_kernel_cache, resolve_autocast, resolve_device, save_checkpoint, stage_set,
                                write_checkpoint)
from embeddings.sampling import (PQCTuples, build_pqc_tuples, corrupt_queries, heldout_query_rows,
                                 sample_negative_products, split_cold_products, title_spans,
                                 TITLE_SPAN_MAX_WORDS)
from embeddings.steps import NonFinite, Precision, adamw, stage1_losses, stage2_losses

log = logging.getLogger(__name__)

EVAL_NEGATIVES_SEED_OFFSET = 1_000_003
TYPO_STREAM = 4  # numpy seed key [seed, step, TYPO_STREAM] of the typos of a stage-2 step
TITLE_QUERY_STREAM = 5  # [seed, step, TITLE_QUERY_STREAM]: its title-span queries
MIN_STAGE1_PRODUCTS = 4
# the data tables each stage reads
STAGE_TABLES: dict[int, tuple[schema.TableName, ...]] = {1: ("catalog",), 2: ("catalog", "relevance")}


# -------------------------------------------------------------------- schedule, RNG state, batches
def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 0."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_order(items: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The data order of ``epoch``: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(items)


def batch_at(items: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The ``step``-th batch of an endless sequence of epochs (last partial batch of each epoch dropped)."""
    per_epoch = len(items) // batch_size
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(items, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


def stage1_rows(has_image: np.ndarray, cold: np.ndarray, seed: int, eval_fraction: float,
                eval_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 catalog rows: ``(train, eval)`` sorted row indices, disjoint.

    Only products with an image take part and cold products (``cold`` ``[P]`` bool) never do: they
    are neither trained on nor used for the ITM eval loss. A seeded shuffle of the rest gives
    ``min(eval_max, round(eval_fraction * n))`` eval rows (none when fewer than 2 training rows
    would remain). Without cold products the split is the one of earlier versions.
    """
    usable = np.flatnonzero(np.asarray(has_image, dtype=bool) & ~np.asarray(cold, dtype=bool))
    shuffled = np.random.default_rng([seed, 1]).permutation(usable)
    n_eval = min(eval_max, round(eval_fraction * len(shuffled)))
    if len(shuffled) - n_eval < 2:
        n_eval = 0
    return np.sort(shuffled[n_eval:]), np.sort(shuffled[:n_eval])


def stage2_relevance(relevance: pd.DataFrame, cold_products: np.ndarray, query_eval_fraction: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The relevance rows stage 2 samples its ``(train, eval)`` tuples from.

    The query split (:func:`split_queries`) is taken on the whole table, so it is the one the
    evaluation recomputes; then the rows of ``cold_products`` (product_ids) are dropped from both
    sides: no tuple has a cold product, and their queries are proxies only through seen products.
    """
    is_eval = heldout_query_rows(relevance, query_eval_fraction, seed)
    seen = ~relevance["product_id"].isin(np.asarray(cold_products, dtype=np.int64)).to_numpy()
    return (relevance.loc[~is_eval & seen].reset_index(drop=True),
            relevance.loc[is_eval & seen].reset_index(drop=True))


def tuple_query_matrices(tuple_sets: Sequence[PQCTuples]) -> tuple[list[str], list[np.ndarray]]:
    """The distinct queries of several tuple sets, in order of first use (set by set, tuple by tuple,
    positive then negatives), and each set's ``[T, 1+N]`` int32 indices into them (positive first)."""
    vocabulary = np.unique(np.concatenate([t.queries for t in tuple_sets]))
    codes = [np.searchsorted(vocabulary, t.queries).astype(np.int32)[np.concatenate([t.positive[:, None], t.negatives],
                                                                                    axis=1)]
             for t in tuple_sets]
    first_use = np.full(len(vocabulary), np.iinfo(np.int64).max)  # position of each query's first use
    offset = 0
    for matrix in codes:
        for start in range(0, len(matrix), 1 << 16):  # in blocks: no position array as long as all the slots
            block = matrix[start:start + (1 << 16)].reshape(-1)
            np.minimum.at(first_use, block, offset + np.arange(len(block)))
            offset += len(block)
    used = np.flatnonzero(first_use < np.iinfo(np.int64).max)
    by_first_use = used[np.argsort(first_use[used])]
    index = np.zeros(len(vocabulary), dtype=np.int32)
    index[by_first_use] = np.arange(len(by_first_use), dtype=np.int32)
    return vocabulary[by_first_use].tolist(), [index[c] for c in codes]


def plan_steps(n_items: int, batch_size: int, epochs: float, max_steps: int) -> int:
    steps = max(1, math.ceil(epochs * (n_items // batch_size)))
    return min(steps, max_steps) if max_steps > 0 else steps


def items_drawn(n_items: int, batch_size: int, seed: int, steps: int) -> np.ndarray:
    """Sorted distinct indices ``0..n_items-1`` that the batches of steps ``0..steps-1`` of
    :func:`batch_at` (over ``np.arange(n_items)``) draw: all of them but the dropped tails once
    training runs an epoch, a fraction when a step budget ends it sooner."""
    per_epoch = n_items // batch_size
    items = np.arange(n_items)
    drawn = [epoch_order(items, seed, epoch)[:min(steps - epoch * per_epoch, per_epoch) * batch_size]
             for epoch in range(math.ceil(steps / per_epoch))]
    return np.unique(np.concatenate(drawn)) if drawn else np.zeros(0, dtype=np.int64)


class QueryPrefixStore:
    """Query inputs of stage 2: the states after the query encoder's frozen layers.

    Those layers are fixed (and in eval mode) during stage 2, so their output is computed once per
    distinct query and kept when all of them fit in ``cache_mb``; else once per query that training
    reads (``needed``, sorted indices: a step budget shorter than an epoch reads few) when those fit;
    otherwise (or with no frozen layer) it is computed per batch. A query read with another text
    (a typo or a title span, :meth:`batch`) is always computed from that text.
    """

    def __init__(self, model: DashCLIP, tokens: TokenStore, device: torch.device, precision: Precision,
                 cache_mb: float, batch_size: int = 256, needed: np.ndarray | None = None) -> None:
        self.model, self.tokens, self.device, self.precision = model, tokens, device, precision
        self.frozen = model.frozen_layers.get("query_encoder", 0) > 0

        def size_mb(rows: np.ndarray) -> float:
            return len(rows) * int(tokens.lengths[rows].max(initial=1)) * model.query_encoder.width * 4 / 2**20

        every = np.arange(len(tokens))
        needed = every if needed is None or size_mb(every) <= cache_mb else np.asarray(needed, dtype=np.int64)
        longest = int(tokens.lengths[needed].max(initial=1))
        self.cache: torch.Tensor | None = None
        self.cache_row = torch.full((len(tokens),), -1, dtype=torch.long, device=device)  # query -> cache row
        self.lengths = torch.as_tensor(tokens.lengths, device=device)
        if self.frozen and size_mb(needed) <= cache_mb:
            starts = range(0, len(needed), batch_size)
            parts = [self._compute(needed[i:i + batch_size])[0].float() for i in starts]
            self.cache = torch.zeros(len(needed), longest, parts[0].shape[-1] if parts else 1, device=device)
            for i, part in zip(starts, parts):
                self.cache[i:i + len(part), :part.shape[1]] = part
            self.cache_row[torch.as_tensor(needed, device=device)] = torch.arange(len(needed), device=device)
            log.info("stage 2: frozen query-encoder states of %d of %d distinct queries cached (%.0f MB)",
                     len(needed), len(tokens), size_mb(needed))
        elif self.frozen:
            log.info("stage 2: %d distinct queries need %.0f MB > --query-cache-mb: computing their frozen states "
                     "per batch", len(needed), size_mb(needed))

    def _states(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = ids.to(self.device), mask.to(self.device)
        with (torch.no_grad() if self.frozen else contextlib.nullcontext()), self.precision():
            return self.model.query_prefix_states(ids, mask), mask

    def _compute(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._states(*self.tokens.batch(indices))

    def batch(self, indices: np.ndarray,
              texts: Sequence[str | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [n, L, Dq], attention_mask [n, L])`` of the queries at ``indices``. ``texts`` (one
        per index, None = the query's own) gives some of them another text (a typo, a title span): their
        states are computed from it, never read from the cache."""
        other = np.array([t is not None for t in texts], dtype=bool) if texts is not None else None
        if other is None or not other.any():
            return self._stored(indices)
        rows = [np.flatnonzero(other), np.flatnonzero(~other)]
        parts = [self._states(*self.tokens.encode([texts[i] for i in rows[0]]))]
        if len(rows[1]):
            parts.append(self._stored(np.asarray(indices)[rows[1]]))
        states, _ = parts[-1]
        merged = states.new_zeros(len(other), max(s.shape[1] for s, _ in parts), states.shape[-1])
        mask = torch.zeros(merged.shape[:2], dtype=torch.long, device=self.device)
        for row, (part, part_mask) in zip(rows, parts):
            at = torch.as_tensor(row, device=self.device)
            merged[at, :part.shape[1]] = part.to(merged.dtype)
            mask[at, :part.shape[1]] = part_mask
        return merged, mask

    def _stored(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch` of the queries' own texts (from the cache when it holds them)."""
        if self.cache is None:
            return self._compute(indices)
        queries = torch.as_tensor(indices, device=self.device)
        rows = self.cache_row[queries]
        if bool((rows < 0).any()):
            raise ValueError("stage 2: a query outside the cached ones (those training reads) was asked for")
        lengths = self.lengths[queries]
        longest = int(lengths.max())
        mask = (torch.arange(longest, device=self.device)[None, :] < lengths[:, None]).long()
        return self.cache[rows, :longest], mask


class Paused(Exception):
    """This invocation's step budget (``--max-steps-this-run``) ran out; the run is checkpointed."""


class StepBudget:
    """Counts optimizer steps of this invocation against ``--max-steps-this-run``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def exhausted(self) -> bool:
        return self.limit > 0 and self.used >= self.limit


# --------------------------------------------------------------------------------- stage loop
class StageRunner:
    """The optimisation loop shared by both stages: steps, checkpoints, resume, log, progress.

    Subclasses provide :meth:`train_loss` (the loss of global step ``step``) and may hook
    :meth:`after_step` (evaluation, early stopping) and :meth:`extra_state`/:meth:`load_extra_state`.
    Distributed (``shard``): the step's losses run through :meth:`parallel` (DDP), the logged
    losses are the means over the ranks (the global batch's), and only rank 0 writes checkpoints.
    ``key`` (:meth:`MadeFrom.key` of the stage's output) marks the resume checkpoint: a run
    continues only from one made from the same inputs and settings.
    """

    stage: int = 0

    def __init__(self, cfg: EmbeddingsTrainConfig, model: DashCLIP, device: torch.device, paths: Paths,
                 groups: list[dict[str, Any]], total_steps: int, budget: StepBudget, shard: Shard, key: str) -> None:
        self.cfg, self.model, self.device, self.paths, self.budget = cfg, model, device, paths, budget
        self.shard, self.key = shard, key
        self.total_steps = total_steps
        self.optimizer = adamw(groups, cfg.weight_decay, device)
        self.scheduler = warmup_cosine(self.optimizer, total_steps, cfg.warmup_fraction)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.train_wall_s = 0.0  # optimizer steps only
        self.wall_s = 0.0  # the whole loop: steps, evaluations, checkpoints (summed over resumed runs)
        torch.manual_seed(cfg.seed + self.stage)  # dropout; a resumed run restores the saved state

    # hooks -------------------------------------------------------------------
    def train_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> bool:
        """Called after each optimizer step; returns True to stop early."""
        return False

    def evaluation_due(self, every: int, evals: list[dict[str, float]]) -> bool:
        """Every ``every`` steps, and at the last step unless an evaluation ran shortly before (within
        ``min(every, total_steps) / 2`` steps)."""
        if self.step % every == 0:
            return True
        last = evals[-1]["step"] if evals else -every
        return self.step == self.total_steps and self.step - last >= max(1, min(every, self.total_steps) // 2)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def trained_modules(self) -> dict[str, nn.Module]:
        """Modules whose state (besides the model) a checkpoint must carry."""
        return {}

    def parallel(self, compute: Callable[..., dict[str, torch.Tensor]],
                 find_unused: bool = False) -> Callable[..., dict[str, torch.Tensor]]:
        """``compute`` (the losses of this rank's share of a step) wrapped in DDP when distributed:
        the optimizer's parameters (model and :meth:`trained_modules`) are synchronised."""
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        return data_parallel(compute, {"model": self.model, **self.trained_modules()}, trained, self.shard, find_unused)

    # loop --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"made_from": self.key, "step": self.step, "total_steps": self.total_steps,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(self.device),
                "modules": {k: m.state_dict() for k, m in self.trained_modules().items()},
                "history": self.history, "train_wall_s": self.train_wall_s, "wall_s": self.wall_s,
                "extra": self.extra_state()}

    def save(self) -> None:
        if self.shard.is_main:
            save_checkpoint(self.state(), self.paths.stage_last(self.stage))

    def try_resume(self) -> bool:
        path = self.paths.stage_last(self.stage)
        if not path.exists():
            return False
        state = load_checkpoint(path, self.device)
        if state.get("made_from") != self.key or state.get("total_steps") != self.total_steps:
            log.info("stage %d: %s is from other data or settings; starting over", self.stage, path)
            return False
        if not self.cfg.resume:
            log.info("stage %d: --no-resume: discarding the interrupted run at step %d", self.stage, state["step"])
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, module in self.trained_modules().items():
            module.load_state_dict(state["modules"][name])
        set_rng_state(state["rng"], self.device)
        self.step, self.history = state["step"], state["history"]
        self.train_wall_s, self.wall_s = state["train_wall_s"], state["wall_s"]
        self.load_extra_state(state["extra"])
        log.info("stage %d: resumed from %s at step %d of %d", self.stage, path, self.step, self.total_steps)
        return True

    @staticmethod
    def check_finite(metrics: dict[str, float]) -> None:
        """:class:`NonFinite` when the loss of the step about to be taken is NaN or infinite (the
        same on every rank: ``metrics`` are the means over the ranks)."""
        if not math.isfinite(metrics["loss"]):
            raise NonFinite("the training loss is not finite (" + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                            + ")")

    def run(self) -> None:
        """Train to ``total_steps`` (or an early stop). Raises :class:`Paused` when the step budget
        of this invocation runs out (after checkpointing), and a one-line :class:`UserError` when a
        loss becomes NaN or infinite (:class:`NonFinite`)."""
        self.model.train()
        progress = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {self.stage}", unit="step",
                        dynamic_ncols=True, mininterval=1.0, disable=None if self.shard.is_main else True)
        stop = False
        loop_started = time.perf_counter()
        try:
            while self.step < self.total_steps and not stop:
                if self.budget.exhausted():
                    self.wall_s += time.perf_counter() - loop_started
                    loop_started = time.perf_counter()
                    self.save()
                    raise Paused(f"stage {self.stage} paused at step {self.step} of {self.total_steps} "
                                 f"(--max-steps-this-run {self.budget.limit}); rerun to continue")
                started = time.perf_counter()
                self.model.train()
                if self.shard.distributed:  # independent dropout per rank, reproduced on resume
                    torch.manual_seed(dropout_seed(self.cfg.seed, self.stage, self.step, self.shard.rank))
                loss, metrics = self.train_loss(self.step)
                metrics = mean_over_ranks({"loss": float(loss.detach()), **metrics}, self.shard)
                self.check_finite(metrics)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.budget.used += 1
                self.train_wall_s += time.perf_counter() - started
                self.history.append({"step": self.step, **metrics, "lr": self.scheduler.get_last_lr()[0]})
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                stop = self.after_step()
                if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total_steps and not stop:
                    self.save()
        except NonFinite as exc:
            raise UserError(f"stage {self.stage} diverged after {self.step} steps: {exc}; nothing was published "
                            f"(lower the learning rates, or check the data)") from None
        finally:
            progress.close()
            self.wall_s += time.perf_counter() - loop_started


# ------------------------------------------------------------------------------------ stage 1
class Stage1(StageRunner):
    """ITC + ITM on (image, title) pairs with held-out ITM early stopping."""

    stage = 1

    def __init__(self, cfg: EmbeddingsTrainConfig, model: DashCLIP, device: torch.device, paths: Paths,
                 images: ImageStore, titles: TokenStore, title_text: list[str], train_rows: np.ndarray,
                 eval_rows: np.ndarray, budget: StepBudget, key: str, shard: Shard = Shard()) -> None:
        self.images, self.titles, self.title_text = images, titles, title_text
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.batch_size = global_batch_size(cfg.stage1_batch_size, len(train_rows), shard.world_size,
                                            "--stage1-batch-size")
        self.itc = itc_loss(cfg.itc_temperature, shard.world_size).to(device)
        self.itm = ITMLoss()
        self.mm_itc = (itc_loss(cfg.itc_temperature, shard.world_size).to(device) if cfg.multimodal_itc_weight > 0
                       else None)
        temperatures = [*self.itc.parameters(), *(self.mm_itc.parameters() if self.mm_itc is not None else [])]
        groups = model.stage_parameter_groups(1)
        total = plan_steps(len(train_rows), self.batch_size, cfg.stage1_epochs, cfg.stage1_max_steps)
        super().__init__(cfg, model, device, paths,
                         [{"params": groups["encoder"], "lr": cfg.stage1_lr},
                          {"params": groups["new"] + temperatures, "lr": cfg.head_lr}],
                         total, budget, shard, key)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        # without the multimodal term, multimodal_proj (trained in stage 1) gets no gradient
        self.step_losses = self.parallel(self._step_losses, find_unused=self.mm_itc is None)
        self.evals: list[dict[str, float]] = []
        self.best_loss = math.inf
        self.best_step = 0
        self.bad_evals = 0
        self.stopped_early = False

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"itc": self.itc, **({"mm_itc": self.mm_itc} if self.mm_itc is not None else {})}

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "evals": self.evals, "best_loss": self.best_loss,
                "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.evals, self.best_loss = state["evals"], state["best_loss"]
        self.best_step, self.bad_evals = state["best_step"], state["bad_evals"]

    def _same_title(self, rows: np.ndarray) -> torch.Tensor:
        titles = np.array([self.title_text[r] for r in rows], dtype=object)
        return torch.as_tensor(titles[:, None] == titles[None, :], device=self.device)

    def _losses(self, rows: np.ndarray, generator: torch.Generator, shard: Shard = Shard()) -> dict[str, torch.Tensor]:
        """The stage-1 losses of one batch of catalog rows (with ``shard``: this rank's share of the global batch)."""
        pixels = self.images.pixels(rows[shard.block(len(rows))]).to(self.device)
        ids, mask = (t.to(self.device) for t in self.titles.batch(rows))
        return stage1_losses(self.model, self.itc, self.itm, self.mm_itc, pixels, ids, mask, self._same_title(rows),
                             generator, functools.partial(autocast, self.device, self.cfg.autocast), shard)

    def _step_losses(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self._losses(rows, self.generator, self.shard)

    def train_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rows = batch_at(self.train_rows, self.batch_size, self.cfg.seed, step)
        losses = self.step_losses(rows)
        total = losses["itc"] + losses["itm"] + self.cfg.multimodal_itc_weight * losses.get("mm_itc", 0.0)
        return total, {**{k: float(v.detach()) for k, v in losses.items()}, "temperature": self.itc.temperature}

    @torch.no_grad()
    def eval_itm_loss(self) -> float:
        """Mean ITM loss over the held-out products (fixed batches and negative-sampling seed); each
        rank computes it whole (local contrast only)."""
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + EVAL_NEGATIVES_SEED_OFFSET)
        total, count = 0.0, 0
        with local_contrast(self.itc, self.mm_itc):
            for start in range(0, len(self.eval_rows), self.batch_size):
                rows = self.eval_rows[start:start + self.batch_size]
                if len(rows) < 2:
                    continue
                total += float(self._losses(rows, generator)["itm"]) * len(rows)
                count += len(rows)
        self.model.train()
        return total / count

    def evaluate(self) -> None:
        loss = broadcast_from_main({"itm": self.eval_itm_loss()}, self.shard)["itm"]  # every rank decides alike
        self.evals.append({"step": self.step, "itm_eval_loss": loss})
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = loss, self.step, 0
            if self.shard.is_main:
                save_checkpoint({"step": self.step, "model": self.model.state_dict(), "itc": self.itc.state_dict()},
                                self.paths.stage1_best)
        else:
            self.bad_evals += 1
        log.info("stage 1 step %d: ITM eval loss %.4f (best %.4f at step %d)", self.step, loss, self.best_loss,
                 self.best_step)

    @property
    def can_evaluate(self) -> bool:
        return len(self.eval_rows) >= 2

    def after_step(self) -> bool:
        if not self.can_evaluate:
            return False
        if self.evaluation_due(self.cfg.eval_every, self.evals):
            self.evaluate()
            if self.bad_evals >= self.cfg.patience:
                self.stopped_early = True
                log.info("stage 1: early stop at step %d (%d evaluations without improvement)", self.step,
                         self.bad_evals)
                return True
        return False

    def run(self) -> None:
        if not self.try_resume() and self.can_evaluate:
            if self.shard.is_main:
                self.paths.stage1_best.unlink(missing_ok=True)
            self.evaluate()  # the untrained model is a candidate too (step 0)
        super().run()

    def final_state(self) -> dict[str, Any]:
        """The weights to keep: the best evaluation's, else the last step's."""
        if self.can_evaluate:
            best = load_checkpoint(self.paths.stage1_best, self.device)
            return {"model": best["model"], "itc": best["itc"]}
        return {"model": self.model.state_dict(), "itc": self.itc.state_dict()}

    def summary(self) -> dict[str, Any]:
        return {"steps": self.history, "evals": self.evals, "total_steps": self.total_steps,
                "steps_done": self.step, "best_step": self.best_step if self.can_evaluate else self.step,
                "best_itm_eval_loss": self.best_loss if self.can_evaluate else None,
                "stopped_early": self.stopped_early, "train_wall_s": round(self.train_wall_s, 2),
                "loop_wall_s": round(self.wall_s, 2), "s_per_step": round(self.train_wall_s / max(1, self.step), 4),
                "batch_size": self.batch_size,
                "n_train_products": int(len(self.train_rows)), "n_eval_products": int(len(self.eval_rows))}


# ------------------------------------------------------------------------------------ stage 2
class Stage2(StageRunner):
    """PQC on (product, positive query, negative queries) tuples with frozen product encoders."""

    stage = 2

    def __init__(self, cfg: EmbeddingsTrainConfig, model: DashCLIP, device: torch.device, paths: Paths,
                 product_state: torch.Tensor, tuple_rows: np.ndarray, tuple_queries: np.ndarray,
                 tuple_negative_rows: np.ndarray | None, queries: QueryPrefixStore, query_text: Sequence[str],
                 eval_rows: np.ndarray, eval_queries: np.ndarray, budget: StepBudget, key: str,
                 shard: Shard = Shard(), product_title: Sequence[str] = (),
                 product_brand: Sequence[str | None] = ()) -> None:
        self.product_state, self.tuple_rows, self.tuple_queries = product_state, tuple_rows, tuple_queries
        self.product_title = product_title  # per state row: the title-span queries' source
        self.product_brand = product_brand  # per state row with --pqc-title-query-brand-share: None = no brand
        self.tuple_negative_rows = tuple_negative_rows
        self.queries, self.query_text = queries, query_text
        self.eval_rows, self.eval_queries = eval_rows, eval_queries
        self.batch_size = self.global_batch(cfg, len(tuple_rows), shard)
        self.pqc = PQCLoss(cfg.pqc_tau)
        self.in_batch = (itc_loss(cfg.pqc_tau, shard.world_size, learnable=False).to(device)
                         if cfg.pqc_in_batch_weight > 0 else None)
        groups = model.stage_parameter_groups(2)
        total = plan_steps(len(tuple_rows), self.batch_size, cfg.stage2_epochs, cfg.stage2_max_steps)
        if (tuple_rows[self.tuples_used(cfg, len(tuple_rows), shard)] < 0).any():
            raise ValueError("stage 2: a tuple that training uses has no product state")
        super().__init__(cfg, model, device, paths,
                         [{"params": groups["encoder"], "lr": cfg.stage2_lr},
                          {"params": groups["new"], "lr": cfg.stage2_head_lr}], total, budget, shard, key)
        self.step_losses = self.parallel(self._losses)
        self.order = np.arange(len(tuple_rows))
        self.product_log_share = self.log_share(tuple_rows, len(product_state)) * cfg.pqc_in_batch_popularity
        self.train_probe = self.probe_tuples(cfg, len(tuple_rows))
        self.evals: list[dict[str, float]] = []

    @staticmethod
    def log_share(tuple_rows: np.ndarray, n_rows: int) -> np.ndarray:
        """``[n_rows]`` float32: the log of each state row's share of the tuples (how often its product
        fills a batch slot); a product without tuples counts as one."""
        counts = np.bincount(tuple_rows[tuple_rows >= 0], minlength=n_rows)
        return np.log(np.maximum(counts, 1) / max(1, len(tuple_rows))).astype(np.float32)

    @staticmethod
    def global_batch(cfg: EmbeddingsTrainConfig, n_tuples: int, shard: Shard) -> int:
        return global_batch_size(cfg.stage2_batch_size, n_tuples, shard.world_size, "--stage2-batch-size")

    @staticmethod
    def probe_tuples(cfg: EmbeddingsTrainConfig, n_tuples: int) -> np.ndarray:
        """The fixed sample of training tuples whose PQC loss each evaluation reports (sorted)."""
        n_probe = min(cfg.stage2_eval_max, n_tuples)
        return np.sort(np.random.default_rng([cfg.seed, 2]).choice(n_tuples, n_probe, replace=False))

    @classmethod
    def tuples_used(cls, cfg: EmbeddingsTrainConfig, n_tuples: int, shard: Shard) -> np.ndarray:
        """Sorted indices of the training tuples a run with these settings reads: its batches and the
        probe. Under a step budget shorter than an epoch only those products need a state."""
        batch_size = cls.global_batch(cfg, n_tuples, shard)
        steps = plan_steps(n_tuples, batch_size, cfg.stage2_epochs, cfg.stage2_max_steps)
        return np.union1d(items_drawn(n_tuples, batch_size, cfg.seed, steps), cls.probe_tuples(cfg, n_tuples))

    def extra_state(self) -> dict[str, Any]:
        return {"evals": self.evals}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.evals = state["evals"]

    def typos(self, query_index: np.ndarray, step: int) -> dict[int, str]:
        """The typo augmentation of ``step`` (``--pqc-query-typo-rate``): ``{query index: text with a
        typo}`` for the distinct queries of ``query_index`` (the global batch's positives) that
        :func:`corrupt_queries` changes, drawn from (seed, step): the same on every rank and on resume."""
        if self.cfg.pqc_query_typo_rate == 0:
            return {}
        distinct = np.unique(query_index).tolist()
        texts = [self.query_text[q] for q in distinct]
        rng = np.random.default_rng([self.cfg.seed, step, TYPO_STREAM])
        return {q: typo for q, text, typo in zip(distinct, texts, corrupt_queries(texts, self.cfg.pqc_query_typo_rate,
                                                                                  rng)) if typo != text}

    def _losses(self, product_rows: np.ndarray, query_index: np.ndarray, negative_rows: np.ndarray | None = None,
                texts: dict[int, str] | None = None) -> dict[str, torch.Tensor]:
        """Stage-2 losses of tuples: product rows ``[B]`` of the state table, query indices ``[B, 1+N]``,
        optionally the rows ``[B, M]`` (-1 = empty) of the products the positive query ranks lower and
        ``texts``, ``{query index: text}`` of the queries read with another text (:meth:`typos`,
        :meth:`title_queries`)."""
        distinct, slots = np.unique(query_index.reshape(-1), return_inverse=True)
        states, mask = self.queries.batch(distinct, [texts.get(q) for q in distinct.tolist()] if texts else None)
        negatives = {}
        if negative_rows is not None:
            rows = torch.as_tensor(negative_rows)
            negatives = {"negative_product_state": self.product_state[rows.clamp_min(0)],
                         "negative_product_valid": (rows >= 0).to(self.product_state.device)}
        device = self.product_state.device
        log_share = (torch.as_tensor(self.product_log_share[product_rows], device=device)
                     if self.cfg.pqc_in_batch_popularity > 0 else None)
        return stage2_losses(self.model, self.pqc, self.in_batch, self.product_state[torch.as_tensor(product_rows)],
                             states, mask, functools.partial(autocast, self.device, self.cfg.autocast), **negatives,
                             query_slots=torch.as_tensor(slots.reshape(-1), device=device),
                             product_log_share=log_share)

    def title_queries(self, picked: np.ndarray, query_index: np.ndarray, step: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """The title-span queries of ``step`` (``--pqc-title-query-rate``) for the global batch's tuples
        ``picked``: ``(query_index [B, 1+N] with the chosen tuples' positive replaced by a new index
        beyond the queries, the chosen tuples [B] bool, {new index: span}``), drawn from (seed, step)."""
        rate = self.cfg.pqc_title_query_rate
        chosen = np.random.default_rng([self.cfg.seed, step, TITLE_QUERY_STREAM]).random(len(picked)) < rate
        if not chosen.any():
            return query_index, chosen, {}
        rng = np.random.default_rng([self.cfg.seed, step, TITLE_QUERY_STREAM, 1])
        rows = np.flatnonzero(chosen)
        context = ([self.query_text[q] for q in query_index[rows, 0].tolist()]
                   if self.cfg.pqc_title_query_context else None)
        product_rows = self.tuple_rows[picked[rows]].tolist()
        brands = None
        if self.cfg.pqc_title_query_brand_share > 0:
            brand_rng = np.random.default_rng([self.cfg.seed, step, TITLE_QUERY_STREAM, 2])
            as_brand = brand_rng.random(len(rows)) < self.cfg.pqc_title_query_brand_share
            brands = [self.product_brand[r] if b else None for r, b in zip(product_rows, as_brand.tolist())]
        spans = title_spans([self.product_title[r] for r in product_rows], rng, queries=context, brands=brands)
        new_index = len(self.query_text) + rows
        query_index = query_index.copy()
        query_index[rows, 0] = new_index
        return query_index, chosen, dict(zip(new_index.tolist(), spans))

    def step_queries(self, picked: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """What ``step`` reads for the global batch's tuples ``picked``: ``(query_index [B, 1+N], the
        title-span tuples [B] bool, {query index: text read instead of its own})``, the texts being typos
        of the positive queries (:meth:`typos`) and title spans (:meth:`title_queries`)."""
        typos = self.typos(self.tuple_queries[picked, 0], step)  # the positives: what a misspelt query should find
        query_index, title_query, spans = self.title_queries(picked, self.tuple_queries[picked], step)
        return query_index, title_query, {**typos, **spans}

    def train_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        picked = batch_at(self.order, self.batch_size, self.cfg.seed, step)
        query_index, title_query, texts = self.step_queries(picked, step)
        block = self.shard.block(len(picked))  # this rank's block of the global batch
        picked, query_index, title_query = picked[block], query_index[block], title_query[block]
        negative_rows = None if self.tuple_negative_rows is None else self.tuple_negative_rows[picked]
        if negative_rows is not None and title_query.any():  # ranked by the labelled query, not by the span
            negative_rows = np.where(title_query[:, None], -1, negative_rows)
        losses = self.step_losses(self.tuple_rows[picked], query_index, negative_rows, texts)
        total = losses["pqc"] + self.cfg.pqc_in_batch_weight * losses.get("in_batch", 0.0) \
            + losses.get("query_side", 0.0)
        return total, {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def mean_pqc_loss(self, rows: np.ndarray, query_index: np.ndarray) -> float:
        """PQC loss over fixed tuples in eval mode (no dropout): comparable across steps. Each rank
        computes it whole (local contrast only)."""
        self.model.eval()
        total = 0.0
        with local_contrast(self.in_batch):
            for start in range(0, len(rows), self.batch_size):
                part = slice(start, start + self.batch_size)
                total += float(self._losses(rows[part], query_index[part])["pqc"]) * len(rows[part])
        self.model.train()
        return total / len(rows)

    def evaluate(self) -> None:
        """PQC loss of a fixed sample of training tuples and of the held-out-query tuples."""
        losses = {"pqc_train_loss": self.mean_pqc_loss(self.tuple_rows[self.train_probe],
                                                       self.tuple_queries[self.train_probe])}
        if len(self.eval_rows):
            losses["pqc_eval_loss"] = self.mean_pqc_loss(self.eval_rows, self.eval_queries)
        losses = broadcast_from_main(losses, self.shard)
        self.evals.append({"step": self.step, **losses})
        log.info("stage 2 step %d: PQC loss %s", self.step, ", ".join(f"{k[4:]} {v:.4f}" for k, v in losses.items()))

    def after_step(self) -> bool:
        if self.evaluation_due(self.cfg.stage2_eval_every, self.evals):
            self.evaluate()
        return False

    def run(self) -> None:
        if not self.try_resume():
            self.evaluate()
        super().run()

    def summary(self) -> dict[str, Any]:
        return {"steps": self.history, "evals": self.evals, "total_steps": self.total_steps,
                "steps_done": self.step, "train_wall_s": round(self.train_wall_s, 2),
                "loop_wall_s": round(self.wall_s, 2), "s_per_step": round(self.train_wall_s / max(1, self.step), 4),
                "batch_size": self.batch_size,
                "n_tuples": int(len(self.tuple_rows)), "n_eval_tuples": int(len(self.eval_rows))}


# --------------------------------------------------------------------------------- orchestration
@torch.no_grad()
def encode_product_states(model: DashCLIP, images: ImageStore, titles: TokenStore, rows: np.ndarray,
                          device: torch.device, batch_size: int, desc: str, progress: bool = True,
                          autocast_dtype: str = "auto") -> torch.Tensor:
    """Grounded states ``[len(rows), Dt]`` (float32, on ``device``) of catalog ``rows`` in eval mode
    (products without an image: the text-only path), computed by the fused inference copy of the
    model (:meth:`DashCLIP.inference_copy`, the same function up to float rounding). Batches group
    titles of similar length."""
    net = model.inference_copy()
    by_length = np.argsort(titles.lengths[rows], kind="stable")
    order = rows[by_length]
    out = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=1.0, leave=False,
                      disable=None if progress else True):
        part = order[start:start + batch_size]
        has_image = images.has_image[part]
        pixels = (images.pixels(part[has_image], channels_last=net.reads_channels_last).to(device)
                  if has_image.any() else None)
        ids, mask = (t.to(device) for t in titles.batch(part))
        with autocast(device, autocast_dtype):
            states = net.product_state(ids, mask, pixels, torch.as_tensor(has_image, device=device))
        out.append(states.float())
    if not out:
        return torch.zeros(0, model.text_encoder.width, device=device)
    return torch.cat(out)[torch.as_tensor(np.argsort(by_length), device=device)]


class Trainer:
    """Loads the data once and runs the requested stages with skip / resume logic. With a
    distributed ``shard`` every rank runs this, rank 0 alone writes files, and the ranks wait for
    each other (barrier) wherever rank 0 changes a file that the others read next."""

    def __init__(self, cfg: EmbeddingsTrainConfig, shard: Shard | None = None) -> None:
        self.shard = shard if shard is not None else Shard(device=resolve_device(cfg.device))
        self.device = self.shard.device
        self.cfg = dataclasses.replace(cfg, autocast=resolve_autocast(cfg.autocast, self.device))  # recorded as chosen
        self.paths = Paths(prepare_workdir(cfg.workdir, "embeddings/checkpoints"))
        self.budget = StepBudget(cfg.max_steps_this_run)
        self._catalog: pd.DataFrame | None = None
        self._cold: np.ndarray | None = None
        self.log_data: dict[str, Any] = read_json(self.paths.log) if self.paths.log.exists() else {}
        if self.shard.is_main:  # roll back publications a killed run left half done, once, before the ranks read
            for output in (data_set(self.paths.root, []), stage_set(self.paths.root, 1), stage_set(self.paths.root, 2)):
                output.recover()
        self.shard.barrier()

    # data ----------------------------------------------------------------------
    @property
    def catalog(self) -> pd.DataFrame:
        if self._catalog is None:
            table = schema.read_table(self.cfg.workdir, "catalog")
            self._catalog = table.select(["product_id", "title", "aisle", "image", "brand"]).to_pandas()
        return self._catalog

    @property
    def cold_products(self) -> np.ndarray:
        """The product_ids held out of both stages (:func:`split_cold_products`), sorted."""
        if self._cold is None:
            self._cold = split_cold_products(self.catalog, self.cfg.cold_product_fraction, self.cfg.seed)
            if len(self._cold):
                log.info("cold start: %d of %d products (--cold-product-fraction %g, stratified by aisle) take no "
                         "part in training", len(self._cold), self.catalog["product_id"].nunique(),
                         self.cfg.cold_product_fraction)
        return self._cold

    # provenance ----------------------------------------------------------------
    def made_from(self, stage: int) -> MadeFrom:
        """What the output of ``stage`` is made from in this run: the tables it reads, for stage 2
        also the published ``stage1.pt`` (which must be current), and the stage's settings."""
        inputs: dict[str, str | None] = dict(input_hashes(self.paths.root, STAGE_TABLES[stage]))
        if stage == 2:
            if not stage_set(self.paths.root, 1).current(self.made_from(1)):
                raise UserError(f"stage 2 needs the stage-1 output for these settings and data "
                                f"({self.paths.stage_final(1)}): run with --stage 1 or --stage all first")
            inputs.update(stage_set(self.paths.root, 1).verify())
        return MadeFrom(inputs, self.cfg.settings(str(stage)))

    def reusable(self, stage: int, made_from: MadeFrom) -> bool:
        """True when the published output of ``stage`` is made from ``made_from`` (and no --force)."""
        if self.cfg.force or not stage_set(self.paths.root, stage).current(made_from):
            return False
        log.info("stage %d: %s is complete for these data and settings: skipping (--force to redo)", stage,
                 self.paths.stage_final(stage))
        return True

    def validate_inputs(self, stages: Sequence[int]) -> None:
        """Validate the tables of the stages that will train (images decoded) before any file is
        changed; nothing to check when every stage is reusable."""
        for i, stage in enumerate(stages):
            if self.cfg.force or not stage_set(self.paths.root, stage).current(self.made_from(stage)):
                tables = sorted({name for later in stages[i:] for name in STAGE_TABLES[later]})
                log.info("validating %s before training", ", ".join(tables))
                schema.validate_tables(self.paths.root, tables, check_images=True)
                return

    def _stores(self, model_spec, tokenizer, image_cache_mb: int) -> tuple[ImageStore, TokenStore]:
        catalog = self.catalog
        images = ImageStore(catalog["image"].tolist(), catalog["product_id"].tolist(), model_spec, image_cache_mb)
        titles = TokenStore(tokenizer, catalog["title"].astype(str).tolist(), self.cfg.title_max_tokens)
        return images, titles

    def write_log(self) -> None:
        """Write ``train_log.json`` (rank 0), unless it holds this log already (both stages reused)."""
        if not self.shard.is_main:
            return
        if self.paths.log.is_file() and self.paths.log.read_text() == json_text(self.log_data):
            return
        write_json(self.log_data, self.paths.log)

    def fresh_model(self) -> tuple[DashCLIP, Any, Any]:
        model, tokenizer, spec = build_dashclip(self.cfg.model_only())
        return model.to(self.device), tokenizer, spec

    # stage 1 -------------------------------------------------------------------
    def split_stage1(self, images: ImageStore) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 (train, eval) catalog rows (:func:`stage1_rows`), cold products left out."""
        cold = self.catalog["product_id"].isin(self.cold_products).to_numpy()
        return stage1_rows(images.has_image, cold, self.cfg.seed, self.cfg.stage1_eval_fraction,
                           self.cfg.stage1_eval_max)

    def run_stage1(self) -> None:
        cfg, paths = self.cfg, self.paths
        made_from = self.made_from(1)
        if self.reusable(1, made_from):
            return
        if cfg.force and self.shard.is_main:
            paths.stage_last(1).unlink(missing_ok=True)
        self.shard.barrier()  # before any rank looks for a checkpoint to resume
        model, tokenizer, spec = self.fresh_model()
        images, titles = self._stores(spec, tokenizer, self.cfg.image_cache_mb)
        train_rows, eval_rows = self.split_stage1(images)
        n_without = int((~images.has_image).sum())
        if n_without:
            log.info("stage 1: %d of %d products have no image: they take no part in image-text pretraining "
                     "(their product embedding uses the text-only path)", n_without, len(images))
        started = time.perf_counter()
        if len(train_rows) < MIN_STAGE1_PRODUCTS:
            log.info("stage 1 skipped: only %d products have images (title-only catalog); stage 2 starts from "
                     "the untuned encoders", len(train_rows))
            final = {"model": model.state_dict(), "itc": ITCLoss(cfg.itc_temperature).state_dict()}
            summary: dict[str, Any] = {"skipped": "no product images", "n_train_products": int(len(train_rows))}
        else:
            log.info("stage 1: %d training and %d held-out products, batch %d", len(train_rows), len(eval_rows),
                     min(cfg.stage1_batch_size, len(train_rows)))
            runner = Stage1(cfg, model, self.device, paths, images, titles, self.catalog["title"].astype(str).tolist(),
                            train_rows, eval_rows, self.budget, made_from.key(), self.shard)
            try:
                runner.run()
            except Paused:
                self.log_data["stage1"] = {**runner.summary(), "paused": True}
                self.write_log()
                raise
            final = runner.final_state() if self.shard.is_main else {}
            summary = runner.summary()
        summary["invocation_wall_s"] = round(time.perf_counter() - started, 2)
        summary["world_size"] = self.shard.world_size  # of this (last) invocation
        summary["n_cold_products"] = int(len(self.cold_products))
        if self.shard.is_main:
            gates = {name: round(math.tanh(float(value)), 4) for name, value in final["model"].items()
                     if name.endswith(".cross_gate")}
            if gates:  # how far stage 1 opened the image path of each layer (0 = text only)
                summary["cross_attention_gates"] = gates
                log.info("stage 1: cross-attention gates tanh(gate) %s", " ".join(f"{v:+.3f}" for v in gates.values()))
            self.publish(1, made_from, final, summary)
            stage_set(paths.root, 2).clear()  # trained on another stage-1 output
            for stale in (paths.stage_last(1), paths.stage1_best, paths.stage_last(2)):
                stale.unlink(missing_ok=True)
        self.log_data["stage1"] = summary
        self.log_data.pop("stage2", None)
        self.write_log()
        self.shard.barrier()  # stage 2 reads stage1.pt on every rank
        log.info("stage 1 done: kept step %s -> %s", summary.get("best_step"), paths.stage_final(1))

    def publish(self, stage: int, made_from: MadeFrom, checkpoint: dict[str, Any], summary: dict[str, Any]) -> None:
        """Publish the output set of ``stage``: its checkpoint (and, for stage 2, ``config.json``);
        the manifest records the summary without the per-step rows."""
        record = {"summary": {k: v for k, v in summary.items() if k not in ("steps", "evals")}}
        with stage_set(self.paths.root, stage).publish(made_from, record) as staged:
            write_checkpoint(checkpoint, staged[STAGE1_CHECKPOINT if stage == 1 else MODEL_CHECKPOINT])
            if stage == 2:
                write_json(self.cfg.settings("2"), staged[RUN_CONFIG])

    # stage 2 -------------------------------------------------------------------
    def _tuples(self, relevance: pd.DataFrame) -> tuple[PQCTuples, PQCTuples, np.ndarray | None]:
        """Training and held-out PQC tuples, and the training tuples' negative products
        ``[T, --query-side-negatives]`` (-1 = empty; None when that term is off)."""
        cfg = self.cfg
        train_df, eval_df = stage2_relevance(relevance, self.cold_products, cfg.query_eval_fraction, cfg.seed)
        del relevance  # both sides are copies: the whole table goes before the sampling's working arrays
        kwargs = dict(n_negatives=cfg.pqc_negatives, max_positives=cfg.pqc_max_positives,
                      hr_mr_ratio=cfg.pqc_hr_mr_ratio, seed=cfg.seed)
        catalog = self.catalog
        train_tuples = build_pqc_tuples(train_df, catalog, **kwargs)
        eval_tuples = train_tuples.take(np.zeros(0, dtype=np.int64))
        if len(eval_df):
            try:
                eval_tuples = build_pqc_tuples(eval_df, catalog, **kwargs)
            except ValueError as exc:  # too few held-out queries to fill the tuples: the eval loss is optional
                log.warning("stage 2: no held-out PQC eval loss (%s)", exc)
        if len(eval_tuples) > cfg.stage2_eval_max:  # a seeded sample, in tuple order
            eval_tuples = eval_tuples.take(np.sort(np.random.RandomState(cfg.seed).choice(
                len(eval_tuples), cfg.stage2_eval_max, replace=False)))
        negative_products = None
        if cfg.query_side_negatives and len(train_tuples):
            negative_products = sample_negative_products(train_df, train_tuples.queries[train_tuples.positive],
                                                         train_tuples.positive_label, cfg.query_side_negatives,
                                                         cfg.seed)
            log.info("stage 2: %.1f products per tuple that its positive query ranks lower (--query-side-negatives "
                     "%d)", float((negative_products >= 0).sum(axis=1).mean()), cfg.query_side_negatives)
        return train_tuples, eval_tuples, negative_products

    def run_stage2(self) -> None:
        cfg, paths = self.cfg, self.paths
        made_from = self.made_from(2)
        if self.reusable(2, made_from):
            return
        if cfg.force and self.shard.is_main:
            paths.stage_last(2).unlink(missing_ok=True)
        self.shard.barrier()  # before any rank looks for a checkpoint to resume
        started = time.perf_counter()
        model, tokenizer, spec = self.fresh_model()
        stage1 = load_checkpoint(paths.stage_final(1), self.device)
        model.load_state_dict(stage1["model"])
        model.init_query_side_from_text()
        train_tuples, eval_tuples, negative_products = self._tuples(schema.read_table(cfg.workdir, "relevance")
                                                                    .to_pandas())
        if not len(train_tuples):
            raise UserError(f"{schema.table_path(cfg.workdir, 'relevance')}: no training tuples (no query with an "
                            f"MR or HR label outside the held-out {cfg.query_eval_fraction:.0%} of queries, for a "
                            f"product outside the {len(self.cold_products)} cold-start products)")
        catalog = self.catalog
        position = pd.Index(catalog["product_id"])
        used = Stage2.tuples_used(cfg, len(train_tuples), self.shard)
        if len(used) < len(train_tuples):
            log.info("stage 2: the step budget reads %d of the %d training tuples: product states for theirs only",
                     len(used), len(train_tuples))
        used_negatives = None if negative_products is None else negative_products[used]
        needed = np.unique(np.concatenate([train_tuples.product_id[used], eval_tuples.product_id,
                                           *([] if used_negatives is None else [used_negatives[used_negatives >= 0]])]))
        needed_rows = position.get_indexer(needed)
        images, titles = self._stores(spec, tokenizer, 0)  # each image is encoded once: nothing to keep
        n_text_only = int((~images.has_image[needed_rows]).sum())
        if n_text_only:
            log.info("stage 2: %d of %d products have no image: product embedding = multimodal projection of the "
                     "text encoder run without image tokens", n_text_only, len(needed_rows))
        precompute_started = time.perf_counter()
        product_state = encode_product_states(model, images, titles, needed_rows, self.device,
                                         cfg.stage1_batch_size * 2, "stage 2: frozen product [CLS]",
                                         progress=self.shard.is_main,  # every rank computes all of them
                                         autocast_dtype=cfg.autocast)
        precompute_s = time.perf_counter() - precompute_started
        cls_row = pd.Index(needed)

        query_text, (train_queries, eval_queries) = tuple_query_matrices([train_tuples, eval_tuples])
        model.eval()
        needed_queries = np.unique(np.concatenate([train_queries[used].reshape(-1), eval_queries.reshape(-1)]))
        queries = QueryPrefixStore(model, TokenStore(tokenizer, query_text, cfg.query_max_tokens), self.device,
                                   functools.partial(autocast, self.device, self.cfg.autocast), cfg.query_cache_mb,
                                   needed=needed_queries)
        model.train()
        log.info("stage 2: %d training tuples (%d held-out for the eval loss), %d negatives each, batch %d",
                 len(train_tuples), len(eval_tuples), cfg.pqc_negatives, min(cfg.stage2_batch_size, len(train_tuples)))
        negative_rows = (None if negative_products is None
                         else np.where(negative_products >= 0, cls_row.get_indexer(negative_products.reshape(-1))
                                       .reshape(negative_products.shape), -1))
        product_brand = ([brand if isinstance(brand, str) and brand else None  # None: a null brand
                          for brand in catalog["brand"].to_numpy()[needed_rows]]
                         if cfg.pqc_title_query_brand_share > 0 else [])
        if cfg.pqc_title_query_rate > 0:
            log.info("stage 2: title-span queries: each step replaces each tuple's positive query with 1-%d words of "
                     "its product's title%s with probability %g (--pqc-title-query-rate)", TITLE_SPAN_MAX_WORDS,
                     ", then the query's words the title lacks (--pqc-title-query-context)"
                     if cfg.pqc_title_query_context else "", cfg.pqc_title_query_rate)
            if cfg.pqc_title_query_brand_share > 0:
                log.info("stage 2: %g of the title-span queries are their product's brand instead "
                         "(--pqc-title-query-brand-share; %d of %d products have a brand, the others keep their span)",
                         cfg.pqc_title_query_brand_share, sum(b is not None for b in product_brand), len(product_brand))
        if cfg.pqc_query_typo_rate > 0:
            log.info("stage 2: typo augmentation: each step reads each distinct positive query of the batch with a "
                     "typo with probability %g (--pqc-query-typo-rate)", cfg.pqc_query_typo_rate)
        runner = Stage2(cfg, model, self.device, paths, product_state,
                        cls_row.get_indexer(train_tuples.product_id), train_queries, negative_rows, queries,
                        query_text, cls_row.get_indexer(eval_tuples.product_id), eval_queries, self.budget,
                        made_from.key(), self.shard, catalog["title"].to_numpy()[needed_rows].tolist(),
                        product_brand)
        try:
            runner.run()
        except Paused:
            self.log_data["stage2"] = {**runner.summary(), "paused": True}
            self.write_log()
            raise
        summary = {**runner.summary(), "precompute_wall_s": round(precompute_s, 2),
                   "n_cold_products": int(len(self.cold_products))}
        summary["invocation_wall_s"] = round(time.perf_counter() - started, 2)
        summary["world_size"] = self.shard.world_size  # of this (last) invocation
        if self.shard.is_main:
            self.publish(2, made_from, {"model_config": dataclasses.asdict(cfg.model_only()),
                                        "model": model.state_dict()}, summary)
            paths.stage_last(2).unlink(missing_ok=True)
        self.log_data["stage2"] = summary
        self.write_log()
        log.info("stage 2 done -> %s", paths.stage_final(2))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(EmbeddingsTrainConfig, argv)
    bound_kernel_cache()
    env = init_from_env(cfg.pg_timeout_s, cfg.device)  # under torchrun (WORLD_SIZE > 1), else None
    shard = Shard.of(env, resolve_device(cfg.device) if env is None else env.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(cfg.threads))
    root_log = logging.getLogger()
    level = root_log.level
    if not shard.is_main:
        root_log.setLevel(logging.WARNING)  # rank 0 reports the progress
    ended = False
    try:
        for name in ("stage1_batch_size", "stage2_batch_size"):  # before any work, not when the stage starts
            check_batch_split(getattr(cfg, name), shard.world_size, "--" + name.replace("_", "-"))
        with deterministic_kernels(shard.device):
            result = train(cfg, shard)
        ended = True
        return result
    finally:
        torch.set_num_threads(threads)
        root_log.setLevel(level)
        if env is not None:
            close_process_group(synchronize=ended)


def train(cfg: EmbeddingsTrainConfig, shard: Shard | None = None) -> dict[str, Any]:
    """Run the stages of ``cfg`` (on this rank of ``shard``); returns the training log (rank 0
    writes it to ``train_log.json``)."""
    trainer = Trainer(cfg, shard)
    ranks = f", DDP over {trainer.shard.world_size} ranks" if trainer.shard.distributed else ""
    log.info("DashCLIP training in %s on %s (backbone %s, stage %s%s)", trainer.paths.emb, trainer.device,
             cfg.backbone, cfg.stage, ranks)
    stages = [1, 2] if cfg.stage == "all" else [int(cfg.stage)]
    trainer.validate_inputs(stages)
    try:
        if 1 in stages:
            trainer.run_stage1()
        if 2 in stages:
            trainer.run_stage2()
    except Paused as paused:
        log.info("%s", paused)
        trainer.log_data["paused"] = True
        trainer.write_log()
        return trainer.log_data
    trainer.log_data.pop("paused", None)
    trainer.write_log()
    trainer.shard.barrier()  # no rank ends before rank 0 has written the outputs
    return trainer.log_data


if __name__ == "__main__":
    run_main(main)
