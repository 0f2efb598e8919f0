"""Atomic file output and workdir layout.

Every stage writes to a temporary name in the destination directory and renames it into place
(``os.replace`` is atomic on POSIX), so a killed run never leaves a half-written file that a later
stage would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import UserError


def prepare_workdir(workdir: str | Path, *subdirs: str) -> Path:
    """Return ``workdir`` as a Path, creating it and ``subdirs``; a one-line error if it is a file."""
    root = Path(workdir)
    if root.exists() and not root.is_dir():
        raise UserError(f"workdir {root} exists and is not a directory")
    for sub in subdirs or ("",):
        target = root / sub
        if target.exists() and not target.is_dir():
            raise UserError(f"{target} exists and is not a directory")
        target.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it over ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table, path: str | Path, **kwargs: Any) -> Path:
    """Write ``table`` to ``path`` atomically (deterministic: no wall-clock metadata)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
