"""Shared fixtures of the serving tests: one tiny trained and exported model per test session.

``serving_workdir``: a copy of the session's tiny synthetic data (``tiny_workdir`` of conftest.py), a
DashCLIP checkpoint of the tiny random backbone at its initialisation (:func:`write_dashclip_checkpoint`:
its query side starts as a copy of its title side, so a title-only product's vector is exactly
its title's query vector, which makes "a new product is found by its title" exact), its product
and query tables (:func:`write_encoded_tables`: every tenth catalog product is left out of the
product table, so unknown products occur and :func:`left_out_products` can be added by
``serving.add_products``), a ``dcn_pq_hist`` model trained for one epoch, its fp32 export
(``serving/``) and the exact product index. Tests that write elsewhere in a workdir take a copy
(:func:`copy_workdir`, :func:`copy_served`).

``service``: ``python -m serving.server`` on ``serving_workdir`` (one worker, a real uvicorn process
on a free localhost port) and an ``httpx.Client`` for it, for the tests that only read.

pytest makes a session fixture imported into several test modules once per module, so both keep
what they made in :data:`_MADE` and make it once per test session.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from common.provenance import MadeFrom
from data.schema import table_path
from data.text import normalize_query
from embeddings.config import DashCLIPConfig
from embeddings.encode import load_encoder
from embeddings.models import build_dashclip
from embeddings.runtime import save_checkpoint
from embeddings.tables import build_table, embedding_table_rel, tables_set, write_table
from ranking import layout, train
from serving import export, index
from serving.published import ENCODER_CHECKPOINT
from serving.server import ServiceProcess

MAX_CANDIDATES = 8
DASHCLIP_DIM = 32


def write_dashclip_checkpoint(workdir: Path, embed_dim: int = DASHCLIP_DIM) -> None:
    """``DIR/embeddings/checkpoints/model.pt``: the tiny DashCLIP model at its initialisation, in the
    format of a trained one (what ``load_encoder(DIR, "trained")`` reads)."""
    cfg = DashCLIPConfig(backbone="tiny", image_size=32, embed_dim=embed_dim)
    model, _, _ = build_dashclip(cfg)
    path = workdir / ENCODER_CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model_config": dataclasses.asdict(cfg), "model": model.state_dict()}, path)


def left_out_products(workdir: Path) -> np.ndarray:
    """The catalog products that :func:`write_encoded_tables` leaves out of the product table (sorted)."""
    products = pq.read_table(table_path(workdir, "catalog"), columns=["product_id"]).column(0).to_numpy()
    return np.sort(products)[np.arange(len(products)) % 10 == 9]


def write_encoded_tables(workdir: Path) -> None:
    """Publish the product table (the catalog without :func:`left_out_products`) and the query table
    (every impression and relevance query), encoded by the workdir's trained DashCLIP model, as
    ``embeddings.export`` does (made from its checkpoint)."""
    encoder = load_encoder(workdir, "trained")
    catalog = pq.read_table(table_path(workdir, "catalog")).to_pandas().sort_values("product_id")
    catalog = catalog[~catalog["product_id"].isin(left_out_products(workdir))]
    queries = sorted({normalize_query(q) for name in ("impressions", "relevance")
                      for q in pq.read_table(table_path(workdir, name), columns=["query"]).column(0).to_pylist()})
    made_from = MadeFrom.of(workdir, [ENCODER_CHECKPOINT], {"left_out": "every tenth catalog product"})
    with tables_set(workdir).publish(made_from) as staged:
        write_table(build_table("product", catalog["product_id"].tolist(), encoder.products(catalog), encoder.source),
                    staged[embedding_table_rel("product")])
        write_table(build_table("query", queries, encoder.queries(queries), encoder.source),
                    staged[embedding_table_rel("query")])


def copy_workdir(source: Path, target: Path) -> Path:
    """Copy data, tables and trained models (not the serving export) to ``target``."""
    for sub in ("data", "embeddings", layout.ROOT):
        shutil.copytree(source / sub, target / sub)
    return target


def copy_served(source: Path, target: Path) -> Path:
    """:func:`copy_workdir` and the serving export and index, ready to serve."""
    copy_workdir(source, target)
    shutil.copytree(source / "serving", target / "serving", ignore=shutil.ignore_patterns("server.log", "bench*"))
    return target


_MADE: dict[str, object] = {}  # fixture name -> its value, for the whole session


@pytest.fixture(scope="session")
def serving_workdir(tiny_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "serving_workdir" not in _MADE:
        _MADE["serving_workdir"] = _make_serving_workdir(tiny_workdir, tmp_path_factory.mktemp("serving"))
    return _MADE["serving_workdir"]  # type: ignore[return-value]


def _make_serving_workdir(tiny_workdir: Path, workdir: Path) -> Path:
    shutil.copytree(tiny_workdir / "data", workdir / "data")
    write_dashclip_checkpoint(workdir)
    write_encoded_tables(workdir)
    train.main(["--workdir", str(workdir), "--variant", "dcn_pq_hist", "--seeds", "1", "--epochs", "1",
                "--batch-size", "256", "--lr", "0.01", "--threads", "1"])
    export.main(["--workdir", str(workdir), "--threads", "1"])
    index.main(["--workdir", str(workdir)])
    return workdir


@pytest.fixture(scope="session")
def service(serving_workdir: Path, request: pytest.FixtureRequest) -> httpx.Client:
    if "service" not in _MADE:
        proc = ServiceProcess(serving_workdir, threads=1, max_candidates=MAX_CANDIDATES).__enter__()
        client = httpx.Client(base_url=proc.url, timeout=30.0)
        request.config.add_cleanup(proc.__exit__)
        request.config.add_cleanup(client.close)
        _MADE["service"] = client
    return _MADE["service"]  # type: ignore[return-value]
