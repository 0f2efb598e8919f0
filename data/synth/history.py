"""Purchases and the 84-day history: a day's orders (:func:`purchases_of_day`) and who bought which
product, brand and aisle when (:class:`PurchaseHistory`), which the click model's history terms read."""
from __future__ import annotations

import numpy as np

from data.protocol import DAY_S, HISTORY_DAYS
from data.synth.catalog import Catalog
from data.synth.config import Behaviour
from data.synth.sampling import pick_slot
from data.synth.users import (Users, choose_products, favourite_aisle_products, favourite_brand_products,
                              seconds_of_day)


class LastTime:
    """A sorted map int64 key -> time of the latest event with that key (int64 seconds)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.times = np.zeros(0, dtype=np.int64)

    def get(self, keys: np.ndarray, missing: int) -> np.ndarray:
        if not len(self.keys):
            return np.full(len(keys), missing, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.times[pos], missing)

    def merge_newer(self, keys: np.ndarray, times: np.ndarray) -> None:
        """Record events that are all later than every stored time."""
        order = np.lexsort((times, keys))
        keys, times = keys[order], times[order]
        last = np.r_[keys[1:] != keys[:-1], True] if len(keys) else np.zeros(0, dtype=bool)
        keys, times = keys[last], times[last]
        pos = np.searchsorted(self.keys, keys)
        hit = pos < len(self.keys)
        hit[hit] = self.keys[pos[hit]] == keys[hit]
        self.times[pos[hit]] = times[hit]
        self.keys = np.insert(self.keys, pos[~hit], keys[~hit])
        self.times = np.insert(self.times, pos[~hit], times[~hit])

    def prune(self, min_time: int) -> None:
        keep = self.times >= min_time
        self.keys, self.times = self.keys[keep], self.times[keep]


def first_times(keys: np.ndarray, times: np.ndarray) -> LastTime:
    """A map key -> earliest time (used for the current day's purchases)."""
    order = np.lexsort((times, keys))
    keys, times = keys[order], times[order]
    first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, dtype=bool)
    out = LastTime()
    out.keys, out.times = keys[first], times[first]
    return out


class PurchaseHistory:
    """Who bought which product/brand/aisle when, pruned to what can still fall in an 84-day window."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.maps = {"product": LastTime(), "brand": LastTime(), "aisle": LastTime()}

    def _keys(self, level: str, user: np.ndarray, product: np.ndarray) -> np.ndarray:
        """int64 key of (user, the product's ``level`` attribute)."""
        c = self.catalog
        if level == "product":
            return user.astype(np.int64) * c.n + product
        if level == "brand":
            return user.astype(np.int64) * len(c.brand_name) + c.brand[product]
        return user.astype(np.int64) * len(c.vocab.aisles) + c.aisle[product]

    def matches(self, user: np.ndarray, ts: np.ndarray, product: np.ndarray, today_user: np.ndarray,
                today_ts: np.ndarray, today_product: np.ndarray) -> dict[str, np.ndarray]:
        """For each impression: did the user buy the same product/brand/aisle in ``[ts - 84 d, ts)``?

        ``today_*`` are the purchases of the impressions' day (not yet merged into the maps).
        """
        out = {}
        for level, stored in self.maps.items():
            keys = self._keys(level, user, product)
            earlier = stored.get(keys, np.iinfo(np.int64).min) >= ts - HISTORY_DAYS * DAY_S
            today = first_times(self._keys(level, today_user, today_product), today_ts)
            out[level] = earlier | (today.get(keys, np.iinfo(np.int64).max) < ts)
        return out

    def add_day(self, user: np.ndarray, ts: np.ndarray, product: np.ndarray, next_day_start: int) -> None:
        for level, stored in self.maps.items():
            stored.merge_newer(self._keys(level, user, product), ts)
            stored.prune(next_day_start - HISTORY_DAYS * DAY_S)


def purchases_of_day(rng: np.random.Generator, catalog: Catalog, users: Users, behaviour: Behaviour,
                     day_start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, ts, product index) of one day's purchases, sorted by (ts, user, product)."""
    orders = rng.poisson(users.order_rate)
    order_user = np.repeat(np.arange(users.n), orders)
    order_ts = day_start + seconds_of_day(rng, len(order_user))
    items = 1 + rng.poisson(behaviour.basket_extra_items_mean, len(order_user))
    user, ts = np.repeat(order_user, items), np.repeat(order_ts, items)
    product = choose_products(rng, catalog, behaviour.purchase_item_probs, (
        pick_slot(rng, users.staples, user), favourite_brand_products(rng, catalog, users, user),
        favourite_aisle_products(rng, catalog, users, user, behaviour)))
    order = np.lexsort((product, user, ts))
    return user[order], ts[order], product[order]
