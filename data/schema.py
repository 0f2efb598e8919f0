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

Beyond columns and dtypes the contract asks for usable values: ``dense_*`` values finite (no NaN
or +/-inf, also after the cast to float32); every ``query`` (relevance and impressions) keeps at
least one character under :func:`data.text.normalize_query` (a query of only emoji, punctuation
or whitespace would become the key ``""``: rejected, not mapped to the unknown query, since a
query table needs a real text per key); every non-null ``image`` decodes. Whole tables must be
usable: the catalog has at least one product and the relevance table at least one MR or HR
label (the embeddings stage trains on positives); impressions and purchases may be empty (a
source without clicks, such as :mod:`data.adapters.fashion`, feeds the embeddings stage only).

:func:`validate` checks one table or one chunk of it (row checks); :func:`validate_tables` checks
the files a stage reads, whole-table rules included, streaming the large ones; stages call it
before they delete or overwrite anything. Both raise :class:`SchemaError`, whose one-line
message names the file, the column and the offending row (0-based, counted from the start of
the file) or value; it is a :class:`~common.cli.UserError`, so a command prints it and exits 2.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.cli import UserError
from data.text import normalize_query

if TYPE_CHECKING:
    from PIL import Image

SCHEMA_VERSION = 1

TableName = Literal["catalog", "relevance", "impressions", "purchases"]
TABLE_NAMES: tuple[TableName, ...] = ("catalog", "relevance", "impressions", "purchases")
TIMESTAMP = pa.timestamp("s")

IR, MR, HR = 0, 1, 2
LABEL_NAMES = {IR: "IR", MR: "MR", HR: "HR"}

DENSE_PREFIX = "dense_"
SPARSE_PREFIX = "sparse_"

# Rows per batch when validate_tables streams a table (memory stays bounded on large tables).
STREAM_ROWS = 1 << 18


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
    """``DIR/data/<name>.parquet``."""
    return Path(workdir) / "data" / f"{name}.parquet"


class SchemaError(UserError, ValueError):
    """A table does not meet the contract; the one-line message names file, column and row/value."""

    def __init__(self, path: str | Path, column: str | None, problem: str):
        self.path, self.column, self.problem = str(path), column, " ".join(problem.splitlines())
        where = f"{self.path}: column '{column}'" if column else self.path
        super().__init__(f"{where}: {self.problem}")


# dtype families: a user's int32 product_id or large_string title is fine; a float id is not.
_FAMILY: dict[str, Callable[[pa.DataType], bool]] = {
    "int": pa.types.is_integer,
    "float": pa.types.is_floating,
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    "timestamp": pa.types.is_timestamp,
}

# A query holding one of these characters keeps it under normalize_query (ASCII is untouched by
# NFKC and lower-casing, and the punctuation filter keeps word characters and & ' % . -).
_SURELY_NONEMPTY_QUERY = r"[A-Za-z0-9_&'%.-]"

# Why a table must not be empty, for the tables that never may be.
_NONEMPTY_REASON: dict[str, str] = {
    "catalog": "every stage needs at least one product",
    "relevance": "the embeddings stage trains on labelled query-product pairs",
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


def _first_row(mask: pa.Array | pa.ChunkedArray | np.ndarray) -> int:
    """Index of the first true value of a boolean mask (which has one)."""
    values = mask if isinstance(mask, np.ndarray) else mask.to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(np.asarray(values, dtype=bool))[0])


def _family_known(dtype: pa.DataType) -> bool:
    return any(test(dtype) for test in _FAMILY.values())


def _check_nulls(path: str | Path, table: pa.Table, name: str, first_row: int) -> None:
    col = table.column(name)
    if col.null_count:
        row = first_row + _first_row(pc.is_null(col))
        raise SchemaError(path, name, f"null at row {row}; this column must not be null")


def _check_in_set(path: str | Path, table: pa.Table, name: str, allowed: set[int], what: str,
                  first_row: int) -> None:
    values = table.column(name).to_numpy(zero_copy_only=False)
    bad = ~np.isin(values, list(allowed))
    if bad.any():
        row = _first_row(bad)
        raise SchemaError(path, name, f"value {values[row].item()!r} at row {first_row + row} is not a valid "
                                      f"{what} (expected one of {sorted(allowed)})")


