"""Counting features: past impressions and clicks per key, from earlier days only. The smoothed
click rate (:func:`smoothed_ctr`) and the query counting features of the impressions
(:class:`QueryCountFeatures`, over :class:`QueryCodes` and :class:`PastCounts`)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

# The query counting features: past smoothed CTR and log(1 + past impressions) per level.
QUERY_COUNT_LEVELS = ("query", "query_product", "query_aisle")
QUERY_COUNT_FEATURES = [pa.field(f"dense_{level}_{what}_past", pa.float32())
                        for level in QUERY_COUNT_LEVELS for what in ("ctr", "log_impressions")]


def smoothed_ctr(clicks: np.ndarray, impressions: np.ndarray, prior: float, strength: float) -> np.ndarray:
    """``(clicks + strength * prior) / (impressions + strength)``: the click rate with ``strength``
    pseudo-impressions at the ``prior`` rate (``prior`` itself where there are no impressions)."""
    return (clicks + strength * prior) / (impressions + strength)


class PastCounts:
    """Impressions and clicks per int64 key, summed over the days added so far.

    Sorted distinct keys with parallel int32 counts: 16 bytes per distinct key. A lookup is one
    ``numpy.searchsorted`` per batch; adding a day inserts its new keys into each array in turn
    (a new array replaces the old one, so at most 8 more bytes per key exist for a moment).
    """

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.impressions = np.zeros(0, dtype=np.int32)
        self.clicks = np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(impressions, clicks) of each of ``keys``; 0 and 0 for a key never added."""
        if not len(self.keys):
            return np.zeros(len(keys), dtype=np.int32), np.zeros(len(keys), dtype=np.int32)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[pos] == keys
        return np.where(found, self.impressions[pos], 0), np.where(found, self.clicks[pos], 0)

    def add(self, keys: np.ndarray, clicked: np.ndarray) -> None:
        """Count one impression per entry of ``keys``, and a click where ``clicked`` is 1."""
        distinct, inverse = np.unique(keys, return_inverse=True)
        impressions = np.bincount(inverse, minlength=len(distinct)).astype(np.int32)
        clicks = np.bincount(inverse, weights=clicked, minlength=len(distinct)).astype(np.int32)
        pos = np.searchsorted(self.keys, distinct)
        known = pos < len(self.keys)
        known[known] = self.keys[pos[known]] == distinct[known]
        self.impressions[pos[known]] += impressions[known]
        self.clicks[pos[known]] += clicks[known]
        new = pos[~known]
        self.keys = np.insert(self.keys, new, distinct[~known])
        self.impressions = np.insert(self.impressions, new, impressions[~known])
        self.clicks = np.insert(self.clicks, new, clicks[~known])


class QueryCodes:
    """Dense int64 codes of query texts, keyed by the 64-bit hash of the normalised text
    (:func:`query_hashes`): sorted hashes with parallel codes, 16 bytes per distinct query; also the
    set of the queries seen so far. Codes are given in order of the first :meth:`assign` call that
    sees a query (by hash within a call). A lookup is a binary search per hash; adding queries also
    copies the stored arrays once (no sort or hash of what is stored)."""

    def __init__(self) -> None:
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.codes = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The code of each of ``hashes``; -1 for a query without one."""
        if not len(self.hashes):
            return np.full(len(hashes), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[pos] == hashes, self.codes[pos], -1)

    def assign(self, hashes: np.ndarray) -> np.ndarray:
        """The code of each of ``hashes``, giving the next free codes to queries without one."""
        distinct = np.unique(hashes)
        new = distinct[self.lookup(distinct) < 0]
        pos = np.searchsorted(self.hashes, new)
        self.hashes = np.insert(self.hashes, pos, new)
        self.codes = np.insert(self.codes, pos, len(self.codes) + np.arange(len(new), dtype=np.int64))
        return self.lookup(hashes)


class QueryCountFeatures:
    """The query counting features of the impressions (the :mod:`data.synth` docstring): past impressions and
    clicks of each query, (query, product) and (query, aisle) pair, over the days added so far.

    A day's features are read before that day is added, so they only count earlier days.
    Memory: 16 bytes per distinct query (:class:`QueryCodes`) plus 16 bytes per distinct key of
    each level (:class:`PastCounts`); each level has at most one key per impression.
    """

    def __init__(self, n_products: int, n_aisles: int, prior: float, strength: float) -> None:
        self.n_products, self.n_aisles = n_products, n_aisles
        self.prior, self.strength = prior, strength
        self.codes = QueryCodes()
        self.counts = {level: PastCounts() for level in QUERY_COUNT_LEVELS}

    def _keys(self, code: np.ndarray, product: np.ndarray, aisle: np.ndarray) -> dict[str, np.ndarray]:
        """The int64 key of each level (``code`` -1 gives negative keys, which are never stored)."""
        return {"query": code, "query_product": code * self.n_products + product,
                "query_aisle": code * self.n_aisles + aisle}

    def features(self, query_hash: np.ndarray, product: np.ndarray, aisle: np.ndarray) -> list[np.ndarray]:
        """The float32 columns of ``QUERY_COUNT_FEATURES`` for impressions of (query hash, product
        index, aisle index): per level the smoothed CTR and log(1 + impressions) of the days added
        so far. A query never counted before gets 0 impressions and the prior at every level."""
        columns = []
        for level, keys in self._keys(self.codes.lookup(query_hash), product, aisle).items():
            impressions, clicks = self.counts[level].get(keys)
            columns.append(smoothed_ctr(clicks, impressions, self.prior, self.strength).astype(np.float32))
            columns.append(np.log1p(impressions).astype(np.float32))
        return columns

    def add_day(self, query_hash: np.ndarray, product: np.ndarray, aisle: np.ndarray, clicked: np.ndarray) -> None:
        """Count a day's impressions (``[rows]`` aligned arrays) and their clicks."""
        for level, keys in self._keys(self.codes.assign(query_hash), product, aisle).items():
            self.counts[level].add(keys, clicked)

    def sizes(self) -> dict[str, int]:
        """Distinct queries and distinct keys per level counted so far."""
        return {"queries": len(self.codes), **{level: len(counts) for level, counts in self.counts.items()}}
