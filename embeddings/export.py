"""Export the frozen tables: ``python -m embeddings.export --workdir DIR [--force]``.

Writes ``DIR/embeddings/product_table.parquet`` (every catalog product, multimodal vectors) and
``DIR/embeddings/query_table.parquet`` (every distinct normalised query of the relevance and the
impressions tables) in the layout of :mod:`embeddings.tables` (row 0 = zeros for unknown ids).
The file metadata ``dashrec.source`` names the checkpoint and its hash; tables whose source
matches the current checkpoint are kept (``--force`` re-exports).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import pyarrow.compute as pc

from common.cli import UserError, parse_config, run_main
from common.io import prepare_workdir
from data import schema
from data.schema import SchemaError
from data.text import normalize_query
from embeddings import tables
from embeddings.config import ExportConfig
from embeddings.encode import load_encoder

log = logging.getLogger(__name__)


def distinct_queries(workdir: Path) -> list[str]:
    """Sorted distinct normalised queries of the relevance and impressions tables."""
    found: set[str] = set()
    for name in ("relevance", "impressions"):
        column = schema.read_table(workdir, name, columns=["query"]).column("query")
        if column.null_count:
            raise SchemaError(schema.table_path(workdir, name), "query", "null query; this column must not be null")
        found.update(normalize_query(q) for q in pc.unique(column).to_pylist())
    return sorted(found)


def export(cfg: ExportConfig) -> dict[str, Path]:
    workdir = prepare_workdir(cfg.workdir, "embeddings")
    encoder = load_encoder(workdir, "trained", cfg.device, cfg.batch_size)
    paths = {kind: tables.table_path(workdir, kind) for kind in ("product", "query")}
    if not cfg.force and all(p.exists() for p in paths.values()):
        sources = {tables.read_table(p).source for p in paths.values()}
        if sources == {encoder.source}:
            log.info("product and query tables are up to date with %s: skipping (--force to redo)", encoder.source)
            return paths
    try:
        catalog = schema.read_table(workdir, "catalog").select(["product_id", "title", "image"]).to_pandas()
        queries = distinct_queries(workdir)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    started = time.perf_counter()
    product_vectors = encoder.products(catalog)
    product_s = time.perf_counter() - started
    tables.write_table(tables.build_table("product", catalog["product_id"].tolist(), product_vectors, encoder.source),
                       paths["product"])
    started = time.perf_counter()
    query_vectors = encoder.queries(queries)
    query_s = time.perf_counter() - started
    tables.write_table(tables.build_table("query", queries, query_vectors, encoder.source), paths["query"])
    log.info("exported %d products (%.1f/s) to %s and %d queries (%.1f/s) to %s", len(catalog),
             len(catalog) / max(product_s, 1e-9), paths["product"], len(queries), len(queries) / max(query_s, 1e-9),
             paths["query"])
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    return export(parse_config(ExportConfig, argv))


if __name__ == "__main__":
    run_main(main)
