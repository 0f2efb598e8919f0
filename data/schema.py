"""The on-disk contract: the four tables every stage reads, and one validator.

A user's own data must meet these column names and dtypes. Each table is a Parquet file under
``DIR/data/``:

``catalog.parquet``: one row per product.
    ========== ================ ======== ==================================================
    column     dtype            nullable meaning
    ========== ================ ======== ==================================================
    product_id int64            no       unique product key
    title      string           no       listing title as shown to shoppers
    aisle      string           no       aisle category (the paper's "aisle")
    image      binary           yes      encoded image bytes (PNG/JPEG); null = title only
    brand      string           yes      brand name
    ========== ================ ======== ==================================================
    Other columns (product_type, variant, container, size, price, ...) are allowed and kept.

``relevance.parquet``: query-product relevance labels.
    query (string), product_id (int64), label (int8 in {0 IR, 1 MR, 2 HR}).

``impressions.parquet``: one row per ad candidate shown in a search session.
    ts (timestamp[s]), session_id (int64), user_id (int64), query (string), product_id (int64),
    position (int32, 0 = top), clicked (int8 in {0, 1}), then the existing ranking features:
    every column named ``dense_<name>`` is a float32 dense feature and every column named
    ``sparse_<name>`` is an int64 categorical id (>= 0). Their sets are free; the ranking
    stage discovers them from these prefixes.

``purchases.parquet``: ts (timestamp[s]), user_id (int64), product_id (int64).

:func:`validate` checks a table and raises :class:`SchemaError`, whose message names the
file, the column and the offending row (0-based) or value.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

TableName = Literal["catalog", "relevance", "impressions", "purchases"]
TABLE_NAMES: tuple[TableName, ...] = ("catalog", "relevance", "impressions", "purchases")
TIMESTAMP = pa.timestamp("s")

IR, MR, HR = 0, 1, 2
LABEL_NAMES = {IR: "IR", MR: "MR", HR: "HR"}

DENSE_PREFIX = "dense_"
SPARSE_PREFIX = "sparse_"


@dataclass(frozen=True)
class Column:
    """A required column: name, canonical dtype, whether nulls are allowed."""

    name: str
    dtype: pa.DataType
    nullable: bool = False


COLUMNS: dict[str, tuple[Column, ...]] = {
    "catalog": (
        Column("product_id", pa.int64()),
        Column("title", pa.string()),
        Column("aisle", pa.string()),
        Column("image", pa.binary(), nullable=True),
        Column("brand", pa.string(), nullable=True),
    ),
    "relevance": (
        Column("query", pa.string()),
        Column("product_id", pa.int64()),
        Column("label", pa.int8()),
    ),
    "impressions": (
        Column("ts", TIMESTAMP),
        Column("session_id", pa.int64()),
        Column("user_id", pa.int64()),
        Column("query", pa.string()),
        Column("product_id", pa.int64()),
        Column("position", pa.int32()),
        Column("clicked", pa.int8()),
    ),
    "purchases": (
        Column("ts", TIMESTAMP),
        Column("user_id", pa.int64()),
        Column("product_id", pa.int64()),
    ),
}


def schema(name: TableName, extra: Iterable[pa.Field] = ()) -> pa.Schema:
    """The canonical pyarrow schema of table ``name`` (required columns, then ``extra``)."""
    fields = [pa.field(c.name, c.dtype, nullable=c.nullable) for c in COLUMNS[name]]
    return pa.schema(fields + list(extra))


def table_path(workdir: str | Path, name: TableName) -> Path:
    return Path(workdir) / "data" / f"{name}.parquet"


class SchemaError(ValueError):
    """A table does not meet the contract; the message names file, column and row/value."""

    def __init__(self, path: str | Path, column: str | None, problem: str):
        self.path, self.column, self.problem = str(path), column, problem
        where = f"{self.path}: column '{column}'" if column else self.path
        super().__init__(f"{where}: {problem}")


# dtype families: a user's int32 product_id or large_string title is fine; a float id is not.
_FAMILY: dict[str, Callable[[pa.DataType], bool]] = {
    "int": pa.types.is_integer,
    "float": pa.types.is_floating,
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    "timestamp": pa.types.is_timestamp,
}


def _family(dtype: pa.DataType) -> str:
    for fam, test in _FAMILY.items():
        if test(dtype):
            return fam
    raise ValueError(f"no family for {dtype}")


def feature_columns(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split impression column names into (dense feature columns, sparse feature columns)."""
    names = list(names)
    return ([n for n in names if n.startswith(DENSE_PREFIX)], [n for n in names if n.startswith(SPARSE_PREFIX)])


