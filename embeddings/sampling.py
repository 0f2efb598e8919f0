"""Training data for stage 2: the query split and the paper's PQC tuple sampling.

:func:`split_queries` holds out a fraction of the distinct (normalised) queries for evaluation,
so the evaluation measures queries the query encoder has never seen.

:func:`split_cold_products` holds out a fraction of the catalog's products (stratified by aisle)
from both training stages, for the cold-start evaluation of products no stage has seen; training
(:mod:`embeddings.train`) and evaluation (:mod:`embeddings.evaluate`) both call it with the seed and
fraction that training records, so they agree on which products are cold.

:func:`build_pqc_tuples` turns the relevance table into product-query contrastive tuples
(one product, one positive query, ``n_negatives`` negative queries), following section 3.2.2 of
the DashCLIP paper:

1. Only products with at least one MR or HR query take part.
2. Each product gets at most ``max_positives`` positives, HR and MR in the ratio
   ``hr_mr_ratio : 1``. Our reading when a class is short: the HR quota is
   ``round(max_positives * r / (1 + r))`` (73 of 110 for r = 2) and MR gets the rest of the cap;
   a class with fewer queries than its quota gives all it has and the other class fills the
   freed places as far as it has queries and the cap allows. A product with at most
   ``max_positives`` positive queries therefore uses all of them.
3. An HR positive draws its negatives from the product's IR and MR queries; an MR positive from
   its IR queries only (uniformly, without replacement).
4. Slots left empty are filled with proxy negatives: queries that are HR for some product in
   another aisle, never a query labelled MR or HR for this product, never a repeat within the
   tuple. The proxy pool is the set of distinct (aisle, HR query) pairs, drawn uniformly among
   those of other aisles.
5. When all ``n_negatives`` negatives are IR, one of them (a uniformly chosen slot) is replaced by
   a proxy negative, so every tuple sees at least one easy, off-aisle contrast.

Queries are normalised with :func:`data.text.normalize_query` and deduplicated per product (a
pair listed twice keeps its highest label, so a relevant query is never used as a negative).
Everything is vectorised over numpy arrays (group offsets and counts, no per-product Python loop),
and deterministic for a given ``seed`` whatever the row order of the inputs.

:func:`corrupt_queries` is the typo augmentation of the training queries of stage 2
(``--pqc-query-typo-rate``): one character-level typo in one word of a random share of them;
:func:`title_spans` draws the title-span queries of ``--pqc-title-query-rate``.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from data.schema import HR, IR, LABEL_NAMES, MR
from data.text import normalize_query

log = logging.getLogger(__name__)

KIND_IR, KIND_MR, KIND_PROXY = 0, 1, 2  # negative kinds, as codes while sampling
KIND_NAMES = np.array([LABEL_NAMES[IR], LABEL_NAMES[MR], "proxy"], dtype=object)
MAX_PROXY_ROUNDS = 200
TYPO_MIN_LETTERS = 3  # a word takes a typo only when it has at least this many letters
TITLE_SPAN_MAX_WORDS = 3  # a title-span query has 1 to this many words
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _require_columns(frame: pd.DataFrame, what: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame: missing column(s) {missing}; found {list(frame.columns)}")


def normalized_query_codes(queries: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(codes [N] int64, vocabulary [V] object)``: the :func:`normalize_query` of value i is
    ``vocabulary[codes[i]]``; the vocabulary is sorted and each distinct raw value is normalised once."""
    raw_codes, raw_uniques = pd.factorize(queries.to_numpy(dtype=object))
    if (raw_codes < 0).any():
        raise ValueError(f"relevance frame: column 'query' is null at row {int(np.flatnonzero(raw_codes < 0)[0])}")
    normalized = np.array([normalize_query(str(q)) for q in raw_uniques], dtype=object)
    norm_codes, vocabulary = pd.factorize(normalized, sort=True)
    return norm_codes[raw_codes].astype(np.int64), np.asarray(vocabulary, dtype=object)


def _hash_key(seed: int, what: str = "split") -> str:
    """The 16-character key of pandas' SipHash for ``seed`` (and the split ``what``)."""
    return hashlib.sha256(f"dashrec-{what}-{seed}".encode()).hexdigest()[:16]


