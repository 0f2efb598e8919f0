"""Atomic file output and workdir layout.

Every stage writes to a temporary name in the destination directory, fsyncs it and renames it
into place (``os.replace`` is atomic on POSIX), then fsyncs the directory, so a killed run (or a
power cut) never leaves a half-written file that a later stage would trust. Temporary names carry
the writer's process id (``.<name>.<pid>.<random>.tmp``): :func:`remove_stale_temps` deletes those
of processes that are gone, and :func:`prepare_workdir` runs it on every directory it prepares, so
the leftovers of a killed run are removed by the next run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import UserError

_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.(tmp|bak)$")


def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh hidden name next to ``path`` that :func:`remove_stale_temps` recognises (``kind``: tmp or bak)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files and directories in ``directory`` whose writing process is gone."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and not _alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_workdir(workdir: str | Path, *subdirs: str) -> Path:
    """Return ``workdir`` as a Path, creating it and ``subdirs`` (and removing the temp leftovers of
    killed runs in them); a one-line error if one of them is a file."""
    root = Path(workdir)
    if root.exists() and not root.is_dir():
        raise UserError(f"workdir {root} exists and is not a directory")
    for sub in subdirs or ("",):
        target = root / sub
        if target.exists() and not target.is_dir():
            raise UserError(f"{target} exists and is not a directory")
        target.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
    return root


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it, rename it over ``path`` and fsync the
    directory; on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_sibling(path)
    tmp_path.touch(mode=0o600)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table, path: str | Path, **kwargs: Any) -> Path:
    """Write ``table`` to ``path`` atomically (deterministic: no wall-clock metadata)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def json_text(obj: Any) -> str:
    """The text :func:`write_json` writes for ``obj`` (sorted keys: the same object, the same bytes)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (remembered for this process while the file's inode, size and
    modification time stay the same)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]
