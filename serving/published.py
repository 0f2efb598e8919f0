"""The published serving files, readable without torchrec: the export, and the products added to it.

``python -m serving.export`` publishes ``DIR/serving/{model.pt, model_weights.pt, manifest.json,
product_features.parquet}`` (and, for a model with tables, ``model_vectors.pt`` and the id maps) as
one :class:`common.provenance.OutputSet` with the manifest ``DIR/serving/export.manifest.json``.

``model.pt`` is self-contained (``torch.jit.load``); ``model_weights.pt`` holds the same tensors
by name (``torch.save``, read with ``weights_only=True``). :func:`load_served_model` maps them
from it into the module ``model.pt`` describes, so that every process serving the export (the
service's workers, the benchmark) shares one copy of the tables in the page cache, where
``torch.jit.load`` would read a private copy into each.

``python -m serving.add_products`` publishes the *added set* (:func:`added_set`, manifest
``DIR/serving/added.manifest.json``): the served versions of the fused model (its product table
grown by the added products), the product id map, the per-product features and the product index,
plus ``added/products.parquet``, the record of every product added so far (catalog columns and
vector). It is made from the export, the index and the DashCLIP checkpoint (:func:`added_inputs`);
when any of them is published again, the added set no longer applies (:func:`current_added`
raises, naming the file that changed).

The service and the benchmark read these files through :func:`published_export` and
:func:`current_added`, which import neither torchrec nor the exporter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.cli import UserError
from common.io import write_parquet
from embeddings.keys import TableKeys, TableKind
from embeddings.tables import KEY_COLUMN
from common.io import file_sha256
from common.provenance import OutputSet

EXPORT_MANIFEST = "serving/export.manifest.json"
FILES = {"model": "model.pt", "model_weights": "model_weights.pt", "manifest": "manifest.json",
         "product_features": "product_features.parquet"}
TABLE_FILES = {"vectors_model": "model_vectors.pt", "product_ids": "product_ids.parquet",
               "query_ids": "query_ids.parquet"}  # only for variants with tables

ADDED_MANIFEST = "serving/added.manifest.json"
ADDED_FILES = {"model": "serving/added/model.pt", "product_ids": "serving/added/product_ids.parquet",
               "product_features": "serving/added/product_features.parquet", "index": "serving/added/index.faiss",
               "index_ids": "serving/added/index_ids.npy", "products": "serving/added/products.parquet"}
ENCODER_CHECKPOINT = "embeddings/checkpoints/model.pt"


def read_id_map(path: Path, kind: TableKind) -> TableKeys:
    """The keys of an exported id map (``row_id`` 1..R-1 and ``product_id`` or ``query``, see
    :func:`write_id_map`)."""
    if not path.exists():
        raise UserError(f"{path}: missing id map (run `python -m serving.export --force`)")
    key = KEY_COLUMN[kind]
    table = pq.read_table(path)
    if "row_id" not in table.column_names or key not in table.column_names:
        raise UserError(f"{path}: expected columns row_id and {key}, found {table.column_names}")
    rows = table.column("row_id").to_numpy()
    if not np.array_equal(rows, np.arange(1, len(rows) + 1)):
        raise UserError(f"{path}: column 'row_id' must be 1..R-1 in order")
    try:
        return TableKeys.from_keys(kind, table.column(key).combine_chunks())
    except (ValueError, pa.ArrowInvalid) as exc:
        raise UserError(f"{path}: column {key!r}: {exc}") from None


def write_id_map(keys: TableKeys, path: Path) -> None:
    """Rows 1..R-1 of a table and their keys: ``row_id`` int64 and ``product_id`` int64 or ``query`` string."""
    write_parquet(pa.table({"row_id": pa.array(np.arange(1, len(keys)), pa.int64()),
                            KEY_COLUMN[keys.kind]: keys.to_arrow().slice(1)}), path)


def scripted_tensors(module: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a TorchScript module by its qualified name: what
    ``model_weights.pt`` holds."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def load_served_model(model_path: str | Path, weights_path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The TorchScript model of ``model_path`` in eval mode; with ``weights_path`` (its
    ``model_weights.pt``, same export) its tensors are not read from ``model_path`` but mapped from
    that file (``torch.load`` with ``mmap=True``, copy on write): processes that load the same
    export share those pages. Raises :class:`UserError` naming the file when the two do not match."""
    if weights_path is None:
        return torch.jit.load(str(model_path)).eval()
    module = torch.jit.load(str(model_path), map_location="meta")  # the structure, no tensor read
    expected = scripted_tensors(module)
    try:
        weights = torch.load(weights_path, mmap=True, weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{weights_path}: cannot read the model's weights ({exc}); run python -m serving.export "
                        f"--force") from None
    if not isinstance(weights, dict) or set(weights) != set(expected):
        raise UserError(f"{weights_path}: its tensors are not those of {model_path} (run python -m serving.export "
                        f"--force)")
    parameters = dict(module.named_parameters())
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise UserError(f"{weights_path}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, {model_path} "
                            f"expects {tuple(expected[name].shape)} {expected[name].dtype}")
        owner_name, _, attribute = name.rpartition(".")
        owner = module
        for part in owner_name.split(".") if owner_name else ():
            owner = getattr(owner, part)
        setattr(owner, attribute, torch.nn.Parameter(tensor, requires_grad=False) if name in parameters else tensor)
    return module.eval()


