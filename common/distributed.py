"""The process group of a ``torchrun`` job, shared by the distributed trainers (no torchrec import).

:func:`init_from_env` starts the default process group from the environment ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): nccl with one GPU per
``LOCAL_RANK`` on CUDA, gloo on CPU, and a timeout on every collective so that a rank that dies
makes the others fail instead of waiting forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.cli import UserError


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    device: torch.device
    pg: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(timeout_s: float, device: str = "auto") -> DistEnv | None:
    """Start the default process group from the torchrun environment; None when ``WORLD_SIZE``
    is unset or 1. ``device``: ``auto`` (cuda when available, else cpu), ``cuda`` or ``cpu``
    decides the backend (nccl / gloo); every collective fails after ``timeout_s`` seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if timeout_s <= 0:
        raise UserError(f"--pg-timeout-s must be > 0, got {timeout_s}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device != "cpu" and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s); start "
                            f"at most that many processes per node (torchrun --nproc_per_node)")
        place = torch.device("cuda", local_rank)
        torch.cuda.set_device(place)
        backend = "nccl"
    else:
        place, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistEnv(dist.get_rank(), dist.get_world_size(), place, dist.group.WORLD)


def close_process_group(synchronize: bool = True) -> None:
    """Destroy the default process group. With ``synchronize`` (a run that ended normally) every rank
    first waits for the others at a barrier, so that no rank tears its connections down and exits
    while a peer still holds them: gloo can then abort the exiting process ("terminate called
    without an active exception"). A run that failed does not wait for peers that may never come."""
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def current_env() -> DistEnv | None:
    """The :class:`DistEnv` of an initialised multi-rank process group, else None."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), device, dist.group.WORLD)
