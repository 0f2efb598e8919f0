"""Shared fixtures of the serving tests: one tiny trained and exported model per test session.

``serving_workdir``: a copy of the session's tiny synthetic data (``tiny_workdir`` of conftest.py), random
8-d embedding tables that leave out every tenth product (so unknown products occur), a
``dcn_pq_hist`` model trained for one epoch and its fp32 export (``serving/``). Tests that
write elsewhere in a workdir take a copy (:func:`copy_workdir`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.schema import table_path as data_table_path
from data.text import normalize_query
from embeddings.tables import build_table, table_path, write_table
from ranking import train
from serving import export

TABLE_DIM = 8


def write_random_tables(workdir: Path, dim: int = TABLE_DIM, seed: int = 0) -> None:
    """Product table without every tenth catalog product; query table of every impression/relevance query."""
    products = pq.read_table(data_table_path(workdir, "catalog"), columns=["product_id"]).column(0).to_numpy()
    products = np.sort(products)[np.arange(len(products)) % 10 != 9]
    queries = sorted({normalize_query(q) for name in ("impressions", "relevance")
                      for q in pq.read_table(data_table_path(workdir, name), columns=["query"]).column(0).to_pylist()})
    rng = np.random.default_rng(seed)
    write_table(build_table("product", products, rng.normal(size=(len(products), dim)) / np.sqrt(dim)),
                table_path(workdir, "product"))
    write_table(build_table("query", queries, rng.normal(size=(len(queries), dim)) / np.sqrt(dim)),
                table_path(workdir, "query"))


def copy_workdir(source: Path, target: Path) -> Path:
    """Copy data, tables and trained models (not the serving export) to ``target``."""
    for sub in ("data", "embeddings", "ranking"):
        shutil.copytree(source / sub, target / sub)
    return target


@pytest.fixture(scope="session")
def serving_workdir(tiny_workdir: Path, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("serving")
    shutil.copytree(tiny_workdir / "data", workdir / "data")
    write_random_tables(workdir)
    train.main(["--workdir", str(workdir), "--variant", "dcn_pq_hist", "--seeds", "1", "--epochs", "1",
                "--batch-size", "256", "--lr", "0.01", "--threads", "1"])
    export.main(["--workdir", str(workdir), "--threads", "1"])
    return workdir