QUERY_TABLE_WEIGHT = "query_table.weight"  # the name's end, in the fused model, of the query table's weight


def fp32_query_table(module: torch.jit.ScriptModule, manifest: dict[str, Any]) -> np.ndarray | None:
    """The served model's query table ``[R, d]`` as an array over the model's own tensor (no copy)
    when the export keeps fp32 tables; None otherwise (no tables, or quantized ones)."""
    if manifest.get("table_dtype") != "fp32":
        return None
    found = [t for name, t in module.named_parameters() if name.endswith(QUERY_TABLE_WEIGHT)]
    if len(found) != 1 or found[0].dtype != torch.float32 or found[0].dim() != 2:
        return None
    return found[0].detach().numpy()


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


def added_set(workdir: str | Path) -> OutputSet:
    """The output set of ``python -m serving.add_products`` (see the module docstring)."""
    return OutputSet(workdir, ADDED_MANIFEST, list(ADDED_FILES.values()), what="python -m serving.add_products")


def added_inputs(workdir: str | Path) -> dict[str, str]:
    """What an added set is made from: the SHA-256 of the export's files, of the product index
    (``serving.index``) and of the DashCLIP checkpoint that encodes the products. One-line
    :class:`UserError` when one of them is missing or not one publication."""
    from serving.index import index_set  # (faiss is imported only when an index is read)

    checkpoint = Path(workdir) / ENCODER_CHECKPOINT
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint} not found: no trained DashCLIP model to encode products with "
                        f"(run python -m embeddings.train --workdir {workdir})")
    return {**published_export(workdir).verify(), **index_set(workdir).verify(),
            ENCODER_CHECKPOINT: file_sha256(checkpoint)}


def current_added(workdir: str | Path) -> dict[str, Any] | None:
    """The added set's manifest when one is published and made from the current export, index and
    DashCLIP checkpoint; None when none is published. A set made from other files (an export,
    index or checkpoint published since) is a one-line :class:`UserError` naming the file."""
    out = added_set(workdir)
    if out.manifest() is None:
        return None
    out.verify()
    manifest = out.manifest() or {}
    made_from = manifest.get("made_from", {}).get("inputs", {})
    for rel, digest in added_inputs(workdir).items():
        if made_from.get(rel) != digest:
            raise UserError(f"{out.manifest_path} was made from another {Path(workdir) / rel} (published since): "
                            f"run python -m serving.add_products --workdir {workdir} --catalog FILE again (it "
                            f"encodes the products added before anew), or delete {out.manifest_path} to serve the "
                            f"export alone")
    return manifest
