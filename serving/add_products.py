"""New products without retraining: encode them with DashCLIP and serve them, as one atomic update.

``python -m serving.add_products --workdir DIR --catalog new.parquet [--replace] [--threads 1] [--batch-size 64]``

``--catalog`` is a file of the catalog schema (:mod:`data.schema`: ``product_id``, ``title``,
``aisle``, ``image`` (null = title only), ``brand``, any other columns), validated with
``data.schema.validate`` including image decoding. Its products are encoded by the trained DashCLIP
model (``embeddings.encode.load_encoder(DIR, "trained")``, the checkpoint that made the exported
tables) and published, with every product added before, as the *added set*
(:func:`serving.published.added_set`, manifest ``DIR/serving/added.manifest.json``):

``serving/added/model.pt``
    The served fused model with the added products' rows in its product table: the export's
    TorchScript model traced and scripted again (:func:`serving.export.fused_model`, the export's
    ``--table-dtype``) from the ranking checkpoint with the product table grown
    (:func:`grown_model`): new products appended, replaced ones overwritten; every other weight is
    the checkpoint's. Checked before anything is published: on the export's parity impressions the
    new file scores like the eager grown model (max |logit diff| <= 1e-5), also with every added
    product as the candidate, and like the export's ``model.pt`` wherever no added product is
    involved (``parity`` in the manifest).
``serving/added/product_ids.parquet``
    The id map of that table (the export's rows unchanged, then the new products).
``serving/added/product_features.parquet``
    The export's per-product features plus the added products'. A product-level feature
    (``features.product`` of the export manifest, :mod:`serving.funnel`) is read from the catalog
    column of the same name (``dense_price``, ``sparse_aisle``, ...; non-null, dense values within
    the training mean +- 1000 stds the service accepts, integer ids >= 0) when the catalog has it;
    else a replaced product keeps its value and a new product takes the feature's default (dense:
    training mean; sparse: the id reserved for unseen ids).
``serving/added/index.faiss``, ``index_ids.npy``
    The product index with the added products (:func:`serving.index.index_with`).
``serving/added/products.parquet``
    The record of the added products: ``product_id``, ``title``, ``aisle``, ``image``, ``brand``,
    ``vector`` and the product-level feature columns.

Why the table is rewritten inside the model: the fused TorchScript file holds its tables as
frozen weights, and its graph carries the table's row count as a constant (rows beyond it are
read as row 0), so a grown table needs the model traced again; the alternative, serving the
vectors model (``model_vectors.pt``) with the tables as tensors passed in, would change the path
``POST /score`` serves (and drop the ``--table-dtype`` tables). Tracing again keeps that path, and
``/score`` still gives the export's scores to the last bit for every product served before
(``parity.export_max_abs_diff``, 0.0 on the tiny and demo models). It costs seconds per update:
adding 20 products to the demo model took 46 s of wall time and 25 s of CPU on the shared 2-core
machine, most of it importing torch and torchrec and loading the DashCLIP encoder and the ranking
checkpoint; tracing, scripting and the parity check take a few seconds.

A product id the export or an earlier update serves is refused unless ``--replace``. The added set
is made from the export, the product index and the DashCLIP checkpoint; once one of them is
published again, the set no longer applies (the service refuses it) and the next run encodes the
products added before anew. The set is published with :class:`common.provenance.OutputSet`: the
service (a file watch, :mod:`serving.server`) sees the old files or the new ones, never a mix.
Bad input (a catalog that fails the schema, an image that does not decode, an encoder whose
vectors do not have the served table's dimension, an id already served) is one ``error:`` line
naming the file, column or field, exit 2, and nothing served changes. Same inputs, same bytes
(``PYTHONHASHSEED=0``, as for ``serving.export``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from common.cli import (DEFAULT_WORKDIR, UserError, check_config, parse_config, resolve_threads, run_main,
                        threads_field, with_fixed_hash_seed)
from common.io import read_json, write_parquet
from common.provenance import MadeFrom
from data import schema
from embeddings import tables
from embeddings.encode import load_encoder
from embeddings.keys import TableKeys
from ranking.features import ImpressionCache, RankingData
from ranking.model import RankingModel, load_model, model_from_state
from ranking.spec import FeatureSpec, PurchaseIndex
from ranking.tables import PRODUCT_TABLE
from ranking.variants import get_variant
from serving.export import PARITY_TOLERANCE, fused_model, save_script, script
from serving.index import index_set, index_with, write_index_files
from serving.published import ADDED_FILES, ENCODER_CHECKPOINT, added_inputs, added_set, read_id_map, write_id_map
from serving.requests import DENSE_MAX_Z, dense_bounds

log = logging.getLogger("serving.add_products")

ADDED_FORMAT = 1
RECORD_COLUMNS = ("product_id", "title", "aisle", "image", "brand")
PRODUCT_WEIGHT = f"table_tower.tables.ebc.embedding_bags.{PRODUCT_TABLE}.weight"


@dataclass
class AddProductsConfig:
    """Encode new products with the trained DashCLIP model and serve them without retraining."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory (needs serving.export and "
                                                                    "serving.index)"})
    catalog: str = field(default="", metadata={"help": "Parquet file of the catalog schema with the products"})
    replace: bool = field(default=False, metadata={"help": "replace products that are already served"})
    threads: int = threads_field()
    batch_size: int = field(default=64, metadata={"help": "products per encoder batch", "min": 1})


