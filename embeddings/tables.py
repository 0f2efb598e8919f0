"""The frozen embedding tables: the file contract between ``embeddings/`` and ``ranking/``.

``DIR/embeddings/product_table.parquet``
    row_id (int64, 0..R-1, dense and sorted), product_id (int64, null on row 0),
    vector (fixed_size_list<float32>[d]).
``DIR/embeddings/query_table.parquet``
    row_id (int64), query (string, normalised with :func:`data.text.normalize_query`,
    null on row 0), vector (fixed_size_list<float32>[d]).

Files are written in row groups of :data:`ROW_GROUP_ROWS` rows (vectors uncompressed), which a
reader decodes one at a time into a single array; any layout of the same columns reads.
Row 0 of each table is reserved for unknown ids and is all zeros. The id maps (key -> row_id)
are the first two columns of each file; a reader holds them as :class:`embeddings.keys.TableKeys`
(:func:`read_table_keys`: one array, no Python object per key).
The file-level metadata records ``dashrec.kind`` (product/query), ``dashrec.dim`` and
``dashrec.source`` (which encoder produced the vectors).

Readers that keep a table for long, and in several processes, map its vectors instead of reading
them (:func:`mapped_table`: ``DIR/embeddings/mapped/<kind>-v1-<sha>.npy``, a plain cache keyed by
the file's SHA-256).

``embeddings.export`` publishes both files as one :class:`common.provenance.OutputSet`
(:func:`tables_set`, manifest ``DIR/embeddings/tables.manifest.json``). A reader calls
``tables_set(workdir).verify()``: it returns ``{relative path: sha256}`` of the two tables (the
reader's input fingerprints) or raises a one-line error when they are missing or not from the
same export.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.io import prepare_workdir, temp_sibling, write_parquet
from common.provenance import OutputSet
from data.schema import SchemaError
from embeddings.keys import UNKNOWN_ROW, TableKeys, TableKind

KEY_COLUMN: dict[str, str] = {"product": "product_id", "query": "query"}
ROW_GROUP_ROWS = 65_536  # rows per Parquet row group of a table file (64 MiB of 256-d vectors)
MAPPED_REL = "embeddings/mapped"  # the vectors of the table files as .npy files, for memory maps (mapped_table)
MAPPED_VERSION = 1


def embedding_table_rel(kind: TableKind) -> str:
    """``embeddings/<kind>_table.parquet``: the table's path relative to the workdir."""
    return f"embeddings/{kind}_table.parquet"


def embedding_table_path(workdir: str | Path, kind: TableKind) -> Path:
    return Path(workdir) / embedding_table_rel(kind)


def tables_set(workdir: str | Path) -> OutputSet:
    """The product and query tables of ``workdir``, published together by ``embeddings.export``."""
    return OutputSet(workdir, "embeddings/tables.manifest.json",
                     [embedding_table_rel("product"), embedding_table_rel("query")],
                     what="python -m embeddings.export")


@dataclass
class EmbeddingTable:
    """An in-memory frozen table. ``vectors`` is ``[R, d]`` float32 with row 0 = zeros."""

    kind: TableKind
    keys: TableKeys  # R rows, keys[0] (the unknown row's) is None
    vectors: np.ndarray
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def lookup(self, keys: Sequence | np.ndarray) -> np.ndarray:
        """Row ids for ``keys`` (unknown -> 0). Query keys are normalised first."""
        return self.keys.rows(keys)


