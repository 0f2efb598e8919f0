"""A seeded synthetic marketplace: the embedded default data set (and the ground truth it plants).

``python -m data.synth --profile {tiny,demo,paper} --workdir DIR --seed N [--label-noise P]
[--scale F] [--force]`` writes ``DIR/data/{catalog,relevance,impressions,purchases}.parquet``
(the contract of :mod:`data.schema`), ``DIR/data/synth_truth.parquet`` (hidden per-impression
truth, row-aligned with ``impressions.parquet``; not part of the contract) and
``DIR/data/manifest.json`` (settings, row counts, click rate, label split, measured CTRs).
Every table is generated in chunks (a day of impressions, a block of queries, a block of
products), validated with :func:`data.schema.validate` and written as fixed-size row groups to a
temporary file; all files are renamed into place only when everything has been written, so a
failed run (a full disk included) leaves the workdir as it was. Memory holds the per-product and
per-user state (O(products + users)), the query counting accumulators (below) and one chunk, never
a whole output table.

The generative model (this is the truth later stages should recover)
====================================================================
Randomness: one ``numpy.random.default_rng(SeedSequence([seed, stream, k]))`` per component
(stream = catalog, brands, users, stores, relevance chunk k, purchases of day k, sessions of day
k), so a run is byte-identical for the same (profile, seed, scale, label noise).

Catalog (:func:`build_catalog`). The vocabulary (:mod:`data.vocab`) has 24 aisles in 10 aisle
groups, 53 type groups, 131 product types and 277 variants. ``n_brands = max(2 * aisles,
products // 12)`` invented brands; every aisle gets at least two, the rest are spread by aisle
weight; a brand has a popularity ``LogNormal(0, 0.8)``, a price tier ``N(0, 0.2)``, a label
colour and makes 1-4 of its aisle's types. A product draws aisle (vocabulary weight) -> brand
(popularity, within the aisle) -> type (uniform over the brand's types) -> variant (uniform in the
type group) -> container, amount, pack count (uniform over the type's options); ``organic`` with
the aisle's organic share. ``price = base(type) * (1 + 0.6 amount_index) * pack^0.85 *
exp(tier + N(0, 0.08)) * (1.3 if organic)``. Popularity ``LogNormal(0, 1) * sqrt(brand
popularity)`` drives every "popular product" draw below; a latent click ``appeal ~ N(0,
ClickModel.appeal_sd)`` is seen by no column.
Title: ``"{Brand} [Organic ]{Type}[ {Variant}] {pack} x {amount} {Containers}"``
(e.g. "Fizzly Cola Zero Sugar 12 x 12 fl oz Cans"). Image-only facts: the variant is left out of
the title for ``variant_hidden_share`` (30%) of products, but the packshot body always has the
variant's colour; "Organic" is left out of the title for ``organic_image_only_share`` (50%) of
organic products, but every organic packshot has a green badge (:mod:`data.packshot`).

Queries (:func:`sample_intents`, :func:`render_queries`). A query comes from a target product
and an intent kind (``Behaviour.intent_kind_probs``): type 16%, brand+type 28%, type+variant
16%, brand+type+variant 14%, brand 10%, aisle 16%; an organic target turns into organic+type
with probability ``organic_query_share`` (40%). The intent keeps the target's attributes of that
kind. Its text uses a type/aisle synonym (45%), a relevance-neutral modifier ("bulk", "near me",
"12 pack", 45%; a second one for 25% of those), swapped word order (20%), one misspelt word
(dropped, swapped or doubled letter, 12%) and an initial capital (15%). No noun (type or aisle
name/synonym) belongs to two types or aisles. The surface forms make a long tail: in ``demo``
about half the eval-week impressions carry a query never seen before it (the manifest records
this share), so memorising (query, product) pairs does not work, while the words generalise.

Relevance label of (intent, product) (:func:`relevance_labels`), the single rule used for the
relevance table and for the clicks:
  * HR (2): the product meets every attribute of the intent (brand, type, variant, organic;
    an aisle intent: the product is in that aisle).
  * MR (1): otherwise, if the intent has a type: the product's type is in the same type group
    (same type other brand/variant, or a related type: cola vs root beer); a brand-only intent:
    the product is of a type the brand makes (a competitor's product); an aisle intent: the
    product's aisle is in the same aisle group (drinks vs alcohol).
  * IR (0): everything else.
Relevance table: ``n_relevance_queries`` distinct query texts (normalised), drawn like search
queries from popular (70%) or uniformly chosen (30%) target products; per query
``ceil(1.6 * pairs_per_query)`` candidates from the exact pool (15%), the near pool (30%: same
type group / brand's aisle / aisle group) and popular products (55%), deduplicated, labelled by
the rule, then subsampled per chunk to ``pairs_per_query`` pairs per query on average in the
split IR 69.6 / MR 20.5 / HR 9.9 %. ``--label-noise p``: each label flips with probability p to an adjacent grade
(HR->MR, IR->MR, MR->HR or IR with equal odds), imitating LLM label noise; the manifest records
the split before and after.

Users (:func:`build_users`). ``users_without_purchases`` (30%) never buy. Every user has three
favourite aisles (Gumbel top-3 by aisle size; slot weights 0.55/0.3/0.15), five favourite
brands (popular brands of those aisles), four staple products (popular products of those
brands), a price sensitivity ``N(0.4, 0.25)`` clipped at 0, a home store, a main platform and a
search activity ``Gamma(1, 1)``. Buyers place ``Poisson(rate)`` orders a day, ``rate = Gamma(2)``
around ``mean_orders_per_user / n_days``; an order has ``1 + Poisson(1.5)`` items: a staple (35%),
a favourite-brand product (35%) or a favourite-aisle product (30%).

Impressions (:func:`simulate_day`), day by day over ``n_days`` from ``start_date``: a day has
``Poisson`` sessions (weekends x1.15); a session is (user ~ activity, time ~ hour profile, store:
home 80%, platform: main 85%) and a query from a target product (favourite brand 25%,
favourite aisle 55%, popular product 20%). It shows ``U{4..8}`` ad candidates, each from the
intent's exact pool (22%), near pool (28%), same aisle (25%) or any popular product (25%),
deduplicated; positions 0..k-1 by an auction score ``N(0, 1) + 0.5 * label``. A candidate is
clicked with ``p = sigmoid(logit)``,

    logit = intercept + relevance_mr [MR] + relevance_hr [HR]
            + history_aisle [user bought the candidate's aisle in [ts - 84 d, ts)]
            + history_brand [... its brand ...] + history_product [... this product ...]
            + position_log1p * log(1 + position) + appeal(product) + store_effect(store)
            + platform[platform] + evening [18-21 h] + night [0-5 h] + weekend [Sat, Sun]
            + discount * dense_discount - price_sensitivity(user) * price_z(product)

with the :class:`ClickModel` defaults (intercept -5.05, MR +1.1, HR +2.3, history aisle +0.6,
brand +0.8, product +1.0, position -0.5 per log(1+pos), appeal sd 0.4, store sd 0.15,
platform ios 0 / android +0.1 / web -0.2, evening +0.2, night -0.2, weekend +0.1, discount +2.0
per unit, price_z = log price standardised within the product type). The history terms can
only fire for users with purchases. In ``demo`` (seed 0) this gives an overall CTR of about 4%,
candidates about 37% IR / 29% MR / 34% HR with CTR about 0.6% / 2.7% / 9.3%, and for buyers a
CTR of about 8.7% when the candidate's aisle was bought in the last 84 days vs 2.1% when not.
Features (what a baseline without query text sees): ``dense_price`` (list price),
``dense_discount`` (0 for 80% of impressions, else 0.1..0.3), ``dense_hour``,
``dense_product_ctr_past`` = (clicks + 20 * 0.04) / (impressions + 20) of the product over all
*earlier days* (never the same day), ``sparse_store``, ``sparse_aisle``, ``sparse_brand``,
``sparse_platform``, ``sparse_product`` (= product_id), ``sparse_hour_bucket`` (hour // 4),
``sparse_weekday`` (Monday = 0).

Query counting features (default; ``--no-query-counts`` leaves them out, and then the impressions
are those of generator version 1): what a production ranker knows about a query from its own
logs. For each level L in (query, (query, product), (query, aisle)), with the query keyed by
:func:`data.text.normalize_query` and counts over every impression of *earlier days* (strictly
before the impression's day: never the same day or later),
``dense_L_ctr_past = (clicks_L + 20 * 0.04) / (impressions_L + 20)`` (the same smoothing as the
product CTR: 20 pseudo-impressions at the prior ``ClickModel.ctr_prior``) and
``dense_L_log_impressions_past = log(1 + impressions_L)``; columns ``dense_query_*``,
``dense_query_product_*``, ``dense_query_aisle_*``. A query never seen on an earlier day gets
the prior and 0 at every level. They are computed day by day (:class:`QueryCountFeatures`:
sorted int64 keys with int32 counts, a query's key being a dense code of its 64-bit text hash):
16 bytes per distinct query and per distinct key of each level, at most 64 bytes per impression
of the whole period, in practice less (``query_count_keys`` in the manifest counts them; demo:
42k queries, 354k (query, product) and 130k (query, aisle) keys: 9.1 MB).

Relevance depends on the query text, which the features only see through the counts of queries
already seen (about half the eval-week impressions in ``demo`` carry a query never seen before);
the history terms depend on the purchases table, which they lack; appeal is learnable only
through ``sparse_product`` and the past CTR.

``synth_truth.parquet`` (row-aligned with impressions): true_label, hist_aisle, hist_brand,
hist_product, intent_kind, candidate_source, appeal, click_prob.

``synth_relevance_truth.parquet`` (relevance schema): for the first ``complete_label_queries``
relevance queries (2000; none in ``paper``), every MR/HR product of the catalog with its
noise-free label. The relevance table judges ~20 products per query; with this file
``embeddings.evaluate`` also scores full-catalog retrieval with complete judgments.
"""
from __future__ import annotations

