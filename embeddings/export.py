"""Export the frozen tables: ``python -m embeddings.export --workdir DIR [--force]``.

Writes ``DIR/embeddings/product_table.parquet`` (every catalog product, multimodal vectors) and
``DIR/embeddings/query_table.parquet`` (every distinct normalised query of the relevance and the
impressions tables) in the layout of :mod:`embeddings.tables` (row 0 = zeros for unknown ids),
published as one set (:func:`embeddings.tables.tables_set`). The set is made from the trained
checkpoint (``model.pt`` with its ``config.json``), the catalog, relevance and impressions
tables and ``--batch-size``; tables made from exactly these are kept (``--force`` re-exports).
The file metadata ``dashrec.source`` names the checkpoint and its hash.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import pyarrow.compute as pc

from common.cli import parse_config, run_main
from common.io import prepare_workdir
from common.provenance import MadeFrom
from data import schema
from data.dataset import input_hashes
from data.text import normalize_query
from embeddings import tables
from embeddings.config import TableExportConfig
from embeddings.encode import load_encoder
from embeddings.runtime import resolve_device, resolve_precision, stage_set

log = logging.getLogger(__name__)

QUERY_TABLES: tuple[schema.TableName, ...] = ("relevance", "impressions")


def distinct_queries(workdir: Path) -> list[str]:
    """Sorted distinct normalised queries of the relevance and impressions tables (validated)."""
    found: set[str] = set()
    for name in QUERY_TABLES:
        column = schema.read_table(workdir, name, columns=["query"]).column("query")
        found.update(normalize_query(q) for q in pc.unique(column).to_pylist())
    return sorted(found)


def made_from(workdir: Path, cfg: TableExportConfig) -> MadeFrom:
    """The trained model's published set, the tables the export reads, and its settings."""
    inputs = {**stage_set(workdir, 2).verify(), **input_hashes(workdir, ("catalog", *QUERY_TABLES))}
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))  # what it runs at, not the flag
    return MadeFrom(inputs, {"batch_size": cfg.batch_size, "precision": precision})


def export(cfg: TableExportConfig) -> dict[str, Path]:
    workdir = prepare_workdir(cfg.workdir, "embeddings")
    output = tables.tables_set(workdir)
    paths = {kind: tables.embedding_table_path(workdir, kind) for kind in ("product", "query")}
    source = made_from(workdir, cfg)
    if not cfg.force and output.current(source):
        log.info("product and query tables are made from these checkpoint, data and settings: skipping "
                 "(--force to redo)")
        return paths
    schema.validate_tables(workdir, ("catalog", *QUERY_TABLES), check_images=True)
    encoder = load_encoder(workdir, "trained", cfg.device, cfg.batch_size, cfg.precision, cfg.workers)
    catalog = schema.read_table(workdir, "catalog").select(["product_id", "title", "image"]).to_pandas()
    queries = distinct_queries(workdir)
    # the encoders write into the tables' own arrays (row 0, the unknown row, stays zeros): one copy
    product_vectors = tables.table_array(len(catalog), encoder.dim)
    query_vectors = tables.table_array(len(queries), encoder.dim)
    started = time.perf_counter()
    encoder.products(catalog, out=product_vectors[1:])
    product_s = time.perf_counter() - started
    started = time.perf_counter()
    encoder.queries(queries, out=query_vectors[1:])
    query_s = time.perf_counter() - started
    with output.publish(source, {"source": encoder.source}) as staged:
        tables.write_table(tables.build_table("product", catalog["product_id"].tolist(), product_vectors,
                                              encoder.source), staged[tables.embedding_table_rel("product")])
        tables.write_table(tables.build_table("query", queries, query_vectors, encoder.source),
                           staged[tables.embedding_table_rel("query")])
    log.info("exported %d products (%.1f/s) to %s and %d queries (%.1f/s) to %s", len(catalog),
             len(catalog) / max(product_s, 1e-9), paths["product"], len(queries), len(queries) / max(query_s, 1e-9),
             paths["query"])
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    return export(parse_config(TableExportConfig, argv))


if __name__ == "__main__":
    run_main(main)