def build_table(kind: TableKind, keys: Sequence | np.ndarray | pa.Array, vectors: np.ndarray,
                source: str = "") -> EmbeddingTable:
    """Prepend the zero row 0 to ``vectors`` ``[N, d]`` for ``keys`` (length N, unique; raw queries
    are normalised, an Arrow array of queries is taken as normalised). Vectors of ``[N + 1, d]``
    whose row 0 is zeros are taken as the whole table, without a copy (an encoder can write the
    rows of :func:`table_array` in place)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    with_unknown_row = vectors.ndim == 2 and vectors.shape[0] == len(keys) + 1 and not np.any(vectors[UNKNOWN_ROW])
    if vectors.ndim != 2 or not (vectors.shape[0] == len(keys) or with_unknown_row):
        raise ValueError(f"vectors must be [len(keys), d] (or [len(keys) + 1, d] with row 0 zeros), got "
                         f"{vectors.shape} for {len(keys)} keys")
    full = vectors if with_unknown_row else np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors])
    return EmbeddingTable(kind, TableKeys.from_keys(kind, keys), full, source)


def table_array(rows: int, dim: int) -> np.ndarray:
    """A zeroed ``[rows + 1, d]`` float32 table: row 0 stays the unknown row, ``[1:]`` is for the
    vectors of ``rows`` keys (see :func:`build_table`)."""
    return np.zeros((rows + 1, dim), np.float32)


def write_table(table: EmbeddingTable, path: str | Path) -> Path:
    """Write atomically in the documented layout."""
    dim = table.dim
    flat = pa.array(table.vectors.reshape(-1), type=pa.float32())
    arrow = pa.table({
        "row_id": pa.array(np.arange(len(table.keys), dtype=np.int64)),
        KEY_COLUMN[table.kind]: table.keys.to_arrow(),
        "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
    })
    arrow = arrow.replace_schema_metadata({"dashrec.kind": table.kind, "dashrec.dim": str(dim),
                                           "dashrec.source": table.source})
    # row groups bound what a reader decodes at once (read_embedding_table); float vectors do not
    # compress, so theirs are stored plain
    return write_parquet(arrow, path, row_group_size=ROW_GROUP_ROWS,
                         compression={"row_id": "snappy", KEY_COLUMN[table.kind]: "snappy", "vector": "none"})


def _open_table(path: Path, kind: TableKind | None) -> tuple[pq.ParquetFile, TableKind, dict[str, str]]:
    """The table file (its kind and metadata), its columns and row ids checked."""
    if not path.exists():
        raise SchemaError(path, None, "missing embedding table (run `python -m embeddings.export` first)")
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    file_kind = meta.get("dashrec.kind") or ("product" if "product_id" in schema.names else "query")
    if kind is not None and file_kind != kind:
        raise SchemaError(path, None, f"expected a {kind} table, found a {file_kind} table")
    for col in ("row_id", KEY_COLUMN[file_kind], "vector"):
        if col not in schema.names:
            raise SchemaError(path, col, f"missing column; found {schema.names}")
    row_ids = parquet.read(columns=["row_id"]).column(0).to_numpy()
    if not np.array_equal(row_ids, np.arange(len(row_ids))):
        raise SchemaError(path, "row_id", "row ids must be 0..R-1 in order")
    return parquet, file_kind, meta


def read_embedding_table(path: str | Path, kind: TableKind | None = None,
                         allocate: Callable[[tuple[int, int]], np.ndarray] | None = None) -> EmbeddingTable:
    """Read and check a table file; errors name the file and what was expected.

    The vectors are decoded one row group at a time into one writable ``[R, d]`` float32 array,
    ``allocate((R, d))`` when given (e.g. a memory-mapped file), else a new one: decoding a whole
    list column at once takes several times its size in scratch memory (its levels and pages),
    and Arrow's allocator would keep that scratch afterwards.
    """
    path = Path(path)
    parquet, file_kind, meta = _open_table(path, kind)
    schema = parquet.schema_arrow
    vec_type = schema.field("vector").type
    if not pa.types.is_fixed_size_list(vec_type):
        raise SchemaError(path, "vector", f"expected fixed_size_list<float32>, got {vec_type}")
    shape = (parquet.metadata.num_rows, vec_type.list_size)
    vectors = allocate(shape) if allocate is not None else np.empty(shape, np.float32)
    if vectors.shape != shape or vectors.dtype != np.float32:
        raise ValueError(f"allocate{shape} gave a {vectors.dtype} array of shape {vectors.shape}")
    start = 0
    for group in range(parquet.metadata.num_row_groups):
        start = _read_vectors(parquet, group, vectors, start, path)
        pa.default_memory_pool().release_unused()  # the group's buffers are gone by now
    if np.any(vectors[UNKNOWN_ROW] != 0):
        raise SchemaError(path, "vector", "row 0 (unknown ids) must be all zeros")
    return EmbeddingTable(file_kind, _read_keys(parquet, file_kind, path), vectors, meta.get("dashrec.source", ""))


def _read_keys(parquet: pq.ParquetFile, kind: TableKind, path: Path) -> TableKeys:
    """The key column as :class:`TableKeys`: null on row 0, unique keys on every other row."""
    column = parquet.read(columns=[KEY_COLUMN[kind]]).column(0)
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0 or column[UNKNOWN_ROW].is_valid:
        raise SchemaError(path, KEY_COLUMN[kind], "row 0 (unknown ids) must have a null key")
    values = column.slice(1)
    if values.null_count:
        raise SchemaError(path, KEY_COLUMN[kind], f"{values.null_count} null keys; only row 0 has none")
    keys = TableKeys(kind, values)
    if not keys.unique():
        raise SchemaError(path, KEY_COLUMN[kind], "keys must be unique")
    pa.default_memory_pool().release_unused()
    return keys


def _read_vectors(parquet: pq.ParquetFile, group: int, out: np.ndarray, start: int, path: Path) -> int:
    """Copy row group ``group``'s vectors into ``out`` from row ``start``; returns the next row."""
    for chunk in parquet.read_row_group(group, columns=["vector"]).column(0).chunks:
        if chunk.null_count:
            raise SchemaError(path, "vector", f"{chunk.null_count} null vectors; every row needs one")
        out[start:start + len(chunk)] = chunk.flatten().to_numpy().reshape(len(chunk), out.shape[1])
        start += len(chunk)
    return start