import colorsys
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import prepare_workdir
from common.provenance import MadeFrom, canonical
from data import schema
from data.dataset import RELEVANCE_TRUTH_FILE, TRUTH_FILE, data_set, table_rel
from data.packshot import Packshot, render
from data.protocol import DAY_S, EVAL_DAYS, HISTORY_DAYS
from data.text import normalize_query
from data.vocab import CONTAINER_PLURAL, MODIFIERS, Vocabulary, brand_names, vocabulary

log = logging.getLogger("data.synth")

GENERATOR_VERSION = 2

# Intent kinds (``intent_kind`` in the truth file).
TYPE, BRAND_TYPE, TYPE_VARIANT, BRAND_TYPE_VARIANT, BRAND, ORGANIC_TYPE, AISLE = range(7)
KIND_NAMES = ("type", "brand_type", "type_variant", "brand_type_variant", "brand", "organic_type", "aisle")
_HAS_BRAND = np.array([0, 1, 0, 1, 1, 0, 0], dtype=bool)
_HAS_TYPE = np.array([1, 1, 1, 1, 0, 1, 0], dtype=bool)
_HAS_VARIANT = np.array([0, 0, 1, 1, 0, 0, 0], dtype=bool)

# Candidate sources (``candidate_source`` in the truth file).
EXACT, NEAR, SAME_AISLE, POPULAR = range(4)

# Share of sessions and orders by hour of day (0..23).
HOUR_WEIGHTS = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1.2, 2.2, 3.2, 3.8, 4.2, 4.8,
                         5.2, 4.8, 4.3, 4.2, 4.6, 5.4, 6.0, 6.2, 5.6, 4.6, 3.2, 2.0])
HOUR_WEIGHTS = HOUR_WEIGHTS / HOUR_WEIGHTS.sum()


@dataclass(frozen=True)
class ProfileConfig:
    """Sizes of one profile (``--scale`` multiplies the product/user/session/query/store counts)."""

    n_products: int
    n_users: int
    n_sessions: int  # search sessions over the whole period (each shows 4-8 ad candidates)
    n_relevance_queries: int  # distinct query texts in the relevance table
    n_stores: int
    n_days: int = 244  # 2024-01-01 .. 2024-08-31; the last EVAL_DAYS (7) are the ranking evaluation split
    start_date: str = "2024-01-01"
    pairs_per_query: int = 20  # relevance pairs per query (on average)
    image_px: int = 96  # packshot side in pixels
    users_without_purchases: float = 0.3
    mean_orders_per_user: float = 10.0  # over the whole period, for users who buy
    min_candidates: int = 4
    max_candidates: int = 8
    variant_hidden_share: float = 0.3  # products whose variant shows only in the image
    organic_image_only_share: float = 0.5  # organic products whose "Organic" shows only in the image
    catalog_rows_per_group: int = 2048  # Parquet row group sizes (fixed: part of the byte-identical output)
    rows_per_group: int = 262_144
    relevance_queries_per_chunk: int = 20_000
    # relevance queries (the first ones drawn) whose complete noise-free MR/HR product list goes to
    # synth_relevance_truth.parquet: retrieval over the whole catalog with complete judgments
    complete_label_queries: int = 2000

    def scaled(self, factor: float) -> "ProfileConfig":
        if factor == 1.0:
            return self
        return dataclasses.replace(
            self,
            n_products=max(100, round(self.n_products * factor)),
            n_users=max(50, round(self.n_users * factor)),
            n_sessions=max(100, round(self.n_sessions * factor)),
            n_relevance_queries=max(50, round(self.n_relevance_queries * factor)),
            n_stores=max(2, round(self.n_stores * factor)),
        )


PROFILES: dict[str, ProfileConfig] = {
    "tiny": ProfileConfig(n_products=400, n_users=150, n_sessions=850, n_relevance_queries=150, n_stores=5,
                          n_days=120, mean_orders_per_user=4.0, catalog_rows_per_group=256, rows_per_group=4096),
    "demo": ProfileConfig(n_products=3500, n_users=5000, n_sessions=72_000, n_relevance_queries=2000, n_stores=40,
                          rows_per_group=65_536),
    "paper": ProfileConfig(n_products=400_000, n_users=500_000, n_sessions=4_000_000,
                           n_relevance_queries=1_600_000, n_stores=2000, rows_per_group=1_048_576,
                           complete_label_queries=0),  # an aisle query alone has tens of thousands of HR products
}


@dataclass(frozen=True)
class Behaviour:
    """Probabilities of the shoppers' and the ad system's choices (see the module docstring)."""

    intent_kind_probs: tuple[float, ...] = (0.16, 0.28, 0.16, 0.14, 0.10, 0.0, 0.16)  # KIND_NAMES order
    organic_query_share: float = 0.4
    query_synonym_share: float = 0.45
    query_modifier_share: float = 0.45
    query_second_modifier_share: float = 0.25
    query_swap_share: float = 0.2
    query_misspell_share: float = 0.12
    query_capital_share: float = 0.15
    fav_aisle_slot_probs: tuple[float, ...] = (0.55, 0.3, 0.15)
    n_fav_brands: int = 5
    n_staples: int = 4
    session_target_probs: tuple[float, ...] = (0.25, 0.55, 0.20)  # favourite brand, favourite aisle, popular
    purchase_item_probs: tuple[float, ...] = (0.35, 0.35, 0.30)  # staple, favourite brand, favourite aisle
    basket_extra_items_mean: float = 1.5
    weekend_session_factor: float = 1.15
    candidate_source_probs: tuple[float, ...] = (0.22, 0.28, 0.25, 0.25)  # exact, near, same aisle, popular
    auction_relevance: float = 0.5
    discount_share: float = 0.2
    discount_levels: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3)
    home_store_share: float = 0.8
    main_platform_share: float = 0.85
    platform_probs: tuple[float, ...] = (0.45, 0.35, 0.2)  # ios, android, web
    relevance_source_probs: tuple[float, ...] = (0.15, 0.30, 0.55)  # exact, near, popular
    relevance_oversample: float = 1.6
    relevance_uniform_target_share: float = 0.3
    label_split: tuple[float, ...] = (0.696, 0.205, 0.099)  # IR, MR, HR


@dataclass(frozen=True)
class ClickModel:
    """Coefficients of the planted click logit (see the module docstring)."""

    intercept: float = -5.05
    relevance_mr: float = 1.1
    relevance_hr: float = 2.3
    history_aisle: float = 0.6
    history_brand: float = 0.8
    history_product: float = 1.0
    position_log1p: float = -0.5
    appeal_sd: float = 0.4
    store_sd: float = 0.15
    platform: tuple[float, ...] = (0.0, 0.1, -0.2)
    evening: float = 0.2
    night: float = -0.2
    weekend: float = 0.1
    discount: float = 2.0
    price_sensitivity_mean: float = 0.4
    price_sensitivity_sd: float = 0.25
    ctr_prior: float = 0.04
    ctr_prior_strength: float = 20.0


@dataclass
class SynthArgs:
    """Generate the synthetic marketplace tables under DIR/data."""

    profile: str = field(default="demo", metadata={"help": f"size profile: one of {', '.join(PROFILES)}"})
    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "random seed (>= 0)"})
    label_noise: float = field(default=0.0, metadata={"help": "share of relevance labels flipped (0..1)"})
    scale: float = field(default=1.0, metadata={"help": "multiply the profile's product/user/session/query counts"})
    query_counts: bool = field(default=True, metadata={
        "help": "add the query counting features (past CTR and impressions of the query, (query, product) and "
                "(query, aisle)) to the impressions; --no-query-counts gives the baseline without query signal"})
    force: bool = field(default=False, metadata={"help": "regenerate even if the outputs match these settings"})


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


_S_CATALOG, _S_BRANDS, _S_USERS, _S_STORES, _S_RELEVANCE, _S_PURCHASES, _S_SESSIONS = range(7)


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


