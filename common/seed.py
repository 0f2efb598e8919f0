"""One place to seed every random number generator a run touches."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a fresh numpy Generator for the caller."""
    if seed < 0:
        from common.cli import UserError
        raise UserError(f"--seed must be >= 0, got {seed}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """Inside, on CPU, torch runs the deterministic variant of every kernel that has one
    (``torch.use_deterministic_algorithms``), so a training run gives the same bits at any thread
    count: the multithreaded backward of indexing with repeated indices (``index_put_`` with
    accumulation) otherwise adds its rows in the order the threads happen to reach them. CUDA runs
    keep the fast kernels: byte-identical results are a CPU promise."""
    previous = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
