"""Data-parallel DashCLIP training: ``torchrun --nproc_per_node N -m embeddings.train ...``.

Every rank draws the same global batch of B items (:func:`embeddings.train.batch_at` is seeded by
the step) and trains on its contiguous block of ``B / W`` rows (:meth:`Shard.block`), so the ranks'
blocks, gathered in rank order, are the global batch in its own order. The model is wrapped in
``DistributedDataParallel`` through :class:`StepObjective`, whose forward is a stage's loss
function, so DDP averages the parameter gradients of the step. The losses are arranged so that
this average is the gradient of the single-process loss of the global batch:

* a per-example mean over the local block (ITM, PQC) averages over the ranks to the global mean
  (every rank holds the same number of rows: B must be a multiple of W, see
  :func:`global_batch_size`; padding rows would enter the contrastive terms as extra negatives);
* a contrastive loss over the global batch (:class:`GlobalBatchITCLoss`: ITC, the multimodal ITC of
  stage 1, the in-batch term of stage 2) is computed whole on every rank from the gathered
  features, with gradients into the local features only (open_clip style); each rank thus holds
  ``1/W`` of its gradient, so the local features' gradients are multiplied by W
  (:func:`scale_grad`) to undo DDP's averaging, while the temperature, which every rank sees
  whole, keeps its gradient.

Stage 1's ITM hard negatives are mined from the global batch's similarities with a generator in
the same state on every rank, and each rank runs the ITM pairs whose image it holds
(:func:`embeddings.steps.stage1_losses`). A step therefore equals the single-process step on the
same global batch (tested to float tolerance with 2 gloo ranks), with two exceptions: dropout masks
are drawn per rank (:func:`dropout_seed`), and BatchNorm layers in training mode (the trainable
EfficientNet blocks of the ``mini`` backbone) normalise over the rank's block, as in any DDP run.

Rank 0 writes every file; checkpoints hold the unwrapped model's ``state_dict`` (the single-process
format), so a run of any world size resumes from them. Evaluations run whole on every rank with
local-only contrast (:func:`local_contrast`) and rank 0's numbers are broadcast
(:func:`broadcast_from_main`), so early-stopping decisions are identical everywhere. The frozen
inputs of stage 2 (product [CLS], frozen query-encoder states) are computed whole on every rank.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.cli import UserError
from common.distributed import DistEnv
from embeddings.losses import ITCLoss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's share of every global batch: rank ``rank`` of ``world_size`` (1 = one process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def of(cls, env: DistEnv | None, device: torch.device) -> "Shard":
        return cls(env.rank, env.world_size, env.device) if env is not None else cls(device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def block(self, global_size: int) -> slice:
        """Rows ``[rank * b, (rank + 1) * b)`` of a global batch of ``global_size = W * b`` rows."""
        if global_size % self.world_size:
            raise ValueError(f"a global batch of {global_size} does not split over {self.world_size} ranks")
        local = global_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files the others read)."""
        if self.distributed:
            dist.barrier()


def check_batch_split(requested: int, world_size: int, flag: str) -> None:
    """A one-line error unless the global batch ``requested`` (the ``flag`` setting) splits evenly over the ranks."""
    if requested % world_size:
        raise UserError(f"{flag} {requested} is the global batch: it must be a multiple of the {world_size} ranks "
                        f"(e.g. {max(world_size, requested - requested % world_size)})")