def read_table_keys(path: str | Path, kind: TableKind | None = None) -> tuple[TableKind, TableKeys, str]:
    """``(kind, keys, source)`` of a table file (``keys[0]``, the unknown row's, is None); reads the
    key column alone."""
    parquet, file_kind, meta = _open_table(Path(path), kind)
    return file_kind, _read_keys(parquet, file_kind, Path(path)), meta.get("dashrec.source", "")


COPY_CHUNK_BYTES = 64 << 20  # what copy_table_vectors copies at a time


def copy_table_vectors(vectors: np.ndarray) -> np.ndarray:
    """A writable copy of ``vectors`` ``[R, d]``, made :data:`COPY_CHUNK_BYTES` at a time. When they are
    a memory map (:func:`mapped_table`), each chunk's pages are given back as it is copied
    (:func:`release_pages`), so the copy never holds the table twice."""
    out = np.empty(vectors.shape, vectors.dtype)
    step = max(1, COPY_CHUNK_BYTES // max(1, vectors.strides[0]))
    for start in range(0, len(vectors), step):
        end = min(start + step, len(vectors))
        out[start:end] = vectors[start:end]
        release_pages(vectors, start, end)
    return out


def release_pages(vectors: np.ndarray, start: int = 0, end: int | None = None) -> None:
    """Give the pages of rows ``[start, end)`` of a memory-mapped table (:func:`mapped_table`) back
    (``madvise(MADV_DONTNEED)``): they leave this process's memory, stay in the page cache for the
    other processes that map them, and are read back from there if touched again. Nothing for an
    array in memory. The mapped table must not have been written to (its private pages would be
    dropped): frozen tables never are."""
    source = getattr(vectors, "_mmap", None) if isinstance(vectors, np.memmap) else None
    if source is None:
        return
    row_bytes = vectors.strides[0]
    end = len(vectors) if end is None else end
    # numpy maps from the allocation granularity at or below the array's offset in the file
    start_in_map = vectors.offset % mmap.ALLOCATIONGRANULARITY
    first = (start_in_map + start * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    last = (start_in_map + end * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        source.madvise(mmap.MADV_DONTNEED, first, last - first)


def mapped_table(workdir: str | Path, kind: TableKind, digest: str) -> EmbeddingTable:
    """The ``kind`` table of ``workdir`` with its vectors memory-mapped (copy on write) from
    ``DIR/embeddings/mapped/<kind>-v<version>-<digest[:16]>.npy``, ``digest`` being the SHA-256 of the
    table file (``tables_set(workdir).verify()``).

    Every process that maps the file shares one copy of the vectors in the page cache: the workers
    of ``ranking.train`` (whose frozen tables are the mapped pages themselves) and of the HTTP
    service. The first call copies the vectors out of the Parquet file, read and checked by
    :func:`read_embedding_table` one row group at a time straight into a temporary ``.npy`` file
    renamed when complete, and removes the files of earlier tables of that kind; the keys are read
    from the Parquet file on every call, first. Errors name the file.
    """
    path = embedding_table_path(workdir, kind)
    file_kind, keys, source = read_table_keys(path, kind)  # the file checked before anything is written
    directory = prepare_workdir(workdir, MAPPED_REL) / MAPPED_REL
    target = directory / f"{kind}-v{MAPPED_VERSION}-{digest[:16]}.npy"
    if not target.exists():
        tmp = temp_sibling(target)
        try:
            def into_file(shape: tuple[int, int]) -> np.ndarray:
                return np.lib.format.open_memmap(tmp, "w+", np.float32, shape)
            table = read_embedding_table(path, kind, into_file)
            table.vectors.flush()
            del table
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        for stale in directory.glob(f"{kind}-*.npy"):  # tables that are gone
            if stale != target:
                stale.unlink(missing_ok=True)
    vectors = np.load(target, mmap_mode="c")
    if vectors.shape[0] != len(keys):
        raise SchemaError(path, KEY_COLUMN[kind], f"{len(keys)} keys for the {vectors.shape[0]} vectors of {target}: "
                                                   f"the file changed while it was read")
    return EmbeddingTable(file_kind, keys, vectors, source)

