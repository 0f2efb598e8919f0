"""Sharded ranking training with torchrec ``DistributedModelParallel`` (DMP), one process per rank.

``torchrun --nproc_per_node N -m ranking.train --workdir DIR --variant NAME [--sharding auto|table_wise|row_wise|column_wise|data_parallel] [--pg-timeout-s 120]``

:func:`ranking.train.main` trains a :class:`ShardedRanker` when ``WORLD_SIZE > 1`` (torchrun sets
it; :func:`common.distributed.init_from_env` starts the process group with a timeout on every
collective). The early-stopping loop is :func:`ranking.train.fit`, the same for a single process:

* :func:`make_plan` asks torchrec's planner for a plan (``auto``; every rank runs the same
  deterministic ``planner.plan``) or forces one sharding type on every table
  (``construct_module_sharding_plan``; table-wise places tables round robin over the ranks).
  :func:`plan_summary` says where each table went and the table memory per rank.
* :func:`shard_model` wraps a :class:`ranking.model.RankingModel` in DMP. Optimizers: frozen
  DashCLIP tables get a fused SGD with ``lr=0`` (``requires_grad`` does not survive sharding,
  the fused kernels update every table they own), trainable tables (the random and finetune
  variants, the sparse features) a fused optimizer applied in backward, which updates only the
  rows a batch looks up, and dense parameters a regular one (:class:`ShardedOptimizer`).
* :class:`ShardedRanker` is the sharded :class:`ranking.train.Ranker`: every rank passes the same
  global batch to :meth:`ShardedRanker.step` and trains on rows ``rank::world`` of it (padded
  with a zero-weight row so all ranks see the same local size); the loss is scaled so the
  gradient equals the single-process gradient of the global batch mean.
  :meth:`ShardedRanker.predict` scores each rank's rows the same way and all-gathers the
  probabilities, so every rank holds the predictions (and metrics) of the FULL split.
* :func:`unsharded_state_dict` gathers sharded tables to full tensors (collective; the result
  is complete on rank 0), i.e. exactly the ``state_dict`` of the unsharded model:
  :meth:`ShardedRanker.unsharded` loads it into a :class:`ranking.model.RankingModel`, whose
  ``model.pt`` (:func:`ranking.model.save_model`) is the single-process format, so a run of any
  world size (or serving.export) reads it with :func:`ranking.model.load_model`.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torch.distributed.tensor import DTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import (column_wise, construct_module_sharding_plan, data_parallel, row_wise,
                                                table_wise)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec import optim as torchrec_optim
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from common.distributed import DistEnv
from ranking.config import RankerConfig
from ranking.features import RankingBatch
from ranking.model import RankingModel, model_from_state
from ranking.plain import PlainFeatures, PlainInputModel
from ranking.spec import FeatureSpec
from ranking.tables import frozen_parameter_names, sparse_gradient_parameters
from ranking.variants import get_variant

log = logging.getLogger(__name__)

SHARDING_TYPES: tuple[str, ...] = ("auto", "table_wise", "row_wise", "column_wise", "data_parallel")
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}


def embedding_collections(model: nn.Module) -> dict[str, EmbeddingBagCollection]:
    """Module path -> every ``EmbeddingBagCollection`` of ``model`` (what DMP shards)."""
    return {name: m for name, m in model.named_modules() if type(m) is EmbeddingBagCollection}


def make_plan(model: nn.Module, sharding: str, env: DistEnv) -> ShardingPlan:
    """The sharding plan of ``model``'s EBCs: the planner's (``auto``) or one type for every table.

    Run on every rank (the planner is deterministic for the same model and topology).
    ``row_wise`` is never offered by the CPU planner, hence the forced plans.
    """
    if sharding not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding {sharding!r}; expected one of {', '.join(SHARDING_TYPES)}")
    sharders = [EmbeddingBagCollectionSharder()]
    if sharding == "auto":
        topology = Topology(world_size=env.world_size, compute_device=env.device.type)
        return EmbeddingShardingPlanner(topology=topology).plan(model, sharders)
    plan: dict = {}
    next_rank = 0
    for path, ebc in embedding_collections(model).items():
        per_table = {}
        for cfg in ebc.embedding_bag_configs():
            if sharding == "table_wise":
                per_table[cfg.name] = table_wise(rank=next_rank % env.world_size)
                next_rank += 1
            elif sharding == "row_wise":
                per_table[cfg.name] = row_wise()
            elif sharding == "column_wise":
                if cfg.embedding_dim % env.world_size:
                    raise ValueError(f"column_wise: table {cfg.name} dim {cfg.embedding_dim} is not divisible by "
                                     f"{env.world_size} ranks")
                per_table[cfg.name] = column_wise(ranks=list(range(env.world_size)))
            else:
                per_table[cfg.name] = data_parallel()
        plan[path] = construct_module_sharding_plan(ebc, per_table, local_size=env.world_size,
                                                    world_size=env.world_size, device_type=env.device.type)
    return ShardingPlan(plan)


def table_shapes(model: nn.Module) -> dict[tuple[str, str], tuple[int, int]]:
    """(module path, table name) -> (rows, dim) of every EBC table of ``model``."""
    return {(path, cfg.name): (cfg.num_embeddings, cfg.embedding_dim)
            for path, ebc in embedding_collections(model).items() for cfg in ebc.embedding_bag_configs()}


def table_memory_per_rank(plan: ShardingPlan, shapes: dict[tuple[str, str], tuple[int, int]], world_size: int,
                          bytes_per_value: int = 4) -> list[int]:
    """Bytes of embedding weights each rank holds under ``plan`` (rows x cols x 4 per shard;
    a data-parallel table counts fully on every rank; optimizer state not included).
    ``shapes``: :func:`table_shapes` of the unsharded model."""
    per_rank = [0] * world_size
    for path, module_plan in plan.plan.items():
        for table, sharding in module_plan.items():
            if sharding.sharding_spec is None:  # data parallel: a full replica everywhere
                rows, dim = shapes[path, table]
                per_rank = [b + rows * dim * bytes_per_value for b in per_rank]
                continue
            for shard in sharding.sharding_spec.shards:
                per_rank[shard.placement.rank()] += shard.shard_sizes[0] * shard.shard_sizes[1] * bytes_per_value
    return per_rank


def plan_summary(plan: ShardingPlan, shapes: dict[tuple[str, str], tuple[int, int]], world_size: int) -> str:
    """One line per table (module, shape, sharding type, kernel, ranks) and the table memory per rank
    (``shapes``: :func:`table_shapes` of the unsharded model)."""
    lines = [f"sharding plan over {world_size} ranks:"]
    for path, module_plan in plan.plan.items():
        for table, sharding in module_plan.items():
            rows, dim = shapes[path, table]
            ranks = sharding.ranks if sharding.ranks is not None else list(range(world_size))
            lines.append(f"  {path}.{table} [{rows} x {dim}]: {sharding.sharding_type}, kernel {sharding.compute_kernel}, "
                         f"ranks {ranks}")
    lines.append("  table memory per rank (fp32 weights, no optimizer state): " + ", ".join(
        f"rank {r} {human_bytes(b)}" for r, b in enumerate(table_memory_per_rank(plan, shapes, world_size))))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.50 KiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} GiB"


class ShardedOptimizer:
    """Dense parameters: ``optimizer_cls`` (wrapped as a torchrec KeyedOptimizer); embedding
    tables: fused optimizers applied during ``backward`` (frozen tables: SGD with ``lr=0``);
    data-parallel tables: with the dense parameters, except the ``frozen`` names (never updated)."""

    def __init__(self, dmp: DistributedModelParallel, optimizer_cls: type[torch.optim.Optimizer], lr: float,
                 frozen: set[str]) -> None:
        # data-parallel tables lose their in-backward optimizer when sharded: leave frozen ones out by name
        dense = {k: v for k, v in in_backward_optimizer_filter(dmp.named_parameters()) if k not in frozen}
        self.dense = KeyedOptimizerWrapper(dense, lambda params: optimizer_cls(params, lr=lr))

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)

    def step(self) -> None:
        """The dense step (the fused table updates already ran in backward)."""
        self.dense.step()


def shard_model(model: RankingModel, env: DistEnv, sharding: str = "auto", optimizer: str = "adam",
                lr: float = 2e-3, table_optimizer: str = "rowwise_adagrad"
                ) -> tuple[DistributedModelParallel, ShardedOptimizer, ShardingPlan]:
    """Wrap ``model`` (same weights on every rank) in DMP; the unsharded ``model`` must not be used afterwards.

    Frozen tables (:func:`ranking.tables.frozen_parameter_names`) get ``SGD(lr=0)`` in backward,
    trainable DashCLIP tables (row-sparse gradients) fbgemm's ``EXACT_ROWWISE_ADAGRAD`` with
    ``table_optimizer="rowwise_adagrad"``, every other table ``OPTIMIZERS[optimizer]`` in backward
    (a fused kernel; ``adam`` becomes Adagrad on CPU, where fbgemm has no fused Adam), the rest
    ``optimizer``.
    """
    optimizer_cls = OPTIMIZERS[optimizer]
    frozen = set(frozen_parameter_names(model))
    params = dict(model.named_parameters())
    table_params = {f"{path}.embedding_bags.{cfg.name}.weight" if path else f"embedding_bags.{cfg.name}.weight"
                    for path, ebc in embedding_collections(model).items() for cfg in ebc.embedding_bag_configs()}
    frozen_weights = [params[n].requires_grad_(True) for n in sorted(frozen)]  # needs a grad accumulator to hook
    if frozen_weights:
        apply_optimizer_in_backward(torch.optim.SGD, frozen_weights, {"lr": 0.0})
    sparse_ids = {id(p) for p in sparse_gradient_parameters(model)}  # the trainable DashCLIP tables
    trainable_tables = [params[n] for n in sorted(table_params - frozen)]
    rowwise = [p for p in trainable_tables if table_optimizer == "rowwise_adagrad" and id(p) in sparse_ids]
    if rowwise:  # as in a single process (ranking.optim.RowWiseAdagrad): fbgemm's EXACT_ROWWISE_ADAGRAD
        apply_optimizer_in_backward(torchrec_optim.RowWiseAdagrad, rowwise, {"lr": lr})
    other_tables = [p for p in trainable_tables if not any(p is q for q in rowwise)]
    if other_tables:
        table_cls = optimizer_cls
        if optimizer == "adam" and env.device.type == "cpu":
            table_cls = torch.optim.Adagrad
            if env.is_main:
                log.warning("fbgemm's CPU kernels have no fused Adam: the trainable tables use fused Adagrad (lr %g)", lr)
        apply_optimizer_in_backward(table_cls, other_tables, {"lr": lr})
    plan = make_plan(model, sharding, env)
    if env.is_main:
        log.info("%s", plan_summary(plan, table_shapes(model), env.world_size))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(env.pg), device=env.device, plan=plan,
                                   sharders=[EmbeddingBagCollectionSharder()])
    load_unsharded_state_dict(dmp, weights)  # DMP initialises the sharded tables afresh
    return dmp, ShardedOptimizer(dmp, optimizer_cls, lr, frozen), plan


@torch.no_grad()
def load_unsharded_state_dict(dmp: DistributedModelParallel, state: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) ``state_dict`` into the sharded model: each rank copies the slices
    its shards own. This is how a checkpoint of any world size is resumed. Local, no collective."""
    live = dmp.state_dict()
    missing = sorted(set(live) ^ set(state))
    if missing:
        raise KeyError(f"state dict keys do not match the sharded model: {missing[:5]}")
    for key, value in live.items():
        full = state[key]
        if isinstance(value, ShardedTensor):
            if tuple(value.size()) != tuple(full.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(full.shape)} != model shape {tuple(value.size())}")
            for shard in value.local_shards():
                index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(full[index])
        elif isinstance(value, DTensor):
            raise NotImplementedError(f"{key}: DTensor state (not produced by the plans of this module)")
        else:
            value.copy_(full)