def read_catalog(path: Path) -> pa.Table:
    """The catalog file validated with ``data.schema.validate`` (images decoded); at least one product."""
    if not path.is_file():
        raise UserError(f"--catalog {path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file: {exc}") from None
    try:
        table = schema.validate(table, path, "catalog", check_images=True)
    except schema.SchemaError as exc:
        raise UserError(str(exc)) from None
    if table.num_rows == 0:
        raise UserError(f"{path}: no products (0 rows)")
    return table


def feature_values(catalog: pa.Table, path: Path, product_split: list[dict[str, Any]], known: pa.Table,
                   bounds: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Each product-level feature column for the catalog's products: the catalog's column of that name
    (checked; a dense value within ``bounds[column]``, what the service accepts), else the value
    ``known`` (the served per-product features) has, else the default."""
    ids = catalog.column("product_id").to_numpy()
    known_ids = known.column("product_id").to_numpy()
    pos = np.clip(np.searchsorted(known_ids, ids), 0, max(len(known_ids) - 1, 0))
    found = known_ids[pos] == ids if len(known_ids) else np.zeros(len(ids), bool)
    out = {}
    for entry in product_split:
        column, dense = entry["column"], entry["kind"] == "dense"
        dtype = np.float32 if dense else np.int64
        if column in catalog.column_names:
            values = catalog.column(column)
            if values.null_count:
                row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
                raise UserError(f"{path}: column '{column}': null at row {row}; a product-level feature needs a "
                                f"value (or leave the column out for the default, {entry['default']:g})")
            numeric = pa.types.is_integer(values.type) or (dense and pa.types.is_floating(values.type))
            if not numeric:
                raise UserError(f"{path}: column '{column}': expected {'a number' if dense else 'an integer id'}, "
                                f"got {values.type}")
            array = values.to_numpy().astype(dtype)
            low, high = bounds.get(column, (0, np.iinfo(np.int64).max))
            bad = ~((array >= low) & (array <= high))
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                wanted = f"within {low:.6g}..{high:.6g} (training mean +- {DENSE_MAX_Z:g} stds)" if dense \
                    else "an id >= 0"
                raise UserError(f"{path}: column '{column}': value {values[row].as_py()!r} at row {row} is not "
                                f"{wanted}")
            out[column] = array
        else:
            default = np.full(len(ids), entry["default"], dtype)
            out[column] = np.where(found, known.column(column).to_numpy()[pos], default) if len(known_ids) \
                else default
    return out


def grown_model(model: RankingModel, product_ids: np.ndarray, vectors: np.ndarray) -> RankingModel:
    """``model`` with products ``product_ids [M]`` (vectors ``[M, d]``) in its product table: a product
    the table holds gets its row overwritten, a new one a row appended (in order). Every other weight,
    and every other row, is ``model``'s."""
    spec = model.spec
    rows = spec.product_rows(product_ids)
    new = rows == tables.UNKNOWN_ROW
    state = model.state_dict()
    weight = state[PRODUCT_WEIGHT].clone()
    weight[torch.from_numpy(rows[~new])] = torch.from_numpy(vectors[~new])
    state[PRODUCT_WEIGHT] = torch.cat([weight, torch.from_numpy(vectors[new])])
    grown_spec = spec.with_keys(TableKeys("product", np.concatenate([spec.product_keys.values, product_ids[new]])),
                                spec.query_keys)
    variant = get_variant(model.variant)
    return model_from_state(variant, grown_spec, model.config, state).eval()


@torch.no_grad()
def parity(workdir: Path, parity_rows: int, reference: torch.nn.Module, served: torch.jit.ScriptModule,
           export_model: torch.jit.ScriptModule, spec: FeatureSpec, added_rows: np.ndarray) -> dict[str, Any]:
    """Max |logit diff| on the first ``parity_rows`` NW impressions between the new scripted model
    (``served``) and the eager ``reference``, as they are and with the candidates replaced by the
    added products (table rows ``added_rows``), and between ``served`` and the export's model
    where no added product is the candidate or in the purchase history."""
    cache = ImpressionCache.open(workdir)
    batch = RankingData(cache, PurchaseIndex.from_workdir(workdir), spec).batch(
        np.asarray(cache.split_index("eval"))[:parity_rows])
    inputs = batch.inputs()
    rows = torch.from_numpy(np.resize(added_rows, len(batch)))
    with_added = (inputs[0], inputs[1], rows, inputs[3], inputs[4])
    added = torch.from_numpy(added_rows)
    untouched = ~torch.isin(inputs[2], added) & ~torch.isin(inputs[4], added).any(dim=1)
    result = {"rows": len(batch), "tolerance": PARITY_TOLERANCE,
              "fused_max_abs_diff": float((served(*inputs) - reference(*inputs)).abs().max()),
              "added_products_max_abs_diff": float((served(*with_added) - reference(*with_added)).abs().max()),
              "unchanged_rows": int(untouched.sum()),
              "export_max_abs_diff": float((served(*inputs) - export_model(*inputs))[untouched].abs().max())
              if untouched.any() else 0.0}
    bad = {k: v for k, v in result.items() if k.endswith("max_abs_diff") and not v <= PARITY_TOLERANCE}
    if bad:
        raise UserError(f"parity check failed on {len(batch)} NW impressions: {bad} exceeds {PARITY_TOLERANCE:g}; "
                        f"nothing published")
    return result


def _vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """``vectors [M, d]`` as the tables' ``vector`` column (fixed_size_list<float32>[d])."""
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def _vectors(record: pa.Table) -> np.ndarray:
    """The ``vector`` column of a record as ``[M, d]`` float32."""
    column = record.column("vector").combine_chunks()
    return column.flatten().to_numpy().reshape(len(record), column.type.list_size).astype(np.float32)


def _record(previous: pa.Table | None, catalog: pa.Table, vectors: np.ndarray,
            features: dict[str, np.ndarray]) -> pa.Table:
    """The products added so far: ``previous`` without the catalog's ids, then the catalog's products."""
    new = pa.table({**{c: catalog.column(c) for c in RECORD_COLUMNS}, **{c: pa.array(v) for c, v in features.items()},
                    "vector": _vector_column(vectors)})
    if previous is None:
        return new
    kept = ~np.isin(previous.column("product_id").to_numpy(), catalog.column("product_id").to_numpy())
    return pa.concat_tables([previous.filter(pa.array(kept)).select(new.column_names).cast(new.schema), new])


def add_products(cfg: AddProductsConfig) -> dict[str, Any]:
    """Run the update (see the module docstring); returns the added set's manifest."""
    check_config(cfg)  # also when called with a config built in code
    workdir, path = Path(cfg.workdir), Path(cfg.catalog)
    if not cfg.catalog:
        raise UserError("--catalog FILE is required")
    catalog = read_catalog(path)
    torch.set_num_threads(resolve_threads(cfg.threads))

    inputs = added_inputs(workdir)  # the export, the index and the checkpoint, each one publication
    manifest = read_json(workdir / "serving" / "manifest.json")
    variant = get_variant(manifest["variant"])
    if variant.table_init != "pretrained":
        raise UserError(f"{workdir / 'serving/model.pt'}: variant {variant.name} has no DashCLIP product table "
                        f"(tables: {variant.table_init}); a new product has no row to add")
    if (index_set(workdir).manifest() or {})["made_from"]["inputs"].get(tables.embedding_table_rel("product")) != \
            manifest["source_tables"]["product"]["sha256"]:
        raise UserError(f"{workdir / 'serving/index.faiss'} was not built from the product table the served model "
                        f"was trained with: run python -m serving.index --workdir {workdir}")
    out = added_set(workdir)
    previous = None
    if out.manifest() is not None:
        out.verify()
        previous = pq.read_table(out.path(ADDED_FILES["products"]))
    previous_current = previous is not None and (out.manifest() or {})["made_from"]["inputs"] == inputs
    base_ids = read_id_map(workdir / "serving" / "product_ids.parquet", "product").values
    ids = catalog.column("product_id").to_numpy()
    served = np.union1d(base_ids, previous.column("product_id").to_numpy() if previous is not None else [])
    clash = np.flatnonzero(np.isin(ids, served))
    if len(clash) and not cfg.replace:
        raise UserError(f"{path}: column 'product_id': product_id {ids[clash[0]]} at row {clash[0]} is already "
                        f"served ({len(clash)} of the {len(ids)} products are); pass --replace to replace them")
    known = pq.read_table(workdir / ("serving/product_features.parquet" if previous is None
                                     else ADDED_FILES["product_features"]))
    spec = FeatureSpec.from_dict(manifest["feature_spec"])
    features = feature_values(catalog, path, manifest["features"]["product"], known,
                              dict(zip(spec.dense_names, dense_bounds(spec))))

    encoder = load_encoder(workdir, "trained", batch_size=cfg.batch_size)
    table_dim = int(manifest["feature_spec"]["table_dim"])
    if encoder.dim != table_dim:
        raise UserError(f"{workdir / ENCODER_CHECKPOINT}: vector dimension mismatch: the DashCLIP encoder makes "
                        f"{encoder.dim}-d vectors, the served product table (serving/model.pt) holds {table_dim}-d "
                        f"ones")
    made_by = (tables.tables_set(workdir).manifest() or {}).get("made_from", {}).get("inputs", {})
    if made_by.get(ENCODER_CHECKPOINT) != inputs[ENCODER_CHECKPOINT]:
        raise UserError(f"{workdir / ENCODER_CHECKPOINT} is not the DashCLIP checkpoint that made "
                        f"{tables.embedding_table_path(workdir, 'product')}: its vectors would not match the "
                        f"served ones")
    record = _record(previous, catalog, encoder.products(catalog.to_pandas()), features)
    if previous is not None and not previous_current:
        earlier = ~np.isin(record.column("product_id").to_numpy(), ids)
        log.info("%s was made from other files: encoding its %d products anew", out.manifest_path, int(earlier.sum()))
        vectors = _vectors(record)
        vectors[earlier] = encoder.products(record.filter(pa.array(earlier)).select(RECORD_COLUMNS).to_pandas())
        record = record.set_column(record.column_names.index("vector"), "vector", _vector_column(vectors))
    return _publish(workdir, manifest, record, inputs)


def _publish(workdir: Path, manifest: dict[str, Any], record: pa.Table, inputs: dict[str, str]) -> dict[str, Any]:
    """Build the added set's files from ``record`` (every product added so far), check the model and
    publish them as one set."""
    ids, vectors = record.column("product_id").to_numpy(), _vectors(record)
    base = load_model(workdir / manifest["checkpoint"]["path"])
    base_ids = base.spec.product_keys.values
    grown = grown_model(base, ids, vectors)
    reference = fused_model(grown, manifest["table_dtype"])
    export_features = pq.read_table(workdir / "serving" / "product_features.parquet")
    kept = ~np.isin(export_features.column("product_id").to_numpy(), ids)
    product_features = pa.concat_tables([export_features.filter(pa.array(kept)),
                                         record.select(export_features.column_names).cast(export_features.schema)])
    product_features = product_features.take(pc.sort_indices(product_features, [("product_id", "ascending")]))
    index, index_ids = index_with(workdir, ids, vectors)
    replaced = int(np.isin(ids, base_ids).sum())
    extra: dict[str, Any] = {
        "format": ADDED_FORMAT, "added_products": len(ids) - replaced, "replaced_products": replaced,
        "products": grown.spec.num_product_rows - 1, "export_model": manifest["files"]["model"]["sha256"],
        "index": {"kind": (index_set(workdir).manifest() or {}).get("kind", ""), "products": int(len(index_ids))}}
    with added_set(workdir).publish(MadeFrom(inputs, {"format": ADDED_FORMAT}), extra) as staged:
        paths = {key: staged[rel] for key, rel in ADDED_FILES.items()}
        save_script(script(reference), paths["model"])
        extra["parity"] = parity(workdir, int(manifest["settings"]["parity_rows"]), reference,
                                 torch.jit.load(str(paths["model"])), torch.jit.load(str(workdir / "serving/model.pt")),
                                 grown.spec, grown.spec.product_rows(ids))
        write_id_map(grown.spec.product_keys, paths["product_ids"])
        write_parquet(product_features, paths["product_features"])
        write_index_files(index, index_ids, paths["index"], paths["index_ids"])
        write_parquet(record, paths["products"])
    log.info("serving %d added and %d replaced products (%d in all; parity %s) from %s", extra["added_products"],
             replaced, extra["products"], extra["parity"], workdir / "serving" / "added")
    return added_set(workdir).manifest() or {}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return add_products(parse_config(AddProductsConfig, argv))


if __name__ == "__main__":
    with_fixed_hash_seed("serving.add_products")
    run_main(main)
