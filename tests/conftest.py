"""Shared fixtures: one synthetic ``tiny`` workdir per test session.

``tiny_workdir`` generates ``python -m data.synth --profile tiny --seed 0`` once (a few seconds)
and returns the workdir ``Path``; its tables are under ``tiny_workdir / "data"``. It is shared by
every test: treat it as read-only. A test that writes stage outputs or corrupts a table uses
``tiny_workdir_copy``, a private copy of ``data/`` in the test's own ``tmp_path``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir holding the synthetic tiny profile (seed 0): DIR/data/*.parquet + manifest.json."""
    from data import synth

    workdir = tmp_path_factory.mktemp("tiny_workdir")
    synth.main(["--profile", "tiny", "--workdir", str(workdir), "--seed", str(TINY_SEED)])
    return workdir


@pytest.fixture
def tiny_workdir_copy(tiny_workdir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny workdir's ``data/`` directory."""
    workdir = tmp_path / "workdir"
    shutil.copytree(tiny_workdir / "data", workdir / "data")
    return workdir
