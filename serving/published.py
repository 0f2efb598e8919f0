"""The files of a serving export as one output set, readable without torchrec.

``python -m serving.export`` publishes ``DIR/serving/{model.pt, manifest.json}`` (and, for a model
with tables, ``model_vectors.pt`` and the id maps) as one :class:`common.provenance.OutputSet`
with the manifest ``DIR/serving/export.manifest.json``. The service and the benchmark read the
export through :func:`published_export`, which imports neither torchrec nor the exporter.
"""
from __future__ import annotations

from pathlib import Path

from common.provenance import OutputSet

EXPORT_MANIFEST = "serving/export.manifest.json"
FILES = {"model": "model.pt", "manifest": "manifest.json"}
TABLE_FILES = {"vectors_model": "model_vectors.pt", "product_ids": "product_ids.parquet",
               "query_ids": "query_ids.parquet"}  # only for variants with tables


def export_files(with_tables: bool) -> dict[str, str]:
    """File key -> workdir-relative path of the files of an export (with the table files ``with_tables``)."""
    return {key: f"serving/{name}" for key, name in {**FILES, **(TABLE_FILES if with_tables else {})}.items()}


def export_set(workdir: str | Path, with_tables: bool) -> OutputSet:
    """The output set of an export (with the vectors model and id maps ``with_tables``)."""
    return OutputSet(workdir, EXPORT_MANIFEST, list(export_files(with_tables).values()), what="python -m serving.export")


def published_export(workdir: str | Path) -> OutputSet:
    """The export set as last published (its manifest says whether it has the table files)."""
    manifest = export_set(workdir, False).manifest() or {}
    return export_set(workdir, export_files(True)["vectors_model"] in manifest.get("files", {}))
