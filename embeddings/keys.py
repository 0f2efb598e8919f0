"""The keys of a table's rows, held as one array: no Python object per key.

A table of the paper's size has 400k products and millions of queries. Held as a Python list
and a dict, every query costs about 150 bytes in every process that reads the table (the ranking
workers, the service's workers); :class:`TableKeys` holds them as one Arrow string array (or one
int64 array of product ids) plus a sorted 64-bit hash per key, about 40 bytes a query, and looks
keys up with one ``numpy.searchsorted`` for a whole batch.

Rows follow the table file contract (:mod:`embeddings.tables`): row 0 is the unknown row and has
no key; row ``r >= 1`` has ``values[r - 1]``. Query keys are normalised
(:func:`data.text.normalize_query`); :meth:`TableKeys.rows` normalises raw queries unless told
they already are.
"""
from __future__ import annotations

from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data.text import normalize_query

TableKind = Literal["product", "query"]
UNKNOWN_ROW = 0

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def string_hashes(values: pa.Array) -> np.ndarray:
    """``[N]`` uint64: a 64-bit hash of each string of ``values`` (FNV-1a over its UTF-8 bytes,
    then the splitmix64 finaliser), vectorised over the array's buffers: one pass per byte
    position over the strings at least that long. The same string always gets the same hash."""
    values = _large_strings(values)
    n = len(values)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(values.buffers()[1], np.int64, count=n + 1, offset=values.offset * 8)
    data_buffer = values.buffers()[2]
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first: the strings still going are a prefix
    starts, lengths_desc = offsets[:-1][order], lengths[order]
    hashes = np.full(n, _FNV_OFFSET, np.uint64)
    negated = -lengths_desc  # ascending
    for position in range(int(lengths_desc[0])):
        live = int(np.searchsorted(negated, -position, side="left"))  # strings longer than `position`
        hashes[:live] ^= data[starts[:live] + position].astype(np.uint64)
        hashes[:live] *= _FNV_PRIME
    hashes ^= hashes >> np.uint64(30)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(27)
    hashes *= np.uint64(0x94D049BB133111EB)
    hashes ^= hashes >> np.uint64(31)
    out = np.empty(n, np.uint64)
    out[order] = hashes
    return out