def _first_row(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _family_known(dtype: pa.DataType) -> bool:
    return any(test(dtype) for test in _FAMILY.values())


def _check_nulls(path: str | Path, table: pa.Table, name: str) -> None:
    col = table.column(name)
    if col.null_count:
        row = _first_row(pc.is_null(col))
        raise SchemaError(path, name, f"null at row {row}; this column must not be null")


def _check_in_set(path: str | Path, table: pa.Table, name: str, allowed: set[int], what: str) -> None:
    values = table.column(name).to_numpy(zero_copy_only=False)
    bad = ~np.isin(values, list(allowed))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SchemaError(path, name, f"value {values[row].item()!r} at row {row} is not a valid {what} "
                                      f"(expected one of {sorted(allowed)})")


def _check_known_products(path: str | Path, table: pa.Table, catalog_ids: np.ndarray) -> None:
    ids = table.column("product_id").to_numpy(zero_copy_only=False)
    bad = ~np.isin(ids, catalog_ids)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SchemaError(path, "product_id", f"product_id {ids[row]} at row {row} is not in the catalog")


def _check_images(path: str | Path, table: pa.Table) -> None:
    from PIL import Image

    images = table.column("image")
    for row, blob in enumerate(images.to_pylist()):
        if blob is None:
            continue
        try:
            with Image.open(io.BytesIO(blob)) as img:
                img.verify()
        except Exception as exc:  # PIL raises many types for corrupt data
            pid = table.column("product_id")[row].as_py()
            raise SchemaError(path, "image", f"unreadable image at row {row} (product_id {pid}): {exc}") from None


def validate(table: pa.Table, path: str | Path, name: TableName, *,
             catalog_ids: np.ndarray | None = None, check_images: bool = True) -> pa.Table:
    """Check ``table`` (read from ``path``) against the contract of table ``name``.

    Checks: required columns present, dtype families, no nulls where none are allowed,
    ``label`` in {0,1,2}, ``clicked`` in {0,1}, unique catalog ``product_id``, feature column dtypes,
    product ids known to the catalog (when ``catalog_ids`` is given) and decodable images.
    Returns the table cast to the canonical dtypes. Raises :class:`SchemaError`.
    """
    if name not in COLUMNS:
        raise ValueError(f"unknown table {name!r}; expected one of {TABLE_NAMES}")
    casts: dict[str, pa.DataType] = {}
    for col in COLUMNS[name]:
        if col.name not in table.column_names:
            raise SchemaError(path, col.name, f"missing required column (expected {col.dtype}); "
                                              f"found columns {table.column_names}")
        actual = table.schema.field(col.name).type
        if not _family_known(actual) or _family(actual) != _family(col.dtype):
            raise SchemaError(path, col.name, f"expected dtype {col.dtype}, got {actual}")
        if not col.nullable:
            _check_nulls(path, table, col.name)
        if actual != col.dtype:
            casts[col.name] = col.dtype
    if name == "impressions":
        dense, sparse = feature_columns(table.column_names)
        for feat in dense:
            if not pa.types.is_floating(table.schema.field(feat).type) and not pa.types.is_integer(table.schema.field(feat).type):
                raise SchemaError(path, feat, f"dense feature must be numeric, got {table.schema.field(feat).type}")
            _check_nulls(path, table, feat)
            casts[feat] = pa.float32()
        for feat in sparse:
            if not pa.types.is_integer(table.schema.field(feat).type):
                raise SchemaError(path, feat, f"sparse feature must be an integer id, got {table.schema.field(feat).type}")
            _check_nulls(path, table, feat)
            neg = pc.less(table.column(feat), 0)
            if pc.any(neg).as_py():
                row = _first_row(neg)
                raise SchemaError(path, feat, f"negative id {table.column(feat)[row].as_py()} at row {row}")
            casts[feat] = pa.int64()
        _check_in_set(path, table, "clicked", {0, 1}, "click flag")
    if name == "relevance":
        _check_in_set(path, table, "label", {IR, MR, HR}, "relevance label")
    if name == "catalog":
        ids = table.column("product_id").to_numpy(zero_copy_only=False)
        uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][0]
            row = int(np.flatnonzero(ids == dup)[1])
            raise SchemaError(path, "product_id", f"duplicate product_id {dup} at row {row}")
        if check_images:
            _check_images(path, table)
    if catalog_ids is not None and name in ("relevance", "impressions", "purchases"):
        _check_known_products(path, table, catalog_ids)
    for col_name, dtype in casts.items():
        idx = table.column_names.index(col_name)
        try:
            table = table.set_column(idx, pa.field(col_name, dtype), table.column(col_name).cast(dtype))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(path, col_name, f"cannot convert to {dtype}: {exc}") from None
    return table


def read_table(workdir: str | Path, name: TableName, *, columns: list[str] | None = None,
               validate_table: bool = True, catalog_ids: np.ndarray | None = None,
               check_images: bool = False) -> pa.Table:
    """Read ``DIR/data/<name>.parquet`` (validated unless told otherwise)."""
    path = table_path(workdir, name)
    if not path.exists():
        raise SchemaError(path, None, f"missing table file (expected the {name} table; run `python -m data.synth` "
                                      f"or an adapter first)")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(path, None, f"not a readable Parquet file: {exc}") from None
    if validate_table and columns is None:
        table = validate(table, path, name, catalog_ids=catalog_ids, check_images=check_images)
    return table


def validate_workdir(workdir: str | Path, check_images: bool = True) -> dict[str, int]:
    """Validate all four tables of a workdir (ids checked against the catalog). Returns row counts."""
    catalog = read_table(workdir, "catalog", check_images=check_images)
    ids = catalog.column("product_id").to_numpy()
    counts = {"catalog": catalog.num_rows}
    for name in ("relevance", "impressions", "purchases"):
        counts[name] = read_table(workdir, name, catalog_ids=ids).num_rows
    return counts