def _check_known_products(path: str | Path, table: pa.Table, catalog_ids: np.ndarray, first_row: int) -> None:
    ids = table.column("product_id").to_numpy(zero_copy_only=False)
    bad = ~np.isin(ids, catalog_ids)
    if bad.any():
        row = _first_row(bad)
        raise SchemaError(path, "product_id", f"product_id {ids[row]} at row {first_row + row} is not in the catalog")


def _check_unique_products(path: str | Path, table: pa.Table, first_row: int) -> None:
    ids = table.column("product_id").to_numpy(zero_copy_only=False)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        row = int(np.flatnonzero(ids == dup)[1])
        raise SchemaError(path, "product_id", f"duplicate product_id {dup} at row {first_row + row}")


def _check_queries(path: str | Path, table: pa.Table, first_row: int) -> None:
    """Reject a query that normalises to ``""``; only queries without an ASCII word character are normalised."""
    queries = table.column("query")
    suspect = pc.invert(pc.match_substring_regex(queries, _SURELY_NONEMPTY_QUERY))
    if not pc.any(suspect).as_py():
        return
    empty = [q for q in pc.unique(queries.filter(suspect)).to_pylist() if not normalize_query(q)]
    if empty:
        row = _first_row(pc.is_in(queries, value_set=pa.array(empty, queries.type)))
        raise SchemaError(path, "query", f"query {queries[row].as_py()!r} at row {first_row + row} normalises to the "
                                         f"empty string (data.text.normalize_query keeps letters, digits and "
                                         f"& ' % . -); drop the row or give it a real query")


def _check_features(path: str | Path, table: pa.Table, first_row: int) -> tuple[list[str], dict[str, pa.DataType]]:
    """Dense features numeric, sparse features non-negative integer ids, none null.

    Returns (dense feature columns, their casts and the sparse ones)."""
    dense, sparse = feature_columns(table.column_names)
    casts: dict[str, pa.DataType] = {}
    for feat in dense:
        dtype = table.schema.field(feat).type
        if not pa.types.is_floating(dtype) and not pa.types.is_integer(dtype):
            raise SchemaError(path, feat, f"dense feature must be numeric, got {dtype}")
        _check_nulls(path, table, feat, first_row)
        casts[feat] = pa.float32()
    for feat in sparse:
        _check_sparse(path, table, feat, first_row)
        casts[feat] = pa.int64()
    return dense, casts


def _check_sparse(path: str | Path, table: pa.Table, feat: str, first_row: int) -> None:
    if not pa.types.is_integer(table.schema.field(feat).type):
        raise SchemaError(path, feat, f"sparse feature must be an integer id, got {table.schema.field(feat).type}")
    _check_nulls(path, table, feat, first_row)
    neg = pc.less(table.column(feat), 0)
    if pc.any(neg).as_py():
        row = _first_row(neg)
        raise SchemaError(path, feat, f"negative id {table.column(feat)[row].as_py()} at row {first_row + row}")


def _check_finite(path: str | Path, raw: pa.Table, cast: pa.Table, feat: str, first_row: int) -> None:
    """Dense values must be finite float32 numbers (checked after the cast, which turns 1e39 into inf)."""
    bad = pc.invert(pc.is_finite(cast.column(feat)))
    if pc.any(bad).as_py():
        row = _first_row(bad)
        raise SchemaError(path, feat, f"value {raw.column(feat)[row].as_py()!r} at row {first_row + row} is not a "
                                      f"finite float32 (dense features must not be NaN or +/-inf)")


def load_image(blob: bytes, *, draft: bool = False) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) into an RGB PIL image.

    ``draft=True`` lets a JPEG decode at reduced scale (every byte is still read, so truncation
    is still caught): the cheap form for checking. Raises ``ValueError`` with a one-line reason.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as img:
            if draft:
                img.draft("RGB", (1, 1))
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image (expected PNG or JPEG bytes)") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"corrupt image data ({exc})") from None


