"""The shoppers: latent user state (:class:`Users`, :func:`build_users`: favourite aisles, brands and
staples, order rate, search activity, price sensitivity, home store, platform) and the draws that
follow from it: products a user picks and the time of day they shop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from data.synth.catalog import Catalog
from data.synth.config import HOUR_WEIGHTS, Behaviour, ClickModel, ProfileConfig
from data.synth.sampling import STREAM_USERS, GroupedSampler, categorical, pick_slot, stream_rng


@dataclass
class Users:
    """Latent user state, parallel ``[n_users]`` arrays (index = user_id - 1)."""

    has_purchases: np.ndarray
    fav_aisles: np.ndarray  # [U, 3]
    fav_brands: np.ndarray  # [U, n_fav_brands]
    staples: np.ndarray  # [U, n_staples] product index
    order_rate: np.ndarray  # orders per day
    activity: np.ndarray
    price_sensitivity: np.ndarray
    home_store: np.ndarray
    platform: np.ndarray
    activity_sampler: GroupedSampler = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def n(self) -> int:
        return len(self.has_purchases)


def build_users(cfg: ProfileConfig, catalog: Catalog, behaviour: Behaviour, clicks: ClickModel, seed: int) -> Users:
    rng = stream_rng(seed, STREAM_USERS)
    n = cfg.n_users
    n_aisles = len(catalog.vocab.aisles)
    has_purchases = rng.random(n) >= cfg.users_without_purchases
    aisle_size = np.bincount(catalog.aisle, minlength=n_aisles) + 1.0
    gumbel = np.log(aisle_size)[None, :] - np.log(-np.log(rng.random((n, n_aisles))))
    fav_aisles = np.argsort(-gumbel, axis=1)[:, :3]
    users = np.arange(n)
    fav_brands = np.stack([
        catalog.samplers["brand_in_aisle"].sample(
            rng, pick_slot(rng, fav_aisles, users, probs=behaviour.fav_aisle_slot_probs))
        for _ in range(behaviour.n_fav_brands)], 1)
    staples = np.stack([
        catalog.draw(rng, "brand", brand=pick_slot(rng, fav_brands, users))
        for _ in range(behaviour.n_staples)], 1)
    mean_rate = cfg.mean_orders_per_user / cfg.n_days
    order_rate = np.where(has_purchases, rng.gamma(2.0, mean_rate / 2.0, n), 0.0)
    activity = rng.gamma(1.0, 1.0, n)
    sensitivity = np.maximum(0.0, rng.normal(clicks.price_sensitivity_mean, clicks.price_sensitivity_sd, n))
    home_store = rng.integers(0, cfg.n_stores, n)
    platform = categorical(rng, behaviour.platform_probs, n)
    out = Users(has_purchases, fav_aisles, fav_brands, staples, order_rate, activity, sensitivity, home_store,
                platform)
    out.activity_sampler = GroupedSampler(np.zeros(n, dtype=np.int64), activity)
    return out


def favourite_brand_products(rng: np.random.Generator, catalog: Catalog, users: Users, user: np.ndarray) -> np.ndarray:
    return catalog.draw(rng, "brand", brand=pick_slot(rng, users.fav_brands, user))


def favourite_aisle_products(rng: np.random.Generator, catalog: Catalog, users: Users, user: np.ndarray,
                             behaviour: Behaviour) -> np.ndarray:
    aisle = pick_slot(rng, users.fav_aisles, user, probs=behaviour.fav_aisle_slot_probs)
    return catalog.draw(rng, "aisle", aisle=aisle)


def popular_products(rng: np.random.Generator, catalog: Catalog, n: int) -> np.ndarray:
    return catalog.draw(rng, "all", aisle=np.zeros(n, dtype=np.int64))


def choose_products(rng: np.random.Generator, catalog: Catalog, probs: Sequence[float],
                    options: Sequence[np.ndarray]) -> np.ndarray:
    """Per row, the product of option ``k ~ probs``; a popular product where that option has none (-1)."""
    n = len(options[0])
    out = np.choose(categorical(rng, probs, n), options)
    return np.where(out < 0, popular_products(rng, catalog, n), out)


def seconds_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    hour = categorical(rng, HOUR_WEIGHTS, n)
    return hour * 3600 + rng.integers(0, 3600, n)