def _categorical(rng: np.random.Generator, probs: Sequence[float], n: int) -> np.ndarray:
    """``[n]`` draws of an index ``k`` with probability ``probs[k] / sum(probs)``."""
    cum = np.cumsum(probs) / np.sum(probs)
    return np.minimum(np.searchsorted(cum, rng.random(n), side="right"), len(cum) - 1)


def _pick_slot(rng: np.random.Generator, table: np.ndarray, rows: np.ndarray, counts: np.ndarray | None = None,
               probs: Sequence[float] | None = None) -> np.ndarray:
    """Pick one entry of each row ``table[rows]`` (``table`` is ``[R, K]``): by ``probs`` over the K
    columns, else uniformly over the first ``counts[row]`` columns (all K when ``counts`` is None)."""
    if probs is not None:
        slot = _categorical(rng, probs, len(rows))
    else:
        width = counts[rows] if counts is not None else table.shape[1]
        slot = np.floor(rng.random(len(rows)) * width).astype(np.int64)
    return table[rows, slot]


# --------------------------------------------------------------------------------------------
# Catalog


@dataclass
class Catalog:
    """Product attributes as parallel ``[n_products]`` arrays (index = product_id - 1)."""

    vocab: Vocabulary
    brand_name: list[str]
    brand_aisle: np.ndarray  # [n_brands]
    brand_rgb: np.ndarray  # [n_brands, 3] uint8
    brand_makes: np.ndarray  # [n_brands, n_types] bool
    brand_popularity: np.ndarray
    aisle: np.ndarray
    brand: np.ndarray
    type: np.ndarray
    variant: np.ndarray
    container: np.ndarray  # index into the type's containers
    amount: np.ndarray  # index into the type's amounts
    pack: np.ndarray  # pack count
    organic: np.ndarray
    organic_in_title: np.ndarray
    variant_in_title: np.ndarray
    price: np.ndarray
    price_z: np.ndarray
    popularity: np.ndarray
    appeal: np.ndarray
    jitter: np.ndarray  # [n_products, 3] int: dx, dy, background
    samplers: dict[str, GroupedSampler] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.aisle)

    @property
    def product_id(self) -> np.ndarray:
        return np.arange(1, self.n + 1, dtype=np.int64)

    def key(self, pool: str, aisle=None, brand=None, type_=None, variant=None, organic=None) -> np.ndarray:
        """The int64 sampler key of ``pool`` for the given attribute arrays."""
        v = self.vocab
        n_t, n_v = len(v.types), len(v.variant_names)
        if pool == "aisle":
            return np.asarray(aisle, dtype=np.int64)
        if pool == "aisle_group":
            return v.aisle_group_ids[aisle]
        if pool == "brand":
            return np.asarray(brand, dtype=np.int64)
        if pool == "type":
            return np.asarray(type_, dtype=np.int64)
        if pool == "type_group":
            return v.type_group[type_]
        if pool == "brand_type":
            return np.asarray(brand, dtype=np.int64) * n_t + type_
        if pool == "type_variant":
            return np.asarray(type_, dtype=np.int64) * n_v + variant
        if pool == "brand_type_variant":
            return (np.asarray(brand, dtype=np.int64) * n_t + type_) * n_v + variant
        if pool == "type_organic":
            return np.asarray(type_, dtype=np.int64) * 2 + np.asarray(organic, dtype=np.int64)
        if pool in ("all", "uniform"):
            return np.zeros(len(aisle), dtype=np.int64)
        raise ValueError(pool)

    def build_samplers(self) -> None:
        attrs = dict(aisle=self.aisle, brand=self.brand, type_=self.type, variant=self.variant, organic=self.organic)
        for pool in ("aisle", "aisle_group", "brand", "type", "type_group", "brand_type", "type_variant",
                     "brand_type_variant", "type_organic", "all"):
            self.samplers[pool] = GroupedSampler(self.key(pool, **attrs), self.popularity)
        self.samplers["uniform"] = GroupedSampler(np.zeros(self.n, dtype=np.int64), np.ones(self.n))
        self.samplers["brand_in_aisle"] = GroupedSampler(self.brand_aisle, self.brand_popularity)

    def draw(self, rng: np.random.Generator, pool: str, **attrs) -> np.ndarray:
        return self.samplers[pool].sample(rng, self.key(pool, **attrs))

    def title(self, i: int) -> str:
        v = self.vocab
        ptype = v.types[self.type[i]]
        words = [self.brand_name[self.brand[i]]]
        if self.organic_in_title[i]:
            words.append("Organic")
        words.append(_title_case(ptype.name))
        if self.variant_in_title[i]:
            words.append(_title_case(v.variant_names[self.variant[i]]))
        container = ptype.containers[self.container[i]]
        amount, pack = ptype.amounts[self.amount[i]], int(self.pack[i])
        if pack > 1:
            words.append(f"{pack} x {amount} {CONTAINER_PLURAL.get(container, container.capitalize() + 's')}")
        else:
            words.append(f"{amount} {container.capitalize()}")
        return " ".join(words)

    def size_text(self, i: int) -> str:
        ptype = self.vocab.types[self.type[i]]
        amount, pack = ptype.amounts[self.amount[i]], int(self.pack[i])
        return f"{pack} x {amount}" if pack > 1 else amount


_ACRONYMS = {"ipa", "bbq", "pb", "tv"}
_LOWER = {"and", "n", "of", "for", "with"}


def _title_case(text: str) -> str:
    return " ".join(w.upper() if w in _ACRONYMS else w if w in _LOWER else w[:1].upper() + w[1:] for w in text.split())