def check_catalog_images(table: pa.Table, path: str | Path, *, first_row: int = 0) -> None:
    """Decode every non-null ``image`` of a catalog table; the first that fails raises :class:`SchemaError`
    naming its row and product_id. The one check that loops over rows in Python."""
    offset = first_row
    for batch in table.select(["product_id", "image"]).to_batches():
        pids, images = batch.column(0), batch.column(1)
        for i in np.flatnonzero(images.is_valid().to_numpy(zero_copy_only=False)):
            try:
                load_image(images[i].as_py(), draft=True)
            except ValueError as exc:
                raise SchemaError(path, "image", f"unreadable image at row {offset + i} "
                                                 f"(product_id {pids[i].as_py()}): {exc}") from None
        offset += batch.num_rows


def _check_required(path: str | Path, table: pa.Table, name: TableName, first_row: int) -> dict[str, pa.DataType]:
    """Required columns present, of the right dtype family, without nulls. Returns the casts still needed."""
    casts: dict[str, pa.DataType] = {}
    for col in COLUMNS[name]:
        if col.name not in table.column_names:
            raise SchemaError(path, col.name, f"missing required column (expected {col.dtype}); "
                                              f"found columns {table.column_names}")
        actual = table.schema.field(col.name).type
        if not _family_known(actual) or _family(actual) != _family(col.dtype):
            raise SchemaError(path, col.name, f"expected dtype {col.dtype}, got {actual}")
        if not col.nullable:
            _check_nulls(path, table, col.name, first_row)
        if actual != col.dtype:
            casts[col.name] = col.dtype
    return casts


def _cast(path: str | Path, table: pa.Table, casts: dict[str, pa.DataType]) -> pa.Table:
    for col_name, dtype in casts.items():
        idx = table.column_names.index(col_name)
        try:
            table = table.set_column(idx, pa.field(col_name, dtype), table.column(col_name).cast(dtype))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(path, col_name, f"cannot convert to {dtype}: {exc}") from None
    return table


def validate(table: pa.Table, path: str | Path, name: TableName, *, catalog_ids: np.ndarray | None = None,
             check_images: bool = True, first_row: int = 0) -> pa.Table:
    """Check ``table`` (read from ``path``, or a chunk of it starting at row ``first_row``) against
    the contract of table ``name``.

    Checks: required columns present, dtype families, no nulls where none are allowed,
    ``label`` in {0,1,2}, ``clicked`` in {0,1}, queries that keep a character under
    normalize_query, unique catalog ``product_id``, feature column dtypes, finite dense values,
    product ids known to the catalog (when ``catalog_ids`` is given) and decodable images.
    Row checks only: an empty table passes (see :func:`validate_tables` for whole-table rules).
    Returns the table cast to the canonical dtypes. Raises :class:`SchemaError`.
    """
    if name not in COLUMNS:
        raise ValueError(f"unknown table {name!r}; expected one of {TABLE_NAMES}")
    casts = _check_required(path, table, name, first_row)
    dense: list[str] = []
    if name == "impressions":
        dense, feature_casts = _check_features(path, table, first_row)
        casts.update(feature_casts)
        _check_in_set(path, table, "clicked", {0, 1}, "click flag", first_row)
    if name == "relevance":
        _check_in_set(path, table, "label", {IR, MR, HR}, "relevance label", first_row)
    if name in ("relevance", "impressions"):
        _check_queries(path, table, first_row)
    if name == "catalog":
        _check_unique_products(path, table, first_row)
        if check_images:
            check_catalog_images(table, path, first_row=first_row)
    if catalog_ids is not None and name in ("relevance", "impressions", "purchases"):
        _check_known_products(path, table, catalog_ids, first_row)
    out = _cast(path, table, casts)
    for feat in dense:
        _check_finite(path, table, out, feat, first_row)
    return out


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn Arrow's errors on a corrupt or non-Parquet file into one :class:`SchemaError` line."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(path, None, f"not a readable Parquet file: {exc}") from None


def existing_table_path(workdir: str | Path, name: TableName) -> Path:
    """``DIR/data/<name>.parquet``; a one-line :class:`SchemaError` naming it when it is missing."""
    path = table_path(workdir, name)
    if not path.is_file():
        raise SchemaError(path, None, f"missing table file (expected the {name} table; run `python -m data.synth` "
                                      f"or an adapter first)")
    return path


def _parquet_file(workdir: str | Path, name: TableName) -> pq.ParquetFile:
    path = existing_table_path(workdir, name)
    with _reading(path):
        return pq.ParquetFile(path)