def local_rows(batch_size: int, env: DistEnv) -> tuple[np.ndarray, int]:
    """Rows ``rank::world`` of a global batch, padded with row 0 to ``ceil(B / world)`` rows (so
    no rank gets an empty batch); returns ``(rows, number of real rows)``."""
    rows = np.arange(env.rank, batch_size, env.world_size)
    width = -(-batch_size // env.world_size)
    return np.concatenate([rows, np.zeros(width - len(rows), np.int64)]), len(rows)


def take(batch: RankingBatch, rows: np.ndarray) -> RankingBatch:
    """The sub-batch of ``rows`` (every field indexed along dim 0)."""
    index = torch.from_numpy(rows)
    return RankingBatch(*(getattr(batch, f).index_select(0, index) for f in (
        "dense", "sparse_ids", "product_rows", "query_rows", "history_rows", "labels", "has_history")))


class ShardedRanker:
    """A DMP-wrapped :class:`RankingModel` with its optimizer and plain-tensor front door
    (:class:`PlainFeatures`): the sharded :class:`ranking.train.Ranker`. :meth:`step`,
    :meth:`predict` and :meth:`unsharded` are collective (every rank calls them, with the same
    global batch); snapshots hold each rank's own shards (local).
    """

    def __init__(self, dmp: DistributedModelParallel, optimizer: ShardedOptimizer, features: PlainFeatures,
                 env: DistEnv, plan: ShardingPlan, variant: str, spec: FeatureSpec, config: RankerConfig) -> None:
        self.dmp, self.optimizer, self.features, self.env, self.plan = dmp, optimizer, features, env, plan
        self.variant, self.spec, self.config = variant, spec, config  # to rebuild the unsharded model

    @classmethod
    def wrap(cls, model: RankingModel, env: DistEnv, sharding: str = "auto", optimizer: str = "adam",
             lr: float = 2e-3, table_optimizer: str = "rowwise_adagrad") -> "ShardedRanker":
        """Shard ``model`` (:func:`shard_model`; ``model`` must not be used afterwards)."""
        features = PlainInputModel(model).features
        variant, spec, config = model.variant, model.spec, model.config
        dmp, opt, plan = shard_model(model, env, sharding, optimizer, lr, table_optimizer)
        return cls(dmp, opt, features, env, plan, variant, spec, config)

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def logits(self, batch: RankingBatch) -> torch.Tensor:
        """Local batch -> logits ``[b]`` through the sharded model (collective: every rank calls it)."""
        kjt = self.features(batch.sparse_ids, batch.product_rows, batch.query_rows, batch.history_rows)
        return self.dmp(batch.dense.to(self.env.device), kjt.to(self.env.device)).cpu()

    def step(self, batch: RankingBatch) -> float:
        """One step on the GLOBAL ``batch`` (``B`` rows, the same on every rank): this rank trains on
        its slice; the gradient equals that of the global mean loss. Returns the global mean loss."""
        self.dmp.train()
        rows, real = local_rows(len(batch), self.env)
        local = take(batch, rows)
        weight = (torch.arange(len(rows)) < real).float()
        self.optimizer.zero_grad()
        losses = nn.functional.binary_cross_entropy_with_logits(self.logits(local), local.labels, reduction="none")
        # DDP (dense) and the embedding all-to-all (tables) average over ranks: scale by world / B
        loss = (losses * weight).sum() * (self.env.world_size / len(batch))
        loss.backward()
        self.optimizer.step()
        total = (losses * weight).sum().detach().reshape(1)
        dist.all_reduce(total, group=self.env.pg)
        return float(total) / len(batch)

    @torch.no_grad()
    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """Click probabilities ``[B]`` of the GLOBAL ``batch`` on every rank (each rank scores its
        slice in eval mode, then all-gather)."""
        self.dmp.eval()
        rows, _ = local_rows(len(batch), self.env)
        probs = torch.sigmoid(self.logits(take(batch, rows)))
        gathered = [torch.empty_like(probs) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, probs, group=self.env.pg)
        return torch.stack(gathered, dim=1).reshape(-1)[: len(batch)]  # row j = rank j % W, position j // W

    @torch.no_grad()
    def snapshot(self, into: dict[str, list[torch.Tensor]] | None = None) -> dict[str, list[torch.Tensor]]:
        """Copies of this rank's parameters and buffers (its shards only), for :meth:`restore`, in
        ``into``'s tensors when given. Local."""
        if into is None:
            return {k: [t.clone() for t in _local_tensors(v)] for k, v in self.dmp.state_dict().items()}
        for k, v in self.dmp.state_dict().items():
            for saved, live in zip(into[k], _local_tensors(v)):
                saved.copy_(live)
        return into

    @torch.no_grad()
    def restore(self, snapshot: dict[str, list[torch.Tensor]]) -> None:
        """Write a :meth:`snapshot` back into the live (sharded) weights. Local."""
        for k, v in self.dmp.state_dict().items():
            for live, saved in zip(_local_tensors(v), snapshot[k]):
                live.copy_(saved)

    def unsharded(self) -> RankingModel | None:
        """The trained weights in a single-process :class:`RankingModel` on rank 0 (None on the other
        ranks). Collective (:func:`unsharded_state_dict`)."""
        state = unsharded_state_dict(self.dmp, self.env)
        if not self.env.is_main:
            return None
        variant = get_variant(self.variant)
        return model_from_state(variant, self.spec, self.config, state)


def _local_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    if isinstance(value, DTensor):
        return [value.to_local()]
    return [value] if isinstance(value, torch.Tensor) else []


def unsharded_state_dict(dmp: DistributedModelParallel, env: DistEnv) -> dict[str, torch.Tensor]:
    """The unsharded model's ``state_dict`` (same keys, full CPU tensors), complete on rank 0.
    Collective: every rank must call it. Other ranks get the replicated tensors only."""
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(tuple(value.size()), dtype=value.dtype) if env.is_main else None
            value.gather(dst=0, out=full)
            if full is not None:
                out[key] = full
        elif isinstance(value, DTensor):
            out[key] = value.full_tensor().cpu()
        else:
            out[key] = value.detach().cpu().clone()
    return out