def _padded(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``[R, max_len]`` int64 table (padded with the row's first entry) and ``[R]`` lengths."""
    width = max(len(x) for x in lists)
    table = np.array([list(x) + [x[0]] * (width - len(x)) for x in lists], dtype=np.int64)
    return table, np.array([len(x) for x in lists], dtype=np.int64)


def build_catalog(cfg: ProfileConfig, seed: int, clicks: ClickModel) -> Catalog:
    """Draw brands and products (attributes only; titles and images are made per chunk)."""
    vocab = vocabulary()
    n_aisles, n_types = len(vocab.aisles), len(vocab.types)
    aisle_w = np.array([a.weight for a in vocab.aisles])
    aisle_p = aisle_w / aisle_w.sum()

    rng = _rng(seed, _S_BRANDS)
    n_brands = max(2 * n_aisles, cfg.n_products // 12)
    brand_aisle = np.concatenate([np.repeat(np.arange(n_aisles), 2),
                                  _categorical(rng, aisle_p, n_brands - 2 * n_aisles)])
    brand_popularity = rng.lognormal(0.0, 0.8, n_brands)
    brand_tier = rng.normal(0.0, 0.2, n_brands)
    hsv = np.stack([rng.random(n_brands), rng.uniform(0.55, 0.95, n_brands), rng.uniform(0.3, 0.85, n_brands)], 1)
    brand_rgb = np.array([colorsys.hsv_to_rgb(*x) for x in hsv]) * 255
    names = brand_names(rng, n_brands, vocab.words())
    types_of_aisle = [np.flatnonzero(vocab.type_aisle == a) for a in range(n_aisles)]
    brand_types = []
    brand_makes = np.zeros((n_brands, n_types), dtype=bool)
    n_made = 1 + rng.binomial(3, 0.4, n_brands)
    for b in range(n_brands):
        options = types_of_aisle[brand_aisle[b]]
        made = np.sort(rng.choice(options, size=min(n_made[b], len(options)), replace=False))
        brand_types.append(made.tolist())
        brand_makes[b, made] = True

    rng = _rng(seed, _S_CATALOG)
    n = cfg.n_products
    aisle = _categorical(rng, aisle_p, n)
    brand = GroupedSampler(brand_aisle, brand_popularity).sample(rng, aisle)
    type_table, type_counts = _padded(brand_types)
    ptype = _pick_slot(rng, type_table, brand, type_counts)
    group = vocab.type_group[ptype]
    variant_table, variant_counts = _padded([g.variants for g in vocab.groups])
    variant = _pick_slot(rng, variant_table, group, variant_counts)
    n_containers = np.array([len(t.containers) for t in vocab.types])
    n_amounts = np.array([len(t.amounts) for t in vocab.types])
    pack_table, n_packs = _padded([t.packs for t in vocab.types])
    container = np.floor(rng.random(n) * n_containers[ptype]).astype(np.int64)
    amount = np.floor(rng.random(n) * n_amounts[ptype]).astype(np.int64)
    pack = _pick_slot(rng, pack_table, ptype, n_packs)
    organic_share = np.array([a.organic_share for a in vocab.aisles])
    organic = rng.random(n) < organic_share[aisle]
    organic_in_title = organic & (rng.random(n) >= cfg.organic_image_only_share)
    variant_in_title = rng.random(n) >= cfg.variant_hidden_share
    base_price = np.array([t.base_price for t in vocab.types])
    price = (base_price[ptype] * (1 + 0.6 * amount) * pack.astype(float) ** 0.85
             * np.exp(brand_tier[brand] + rng.normal(0.0, 0.08, n)) * np.where(organic, 1.3, 1.0))
    price = np.maximum(0.49, np.round(price * 2) / 2 - 0.01)
    log_price = np.log(price)
    cnt = np.bincount(ptype, minlength=n_types).astype(float)
    mean = np.bincount(ptype, log_price, n_types) / np.maximum(cnt, 1)
    var = np.bincount(ptype, (log_price - mean[ptype]) ** 2, n_types) / np.maximum(cnt, 1)
    price_z = (log_price - mean[ptype]) / np.where(var > 0, np.sqrt(var), 1.0)[ptype]
    popularity = rng.lognormal(0.0, 1.0, n) * np.sqrt(brand_popularity[brand])
    appeal = rng.normal(0.0, clicks.appeal_sd, n)
    jitter = np.stack([rng.integers(-3, 4, n), rng.integers(-3, 4, n), rng.integers(236, 256, n)], 1)
    catalog = Catalog(vocab, names, brand_aisle, brand_rgb.astype(np.uint8), brand_makes, brand_popularity,
                      aisle, brand, ptype, variant, container, amount, pack, organic, organic_in_title,
                      variant_in_title, price, price_z, popularity, appeal, jitter)
    catalog.build_samplers()
    return catalog


CATALOG_EXTRA = [pa.field("product_type", pa.string()), pa.field("variant", pa.string()),
                 pa.field("container", pa.string()), pa.field("size", pa.string()),
                 pa.field("pack_count", pa.int32()), pa.field("price", pa.float64()),
                 pa.field("organic", pa.bool_()), pa.field("variant_in_title", pa.bool_()),
                 pa.field("organic_in_title", pa.bool_())]


def catalog_batch(catalog: Catalog, start: int, stop: int, image_px: int) -> pa.Table:
    """Rows ``start..stop-1`` of the catalog table, titles and packshots included."""
    v = catalog.vocab
    idx = range(start, stop)
    images = []
    for i in idx:
        ptype = v.types[catalog.type[i]]
        shot = Packshot(container=ptype.containers[catalog.container[i]],
                        body_rgb=v.variant_rgb[catalog.variant[i]],
                        label_rgb=tuple(int(c) for c in catalog.brand_rgb[catalog.brand[i]]),
                        brand=catalog.brand_name[catalog.brand[i]], organic=bool(catalog.organic[i]),
                        dx=int(catalog.jitter[i, 0]), dy=int(catalog.jitter[i, 1]),
                        background=int(catalog.jitter[i, 2]))
        images.append(render(shot, image_px))
    sl = slice(start, stop)
    return pa.Table.from_arrays([
        pa.array(catalog.product_id[sl]),
        pa.array([catalog.title(i) for i in idx], pa.string()),
        pa.array([v.aisles[a].name for a in catalog.aisle[sl]], pa.string()),
        pa.array(images, pa.binary()),
        pa.array([catalog.brand_name[b] for b in catalog.brand[sl]], pa.string()),
        pa.array([v.types[t].name for t in catalog.type[sl]], pa.string()),
        pa.array([v.variant_names[x] for x in catalog.variant[sl]], pa.string()),
        pa.array([v.types[catalog.type[i]].containers[catalog.container[i]] for i in idx], pa.string()),
        pa.array([catalog.size_text(i) for i in idx], pa.string()),
        pa.array(catalog.pack[sl].astype(np.int32)),
        pa.array(catalog.price[sl]),
        pa.array(catalog.organic[sl]),
        pa.array(catalog.variant_in_title[sl]),
        pa.array(catalog.organic_in_title[sl]),
    ], schema=schema.schema("catalog", CATALOG_EXTRA))


# --------------------------------------------------------------------------------------------
# Intents, query texts and the relevance rule


@dataclass
class Intents:
    """Parallel ``[n]`` arrays describing search intents (-1 = attribute not part of the intent)."""

    kind: np.ndarray
    aisle: np.ndarray  # always set: the target product's aisle
    brand: np.ndarray
    type: np.ndarray
    variant: np.ndarray
    organic: np.ndarray  # bool

    def take(self, idx: np.ndarray) -> "Intents":
        return Intents(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def sample_intents(rng: np.random.Generator, catalog: Catalog, targets: np.ndarray, behaviour: Behaviour) -> Intents:
    """An intent per target product: a kind, then the target's attributes that kind keeps."""
    n = len(targets)
    kind = _categorical(rng, behaviour.intent_kind_probs, n)
    kind = np.where(catalog.organic[targets] & (rng.random(n) < behaviour.organic_query_share), ORGANIC_TYPE, kind)
    return Intents(kind=kind, aisle=catalog.aisle[targets],
                   brand=np.where(_HAS_BRAND[kind], catalog.brand[targets], -1),
                   type=np.where(_HAS_TYPE[kind], catalog.type[targets], -1),
                   variant=np.where(_HAS_VARIANT[kind], catalog.variant[targets], -1),
                   organic=kind == ORGANIC_TYPE)


def _misspell(word: str, code: int) -> str:
    if len(word) < 4:
        return word
    i = 1 + code % (len(word) - 2)
    op = (code >> 10) % 3
    if op == 0:
        return word[:i] + word[i + 1:]
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i] + word[i:]


def render_queries(rng: np.random.Generator, catalog: Catalog, intents: Intents, behaviour: Behaviour) -> list[str]:
    """The text a shopper types for each intent (synonyms, modifiers, word order, typos)."""
    v = catalog.vocab
    n = len(intents.kind)
    use_synonym = (rng.random(n) < behaviour.query_synonym_share).tolist()
    synonym_u = rng.random(n).tolist()
    modifier = np.where(rng.random(n) < behaviour.query_modifier_share,
                        rng.integers(0, len(MODIFIERS), n), -1)
    second_modifier = np.where((modifier >= 0) & (rng.random(n) < behaviour.query_second_modifier_share),
                               rng.integers(0, len(MODIFIERS), n), -1).tolist()
    modifier = modifier.tolist()
    swap = (rng.random(n) < behaviour.query_swap_share).tolist()
    misspell = np.where(rng.random(n) < behaviour.query_misspell_share, rng.integers(0, 1 << 30, n), -1).tolist()
    capital = (rng.random(n) < behaviour.query_capital_share).tolist()
    kinds, aisles, brands = intents.kind.tolist(), intents.aisle.tolist(), intents.brand.tolist()
    types, variants = intents.type.tolist(), intents.variant.tolist()
    queries = []
    for i in range(n):
        kind = kinds[i]
        if kind == AISLE:
            names = (v.aisles[aisles[i]].name, *v.aisles[aisles[i]].synonyms)
        elif types[i] >= 0:
            names = (v.types[types[i]].name, *v.types[types[i]].synonyms)
        else:
            names = ("",)
        noun = names[1 + int(synonym_u[i] * (len(names) - 1))] if use_synonym[i] and len(names) > 1 else names[0]
        brand = catalog.brand_name[brands[i]].lower() if brands[i] >= 0 else ""
        if misspell[i] >= 0:
            if brand:
                brand = _misspell(brand, misspell[i])
            else:
                words = noun.split()
                longest = max(range(len(words)), key=lambda j: len(words[j]))
                words[longest] = _misspell(words[longest], misspell[i])
                noun = " ".join(words)
        variant = v.variant_names[variants[i]] if variants[i] >= 0 else ""
        if kind == BRAND:
            words = [brand]
        elif kind == ORGANIC_TYPE:
            words = [noun, "organic"] if swap[i] else ["organic", noun]
        elif kind == BRAND_TYPE_VARIANT:
            words = [brand, noun, variant] if swap[i] else [brand, variant, noun]
        elif kind == BRAND_TYPE:
            words = [noun, brand] if swap[i] else [brand, noun]
        elif kind == TYPE_VARIANT:
            words = [noun, variant] if swap[i] else [variant, noun]
        else:
            words = [noun]
        if modifier[i] >= 0:
            words = [MODIFIERS[modifier[i]], *words] if swap[i] else [*words, MODIFIERS[modifier[i]]]
        if second_modifier[i] >= 0 and second_modifier[i] != modifier[i]:
            words.append(MODIFIERS[second_modifier[i]])
        text = " ".join(words)
        queries.append(text[:1].upper() + text[1:] if capital[i] else text)
    return queries


def relevance_labels(catalog: Catalog, intents: Intents, products: np.ndarray) -> np.ndarray:
    """``[n]`` int8 label (0 IR, 1 MR, 2 HR) of product ``products[i]`` for intent ``i``."""
    v = catalog.vocab
    p_brand, p_type = catalog.brand[products], catalog.type[products]
    has_brand, has_type = intents.brand >= 0, intents.type >= 0
    is_aisle = intents.kind == AISLE
    hr = ((~has_brand | (p_brand == intents.brand)) & (~has_type | (p_type == intents.type))
          & ((intents.variant < 0) | (catalog.variant[products] == intents.variant))
          & (~intents.organic | catalog.organic[products])
          & (~is_aisle | (catalog.aisle[products] == intents.aisle)))
    type_group = v.type_group
    aisle_group = v.aisle_group_ids
    mr = ((has_type & (type_group[p_type] == type_group[np.maximum(intents.type, 0)]))
          | (~has_type & has_brand & catalog.brand_makes[np.maximum(intents.brand, 0), p_type])
          | (is_aisle & (aisle_group[catalog.aisle[products]] == aisle_group[intents.aisle])))
    return np.where(hr, schema.HR, np.where(mr, schema.MR, schema.IR)).astype(np.int8)


def draw_candidates(rng: np.random.Generator, catalog: Catalog, intents: Intents, source: np.ndarray) -> np.ndarray:
    """One product per intent from pool ``source`` (EXACT, NEAR, SAME_AISLE, POPULAR), never -1."""
    n = len(source)
    out = np.full(n, -1, dtype=np.int64)
    # exact pools, by intent kind
    exact_pool = {TYPE: "type", BRAND_TYPE: "brand_type", TYPE_VARIANT: "type_variant",
                  BRAND_TYPE_VARIANT: "brand_type_variant", BRAND: "brand", ORGANIC_TYPE: "type_organic",
                  AISLE: "aisle"}
    for kind, pool in exact_pool.items():
        rows = np.flatnonzero((source == EXACT) & (intents.kind == kind))
        if len(rows):
            it = intents.take(rows)
            out[rows] = catalog.draw(rng, pool, aisle=it.aisle, brand=it.brand, type_=it.type,
                                     variant=it.variant, organic=np.ones(len(rows), dtype=np.int64))
    near = source == NEAR
    for mask, pool in ((near & (intents.type >= 0), "type_group"), (near & (intents.kind == BRAND), "aisle"),
                       (near & (intents.kind == AISLE), "aisle_group"), (source == SAME_AISLE, "aisle")):
        rows = np.flatnonzero(mask)
        if len(rows):
            out[rows] = catalog.draw(rng, pool, aisle=intents.aisle[rows], type_=intents.type[rows])
    rows = np.flatnonzero((source == POPULAR) | (out < 0))
    out[rows] = catalog.draw(rng, "all", aisle=np.zeros(len(rows), dtype=np.int64))
    return out


# --------------------------------------------------------------------------------------------
# Relevance table


def _query_hashes(texts: Sequence[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(normalize_query(t).encode(), digest_size=8).digest(), "little")
                     for t in texts], dtype=np.uint64)


@dataclass
class LabelCounts:
    clean: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    noisy: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    flipped: int = 0
    queries: int = 0


def complete_labels(catalog: Catalog, intents: Intents, texts: Sequence[str]) -> pa.Table:
    """Every MR/HR product of each intent (noise-free :func:`relevance_labels` over the whole
    catalog), as relevance rows (query text ``texts[i]`` of intent ``i``, product_id, label)."""
    queries, products, labels = [], [], []
    every_product = np.arange(catalog.n)
    for i, text in enumerate(texts):
        label = relevance_labels(catalog, intents.take(np.full(catalog.n, i)), every_product)
        relevant = np.flatnonzero(label >= schema.MR)
        queries += [text] * len(relevant)
        products.append(relevant + 1)
        labels.append(label[relevant])
    return pa.Table.from_arrays([pa.array(queries, pa.string()),
                                 pa.array(np.concatenate(products) if products else [], pa.int64()),
                                 pa.array(np.concatenate(labels) if labels else [], pa.int8())],
                                schema=schema.schema("relevance"))


def relevance_batches(catalog: Catalog, cfg: ProfileConfig, behaviour: Behaviour, seed: int, label_noise: float,
                      counts: LabelCounts) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Relevance rows for ``n_relevance_queries`` distinct queries, in chunks of queries, each with
    the complete MR/HR lists (:func:`complete_labels`) of its queries among the first
    ``complete_label_queries``.

    Every normalised query text occurs once in the table; each query gets ``pairs_per_query``
    pairs on average, subsampled per chunk to the target label split.
    """
    seen = np.zeros(0, dtype=np.uint64)  # hashes of the normalised query texts already used
    target_split = np.asarray(behaviour.label_split)
    per_query = math.ceil(behaviour.relevance_oversample * cfg.pairs_per_query)
    for chunk in itertools.count():
        need = cfg.n_relevance_queries - counts.queries
        if need <= 0:
            return
        rng = _rng(seed, _S_RELEVANCE, chunk)
        n_q = min(cfg.relevance_queries_per_chunk, 2 * need + 16)
        uniform = rng.random(n_q) < behaviour.relevance_uniform_target_share
        targets = np.where(uniform, catalog.draw(rng, "uniform", aisle=np.zeros(n_q, dtype=np.int64)),
                           catalog.draw(rng, "all", aisle=np.zeros(n_q, dtype=np.int64)))
        intents = sample_intents(rng, catalog, targets, behaviour)
        texts = render_queries(rng, catalog, intents, behaviour)
        hashes = _query_hashes(texts)
        _, first = np.unique(hashes, return_index=True)
        keep = np.zeros(n_q, dtype=bool)
        keep[first] = True
        keep &= ~np.isin(hashes, seen)
        q_idx = np.flatnonzero(keep)[:need]
        if not len(q_idx):
            raise RuntimeError(f"relevance chunk {chunk} found no new query text; the vocabulary is exhausted")
        seen = np.union1d(seen, hashes[q_idx])
        complete = q_idx[:max(0, cfg.complete_label_queries - counts.queries)]
        truth = complete_labels(catalog, intents.take(complete), [texts[i] for i in complete.tolist()])
        counts.queries += len(q_idx)
        rows = np.repeat(q_idx, per_query)
        pair_intents = intents.take(rows)
        source = np.array([EXACT, NEAR, POPULAR])[_categorical(rng, behaviour.relevance_source_probs, len(rows))]
        products = draw_candidates(rng, catalog, pair_intents, source)
        labels = relevance_labels(catalog, pair_intents, products)
        _, first = np.unique(rows * (catalog.n + 1) + products, return_index=True)
        rows, products, labels = rows[first], products[first], labels[first]
        # keep len(q_idx) * pairs_per_query pairs in the target split (fewer, same split, if a label runs short)
        have = np.bincount(labels, minlength=3)
        total = min(len(q_idx) * cfg.pairs_per_query, np.min(have / target_split))
        keep_rows = [rng.choice(np.flatnonzero(labels == label), size=min(int(have[label]),
                                                                          round(total * target_split[label])),
                                replace=False) for label in (schema.IR, schema.MR, schema.HR)]
        sel = np.sort(np.concatenate(keep_rows))
        rows, products, labels = rows[sel], products[sel], labels[sel]
        counts.clean += np.bincount(labels, minlength=3)
        flip = rng.random(len(labels)) < label_noise
        mr_to = np.where(rng.random(len(labels)) < 0.5, schema.HR, schema.IR)
        flipped_label = np.where(labels == schema.MR, mr_to, schema.MR).astype(np.int8)
        labels = np.where(flip, flipped_label, labels).astype(np.int8)
        counts.flipped += int(flip.sum())
        counts.noisy += np.bincount(labels, minlength=3)
        yield pa.Table.from_arrays(
            [pa.array([texts[i] for i in rows.tolist()], pa.string()), pa.array(products + 1, pa.int64()),
             pa.array(labels, pa.int8())], schema=schema.schema("relevance")), truth


# --------------------------------------------------------------------------------------------
# Users, purchases and the 84-day history


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
    rng = _rng(seed, _S_USERS)
    n = cfg.n_users
    n_aisles = len(catalog.vocab.aisles)
    has_purchases = rng.random(n) >= cfg.users_without_purchases
    aisle_size = np.bincount(catalog.aisle, minlength=n_aisles) + 1.0
    gumbel = np.log(aisle_size)[None, :] - np.log(-np.log(rng.random((n, n_aisles))))
    fav_aisles = np.argsort(-gumbel, axis=1)[:, :3]
    users = np.arange(n)
    fav_brands = np.stack([
        catalog.samplers["brand_in_aisle"].sample(
            rng, _pick_slot(rng, fav_aisles, users, probs=behaviour.fav_aisle_slot_probs))
        for _ in range(behaviour.n_fav_brands)], 1)
    staples = np.stack([
        catalog.draw(rng, "brand", brand=_pick_slot(rng, fav_brands, users))
        for _ in range(behaviour.n_staples)], 1)
    mean_rate = cfg.mean_orders_per_user / cfg.n_days
    order_rate = np.where(has_purchases, rng.gamma(2.0, mean_rate / 2.0, n), 0.0)
    activity = rng.gamma(1.0, 1.0, n)
    sensitivity = np.maximum(0.0, rng.normal(clicks.price_sensitivity_mean, clicks.price_sensitivity_sd, n))
    home_store = rng.integers(0, cfg.n_stores, n)
    platform = _categorical(rng, behaviour.platform_probs, n)
    out = Users(has_purchases, fav_aisles, fav_brands, staples, order_rate, activity, sensitivity, home_store,
                platform)
    out.activity_sampler = GroupedSampler(np.zeros(n, dtype=np.int64), activity)
    return out


def _favourite_brand_products(rng: np.random.Generator, catalog: Catalog, users: Users, user: np.ndarray) -> np.ndarray:
    return catalog.draw(rng, "brand", brand=_pick_slot(rng, users.fav_brands, user))


def _favourite_aisle_products(rng: np.random.Generator, catalog: Catalog, users: Users, user: np.ndarray,
                              behaviour: Behaviour) -> np.ndarray:
    aisle = _pick_slot(rng, users.fav_aisles, user, probs=behaviour.fav_aisle_slot_probs)
    return catalog.draw(rng, "aisle", aisle=aisle)


def _popular_products(rng: np.random.Generator, catalog: Catalog, n: int) -> np.ndarray:
    return catalog.draw(rng, "all", aisle=np.zeros(n, dtype=np.int64))


def _choose_products(rng: np.random.Generator, catalog: Catalog, probs: Sequence[float],
                     options: Sequence[np.ndarray]) -> np.ndarray:
    """Per row, the product of option ``k ~ probs``; a popular product where that option has none (-1)."""
    n = len(options[0])
    out = np.choose(_categorical(rng, probs, n), options)
    return np.where(out < 0, _popular_products(rng, catalog, n), out)


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


def _seconds_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    hour = _categorical(rng, HOUR_WEIGHTS, n)
    return hour * 3600 + rng.integers(0, 3600, n)


def purchases_of_day(rng: np.random.Generator, catalog: Catalog, users: Users, behaviour: Behaviour,
                     day_start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, ts, product index) of one day's purchases, sorted by (ts, user, product)."""
    orders = rng.poisson(users.order_rate)
    order_user = np.repeat(np.arange(users.n), orders)
    order_ts = day_start + _seconds_of_day(rng, len(order_user))
    items = 1 + rng.poisson(behaviour.basket_extra_items_mean, len(order_user))
    user, ts = np.repeat(order_user, items), np.repeat(order_ts, items)
    product = _choose_products(rng, catalog, behaviour.purchase_item_probs, (
        _pick_slot(rng, users.staples, user), _favourite_brand_products(rng, catalog, users, user),
        _favourite_aisle_products(rng, catalog, users, user, behaviour)))
    order = np.lexsort((product, user, ts))
    return user[order], ts[order], product[order]


# --------------------------------------------------------------------------------------------
# Counting features: past impressions and clicks per key, from earlier days only


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
    (:func:`_query_hashes`): sorted hashes with parallel codes, 16 bytes per distinct query.
    Codes are given in order of the first day a query is counted (by hash within a day)."""

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
        new = np.setdiff1d(hashes, self.hashes)
        pos = np.searchsorted(self.hashes, new)
        self.hashes = np.insert(self.hashes, pos, new)
        self.codes = np.insert(self.codes, pos, len(self.codes) + np.arange(len(new), dtype=np.int64))
        return self.lookup(hashes)


class QueryCountFeatures:
    """The query counting features of the impressions (module docstring): past impressions and
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


# --------------------------------------------------------------------------------------------
# Sessions, candidates and clicks


BASE_DENSE_FEATURES = [pa.field("dense_price", pa.float32()), pa.field("dense_discount", pa.float32()),
                       pa.field("dense_hour", pa.float32()), pa.field("dense_product_ctr_past", pa.float32())]
SPARSE_FEATURES = [pa.field("sparse_store", pa.int64()), pa.field("sparse_aisle", pa.int64()),
                   pa.field("sparse_brand", pa.int64()), pa.field("sparse_platform", pa.int64()),
                   pa.field("sparse_product", pa.int64()), pa.field("sparse_hour_bucket", pa.int64()),
                   pa.field("sparse_weekday", pa.int64())]
# The query counting features: past smoothed CTR and log(1 + past impressions) per level.
QUERY_COUNT_LEVELS = ("query", "query_product", "query_aisle")
QUERY_COUNT_FEATURES = [pa.field(f"dense_{level}_{what}_past", pa.float32())
                        for level in QUERY_COUNT_LEVELS for what in ("ctr", "log_impressions")]


def impression_features(query_counts: bool) -> list[pa.Field]:
    """The feature columns of the impressions table, with or without the query counting features."""
    return BASE_DENSE_FEATURES + (QUERY_COUNT_FEATURES if query_counts else []) + SPARSE_FEATURES


TRUTH_SCHEMA = pa.schema([pa.field("true_label", pa.int8()), pa.field("hist_aisle", pa.int8()),
                          pa.field("hist_brand", pa.int8()), pa.field("hist_product", pa.int8()),
                          pa.field("intent_kind", pa.int8()), pa.field("candidate_source", pa.int8()),
                          pa.field("appeal", pa.float32()), pa.field("click_prob", pa.float32())])
PURCHASES_SCHEMA = schema.schema("purchases")


@dataclass
class MarketState:
    """Everything carried from one day to the next."""

    history: PurchaseHistory
    product_impressions: np.ndarray
    product_clicks: np.ndarray
    store_effect: np.ndarray
    query_counts: QueryCountFeatures | None = None  # None: impressions without the query counting features
    next_session_id: int = 1


@dataclass
class DayResult:
    purchases: pa.Table
    impressions: pa.Table
    truth: pa.Table  # row-aligned with impressions
    session_hashes: np.ndarray  # [sessions] uint64 hash of each session's normalised query (_query_hashes)
    row_session: np.ndarray  # [rows] index into session_hashes


@dataclass
class ImpressionStats:
    rows: int = 0
    clicks: int = 0
    by_label: np.ndarray = field(default_factory=lambda: np.zeros((3, 2), dtype=np.int64))  # [label, (rows, clicks)]
    by_history_aisle: np.ndarray = field(default_factory=lambda: np.zeros((2, 2), dtype=np.int64))  # buyers only
    eval_rows: int = 0
    eval_rows_new_query: int = 0
    query_count_keys: dict[str, int] | None = None  # QueryCountFeatures.sizes() after the last day


@dataclass
class Sessions:
    """One day's search sessions in time order, parallel ``[n_sessions]`` arrays (indices, not ids)."""

    user: np.ndarray
    ts: np.ndarray
    store: np.ndarray
    platform: np.ndarray
    intents: Intents
    queries: list[str]
    n_candidates: np.ndarray


def sessions_of_day(rng: np.random.Generator, cfg: ProfileConfig, catalog: Catalog, users: Users,
                    behaviour: Behaviour, day_start: int, weekend: bool) -> Sessions:
    """Who searches when, from which store and platform, for what (intent and query text)."""
    day_mean = (cfg.n_sessions / cfg.n_days * (behaviour.weekend_session_factor if weekend else 1.0)
                / ((5 + 2 * behaviour.weekend_session_factor) / 7))
    n = int(rng.poisson(day_mean))
    user = users.activity_sampler.sample(rng, np.zeros(n, dtype=np.int64))
    ts = day_start + _seconds_of_day(rng, n)
    store = np.where(rng.random(n) < behaviour.home_store_share, users.home_store[user],
                     rng.integers(0, cfg.n_stores, n))
    platform = np.where(rng.random(n) < behaviour.main_platform_share, users.platform[user],
                        rng.integers(0, len(behaviour.platform_probs), n))
    targets = _choose_products(rng, catalog, behaviour.session_target_probs, (
        _favourite_brand_products(rng, catalog, users, user),
        _favourite_aisle_products(rng, catalog, users, user, behaviour), _popular_products(rng, catalog, n)))
    intents = sample_intents(rng, catalog, targets, behaviour)
    queries = render_queries(rng, catalog, intents, behaviour)
    n_candidates = rng.integers(cfg.min_candidates, cfg.max_candidates + 1, n)
    order = np.argsort(ts, kind="stable")
    return Sessions(user[order], ts[order], store[order], platform[order], intents.take(order),
                    [queries[i] for i in order.tolist()], n_candidates[order])


@dataclass
class Candidates:
    """Ad candidates of a day, sorted by (session, position), parallel ``[rows]`` arrays."""

    session: np.ndarray  # index into the day's Sessions
    source: np.ndarray
    product: np.ndarray
    label: np.ndarray
    position: np.ndarray
    intent_kind: np.ndarray


def ad_candidates(rng: np.random.Generator, catalog: Catalog, sessions: Sessions, behaviour: Behaviour) -> Candidates:
    """Draw each session's candidates, drop repeats, label them, order them by the auction score."""
    session = np.repeat(np.arange(len(sessions.user)), sessions.n_candidates)
    source = _categorical(rng, behaviour.candidate_source_probs, len(session))
    intents = sessions.intents.take(session)
    product = draw_candidates(rng, catalog, intents, source)
    _, first = np.unique(session * (catalog.n + 1) + product, return_index=True)
    first = np.sort(first)
    session, source, product, intents = session[first], source[first], product[first], intents.take(first)
    label = relevance_labels(catalog, intents, product)
    score = rng.normal(0.0, 1.0, len(session)) + behaviour.auction_relevance * label
    rank = np.lexsort((-score, session))
    session = session[rank]
    position = np.arange(len(session)) - np.searchsorted(session, np.arange(len(sessions.user)))[session]
    return Candidates(session, source[rank], product[rank], label[rank], position, intents.kind[rank])


def click_logit(clicks: ClickModel, label: np.ndarray, hist: dict[str, np.ndarray], position: np.ndarray,
                appeal: np.ndarray, store_effect: np.ndarray, platform: np.ndarray, hour: np.ndarray,
                weekend: bool, discount: np.ndarray, price_sensitivity: np.ndarray,
                price_z: np.ndarray) -> np.ndarray:
    """The planted click logit (module docstring), every argument ``[rows]`` aligned."""
    return (clicks.intercept + np.where(label == schema.MR, clicks.relevance_mr, 0.0)
            + np.where(label == schema.HR, clicks.relevance_hr, 0.0)
            + clicks.history_aisle * hist["aisle"] + clicks.history_brand * hist["brand"]
            + clicks.history_product * hist["product"] + clicks.position_log1p * np.log1p(position)
            + appeal + store_effect + np.asarray(clicks.platform)[platform]
            + np.where((hour >= 18) & (hour <= 21), clicks.evening, 0.0) + np.where(hour <= 5, clicks.night, 0.0)
            + (clicks.weekend if weekend else 0.0) + clicks.discount * discount - price_sensitivity * price_z)


def simulate_day(day: int, cfg: ProfileConfig, catalog: Catalog, users: Users, behaviour: Behaviour,
                 clicks: ClickModel, state: MarketState, seed: int, start_ts: int) -> DayResult:
    """One day: purchases, then sessions, their ad candidates and clicks; updates ``state``."""
    day_start = start_ts + day * DAY_S
    weekday = datetime.fromtimestamp(day_start, timezone.utc).weekday()
    p_user, p_ts, p_product = purchases_of_day(_rng(seed, _S_PURCHASES, day), catalog, users, behaviour, day_start)
    rng = _rng(seed, _S_SESSIONS, day)
    sessions = sessions_of_day(rng, cfg, catalog, users, behaviour, day_start, weekend=weekday >= 5)
    cand = ad_candidates(rng, catalog, sessions, behaviour)
    product, session, n = cand.product, cand.session, len(cand.session)
    user, ts, store, platform = (sessions.user[session], sessions.ts[session], sessions.store[session],
                                 sessions.platform[session])
    discount = np.where(rng.random(n) < behaviour.discount_share,
                        np.asarray(behaviour.discount_levels)[rng.integers(0, len(behaviour.discount_levels), n)], 0.0)
    hist = state.history.matches(user, ts, product, p_user, p_ts, p_product)
    hour = (ts - day_start) // 3600
    logit = click_logit(clicks, cand.label, hist, cand.position, catalog.appeal[product], state.store_effect[store],
                        platform, hour, weekday >= 5, discount, users.price_sensitivity[user], catalog.price_z[product])
    prob = 1.0 / (1.0 + np.exp(-logit))
    clicked = (rng.random(n) < prob).astype(np.int8)
    ctr_past = smoothed_ctr(state.product_clicks[product], state.product_impressions[product], clicks.ctr_prior,
                            clicks.ctr_prior_strength)
    session_hashes = _query_hashes(sessions.queries)
    query_hash, aisle = session_hashes[session], catalog.aisle[product]
    query_counts = ([] if state.query_counts is None
                    else [pa.array(col) for col in state.query_counts.features(query_hash, product, aisle)])

    session_id = state.next_session_id + np.arange(len(sessions.user), dtype=np.int64)
    state.next_session_id += len(sessions.user)
    impressions = pa.Table.from_arrays([
        pa.array(ts.astype("datetime64[s]"), schema.TIMESTAMP), pa.array(session_id[session]),
        pa.array(user + 1, pa.int64()), pa.array([sessions.queries[s] for s in session.tolist()], pa.string()),
        pa.array(product + 1, pa.int64()), pa.array(cand.position.astype(np.int32)), pa.array(clicked),
        pa.array(catalog.price[product].astype(np.float32)), pa.array(discount.astype(np.float32)),
        pa.array(hour.astype(np.float32)), pa.array(ctr_past.astype(np.float32)), *query_counts,
        pa.array(store.astype(np.int64)), pa.array(aisle.astype(np.int64)),
        pa.array(catalog.brand[product].astype(np.int64)), pa.array(platform.astype(np.int64)),
        pa.array(product + 1, pa.int64()), pa.array((hour // 4).astype(np.int64)),
        pa.array(np.full(n, weekday, dtype=np.int64)),
    ], schema=schema.schema("impressions", impression_features(state.query_counts is not None)))
    truth = pa.Table.from_arrays([
        pa.array(cand.label), pa.array(hist["aisle"].astype(np.int8)), pa.array(hist["brand"].astype(np.int8)),
        pa.array(hist["product"].astype(np.int8)), pa.array(cand.intent_kind.astype(np.int8)),
        pa.array(cand.source.astype(np.int8)), pa.array(catalog.appeal[product].astype(np.float32)),
        pa.array(prob.astype(np.float32))], schema=TRUTH_SCHEMA)
    purchases = pa.Table.from_arrays([pa.array(p_ts.astype("datetime64[s]"), schema.TIMESTAMP),
                                      pa.array(p_user + 1, pa.int64()), pa.array(p_product + 1, pa.int64())],
                                     schema=PURCHASES_SCHEMA)

    np.add.at(state.product_impressions, product, 1)
    np.add.at(state.product_clicks, product, clicked.astype(np.int64))
    if state.query_counts is not None:
        state.query_counts.add_day(query_hash, product, aisle, clicked)
    state.history.add_day(p_user, p_ts, p_product, day_start + DAY_S)
    return DayResult(purchases, impressions, truth, session_hashes, session)


# --------------------------------------------------------------------------------------------
# Output: chunked, validated, atomic


class TableSink(contextlib.AbstractContextManager):
    """Validate incoming chunks and write them as fixed-size row groups to ``tmp`` (final name ``dest``).

    As a context manager it closes the file on success and abandons it on an error.
    """

    def __init__(self, tmp: Path, dest: Path, table_schema: pa.Schema, rows_per_group: int,
                 name: schema.TableName | None, catalog_ids: np.ndarray | None = None):
        self.dest, self.name, self.catalog_ids = dest, name, catalog_ids
        self.rows_per_group = rows_per_group
        self.writer = pq.ParquetWriter(tmp, table_schema, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.name is not None:
            schema.validate(table, self.dest, self.name, catalog_ids=self.catalog_ids)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.rows_per_group:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        data = pa.concat_tables(self.pending)
        full = data.num_rows if final else data.num_rows - data.num_rows % self.rows_per_group
        for start in range(0, full, self.rows_per_group):
            self.writer.write_table(data.slice(start, min(self.rows_per_group, full - start)),
                                    row_group_size=self.rows_per_group)
        rest = data.slice(full)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def close(self) -> None:
        self._flush(final=True)
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        except OSError:
            self.writer.is_open = False  # else pyarrow retries the close (and fails again) at garbage collection

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _settings(args: SynthArgs, cfg: ProfileConfig, behaviour: Behaviour, clicks: ClickModel) -> dict:
    return {"generator": "data.synth", "generator_version": GENERATOR_VERSION, "profile": args.profile,
            "seed": args.seed, "scale": args.scale, "label_noise": args.label_noise, "query_counts": args.query_counts,
            "config": dataclasses.asdict(cfg), "behaviour": dataclasses.asdict(behaviour),
            "click_model": dataclasses.asdict(clicks)}


def _check_args(args: SynthArgs) -> ProfileConfig:
    if args.profile not in PROFILES:
        raise UserError(f"unknown --profile {args.profile!r}; expected one of {', '.join(PROFILES)}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not 0.0 <= args.label_noise <= 1.0:
        raise UserError(f"--label-noise must be in [0, 1], got {args.label_noise}")
    if not args.scale > 0:
        raise UserError(f"--scale must be > 0, got {args.scale}")
    return PROFILES[args.profile].scaled(args.scale)


OUTPUTS = (*schema.TABLE_NAMES, "truth", "relevance_truth")


def _rel(name: str) -> str:
    """The output's path relative to the workdir."""
    if name == "truth":
        return f"data/{TRUTH_FILE}"
    if name == "relevance_truth":
        return f"data/{RELEVANCE_TRUTH_FILE}"
    return table_rel(name)  # type: ignore[arg-type]


def _dest(workdir: Path, name: str) -> Path:
    return workdir / _rel(name)


def generate(args: SynthArgs) -> dict:
    """Generate all tables for ``args``; returns the manifest (also written to DIR/data/manifest.json)."""
    cfg = _check_args(args)
    workdir = prepare_workdir(args.workdir, "data")
    behaviour, clicks = Behaviour(), ClickModel()
    settings = canonical(_settings(args, cfg, behaviour, clicks))
    output = data_set(workdir, [_rel(name) for name in OUTPUTS], what="python -m data.synth")
    made_from = MadeFrom(settings=settings)
    if not args.force and output.current(made_from):
        log.info("outputs in %s already match these settings; skipping (use --force to regenerate)",
                 workdir / "data")
        return output.manifest() or {}

    log.info("profile %s (scale %g, seed %d): %d products, %d users, %d sessions, %d relevance queries, %d days",
             args.profile, args.scale, args.seed, cfg.n_products, cfg.n_users, cfg.n_sessions,
             cfg.n_relevance_queries, cfg.n_days)
    catalog = build_catalog(cfg, args.seed, clicks)
    users = build_users(cfg, catalog, behaviour, clicks, args.seed)
    start_ts = int(datetime.fromisoformat(cfg.start_date).replace(tzinfo=timezone.utc).timestamp())
    ids = catalog.product_id
    label_counts, stats = LabelCounts(), ImpressionStats()
    manifest: dict = {}
    try:
        with output.publish(made_from, manifest) as staged:
            tmp = {name: staged[_rel(name)] for name in OUTPUTS}
            with contextlib.ExitStack() as writers:
                def sink(name: str, table_schema: pa.Schema, rows_per_group: int, validate_as: str | None,
                         known_ids: np.ndarray | None = None) -> TableSink:
                    return writers.enter_context(TableSink(tmp[name], _dest(workdir, name), table_schema,
                                                           rows_per_group, validate_as, known_ids))

                sinks = {
                    "catalog": sink("catalog", schema.schema("catalog", CATALOG_EXTRA), cfg.catalog_rows_per_group,
                                    "catalog"),
                    "relevance": sink("relevance", schema.schema("relevance"), cfg.rows_per_group, "relevance", ids),
                    "impressions": sink("impressions", schema.schema("impressions",
                                                                     impression_features(args.query_counts)),
                                        cfg.rows_per_group, "impressions", ids),
                    "purchases": sink("purchases", PURCHASES_SCHEMA, cfg.rows_per_group, "purchases", ids),
                    "truth": sink("truth", TRUTH_SCHEMA, cfg.rows_per_group, None),
                    "relevance_truth": sink("relevance_truth", schema.schema("relevance"), cfg.rows_per_group,
                                            None),
                }
                for start in tqdm(range(0, catalog.n, cfg.catalog_rows_per_group), desc="catalog", unit="chunk"):
                    stop = min(catalog.n, start + cfg.catalog_rows_per_group)
                    sinks["catalog"].write(catalog_batch(catalog, start, stop, cfg.image_px))
                for batch, truth in tqdm(relevance_batches(catalog, cfg, behaviour, args.seed, args.label_noise,
                                                           label_counts), desc="relevance", unit="chunk"):
                    sinks["relevance"].write(batch)
                    sinks["relevance_truth"].write(truth)
                _simulate(cfg, catalog, users, behaviour, clicks, args.seed, start_ts, sinks, stats, args.query_counts)
            # every table is complete and closed; the set is published when ``publish`` exits
            row_counts = {name: sinks[name].rows for name in schema.TABLE_NAMES}
            manifest.update(_manifest(settings, cfg, row_counts, label_counts, stats, catalog, users, start_ts))
    except OSError as exc:
        raise UserError(f"cannot write the tables under {workdir / 'data'}: {exc.strerror or exc}") from None
    log.info("wrote %s: %s; click rate %.4f; label split %s", workdir / "data", row_counts, manifest["click_rate"],
             manifest["label_split"])
    return output.manifest() or manifest


def _simulate(cfg: ProfileConfig, catalog: Catalog, users: Users, behaviour: Behaviour, clicks: ClickModel,
              seed: int, start_ts: int, sinks: dict[str, TableSink], stats: ImpressionStats,
              query_counts: bool) -> None:
    store_rng = _rng(seed, _S_STORES)
    state = MarketState(history=PurchaseHistory(catalog),
                        product_impressions=np.zeros(catalog.n, dtype=np.int64),
                        product_clicks=np.zeros(catalog.n, dtype=np.int64),
                        store_effect=store_rng.normal(0.0, clicks.store_sd, cfg.n_stores),
                        query_counts=QueryCountFeatures(catalog.n, len(catalog.vocab.aisles), clicks.ctr_prior,
                                                        clicks.ctr_prior_strength) if query_counts else None)
    eval_start = start_ts + (cfg.n_days - EVAL_DAYS) * DAY_S
    seen_queries = np.zeros(0, dtype=np.uint64)
    for day in tqdm(range(cfg.n_days), desc="days", unit="day"):
        result = simulate_day(day, cfg, catalog, users, behaviour, clicks, state, seed, start_ts)
        sinks["purchases"].write(result.purchases)
        sinks["impressions"].write(result.impressions)
        sinks["truth"].write(result.truth)
        label = result.truth.column("true_label").to_numpy()
        clicked = result.impressions.column("clicked").to_numpy()
        stats.rows += len(label)
        stats.clicks += int(clicked.sum())
        np.add.at(stats.by_label, (label, 0), 1)
        np.add.at(stats.by_label, (label, 1), clicked)
        buyer = users.has_purchases[result.impressions.column("user_id").to_numpy() - 1]
        hist_aisle = result.truth.column("hist_aisle").to_numpy()[buyer]
        np.add.at(stats.by_history_aisle, (hist_aisle, 0), 1)
        np.add.at(stats.by_history_aisle, (hist_aisle, 1), clicked[buyer])
        hashes = result.session_hashes
        if start_ts + day * DAY_S >= eval_start:
            stats.eval_rows += len(result.row_session)
            stats.eval_rows_new_query += int((~np.isin(hashes, seen_queries))[result.row_session].sum())
        else:
            seen_queries = np.union1d(seen_queries, hashes)
    if state.query_counts is not None:
        stats.query_count_keys = state.query_counts.sizes()


def _manifest(settings: dict, cfg: ProfileConfig, row_counts: dict, labels: LabelCounts, stats: ImpressionStats,
              catalog: Catalog, users: Users, start_ts: int) -> dict:
    def split(counts: np.ndarray) -> dict[str, float]:
        total = max(1, int(counts.sum()))
        return {schema.LABEL_NAMES[k]: round(int(counts[k]) / total, 4) for k in (schema.IR, schema.MR, schema.HR)}

    def rate(rows_clicks: np.ndarray) -> float | None:
        return round(int(rows_clicks[1]) / int(rows_clicks[0]), 4) if rows_clicks[0] else None

    end = datetime.fromtimestamp(start_ts + cfg.n_days * DAY_S - 1, timezone.utc)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "source": f"synth:{settings['profile']}",
        "settings": settings,
        "row_counts": row_counts,
        "click_rate": round(stats.clicks / max(1, stats.rows), 4),
        "label_split": split(labels.noisy),
        "label_split_clean": split(labels.clean),
        "labels_flipped": labels.flipped,
        "relevance_queries": labels.queries,
        "ctr_by_true_label": {schema.LABEL_NAMES[k]: rate(stats.by_label[k]) for k in range(3)},
        "ctr_buyers_by_history_aisle_match": {"no": rate(stats.by_history_aisle[0]),
                                              "yes": rate(stats.by_history_aisle[1])},
        "eval_share_of_impressions_with_unseen_query": round(stats.eval_rows_new_query / max(1, stats.eval_rows), 4),
        "query_count_keys": stats.query_count_keys,
        "date_range": [datetime.fromtimestamp(start_ts, timezone.utc).strftime("%Y-%m-%d"), end.strftime("%Y-%m-%d")],
        "eval_week_start": datetime.fromtimestamp(start_ts + (cfg.n_days - EVAL_DAYS) * DAY_S,
                                                  timezone.utc).strftime("%Y-%m-%d"),
        "users": {"total": users.n, "without_purchases_share": round(float(1 - users.has_purchases.mean()), 4)},
        "sparse_cardinality": {"sparse_store": cfg.n_stores, "sparse_aisle": len(catalog.vocab.aisles),
                               "sparse_brand": len(catalog.brand_name), "sparse_platform": 3,
                               "sparse_product": catalog.n + 1, "sparse_hour_bucket": 6, "sparse_weekday": 7},
        "truth_file": {"path": f"data/{TRUTH_FILE}", "row_aligned_with": "impressions",
                       "intent_kinds": list(KIND_NAMES),
                       "candidate_sources": ["exact", "near", "same_aisle", "popular"]},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    return generate(parse_config(SynthArgs, argv))


if __name__ == "__main__":
    run_main(main)