def global_batch_size(requested: int, n_items: int, world_size: int, flag: str) -> int:
    """The global batch of a stage: ``min(requested, n_items)``, which must split evenly over the ranks.

    ``requested`` (the ``flag`` setting) must be a multiple of ``world_size``; when the data is
    smaller than one batch, the batch is the data rounded down to a multiple of ``world_size``.
    """
    check_batch_split(requested, world_size, flag)
    size = min(requested, n_items)
    if size % world_size:
        size -= size % world_size
        log.warning("%s: only %d items, fewer than one batch; the batch is %d (a multiple of the %d ranks)", flag,
                    n_items, size, world_size)
    if size < world_size:
        raise UserError(f"{flag}: {n_items} items cannot give each of the {world_size} ranks one row per step")
    return size


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` unchanged in the forward pass; its gradient multiplied by ``factor`` in the backward."""
    return tensor if factor == 1 else _ScaleGrad.apply(tensor, factor)


class GlobalBatchITCLoss(ITCLoss):
    """:class:`ITCLoss` over the global batch of a DDP step (same state dict, same value).

    Contrasts against the features of every rank (ITCLoss's gather) and multiplies the gradient of
    this rank's features by the world size, so that DDP's average over the ranks yields the
    gradient of the global loss (see the module docstring). Needs an initialised process group.
    """

    def __init__(self, init_temperature: float, world_size: int, learnable: bool = True) -> None:
        super().__init__(init_temperature, learnable, distributed=True)
        self.world_size = world_size

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                image_log_share: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(scale_grad(image_emb, self.world_size), scale_grad(text_emb, self.world_size),
                               image_log_share)


def itc_loss(init_temperature: float, world_size: int, learnable: bool = True) -> ITCLoss:
    """The contrastive loss of a training step: over the global batch when ``world_size > 1``."""
    if world_size > 1:
        return GlobalBatchITCLoss(init_temperature, world_size, learnable)
    return ITCLoss(init_temperature, learnable, distributed=False)


@contextlib.contextmanager
def local_contrast(*losses: ITCLoss | None) -> Iterator[None]:
    """Within: ``losses`` contrast the local batch only (an evaluation that one rank runs whole)."""
    saved = [(loss, loss.distributed) for loss in losses if loss is not None]
    try:
        for loss, _ in saved:
            loss.distributed = False
        yield
    finally:
        for loss, distributed in saved:
            loss.distributed = distributed


class StepObjective(nn.Module):
    """The losses of one training step as a module, for DDP to wrap: ``forward(*args)`` returns
    ``compute(*args)`` (a dict of scalar losses), and ``modules`` (the model, learnable
    temperatures) are registered as submodules so DDP synchronises their parameters."""

    def __init__(self, compute: Callable[..., dict[str, torch.Tensor]], modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.compute = compute
        self.parts = nn.ModuleDict(modules)

    def forward(self, *args: Any) -> dict[str, torch.Tensor]:
        return self.compute(*args)


def data_parallel(compute: Callable[..., dict[str, torch.Tensor]], modules: dict[str, nn.Module],
                  trained: list[nn.Parameter], shard: Shard,
                  find_unused: bool = False) -> Callable[..., dict[str, torch.Tensor]]:
    """``compute`` itself in one process; else a DDP-wrapped :class:`StepObjective` that synchronises the
    gradients of the ``trained`` parameters (the optimizer's) and ignores every other parameter of
    ``modules`` (the other stage's). ``find_unused``: some trained parameters get no gradient in a
    step (they keep ``grad = None`` on every rank, as in one process)."""
    if not shard.distributed:
        return compute
    objective = StepObjective(compute, modules)
    trained_ids = {id(p) for p in trained}
    ignored = [name for name, p in objective.named_parameters() if id(p) not in trained_ids]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, ignored)
    device_ids = [shard.device.index] if shard.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=find_unused)


def mean_over_ranks(values: dict[str, float], shard: Shard) -> dict[str, float]:
    """The mean of each value over the ranks (every rank gets it); ``values`` unchanged in one process."""
    if not shard.distributed:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=shard.device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / shard.world_size).tolist()))


def tensor_from_main(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Rank 0's ``tensor`` (same shape and dtype on every rank) on every rank."""
    if shard.distributed:
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=0)
    return tensor


def broadcast_from_main(values: dict[str, float], shard: Shard) -> dict[str, float]:
    """Rank 0's ``values`` on every rank (same keys on every rank)."""
    if not shard.distributed:
        return values
    tensor = tensor_from_main(torch.tensor(list(values.values()), dtype=torch.float64, device=shard.device), shard)
    return dict(zip(values, tensor.tolist()))


def dropout_seed(seed: int, stage: int, step: int, rank: int) -> int:
    """The torch seed of a rank's dropout at a step of a distributed run: independent streams per
    rank that a resumed run (of any world size) reproduces."""
    return int(np.random.SeedSequence([seed, stage, step, rank]).generate_state(1)[0])
