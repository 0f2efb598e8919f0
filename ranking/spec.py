"""The serving contract of a ranking model: how raw fields become its inputs.

:class:`FeatureSpec` fixes the feature order and everything needed to turn raw request fields
into the model's plain tensors (:mod:`ranking.plain`): dense names and normalisation, sparse
names and table sizes, the product/query id maps of the frozen tables, the history window and
cap. It travels inside every ranking ``model.pt`` (:func:`ranking.model.save_model`) and, without
the id maps, in ``DIR/serving/manifest.json``.

:class:`PurchaseIndex` holds the purchases in memory, sorted by (user, ts), and answers "this
user's purchases with ``ts - history_days <= purchase_ts < ts``" (:data:`data.protocol.HISTORY_DAYS`,
84 days) for a whole batch with one ``numpy.searchsorted`` (strictly before the request: no
leakage). Training, importance, the serving export and the server all build the history with
it, so it is the same everywhere.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from data.protocol import DAY_S, HISTORY_DAYS
from data.schema import read_table
from data.text import normalize_query
from embeddings.tables import UNKNOWN_ROW, EmbeddingTable

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

    ``product_ids[r - 1]`` is the product of table row ``r``; ``queries[r - 1]`` the normalised
    query of row ``r``. Both are empty for a model without tables (variant ``dcn``).
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
    product_ids: list[int] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    _product_keys: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)
    _query_map: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_product_rows(self) -> int:
        return len(self.product_ids) + 1

    @property
    def num_query_rows(self) -> int:
        return len(self.queries) + 1

    def product_rows(self, product_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Product table rows for ``product_ids`` (any shape; unknown -> 0)."""
        ids = np.asarray(product_ids, dtype=np.int64)
        if not self.product_ids:
            return np.zeros(ids.shape, np.int64)
        if self._product_keys is None:  # (sorted ids, their rows), built once
            order = np.argsort(np.asarray(self.product_ids, np.int64), kind="stable")
            self._product_keys = (np.asarray(self.product_ids, np.int64)[order], order + 1)
        keys, rows = self._product_keys
        pos = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
        return np.where(keys[pos] == ids, rows[pos], UNKNOWN_ROW).astype(np.int64)

    def query_map(self) -> dict[str, int]:
        """Normalised query -> its query table row (built once; the unknown row 0 is not in it)."""
        if self._query_map is None:
            self._query_map = {q: i + 1 for i, q in enumerate(self.queries)}
        return self._query_map

    def query_rows(self, queries: Sequence[str]) -> np.ndarray:
        """Query table rows for raw query strings (normalised here; unknown -> 0)."""
        query_map = self.query_map()
        return np.array([query_map.get(normalize_query(q), UNKNOWN_ROW) for q in queries], dtype=np.int64)

    def history_rows(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """``[B, history_len]`` rows from per-request product id lists (already windowed to
        ``history_days`` and ordered most recent first; longer lists are cut, short ones padded -1)."""
        out = np.full((len(histories), self.history_len), -1, dtype=np.int64)
        for i, ids in enumerate(histories):
            ids = list(ids)[: self.history_len]
            out[i, : len(ids)] = self.product_rows(ids)
        return out

    def with_tables(self, product: EmbeddingTable, query: EmbeddingTable) -> "FeatureSpec":
        """A copy carrying the id maps and dimension of the given tables."""
        return FeatureSpec(**{**self.to_dict(), "table_dim": product.dim, "table_source": product.source,
                              "product_ids": [int(k) for k in product.keys[1:]], "queries": list(query.keys[1:])})

    def to_dict(self) -> dict:
        """JSON-able (and ``torch.load(weights_only=True)``-able) dict."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureSpec":
        return cls(**data)


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
