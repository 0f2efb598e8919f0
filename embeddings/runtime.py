"""What training and inference share at run time: the device, its precision, checkpoint files and
the paths of the embeddings stage.

* :func:`resolve_device` turns ``--device`` (``auto``, ``cpu``, ``cuda``...) into a device;
  :func:`autocast` is the precision the encoders run at on it (``auto``: bf16 autocast on CUDA,
  float32 elsewhere; ``bf16`` on CPU too); :func:`resolve_autocast` is what training's ``--autocast
  auto`` runs at (bf16 on CUDA and on CPUs with bf16 instructions); :func:`resolve_precision`
  is what the encoders' ``--precision auto`` runs at (bf16 on CPUs with bf16 instructions).
* Checkpoints are dicts of tensors, numbers, strings, lists and dicts only. :func:`write_checkpoint`
  and :func:`save_checkpoint` (atomic) write them with ``torch.save`` through an open file, so equal
  objects give equal bytes; :func:`load_checkpoint` reads them with ``torch.load(weights_only=True)``
  and refuses, with a one-line error, any file that would run code or build other objects when
  unpickled, or is truncated.
* :class:`Paths` names the files of ``DIR/embeddings/`` that training writes and every later stage
  reads (checkpoints, ``config.json``, ``train_log.json``); :func:`stage_set` is the published
  output set of each training stage (``stage1.pt``; ``model.pt`` with ``config.json``), which
  readers verify.

``embeddings.encode``, ``embeddings.export``, ``embeddings.evaluate`` and ``embeddings.bench``
import this module, never the training command :mod:`embeddings.train`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from common.cli import UserError
from common.io import atomic_path
from common.provenance import OutputSet

# the command that makes the training outputs, and their paths relative to the workdir
TRAIN_COMMAND = "python -m embeddings.train"
STAGE1_CHECKPOINT = "embeddings/checkpoints/stage1.pt"
MODEL_CHECKPOINT = "embeddings/checkpoints/model.pt"
RUN_CONFIG = "embeddings/config.json"


# ------------------------------------------------------------------------------------------ device
AUTOCAST_DTYPES = ("auto", "bf16", "fp32")
KERNEL_CACHE_CAPACITY = 16  # oneDNN kernels kept for reuse in training (bound_kernel_cache)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, dtype: str = "auto") -> contextlib.AbstractContextManager:
    """The encoders' autocast region: ``auto`` = bf16 on CUDA and float32 elsewhere, ``bf16`` = bf16
    on any device (on CPU it pays only where the CPU has bf16 instructions, e.g. AVX512-BF16 or
    AMX), ``fp32`` = float32 everywhere."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast dtype must be one of {AUTOCAST_DTYPES}, got {dtype!r}")
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_autocast(dtype: str, device: torch.device) -> str:
    """The training autocast ``auto`` stands for on ``device``: ``bf16`` on CUDA and on a CPU with bf16
    instructions (there it is about 1.5x faster per stage-2 step of the mini backbone and trains to
    the same losses), ``fp32`` elsewhere; any other value is returned as it is."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_instructions()) else "fp32"


def bound_kernel_cache(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap oneDNN's cache of compiled CPU kernels (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, 1024 by default)
    unless the environment sets it. Training meets new tensor shapes nearly every step (queries and
    title spans of varying lengths in length buckets), and each cached kernel keeps its own buffers:
    over 120 bf16 stage-2 steps of the demo the process grew to 3.17 GB with the default and stays
    at 2.37 GB with 16, at the same speed and with byte-identical weights. Takes effect when called
    before the process's first oneDNN kernel."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def cpu_bf16_instructions() -> bool | None:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), where encoder precision bf16 pays
    off; None when this torch build cannot tell."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """The encoder precision ``auto`` stands for on ``device``: ``bf16`` on a CPU with bf16
    instructions, ``fast`` elsewhere (on CUDA ``fast`` runs under bf16 autocast); any other value is
    returned as it is."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_bf16_instructions() else "fast"


# ------------------------------------------------------------------------------------- checkpoints
def write_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a file object: the archive's inner name is then fixed (from a path it
    would be the file's name, a random temp name here), so equal objects give equal bytes."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """:func:`write_checkpoint` to a temp name, renamed over ``path``."""
    with atomic_path(path) as tmp:
        write_checkpoint(obj, tmp)


def _load_failure(exc: Exception) -> str:
    """The first line of why ``torch.load`` refused a file (past its generic preamble)."""
    text = str(exc)
    if "WeightsUnpickler error: " in text:
        text = text.split("WeightsUnpickler error: ", 1)[1]
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, loaded with ``weights_only=True``: a file that would run code or build
    other objects when unpickled (tampered or foreign), or is truncated, is a one-line error."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as exc:  # a truncated, foreign or tampered file
        raise UserError(f"{path}: not a DashCLIP checkpoint that loads as plain data, refused "
                        f"({_load_failure(exc)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a DashCLIP checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


# ------------------------------------------------------------------------------------------- paths
@dataclasses.dataclass
class Paths:
    """The files of the embeddings stage under the workdir ``root``."""

    root: Path

    @property
    def emb(self) -> Path:
        return self.root / "embeddings"

    @property
    def ckpt(self) -> Path:
        return self.emb / "checkpoints"

    def stage_final(self, stage: int) -> Path:
        return self.root / (STAGE1_CHECKPOINT if stage == 1 else MODEL_CHECKPOINT)

    def stage_last(self, stage: int) -> Path:
        return self.ckpt / f"stage{stage}_last.pt"

    @property
    def stage1_best(self) -> Path:
        return self.ckpt / "stage1_best.pt"

    @property
    def log(self) -> Path:
        return self.emb / "train_log.json"

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG


def stage_set(workdir: str | Path, stage: int) -> OutputSet:
    """The published output of ``stage``: ``stage1.pt`` (1), or ``model.pt`` with ``config.json`` (2)."""
    if stage == 1:
        return OutputSet(workdir, "embeddings/stage1.manifest.json", [STAGE1_CHECKPOINT], what=TRAIN_COMMAND)
    return OutputSet(workdir, "embeddings/model.manifest.json", [MODEL_CHECKPOINT, RUN_CONFIG], what=TRAIN_COMMAND)