def heldout_query_rows(relevance_df: pd.DataFrame, eval_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """``[N]`` bool: the rows of the held-out queries of :func:`split_queries`."""
    _require_columns(relevance_df, "relevance", ("query",))
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    codes, vocabulary = normalized_query_codes(relevance_df["query"])
    n_eval = int(round(eval_fraction * len(vocabulary)))
    hashes = pd.util.hash_array(vocabulary, hash_key=_hash_key(seed))
    is_eval_query = np.zeros(len(vocabulary), dtype=bool)
    is_eval_query[np.argsort(hashes, kind="stable")[:n_eval]] = True
    return is_eval_query[codes]


def split_queries(relevance_df: pd.DataFrame, eval_fraction: float = 0.1,
                  seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the relevance rows by distinct normalised query into (train, eval).

    ``round(eval_fraction * n_distinct_queries)`` queries go to eval: those with the smallest
    seeded hash, so the split depends only on the set of queries and the seed, not on row order.
    Every row of a query lands on the same side. Both frames keep the input columns (fresh index).
    """
    is_eval = heldout_query_rows(relevance_df, eval_fraction, seed)
    return (relevance_df.loc[~is_eval].reset_index(drop=True),
            relevance_df.loc[is_eval].reset_index(drop=True))


def split_cold_products(catalog_df: pd.DataFrame, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """The product_ids held out of training for the cold-start evaluation: sorted int64 ``[C]``.

    Stratified by aisle: aisle ``a`` with ``n_a`` products gets ``floor(fraction * n_a)`` cold
    products, and the largest remainders (ties: aisle name) take one more each until the total is
    ``round(fraction * n_products)``; an aisle always keeps at least one seen product (an aisle of
    one product is never cold), so the aisle probe can learn every aisle it is tested on. Within an
    aisle the products with the smallest seeded hash of their product_id are cold, so the split
    depends only on the set of (product_id, aisle) and the seed, not on row order, and a product's
    membership changes little when products are added. ``fraction`` 0 gives no cold product.
    """
    _require_columns(catalog_df, "catalog", ("product_id", "aisle"))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"cold product fraction must be in [0, 1), got {fraction}")
    products = catalog_df[["product_id", "aisle"]].drop_duplicates("product_id")
    product_ids = products["product_id"].to_numpy(dtype=np.int64)
    if fraction == 0.0 or len(product_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    aisle, _ = pd.factorize(products["aisle"].astype(str).to_numpy(), sort=True)
    n_aisle = np.bincount(aisle)
    cap = np.maximum(n_aisle - 1, 0)
    exact = fraction * n_aisle
    quota = np.minimum(np.floor(exact).astype(np.int64), cap)
    total = min(int(round(fraction * len(product_ids))), int(cap.sum()))
    extra = np.flatnonzero(quota < cap)
    extra = extra[np.lexsort((extra, -(exact - np.floor(exact))[extra]))][:max(total - int(quota.sum()), 0)]
    quota[extra] += 1
    hashes = pd.util.hash_array(product_ids.astype(str).astype(object), hash_key=_hash_key(seed, "cold"))
    order = np.lexsort((product_ids, hashes, aisle))
    cold = order[_within_group_rank(aisle[order]) < quota[aisle[order]]]
    return np.sort(product_ids[cold])


def _group_starts(sorted_groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Index of the first row of each group ``0..n_groups-1`` in a sorted group-code array."""
    return np.searchsorted(sorted_groups, np.arange(n_groups), side="left")


def _within_group_rank(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted array."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    new_group = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    starts = np.flatnonzero(new_group)
    run_lengths = np.diff(np.r_[starts, len(sorted_groups)])
    return np.arange(len(sorted_groups)) - np.repeat(starts, run_lengths)


def _sample_without_replacement(pool_size: np.ndarray, n_slots: int, rng: np.random.Generator) -> np.ndarray:
    """``[R, n_slots]`` local indices: row r holds ``min(n_slots, pool_size[r])`` distinct indices
    drawn uniformly from ``0..pool_size[r]-1`` (Floyd's algorithm, vectorised over rows), then -1."""
    take = np.minimum(pool_size, n_slots)
    chosen = np.full((len(pool_size), n_slots), -1, dtype=np.int64)
    uniform = rng.random((len(pool_size), n_slots))
    for slot in range(n_slots):
        active = slot < take
        upper = pool_size - take + slot  # Floyd: draw from 0..upper
        draw = np.minimum(np.floor(uniform[:, slot] * (upper + 1)).astype(np.int64), upper)
        seen = (chosen[:, :slot] == draw[:, None]).any(axis=1)
        chosen[:, slot] = np.where(active, np.where(seen, upper, draw), -1)
    return chosen


def _positive_quotas(n_hr: np.ndarray, n_mr: np.ndarray, max_positives: int,
                     hr_mr_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Per product (HR quota, MR quota) under the cap and the ratio (see the module docstring)."""
    hr_target = int(math.floor(max_positives * hr_mr_ratio / (1.0 + hr_mr_ratio) + 0.5))
    quota_hr = np.minimum(n_hr, np.maximum(hr_target, max_positives - n_mr))
    quota_mr = np.minimum(n_mr, max_positives - quota_hr)
    return quota_hr, quota_mr


@dataclass(frozen=True)
class PQCTuples:
    """PQC tuples as arrays (T tuples, N negatives each): queries are codes into ``queries``.

    Attributes:
        queries: ``[V]`` str, the sorted distinct normalised queries the codes refer to.
        product_id: ``[T]`` int64.
        positive: ``[T]`` int32, the positive query's code.
        positive_label: ``[T]`` int8, 1 (MR) or 2 (HR).
        negatives: ``[T, N]`` int32, the negative queries' codes.
        negative_kinds: ``[T, N]`` int8, :data:`KIND_IR` / :data:`KIND_MR` / :data:`KIND_PROXY`.

    About 50 bytes a tuple at N = 10, where lists of strings per tuple take twenty times as much.
    """

    queries: np.ndarray
    product_id: np.ndarray
    positive: np.ndarray
    positive_label: np.ndarray
    negatives: np.ndarray
    negative_kinds: np.ndarray

    def __len__(self) -> int:
        return len(self.product_id)

    def take(self, rows: np.ndarray) -> PQCTuples:
        """The tuples at ``rows`` (same query codes)."""
        return PQCTuples(self.queries, self.product_id[rows], self.positive[rows], self.positive_label[rows],
                         self.negatives[rows], self.negative_kinds[rows])

    def frame(self) -> pd.DataFrame:
        """The readable form, one row per tuple: product_id, positive (str), positive_label, negatives
        (list of str), negative_kinds (list of "IR" / "MR" / "proxy", same order)."""
        return pd.DataFrame({"product_id": self.product_id, "positive": self.queries[self.positive],
                             "positive_label": self.positive_label,
                             "negatives": self.queries[self.negatives].tolist(),
                             "negative_kinds": KIND_NAMES[self.negative_kinds].tolist()})


def build_pqc_tuples(relevance_df: pd.DataFrame, catalog_df: pd.DataFrame, n_negatives: int = 10,
                     max_positives: int = 110, hr_mr_ratio: float = 2.0, seed: int = 0) -> PQCTuples:
    """Sample PQC training tuples from relevance labels (rules in the module docstring).

    Args:
        relevance_df: columns query (str), product_id (int), label (0 IR, 1 MR, 2 HR).
        catalog_df: columns product_id, aisle; must cover every product of ``relevance_df``.
        n_negatives: negatives per tuple (the paper's N = 10).
        max_positives: cap on positive queries per product (the paper's 110).
        hr_mr_ratio: HR:MR ratio of the positives (the paper's 2:1).
        seed: sampling seed.

    Returns:
        One tuple per (product, positive query), sorted by product_id then positive; queries are
        normalised (:meth:`PQCTuples.frame` is the readable form).

    Raises:
        ValueError: missing columns, products absent from the catalog, bad arguments, or too few
            HR queries in other aisles to supply the proxy negatives.
    """
    _require_columns(relevance_df, "relevance", ("query", "product_id", "label"))
    _require_columns(catalog_df, "catalog", ("product_id", "aisle"))
    if n_negatives < 1 or max_positives < 1 or not hr_mr_ratio > 0:
        raise ValueError(f"need n_negatives >= 1, max_positives >= 1 and hr_mr_ratio > 0; got {n_negatives}, "
                         f"{max_positives}, {hr_mr_ratio}")
    rng = np.random.default_rng(seed)

    # (product, query) pairs: normalised, deduplicated (highest label), sorted by (product, query).
    query_codes, query_text = normalized_query_codes(relevance_df["query"])
    product_ids = relevance_df["product_id"].to_numpy(dtype=np.int64)
    pairs = (pd.DataFrame({"product_id": product_ids, "query": query_codes,
                           "label": relevance_df["label"].to_numpy(dtype=np.int8)})
             .groupby(["product_id", "query"], sort=True)["label"].max().reset_index())
    eligible = pairs.groupby("product_id")["label"].transform("max") >= MR
    pairs = pairs.loc[eligible.to_numpy()].reset_index(drop=True)
    if pairs.empty:
        raise ValueError("relevance frame: no product has an MR or HR query; no PQC tuple can be built")
    product_codes, product_keys = pd.factorize(pairs["product_id"].to_numpy(), sort=True)
    n_products, n_queries = len(product_keys), len(query_text)
    pair_query = pairs["query"].to_numpy(dtype=np.int64)
    pair_label = pairs["label"].to_numpy(dtype=np.int8)

    aisle_by_product = catalog_df.drop_duplicates("product_id").set_index("product_id")["aisle"]
    aisles = aisle_by_product.reindex(product_keys)
    if aisles.isna().any():
        missing = product_keys[np.flatnonzero(aisles.isna().to_numpy())[0]]
        raise ValueError(f"catalog frame: product_id {missing} of the relevance frame has no aisle in the catalog")
    product_aisle, aisle_names = pd.factorize(aisles.to_numpy(), sort=True)

    # Rule 2: positives per product under the cap and the HR:MR ratio.
    is_pos = pair_label >= MR
    n_hr = np.bincount(product_codes[pair_label == HR], minlength=n_products)
    n_mr = np.bincount(product_codes[pair_label == MR], minlength=n_products)
    quota_hr, quota_mr = _positive_quotas(n_hr, n_mr, max_positives, hr_mr_ratio)
    pos_idx = np.flatnonzero(is_pos)
    order = np.lexsort((rng.random(len(pos_idx)), pair_label[pos_idx], product_codes[pos_idx]))
    pos_idx = pos_idx[order]
    group = product_codes[pos_idx] * 3 + pair_label[pos_idx]
    quota = np.where(pair_label[pos_idx] == HR, quota_hr[product_codes[pos_idx]], quota_mr[product_codes[pos_idx]])
    pos_idx = pos_idx[_within_group_rank(group) < quota]
    pos_product, pos_label = product_codes[pos_idx], pair_label[pos_idx]

    # Rule 3: negatives from the product's own IR (and, for HR positives, MR) queries. The pool
    # rows are sorted by (product, label, query): IR first then MR, so both pools are one range.
    pool_idx = np.flatnonzero(pair_label <= MR)
    pool_idx = pool_idx[np.lexsort((pair_query[pool_idx], pair_label[pool_idx], product_codes[pool_idx]))]
    pool_start = _group_starts(product_codes[pool_idx], n_products)
    pool_query = np.append(pair_query[pool_idx], -1)  # trailing sentinel: the empty slot
    pool_label = np.append(pair_label[pool_idx], -1)
    n_ir = np.bincount(product_codes[pair_label == IR], minlength=n_products)
    pool_size = np.where(pos_label == HR, n_ir[pos_product] + n_mr[pos_product], n_ir[pos_product])
    local = _sample_without_replacement(pool_size, n_negatives, rng)
    flat = np.where(local >= 0, pool_start[pos_product][:, None] + local, len(pool_idx))
    negatives = pool_query[flat]
    kinds = np.select([pool_label[flat] == IR, pool_label[flat] == MR], [KIND_IR, KIND_MR], KIND_PROXY)

    # Rule 5: an all-IR tuple gives up one (uniformly chosen) slot to a proxy.
    all_ir = np.flatnonzero((kinds == KIND_IR).all(axis=1))
    replaced = rng.integers(0, n_negatives, size=len(all_ir))
    negatives[all_ir, replaced] = -1
    kinds[all_ir, replaced] = KIND_PROXY

    # Rule 4: proxies fill every empty slot.
    relevant_keys = np.sort(product_codes[is_pos].astype(np.int64) * n_queries + pair_query[is_pos])
    is_hr = pair_label == HR
    _fill_proxies(negatives, pos_product, product_aisle, hr_aisle=product_aisle[product_codes[is_hr]],
                  hr_query=pair_query[is_hr], relevant_keys=relevant_keys, n_queries=n_queries,
                  n_aisles=len(aisle_names), product_keys=product_keys, rng=rng)

    positive = pair_query[pos_idx]
    order = np.lexsort((positive, pos_product))  # product_id then positive (the codes sort as the strings)
    tuples = PQCTuples(np.asarray(query_text, dtype=object), np.asarray(product_keys, dtype=np.int64)[pos_product[order]],
                       positive[order].astype(np.int32), pos_label[order].astype(np.int8),
                       negatives[order].astype(np.int32), kinds[order].astype(np.int8))
    log.info("PQC tuples: %d from %d products (%d HR, %d MR positives); negatives %.1f%% IR, %.1f%% MR, "
             "%.1f%% proxy", len(tuples), n_products, int((pos_label == HR).sum()), int((pos_label == MR).sum()),
             *(100.0 * float((kinds == k).mean()) for k in (KIND_IR, KIND_MR, KIND_PROXY)))
    return tuples


def sample_negative_products(relevance_df: pd.DataFrame, positive: np.ndarray, positive_label: np.ndarray,
                             n_negatives: int, seed: int = 0) -> np.ndarray:
    """Products each tuple's positive query ranks below the tuple's product: ``[T, n_negatives]``
    product_ids, -1 in slots left empty. ``positive`` ``[T]`` (str) and ``positive_label`` ``[T]``
    are the tuples' positive queries and their labels.

    The query side of the tuples of :func:`build_pqc_tuples`: for a tuple (product p, positive query
    q labelled HR or MR for p) the negatives are drawn uniformly without replacement from the
    products labelled for q in ``relevance_df`` with a lower label (IR and MR products under an HR
    positive, IR products under an MR one): the products retrieval must rank below p for q, often of
    the same type with another brand, variant or size. A query with fewer such products leaves
    slots empty. Queries are normalised as in :func:`build_pqc_tuples`; deterministic for ``seed``.
    """
    _require_columns(relevance_df, "relevance", ("query", "product_id", "label"))
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
    rng = np.random.default_rng([seed, 3])
    query_codes, query_text = normalized_query_codes(relevance_df["query"])
    pairs = (pd.DataFrame({"query": query_codes, "product_id": relevance_df["product_id"].to_numpy(dtype=np.int64),
                           "label": relevance_df["label"].to_numpy(dtype=np.int8)})
             .groupby(["query", "product_id"], sort=True)["label"].max().reset_index())
    pairs = pairs.loc[pairs["label"] <= MR].sort_values(["query", "label", "product_id"], kind="stable")
    pair_query = pairs["query"].to_numpy(dtype=np.int64)
    n_queries = len(query_text)
    pool_start = _group_starts(pair_query, n_queries)
    n_ir = np.bincount(pair_query[pairs["label"].to_numpy() == IR], minlength=n_queries)
    n_mr = np.bincount(pair_query[pairs["label"].to_numpy() == MR], minlength=n_queries)
    tuple_query = pd.Index(query_text).get_indexer(np.asarray(positive, dtype=object))
    known = tuple_query >= 0  # a positive absent from relevance_df has no labelled products to rank
    query = np.where(known, tuple_query, 0)
    positive_label = np.asarray(positive_label, dtype=np.int8)
    pool_size = np.where(known, np.where(positive_label == HR, n_ir[query] + n_mr[query], n_ir[query]), 0)
    local = _sample_without_replacement(pool_size, n_negatives, rng)
    products = np.append(pairs["product_id"].to_numpy(dtype=np.int64), -1)  # trailing sentinel: the empty slot
    return products[np.where(local >= 0, pool_start[query][:, None] + local, len(products) - 1)]


def _fill_proxies(negatives: np.ndarray, row_product: np.ndarray, product_aisle: np.ndarray, *,
                  hr_aisle: np.ndarray, hr_query: np.ndarray, relevant_keys: np.ndarray, n_queries: int,
                  n_aisles: int, product_keys: np.ndarray, rng: np.random.Generator) -> None:
    """Fill the -1 slots of ``negatives`` ``[R, n]`` (query codes) in place with proxy negatives.

    The pool is the distinct (aisle, query) pairs of HR labels, sorted by aisle, so "another
    aisle" is the pool minus one contiguous range: an index drawn from ``0..T-1-size(a)`` is shifted
    past aisle ``a``'s range. Draws that hit a query relevant (MR/HR) to the row's product or one
    already in the row are redrawn.
    """
    pool = np.unique(np.stack([hr_aisle.astype(np.int64), hr_query], axis=1), axis=0)
    pool_aisle, pool_query = pool[:, 0], pool[:, 1]
    aisle_start = _group_starts(pool_aisle, n_aisles)
    aisle_size = np.bincount(pool_aisle, minlength=n_aisles)
    for slot in range(negatives.shape[1]):
        rows = np.flatnonzero(negatives[:, slot] < 0)
        for _ in range(MAX_PROXY_ROUNDS):
            if len(rows) == 0:
                break
            aisle = product_aisle[row_product[rows]]
            n_other = len(pool_query) - aisle_size[aisle]
            if (n_other == 0).any():
                pid = product_keys[row_product[rows[np.flatnonzero(n_other == 0)[0]]]]
                raise ValueError(f"relevance frame: product_id {pid} needs proxy negatives but no product of "
                                 f"another aisle has an HR query")
            draw = np.floor(rng.random(len(rows)) * n_other).astype(np.int64)
            draw = np.minimum(draw, n_other - 1)
            draw = np.where(draw >= aisle_start[aisle], draw + aisle_size[aisle], draw)
            candidate = pool_query[draw]
            keys = row_product[rows].astype(np.int64) * n_queries + candidate
            hit = np.searchsorted(relevant_keys, keys)
            relevant = relevant_keys[np.minimum(hit, len(relevant_keys) - 1)] == keys
            repeated = (negatives[rows] == candidate[:, None]).any(axis=1)
            ok = ~relevant & ~repeated
            negatives[rows[ok], slot] = candidate[ok]
            rows = rows[~ok]
        if len(rows):
            pid = product_keys[row_product[rows[0]]]
            raise ValueError(f"relevance frame: cannot find enough distinct proxy negatives for product_id {pid} "
                             f"(HR queries of other aisles that are not relevant to it)")


def typo(word: str, rng: np.random.Generator) -> str:
    """``word`` (with at least one letter) with one typo at its letters, drawn from ``rng``: two
    adjacent different letters swapped, a letter dropped, doubled or replaced by another lower-case
    letter (upper-case in an upper-case position), each operation equally likely (a word with no two
    adjacent different letters drops one instead of swapping). The edit distance to ``word`` is 1
    (2 for a swap)."""
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    operation = int(rng.integers(4))
    if operation == 0:
        pairs = [i for i in letters if i + 1 < len(word) and word[i + 1].isalpha() and word[i] != word[i + 1]]
        if pairs:
            i = pairs[int(rng.integers(len(pairs)))]
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
        operation = 1
    i = letters[int(rng.integers(len(letters)))]
    if operation == 1:
        return word[:i] + word[i + 1:]
    if operation == 2:
        return word[:i] + word[i] + word[i:]
    others = LETTERS.replace(word[i].lower(), "")
    letter = others[int(rng.integers(len(others)))]
    return word[:i] + (letter.upper() if word[i].isupper() else letter) + word[i + 1:]


def title_spans(titles: Sequence[str], rng: np.random.Generator, max_words: int = TITLE_SPAN_MAX_WORDS,
                queries: Sequence[str] | None = None, brands: Sequence[str | None] | None = None) -> list[str]:
    """A query-like span of each title: 1 to ``max_words`` consecutive words (the length uniform, then
    the start), normalised as queries are (:func:`data.text.normalize_query`); where ``brands`` (one
    per title) gives one, the span is that brand instead (nothing drawn). With ``queries`` (one per
    title), each span is followed by the words of its query that the title lacks, in their order (the
    query's modifiers: "6 pack", "in stock"). Deterministic for the state of ``rng`` (which it
    advances); an empty title gives an empty span."""
    out = []
    n = len(titles)
    for title, query, brand in zip(titles, queries if queries is not None else [None] * n,
                                   brands if brands is not None else [None] * n):
        words = normalize_query(title).split()
        if not words:
            out.append("")
            continue
        if brand:
            span = normalize_query(brand).split()
        else:
            length = int(rng.integers(1, min(max_words, len(words)) + 1))
            start = int(rng.integers(len(words) - length + 1))
            span = words[start:start + length]
        if query is not None:
            in_title = set(words)
            span += [word for word in normalize_query(query).split() if word not in in_title]
        out.append(" ".join(span))
    return out


def corrupt_queries(texts: Sequence[str], rate: float, rng: np.random.Generator) -> list[str]:
    """``texts`` with a typo (:func:`typo`) in a share ``rate`` of them: each text is picked with
    probability ``rate``, and a picked text with a word (space-separated) of at least
    ``TYPO_MIN_LETTERS`` letters gets a typo in one such word, drawn uniformly; other texts come back
    unchanged. Deterministic for the state of ``rng`` (which it advances); ``rate`` 0 changes nothing.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"typo rate must be in [0, 1], got {rate}")
    out = list(texts)
    for i in np.flatnonzero(rng.random(len(out)) < rate).tolist():
        words = out[i].split(" ")
        eligible = [j for j, w in enumerate(words) if sum(c.isalpha() for c in w) >= TYPO_MIN_LETTERS]
        if eligible:
            j = eligible[int(rng.integers(len(eligible)))]
            words[j] = typo(words[j], rng)
            out[i] = " ".join(words)
    return out