def _large_strings(values: pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if values.type != pa.large_string():
        values = values.cast(pa.large_string())
    return values


class TableKeys:
    """The keys of rows ``1..N`` of a table (row 0, the unknown row, has none): product ids as
    ``values`` ``[N]`` int64, or normalised queries as an Arrow ``large_string`` array; unique.

    Behaves as a read-only sequence of ``N + 1`` keys (``keys[0]`` is None), converting to Python
    objects only what is asked for; :meth:`rows` maps a batch of keys to rows without any.
    """

    def __init__(self, kind: TableKind, values: np.ndarray | pa.Array | pa.ChunkedArray, hash_bits: int = 64) -> None:
        self.kind: TableKind = kind
        # query hashes keep their low `hash_bits` bits (fewer only to exercise shared hashes)
        self._hash_mask = np.uint64((1 << hash_bits) - 1)
        if kind == "product":
            self.values: np.ndarray | pa.LargeStringArray = np.ascontiguousarray(
                values.to_numpy() if isinstance(values, (pa.Array, pa.ChunkedArray)) else values, dtype=np.int64)
            hashes = self.values
        else:
            self.values = _large_strings(values if isinstance(values, (pa.Array, pa.ChunkedArray))
                                         else pa.array(values, pa.large_string()))
            if self.values.null_count:
                raise ValueError(f"{self.values.null_count} null query keys")
            hashes = string_hashes(self.values) & self._hash_mask
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._order]

    @classmethod
    def from_keys(cls, kind: TableKind, keys: Sequence[Any] | np.ndarray | pa.Array) -> "TableKeys":
        """From raw keys of rows ``1..N`` (queries are normalised here); raises ``ValueError`` when
        two are equal (after normalisation)."""
        if kind == "query" and not isinstance(keys, (pa.Array, pa.ChunkedArray)):
            keys = pa.array([normalize_query(k) for k in keys], pa.large_string())
        out = cls(kind, keys)
        if not out.unique():
            raise ValueError(f"{kind} keys are not unique" + (" after normalisation" if kind == "query" else ""))
        return out

    def unique(self) -> bool:
        """Whether no key repeats."""
        if not len(self._sorted) or not np.any(self._sorted[1:] == self._sorted[:-1]):
            return True
        return self.kind == "query" and pc.count_distinct(self.values).as_py() == len(self.values)

    def __len__(self) -> int:
        """Rows, the unknown row included."""
        return len(self.values) + 1

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            first = max(start, UNKNOWN_ROW + 1)  # rows >= 1, converted as one block
            block = (self.values[first - 1:stop - 1].tolist() if self.kind == "product"
                     else self.values.slice(first - 1, max(stop - first, 0)).to_pylist())
            return ([None] if start == UNKNOWN_ROW < stop else []) + block
        row = item + len(self) if item < 0 else item
        if not 0 <= row < len(self):
            raise IndexError(f"row {item} of a table of {len(self)} rows")
        if row == UNKNOWN_ROW:
            return None
        value = self.values[row - 1]
        return int(value) if self.kind == "product" else value.as_py()

    def __iter__(self) -> Iterator[Any]:
        return iter(self[:])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TableKeys):
            return NotImplemented
        if self.kind != other.kind or len(self) != len(other):
            return False
        if self.kind == "product":
            return bool(np.array_equal(self.values, other.values))
        return self.values.equals(other.values)

    def __repr__(self) -> str:
        return f"TableKeys({self.kind!r}, {len(self.values)} keys)"

    def rows(self, keys: Sequence[Any] | np.ndarray | pa.Array, normalized: bool = False) -> np.ndarray:
        """Rows ``[len(keys)]`` int64 of ``keys`` (unknown -> 0). Raw query strings are normalised
        first unless ``normalized``; an Arrow array of queries is taken as normalised."""
        if self.kind == "product":
            wanted = np.asarray(keys.to_numpy(zero_copy_only=False) if isinstance(keys, (pa.Array, pa.ChunkedArray))
                                else keys, dtype=np.int64)
            hashes = wanted.reshape(-1)
        else:
            if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
                keys = pa.array(list(keys) if normalized else [normalize_query(k) for k in keys], pa.large_string())
            wanted = _large_strings(keys)
            hashes = string_hashes(wanted) & self._hash_mask
        out = np.zeros(len(hashes), np.int64)
        if not len(self._sorted) or not len(hashes):
            return out.reshape(np.shape(wanted)) if self.kind == "product" else out
        first = np.searchsorted(self._sorted, hashes, side="left")
        found = (first < len(self._sorted)) & (self._sorted[np.minimum(first, len(self._sorted) - 1)] == hashes)
        candidate = self._order[np.minimum(first, len(self._sorted) - 1)]
        if self.kind == "product":
            out[found] = candidate[found] + 1
            return out.reshape(wanted.shape)
        hit = np.flatnonzero(found)
        same = pc.equal(self.values.take(pa.array(candidate[hit])), wanted.take(pa.array(hit))).to_numpy(
            zero_copy_only=False)
        out[hit[same]] = candidate[hit[same]] + 1
        for i in hit[~same]:  # a hash two keys share: try the others with it
            end = int(np.searchsorted(self._sorted, hashes[i], side="right"))
            for position in self._order[first[i] + 1:end]:
                if self.values[int(position)] == wanted[int(i)]:
                    out[i] = int(position) + 1
                    break
        return out

    def to_arrow(self) -> pa.Array:
        """The key column of a table file: ``[N + 1]``, null on row 0 (int64 or string)."""
        if self.kind == "product":
            return pa.concat_arrays([pa.nulls(1, pa.int64()), pa.array(self.values, pa.int64())])
        return pa.concat_arrays([pa.nulls(1, pa.large_string()), self.values]).cast(pa.string())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The keys as tensors (``torch.load(weights_only=True)``-able, no Python object per key):
        ``{"ids"}`` int64 for products, ``{"utf8", "offsets"}`` uint8 and int64 for queries."""
        if self.kind == "product":
            return {"ids": torch.from_numpy(self.values.copy())}
        values = self.values
        offsets = np.frombuffer(values.buffers()[1], np.int64, count=len(values) + 1, offset=values.offset * 8)
        data_buffer = values.buffers()[2]
        data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
        return {"utf8": torch.from_numpy(data[offsets[0]:offsets[-1]].copy()),
                "offsets": torch.from_numpy(offsets - offsets[0])}

    @classmethod
    def from_tensors(cls, kind: TableKind, tensors: dict[str, torch.Tensor]) -> "TableKeys":
        """The keys saved by :meth:`to_tensors`, copied: the tensors of a checkpoint that ``torch.load``
        maps (``mmap=True``) are views of one mapping of the whole file, and keys that stayed views
        would keep it mapped (with every table page read so far resident) as long as the keys live."""
        if kind == "product":
            return cls(kind, tensors["ids"].numpy().copy())
        offsets, utf8 = tensors["offsets"].numpy().copy(), tensors["utf8"].numpy().copy()
        values = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(utf8))
        values.validate(full=True)
        return cls(kind, values)
