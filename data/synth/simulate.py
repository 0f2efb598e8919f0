"""The day simulation: a day's purchases, then its search sessions (:func:`sessions_of_day`), their
ad candidates (:func:`ad_candidates`) and clicks from the planted logit (:func:`click_logit`), as
impressions, truth and purchases tables (:func:`simulate_day`); the state carried between days."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from data import schema
from data.protocol import DAY_S
from data.synth.catalog import Catalog
from data.synth.config import Behaviour, ClickModel, ProfileConfig
from data.synth.counting import QUERY_COUNT_FEATURES, QueryCountFeatures, smoothed_ctr
from data.synth.history import PurchaseHistory, purchases_of_day
from data.synth.queries import Intents, draw_candidates, query_hashes, relevance_labels, render_queries, sample_intents
from data.synth.sampling import STREAM_PURCHASES, STREAM_SESSIONS, categorical, stream_rng
from data.synth.users import (Users, choose_products, favourite_aisle_products, favourite_brand_products,
                              popular_products, seconds_of_day)


BASE_DENSE_FEATURES = [pa.field("dense_price", pa.float32()), pa.field("dense_discount", pa.float32()),
                       pa.field("dense_hour", pa.float32()), pa.field("dense_product_ctr_past", pa.float32())]
SPARSE_FEATURES = [pa.field("sparse_store", pa.int64()), pa.field("sparse_aisle", pa.int64()),
                   pa.field("sparse_brand", pa.int64()), pa.field("sparse_platform", pa.int64()),
                   pa.field("sparse_product", pa.int64()), pa.field("sparse_hour_bucket", pa.int64()),
                   pa.field("sparse_weekday", pa.int64())]


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
    session_hashes: np.ndarray  # [sessions] uint64 hash of each session's normalised query (query_hashes)
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
    ts = day_start + seconds_of_day(rng, n)
    store = np.where(rng.random(n) < behaviour.home_store_share, users.home_store[user],
                     rng.integers(0, cfg.n_stores, n))
    platform = np.where(rng.random(n) < behaviour.main_platform_share, users.platform[user],
                        rng.integers(0, len(behaviour.platform_probs), n))
    targets = choose_products(rng, catalog, behaviour.session_target_probs, (
        favourite_brand_products(rng, catalog, users, user),
        favourite_aisle_products(rng, catalog, users, user, behaviour), popular_products(rng, catalog, n)))
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
    source = categorical(rng, behaviour.candidate_source_probs, len(session))
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
    """The planted click logit (the :mod:`data.synth` docstring), every argument ``[rows]`` aligned."""
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
    p_user, p_ts, p_product = purchases_of_day(stream_rng(seed, STREAM_PURCHASES, day), catalog, users, behaviour,
                                               day_start)
    rng = stream_rng(seed, STREAM_SESSIONS, day)
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
    session_hashes = query_hashes(sessions.queries)
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
