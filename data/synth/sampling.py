"""Seeded random streams and the vectorised draws the whole generator shares: one generator per
(seed, stream, k), weighted draws within groups of items (:class:`GroupedSampler`), categorical
draws and picks of one slot per row of a table."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def stream_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


# The streams: catalog, brands, users, stores, relevance chunk k, purchases of day k, sessions of day k.
(STREAM_CATALOG, STREAM_BRANDS, STREAM_USERS, STREAM_STORES, STREAM_RELEVANCE, STREAM_PURCHASES,
 STREAM_SESSIONS) = range(7)


class GroupedSampler:
    """Draw items by weight within a group of items sharing a key.

    Items are sorted by key once; one cumulative weight array serves every group, so a draw
    is two binary searches. Keys are int64 (combine attributes arithmetically).
    """

    def __init__(self, keys: np.ndarray, weights: np.ndarray):
        order = np.argsort(keys, kind="stable")
        self.items = order
        self.keys, self.starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
        self.ends = self.starts + counts
        self.cum = np.concatenate([[0.0], np.cumsum(weights[order], dtype=np.float64)])

    def sample(self, rng: np.random.Generator, keys: np.ndarray) -> np.ndarray:
        """One item per entry of ``keys`` (``[n]`` int64); -1 where a key has no items."""
        u = rng.random(len(keys))
        g = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[g] == keys
        lo, hi = self.cum[self.starts[g]], self.cum[self.ends[g]]
        pos = np.searchsorted(self.cum, lo + u * (hi - lo), side="right") - 1
        pos = np.clip(pos, self.starts[g], self.ends[g] - 1)
        return np.where(found, self.items[pos], -1)


def categorical(rng: np.random.Generator, probs: Sequence[float], n: int) -> np.ndarray:
    """``[n]`` draws of an index ``k`` with probability ``probs[k] / sum(probs)``."""
    cum = np.cumsum(probs) / np.sum(probs)
    return np.minimum(np.searchsorted(cum, rng.random(n), side="right"), len(cum) - 1)


def pick_slot(rng: np.random.Generator, table: np.ndarray, rows: np.ndarray, counts: np.ndarray | None = None,
              probs: Sequence[float] | None = None) -> np.ndarray:
    """Pick one entry of each row ``table[rows]`` (``table`` is ``[R, K]``): by ``probs`` over the K
    columns, else uniformly over the first ``counts[row]`` columns (all K when ``counts`` is None)."""
    if probs is not None:
        slot = categorical(rng, probs, len(rows))
    else:
        width = counts[rows] if counts is not None else table.shape[1]
        slot = np.floor(rng.random(len(rows)) * width).astype(np.int64)
    return table[rows, slot]
