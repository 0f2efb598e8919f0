"""The serving contract of a ranking model: how raw fields become its inputs.

:class:`FeatureSpec` fixes the feature order and everything needed to turn raw request fields
into the model's plain tensors (:mod:`ranking.plain`): dense names and normalisation, sparse
names and table sizes, the product/query keys of the frozen tables, the history window and
cap. It travels inside every ranking ``model.pt`` (:func:`ranking.model.save_model`) and, without
the keys, in ``DIR/serving/manifest.json``.

:class:`PurchaseIndex` holds the purchases in memory, sorted by (user, ts), and answers "this
user's purchases with ``ts - history_days <= purchase_ts < ts``" (:data:`data.protocol.HISTORY_DAYS`,
84 days) for a whole batch with one ``numpy.searchsorted`` (strictly before the request: no
leakage). Training, importance, the serving export and the server all build the history with
it, so it is the same everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from data.protocol import DAY_S, HISTORY_DAYS
from data.schema import read_table
from embeddings.keys import TableKeys, TableKind
from embeddings.tables import EmbeddingTable

HISTORY_LEN = 50  # cap of the purchase-history bag (most recent kept)
_TS_BITS = 33  # seconds since 1970 fit in 33 bits until year 2242; user index gets the high bits


@dataclass
class FeatureSpec:
    """How raw request fields become the model's plain input tensors (see :mod:`ranking.plain`).

    Feature order of ``PlainInputModel.forward``:
      * ``dense [B, len(dense_names)]`` float32, raw values in ``dense_names`` order (the model
        normalises with ``dense_mean``/``dense_std`` from the training split, held as buffers);
      * ``sparse_ids [B, len(sparse_names)]`` int64, one id per feature in ``sparse_names`` order;
        feature ``i`` has a table of ``sparse_num_embeddings[i]`` rows whose last row is the
        reserved bucket for ids never seen in training (ids ``>= sparse_num_embeddings[i] - 1``
        or negative are mapped there inside the model);
      * ``product_rows [B]``, ``query_rows [B]`` int64 rows of the frozen tables
        (:meth:`product_rows`, :meth:`query_rows`; unknown -> 0, the zero row);
      * ``history_rows [B, history_len]`` int64 product rows of the user's purchases in the
        ``history_days`` days before the request, most recent first, padded with -1
        (:meth:`history_rows`).

    ``product_keys`` and ``query_keys`` are the frozen tables' keys (:class:`embeddings.keys.TableKeys`:
    ``product_keys[r]`` is the product of table row ``r``, ``query_keys[r]`` the normalised query);
    both have no key but the unknown row for a model without tables (variant ``dcn``). They are not
    part of :meth:`to_dict` (JSON, ``DIR/serving/manifest.json``): a checkpoint carries them as
    tensors (:meth:`key_tensors`), serving as ``product_ids.parquet`` and ``query_ids.parquet``.
    """

    dense_names: list[str]
    dense_mean: list[float]
    dense_std: list[float]
    sparse_names: list[str]
    sparse_num_embeddings: list[int]
    train_click_rate: float
    history_len: int = HISTORY_LEN
    history_days: int = HISTORY_DAYS
    table_dim: int = 0
    table_source: str = ""
    product_keys: TableKeys = field(default_factory=lambda: TableKeys("product", np.zeros(0, np.int64)))
    query_keys: TableKeys = field(default_factory=lambda: TableKeys("query", pa.array([], pa.large_string())))

    @property
    def has_tables(self) -> bool:
        """Whether the model reads DashCLIP tables (every variant but ``dcn``)."""
        return self.table_dim > 0

    @property
    def num_product_rows(self) -> int:
        return len(self.product_keys)

    @property
    def num_query_rows(self) -> int:
        return len(self.query_keys)

    def product_rows(self, product_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Product table rows for ``product_ids`` (any shape; unknown -> 0)."""
        return self.product_keys.rows(product_ids)

    def query_rows(self, queries: Sequence[str] | pa.Array, normalized: bool = False) -> np.ndarray:
        """Query table rows for query strings (raw ones normalised here unless ``normalized``; an Arrow
        array is taken as normalised; unknown -> 0)."""
        return self.query_keys.rows(queries, normalized)

    def history_rows(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """``[B, history_len]`` rows from per-request product id lists (already windowed to
        ``history_days`` and ordered most recent first; longer lists are cut, short ones padded -1)."""
        out = np.full((len(histories), self.history_len), -1, dtype=np.int64)
        for i, ids in enumerate(histories):
            ids = list(ids)[: self.history_len]
            out[i, : len(ids)] = self.product_rows(ids)
        return out

    def with_tables(self, product: EmbeddingTable, query: EmbeddingTable) -> "FeatureSpec":
        """A copy carrying the keys and dimension of the given tables."""
        return replace(self, table_dim=product.dim, table_source=product.source, product_keys=product.keys,
                       query_keys=query.keys)

    def to_dict(self) -> dict:
        """JSON-able (and ``torch.load(weights_only=True)``-able) dict of everything but the keys."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _KEY_FIELDS}

    def key_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The table keys as tensors, for a checkpoint (:meth:`from_dict`'s ``keys``)."""
        return {name: getattr(self, name).to_tensors() for name in _KEY_FIELDS}

    @classmethod
    def from_dict(cls, data: dict, keys: dict[str, dict[str, torch.Tensor]] | None = None) -> "FeatureSpec":
        """From :meth:`to_dict` and :meth:`key_tensors` (no keys: a spec without tables). A dict
        written before the keys left it holds them as ``product_ids`` and ``queries`` lists."""
        data = dict(data)
        legacy = {"product_keys": data.pop("product_ids", None), "query_keys": data.pop("queries", None)}
        spec = cls(**data)
        for name, kind in _KEY_FIELDS.items():
            if keys is not None and name in keys:
                setattr(spec, name, TableKeys.from_tensors(kind, keys[name]))
            elif legacy[name]:
                setattr(spec, name, TableKeys.from_keys(kind, legacy[name]))
        return spec

    def with_keys(self, product_keys: TableKeys, query_keys: TableKeys) -> "FeatureSpec":
        """A copy with these table keys (e.g. the id maps of a serving export)."""
        return replace(self, product_keys=product_keys, query_keys=query_keys)


_KEY_FIELDS: dict[str, TableKind] = {"product_keys": "product", "query_keys": "query"}


class PurchaseIndex:
    """All purchases in memory, sorted by (user, ts); vectorised as-of-time history lookups."""

    def __init__(self, user_id: np.ndarray, ts: np.ndarray, product_id: np.ndarray) -> None:
        user_id, ts, product_id = (np.asarray(a, np.int64) for a in (user_id, ts, product_id))
        order = np.lexsort((product_id, ts, user_id))
        self.users = np.unique(user_id)
        user_index = np.searchsorted(self.users, user_id[order])
        self._key = (user_index << _TS_BITS) | np.clip(ts[order], 0, (1 << _TS_BITS) - 1)
        self.product_id = product_id[order]

    @classmethod
    def from_workdir(cls, workdir: str | Path) -> "PurchaseIndex":
        """From ``DIR/data/purchases.parquet`` (validated); the Arrow buffers of the read and the
        checks go back to the system once the index holds its arrays."""
        table = read_table(workdir, "purchases")
        index = cls(table.column("user_id").to_numpy(), table.column("ts").cast(pa.int64()).to_numpy(),
                    table.column("product_id").to_numpy())
        del table
        pa.default_memory_pool().release_unused()
        return index

    def __len__(self) -> int:
        return len(self.product_id)

    def history(self, user_id: np.ndarray, ts: np.ndarray, max_len: int = HISTORY_LEN,
                days: int = HISTORY_DAYS) -> tuple[np.ndarray, np.ndarray]:
        """Purchases of ``user_id[i]`` with ``ts[i] - days <= purchase_ts < ts[i]``.

        Returns ``(product_ids [B, max_len] int64, most recent first, padded -1;
        count [B] int64, the number in the window before the cap)``.
        """
        positions, count = self.history_positions(user_id, ts, max_len, days)
        return np.where(positions >= 0, self.product_id[np.maximum(positions, 0)] if len(self) else -1, -1), count

    def history_positions(self, user_id: np.ndarray, ts: np.ndarray, max_len: int = HISTORY_LEN,
                          days: int = HISTORY_DAYS, trim: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`history`, but positions into :attr:`product_id` (-1 = padding), so a caller
        can gather any per-purchase array (e.g. product table rows mapped once). ``trim``: make
        the width the longest bag of this batch (at most ``max_len``, at least 1)."""
        user_id, ts = np.asarray(user_id, np.int64), np.asarray(ts, np.int64)
        pos = np.clip(np.searchsorted(self.users, user_id), 0, max(len(self.users) - 1, 0))
        known = (self.users[pos] == user_id) if len(self.users) else np.zeros(len(user_id), bool)
        high = pos << _TS_BITS
        top = (1 << _TS_BITS) - 1
        lo = np.searchsorted(self._key, high | np.clip(ts - days * DAY_S, 0, top), side="left")
        hi = np.searchsorted(self._key, high | np.clip(ts, 0, top), side="left")
        count = np.where(known, hi - lo, 0).astype(np.int64)
        width = max(1, min(max_len, int(count.max(initial=0)))) if trim else max_len
        steps = np.arange(width)[None, :]
        positions = np.where(steps < count[:, None], hi[:, None] - 1 - steps, -1)
        return positions.astype(np.int64), count