def read_table(workdir: str | Path, name: TableName, *, columns: list[str] | None = None,
               validate_table: bool = True, catalog_ids: np.ndarray | None = None,
               check_images: bool = False) -> pa.Table:
    """Read ``DIR/data/<name>.parquet`` whole (validated by :func:`validate` unless told otherwise or
    only some ``columns`` are read; those must exist)."""
    path = table_path(workdir, name)
    parquet = _parquet_file(workdir, name)
    found = parquet.schema_arrow.names
    for column in columns or ():
        if column not in found:
            raise SchemaError(path, column, f"missing column; found columns {found}")
    with _reading(path):
        table = parquet.read(columns=columns)
    if validate_table and columns is None:
        table = validate(table, path, name, catalog_ids=catalog_ids, check_images=check_images)
    return table


def _require_rows(path: Path, name: TableName, rows: int, reason: str) -> None:
    if rows == 0:
        raise SchemaError(path, None, f"the {name} table is empty (0 rows); {reason}")


def _batches(parquet: pq.ParquetFile, path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """The file's rows as tables of up to ``batch_rows`` rows (read errors become :class:`SchemaError`)."""
    with _reading(path):
        batches = parquet.iter_batches(batch_size=batch_rows)
    while True:
        with _reading(path):
            batch = next(batches, None)
        if batch is None:
            return
        yield pa.Table.from_batches([batch])


def _validate_streamed(workdir: str | Path, name: TableName, catalog_ids: np.ndarray, batch_rows: int) -> int:
    """Validate a table batch by batch (rows numbered from the file's start); return its row count.

    The relevance table must also hold an MR or HR label."""
    path = table_path(workdir, name)
    parquet = _parquet_file(workdir, name)
    validate(parquet.schema_arrow.empty_table(), path, name)  # columns and dtypes, even of an empty file
    rows = positives = 0
    for batch in _batches(parquet, path, batch_rows):
        table = validate(batch, path, name, catalog_ids=catalog_ids, first_row=rows)
        rows += table.num_rows
        if name == "relevance":
            positives += pc.sum(pc.greater_equal(table.column("label"), MR)).as_py() or 0
    if name == "relevance":
        _require_rows(path, name, rows, _NONEMPTY_REASON[name])
        if not positives:
            raise SchemaError(path, "label", f"no MR ({MR}) or HR ({HR}) label in its {rows} rows; the embeddings "
                                             f"stage trains on relevant (positive) query-product pairs")
    return rows


def validate_tables(workdir: str | Path, names: Iterable[TableName] = TABLE_NAMES, *, check_images: bool = True,
                    require_rows: Iterable[TableName] = (), batch_rows: int = STREAM_ROWS) -> dict[TableName, int]:
    """Validate the tables a stage reads, before it deletes or overwrites anything; return their row counts.

    The catalog is always validated (read whole, images decoded when ``check_images``), as the
    other tables' product ids are checked against it, and must hold at least one product. The
    other tables in ``names`` are streamed in batches of ``batch_rows`` rows. The relevance
    table must hold at least one MR or HR label; impressions and purchases may be empty (a
    source without clicks feeds the embeddings stage only) unless named in ``require_rows``.
    Raises :class:`SchemaError` naming the file, the column and the row or value.
    """
    required = set(require_rows)
    wanted = set(names) | required
    unknown = wanted - set(TABLE_NAMES)
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; expected some of {TABLE_NAMES}")
    catalog = read_table(workdir, "catalog", check_images=check_images)
    _require_rows(table_path(workdir, "catalog"), "catalog", catalog.num_rows, _NONEMPTY_REASON["catalog"])
    ids = catalog.column("product_id").to_numpy()
    counts: dict[TableName, int] = {"catalog": catalog.num_rows}
    for name in TABLE_NAMES[1:]:
        if name in wanted:
            counts[name] = _validate_streamed(workdir, name, ids, batch_rows)
            if name in required:
                _require_rows(table_path(workdir, name), name, counts[name], "this stage needs its rows")
    return counts


def validate_workdir(workdir: str | Path, check_images: bool = True) -> dict[TableName, int]:
    """Validate all four tables of a workdir (:func:`validate_tables` of every table). Returns row counts."""
    return validate_tables(workdir, TABLE_NAMES, check_images=check_images)
