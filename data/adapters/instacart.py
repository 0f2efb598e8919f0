"""Instacart 2017 (593 users' complete order histories) -> the four tables: next-order ranking.

Source ``--source`` (default ``../shared/data/instacart``): ``products.csv``, ``aisles.csv``,
``departments.csv`` (odd format: a pandas index column, then the real fields joined by ';') and
``orders_sample_593users.csv`` (every order line of 593 users, order_number 1..n without gaps).

The derivations (all recorded in the manifest, :data:`RULES`):

* Time: Instacart gives only day gaps between a user's orders. Each user's timeline is laid out
  backwards from one common ``--end-date``: the last order on that date, each earlier order
  ``days_since_prior_order`` days before its successor, at its ``order_hour_of_day``.
* Ranking task (predict the next basket): for a target order, the candidates are the user's
  previously bought products and popular products of the aisles they buy from (at most
  ``--candidates``); clicked = bought in that order. Evaluation targets are every user's last
  order (all on the end date, so inside the last 7 days); training targets are the user's
  ``--train-orders`` latest earlier orders that fall before ``max_ts - 7 days``.
* Features and candidates use only orders strictly before the target order (popularity: order
  lines of strictly earlier days, all users).
* Queries: Instacart has no searches; an impression's query is the candidate's aisle name, and
  the relevance table's queries are aisle names, department names and frequent title words with
  attribute-derived labels: all proxies.

    python -m data.adapters.instacart --workdir runs/instacart
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from common.cli import UserError, parse_config, run_main
from data.adapters.common import (SHARED_DATA, AdapterConfig, AdapterOutput, normalized, rank_within,
                                  require_columns, require_dir, require_file, run_adapter, sample_relevance_pairs)
from data.protocol import EVAL_DAYS
from data.schema import HR, IR, MR
from data.text import normalize_query

log = logging.getLogger(__name__)

GENERATOR = "data.adapters.instacart"
PRODUCTS, AISLES, DEPARTMENTS, ORDERS = "products.csv", "aisles.csv", "departments.csv", "orders_sample_593users.csv"
ORDER_COLUMNS = ["order_id", "user_id", "order_number", "order_dow", "order_hour_of_day", "days_since_prior_order",
                 "product_id"]
NEVER_BOUGHT_DAYS = 365.0  # dense_days_since_last_bought of a product the user never bought (real gaps < 365)
MISSING = "missing"  # Instacart's placeholder aisle and department: never used as a query
WORD_STOPWORDS = frozenset({"and", "with", "the", "for", "from", "made", "style", "size", "pack", "count"})

RULES = {
    "catalog": "every product of products.csv; title = product_name (the inner CSV quoting of names that "
               "contain ';' or quotes undone); aisle = aisle name; image null (title-only); brand null "
               "(Instacart names carry no separable brand); extra columns department, aisle_id, department_id",
    "timeline": "per user, orders laid out backwards from --end-date: the last order on the end date, each earlier "
                "order days_since_prior_order (of its successor) days before it; ts = that date + "
                "order_hour_of_day hours; an order that would not be later than the user's previous one (same day "
                "and hour: 87 orders) is put 1 minute after it",
    "purchases": "every order line: (order ts, user_id, product_id)",
    "targets": "evaluation: every user's last order (ts on the end date, so >= max_ts - 7 days); training: the "
               "user's --train-orders latest earlier orders with ts < max_ts - 7 days and order_number >= 2",
    "candidates": "per target order, from orders strictly before it: the user's previously bought products "
                  "(by times bought, then most recent) up to --history-candidates, then the --aisle-candidates "
                  "most popular products of each aisle the user bought from (aisles the user buys most first, "
                  "then popularity), then the remaining previously bought products; at most --candidates",
    "clicked": "1 if the candidate is in the target order",
    "popularity": "order lines (all users) on calendar days strictly before the target order's day",
    "features": "dense_times_bought_before (user's earlier orders containing the product), "
                "dense_days_since_last_bought (days from the user's last earlier purchase of it, 365 if never), "
                "dense_popularity (log1p of popularity), dense_hour (order_hour_of_day), "
                "dense_days_since_prior_order, dense_user_orders (earlier orders); sparse_aisle (aisle_id), "
                "sparse_department (department_id), sparse_product (product_id), sparse_dow (order_dow): all "
                "from orders strictly before the target order, or known when it is placed",
    "position": "rank of the candidate by popularity (descending, then product_id) within its session",
    "session_id": "the target order_id",
    "query": "PROXY: Instacart has no search queries; an impression's query is the candidate's aisle name",
    "relevance_queries": "aisle names, department names (not 'missing'), and title words (alphabetic, >= 3 "
                         "letters, in >= --min-word-products products) whose home aisle is the aisle holding most "
                         "products with the word; one query per text (aisle > department > word)",
    "labels": "HR: product in the query's department, in its aisle (aisle and word queries) and, for word "
              "queries, the word in the title; MR: not HR but same aisle, same department or word in title; "
              "IR: otherwise",
    "pairs": "per query, draws with replacement (deduplicated) from the pools same aisle, same department, "
             "products with the word (--pairs-per-query each) and any product (7x); then labels subsampled to "
             "the paper's 69/20.5/9.9 IR/MR/HR split",
}


@dataclass
class InstacartConfig(AdapterConfig):
    """Instacart order histories -> next-order ranking impressions and proxy relevance labels."""

    source: str = field(default=str(SHARED_DATA / "instacart"), metadata={"help": "directory of the Instacart csv files"})
    end_date: str = field(default="2017-12-31", metadata={"help": "date of every user's last order (YYYY-MM-DD)"})
    candidates: int = field(default=30, metadata={"help": "candidates per target order", "min": 1})
    history_candidates: int = field(default=20, metadata={"help": "previously bought products ranked first", "min": 0})
    aisle_candidates: int = field(default=5, metadata={"help": "popular products offered per aisle of the user", "min": 0})
    train_orders: int = field(default=3, metadata={"help": "earlier orders per user used as training sessions", "min": 0})
    pairs_per_query: int = field(default=8, metadata={"help": "relevance draws per query per attribute pool", "min": 1})
    min_word_products: int = field(default=30, metadata={"help": "a title word becomes a query if this many "
                                                                  "products contain it", "min": 1})

    def check(self) -> None:
        """``--end-date`` is a date (common.cli.check_config runs the per-field rules first)."""
        try:
            pd.Timestamp(self.end_date)
        except ValueError:
            raise UserError(f"--end-date {self.end_date!r} is not a date (expected YYYY-MM-DD)") from None


# --------------------------------------------------------------------------------------------
# reading


def read_joined_csv(path: Path, fields: list[str]) -> pd.DataFrame:
    """Read Instacart's ',index' + 'a;b;...' csv: the first field split off the left, the rest off the right."""
    try:
        raw = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable csv ({exc})") from None
    header = ";".join(fields)
    if list(raw.columns) != [header]:
        raise UserError(f"{path}: expected one column '{header}' after the index column, found {list(raw.columns)}")
    col = raw[header]
    head = col.str.split(";", n=1, expand=True).reindex(columns=[0, 1])
    if len(fields) > 2:
        tail = head[1].str.rsplit(";", n=len(fields) - 2, expand=True).reindex(columns=range(len(fields) - 1))
    else:
        tail = head[[1]].set_axis([0], axis=1)
    out = pd.concat([head[0], tail], axis=1, ignore_index=True).set_axis(fields, axis=1)
    bad = out.isna().any(axis=1).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(f"{path}: row {row} {col.iloc[row]!r} does not split into {fields}")
    for name in fields:
        if name.endswith("_id"):
            ids = pd.to_numeric(out[name], errors="coerce")
            if ids.isna().any():
                row = int(np.flatnonzero(ids.isna().to_numpy())[0])
                raise UserError(f"{path}: column '{name}' at row {row} is {out[name].iloc[row]!r}, expected an integer")
            out[name] = ids.astype(np.int64)
    return out


def unquote_names(names: pd.Series) -> pd.Series:
    """Undo the inner CSV quoting of names that contained ';' or '"' ('"9\\""x13\\"" Pan"' -> '9"x13" Pan')."""
    quoted = names.str.startswith('"') & names.str.endswith('"') & (names.str.len() >= 2)
    inner = names.str.slice(1, -1).str.replace('\\""', '"', regex=False).str.replace('""', '"', regex=False)
    return inner.where(quoted, names)


def load_source(config: InstacartConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(products with aisle/department names, order lines), checked."""
    root = require_dir(config.source, "instacart")
    products = read_joined_csv(require_file(root, PRODUCTS), ["product_id", "product_name", "aisle_id", "department_id"])
    aisles = read_joined_csv(require_file(root, AISLES), ["aisle_id", "aisle"])
    departments = read_joined_csv(require_file(root, DEPARTMENTS), ["department_id", "department"])
    products["product_name"] = unquote_names(products["product_name"])
    for ids, table, name in ((products["aisle_id"], aisles["aisle_id"], AISLES),
                             (products["department_id"], departments["department_id"], DEPARTMENTS)):
        unknown = ~ids.isin(table)
        if unknown.any():
            raise UserError(f"{root / PRODUCTS}: {ids.name} {ids[unknown].iloc[0]} is not in {root / name}")
    products = products.merge(aisles, on="aisle_id").merge(departments, on="department_id")

    orders_path = require_file(root, ORDERS)
    try:
        lines = pd.read_csv(orders_path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{orders_path}: not a readable csv ({exc})") from None
    require_columns(lines.columns, orders_path, ORDER_COLUMNS)
    lines = lines[ORDER_COLUMNS].reset_index(drop=True)
    unknown = ~lines["product_id"].isin(products["product_id"])
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise UserError(f"{orders_path}: product_id {lines['product_id'].iloc[row]} at row {row} is not in {PRODUCTS}")
    return products.sort_values("product_id").reset_index(drop=True), lines


# --------------------------------------------------------------------------------------------
# time line, targets, candidates, features


def build_timeline(lines: pd.DataFrame, end_date: str) -> pd.DataFrame:
    """One row per order: the source columns, ts (RULES['timeline']) and day (calendar day of ts, end date = 0);
    ``end_date`` is checked by :meth:`InstacartConfig.check`."""
    end = pd.Timestamp(end_date)
    orders = (lines.drop_duplicates("order_id")
              .drop(columns="product_id").sort_values(["user_id", "order_number"]).reset_index(drop=True))
    user = orders["user_id"]
    elapsed = orders["days_since_prior_order"].fillna(0).groupby(user).cumsum()
    date = end + pd.to_timedelta(elapsed - elapsed.groupby(user).transform("max"), unit="D")
    ts = date + pd.to_timedelta(orders["order_hour_of_day"], unit="h")
    # same-day orders at the same hour: each later one a minute after the one before (strictly increasing)
    steps = pd.to_timedelta(orders.groupby("user_id").cumcount(), unit="min")
    orders["ts"] = ((ts - steps).groupby(user).cummax() + steps).astype("datetime64[s]")
    orders["day"] = ((orders["ts"].dt.normalize() - end) / pd.Timedelta(days=1)).astype(np.int64)
    return orders


def select_targets(orders: pd.DataFrame, train_orders: int) -> tuple[pd.DataFrame, pd.Timestamp]:
    """Target orders with a ``split`` column ('eval' = last order, 'train' = earlier, before the cut-off)."""
    last_number = orders.groupby("user_id")["order_number"].transform("max")
    last = orders[orders["order_number"] == last_number]
    cutoff = last["ts"].max() - pd.Timedelta(days=EVAL_DAYS)
    earlier = orders[(orders["order_number"] < last_number) & (orders["ts"] < cutoff) & (orders["order_number"] >= 2)]
    earlier = earlier.sort_values(["user_id", "order_number"], ascending=[True, False])
    earlier = earlier[earlier.groupby("user_id").cumcount() < train_orders]
    targets = pd.concat([last.assign(split="eval"), earlier.assign(split="train")], ignore_index=True)
    return targets.sort_values(["ts", "order_id"]).reset_index(drop=True), cutoff


def popularity_asof(lines_day: np.ndarray, lines_product: np.ndarray, days: np.ndarray) -> pd.DataFrame:
    """Order-line counts per product on days strictly before each of ``days``: [day, product_id, popularity]."""
    order = np.argsort(lines_day, kind="stable")
    sorted_days, sorted_products = lines_day[order], lines_product[order]
    size = int(lines_product.max()) + 1
    frames = []
    for day in np.unique(days):  # few distinct target days: the timelines all end on one date
        counts = np.bincount(sorted_products[:np.searchsorted(sorted_days, day, side="left")], minlength=size)
        nonzero = np.flatnonzero(counts)
        frames.append(pd.DataFrame({"day": day, "product_id": nonzero, "popularity": counts[nonzero]}))
    return pd.concat(frames, ignore_index=True)


def build_impressions(targets: pd.DataFrame, timed_lines: pd.DataFrame, products: pd.DataFrame,
                      config: InstacartConfig) -> pd.DataFrame:
    """Candidates, labels and features of every target order (RULES['candidates'], ['features'])."""
    target_cols = targets[["order_id", "user_id", "order_number", "day"]].rename(
        columns={"order_id": "target", "order_number": "target_number", "day": "target_day"})
    # the user's order lines strictly before each target order
    history = target_cols.merge(timed_lines, on="user_id")
    history = history[history["order_number"] < history["target_number"]]
    bought = (history.groupby(["target", "product_id"])
              .agg(times_bought=("order_id", "size"), last_bought=("ts", "max")).reset_index())
    bought["tier_rank"] = rank_within(bought, ["target"], ["times_bought", "last_bought", "product_id"],
                                      [False, False, True])
    aisle_of = products.set_index("product_id")["aisle_id"]
    user_aisles = (history.assign(aisle_id=history["product_id"].map(aisle_of))
                   .groupby(["target", "target_day", "aisle_id"]).size().rename("aisle_count").reset_index())

    popularity = popularity_asof(timed_lines["day"].to_numpy(), timed_lines["product_id"].to_numpy(),
                                 targets["day"].to_numpy())
    popularity["aisle_id"] = popularity["product_id"].map(aisle_of)
    aisle_top = popularity.sort_values(["day", "aisle_id", "popularity", "product_id"],
                                       ascending=[True, True, False, True])
    aisle_top = aisle_top[aisle_top.groupby(["day", "aisle_id"]).cumcount() < config.aisle_candidates]
    popular = user_aisles.merge(aisle_top.rename(columns={"day": "target_day"}), on=["target_day", "aisle_id"])
    popular = popular.merge(bought[["target", "product_id"]], on=["target", "product_id"], how="left", indicator=True)
    popular = popular[popular["_merge"] == "left_only"].drop(columns="_merge").reset_index(drop=True)
    popular["tier_rank"] = rank_within(popular, ["target"], ["aisle_count", "popularity", "product_id"],
                                       [False, False, True])

    first_history = bought["tier_rank"] < config.history_candidates
    pool = pd.concat([
        bought[["target", "product_id", "tier_rank"]].assign(tier=np.where(first_history, 0, 2)),
        popular[["target", "product_id", "tier_rank"]].assign(tier=1),
    ], ignore_index=True).sort_values(["target", "tier", "tier_rank"], kind="stable")
    cands = pool[pool.groupby("target").cumcount() < config.candidates][["target", "product_id"]]

    # features, from the history only
    cands = cands.merge(targets.rename(columns={"order_id": "target"}), on="target")
    cands = cands.merge(bought[["target", "product_id", "times_bought", "last_bought"]],
                        on=["target", "product_id"], how="left")
    cands = cands.merge(popularity[["day", "product_id", "popularity"]], on=["day", "product_id"], how="left")
    cands = cands.merge(products[["product_id", "aisle", "aisle_id", "department_id"]], on="product_id")
    since = (cands["ts"] - cands["last_bought"]) / pd.Timedelta(days=1)
    in_order = timed_lines[["order_id", "product_id"]].assign(clicked=np.int8(1)).rename(columns={"order_id": "target"})
    cands = cands.merge(in_order, on=["target", "product_id"], how="left")
    impressions = pd.DataFrame({
        "ts": cands["ts"],
        "session_id": cands["target"].astype(np.int64),
        "user_id": cands["user_id"].astype(np.int64),
        "query": normalized(cands["aisle"]),
        "product_id": cands["product_id"].astype(np.int64),
        "clicked": cands["clicked"].fillna(0).astype(np.int8),
        "dense_times_bought_before": cands["times_bought"].fillna(0).astype(np.float32),
        "dense_days_since_last_bought": since.fillna(NEVER_BOUGHT_DAYS).clip(upper=NEVER_BOUGHT_DAYS).astype(np.float32),
        "dense_popularity": np.log1p(cands["popularity"].fillna(0)).astype(np.float32),
        "dense_hour": cands["order_hour_of_day"].astype(np.float32),
        "dense_days_since_prior_order": cands["days_since_prior_order"].astype(np.float32),
        "dense_user_orders": (cands["order_number"] - 1).astype(np.float32),
        "sparse_aisle": cands["aisle_id"].astype(np.int64),
        "sparse_department": cands["department_id"].astype(np.int64),
        "sparse_product": cands["product_id"].astype(np.int64),
        "sparse_dow": cands["order_dow"].astype(np.int64),
    })
    impressions["position"] = rank_within(impressions, ["session_id"], ["dense_popularity", "product_id"],
                                          [False, True]).astype(np.int32)
    return impressions.sort_values(["ts", "session_id", "position"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# relevance


def title_words(products: pd.DataFrame) -> pd.DataFrame:
    """(product_id, word) for every distinct query-worthy word of each title."""
    words = products[["product_id"]].assign(word=products["product_name"].map(normalize_query).str.split()).explode("word")
    words = words[words["word"].str.fullmatch(r"[a-z]{3,}", na=False) & ~words["word"].isin(WORD_STOPWORDS)]
    return words.drop_duplicates().reset_index(drop=True)


def label_pairs(queries: pd.DataFrame, products: pd.DataFrame, words: pd.DataFrame, query_idx: np.ndarray,
                product_ids: np.ndarray) -> np.ndarray:
    """The relevance label of each (query, product) pair by RULES['labels'] (int8 [N]); ``words`` holds
    the (product_id, word) pairs of the titles."""
    qry = queries.iloc[query_idx]
    prod = products.set_index("product_id").loc[product_ids]
    in_aisle = prod["aisle_id"].to_numpy() == qry["aisle_id"].to_numpy()
    in_dept = prod["department_id"].to_numpy() == qry["department_id"].to_numpy()
    has_word = pd.DataFrame({"product_id": product_ids, "word": qry["word"].to_numpy()}).merge(
        words.assign(has=True), on=["product_id", "word"], how="left")["has"].fillna(False).to_numpy(bool)
    is_hr = in_dept & ((qry["aisle_id"].to_numpy() < 0) | in_aisle) & (qry["word"].isna().to_numpy() | has_word)
    return np.where(is_hr, HR, np.where(in_aisle | in_dept | has_word, MR, IR)).astype(np.int8)


def build_relevance(products: pd.DataFrame, rng: np.random.Generator, config: InstacartConfig) -> tuple[pd.DataFrame, dict]:
    words = title_words(products)
    prods = products[products["aisle"] != MISSING]
    aisle_dept = (prods.groupby(["aisle_id", "department_id"]).size().rename("n").reset_index()
                  .sort_values(["aisle_id", "n", "department_id"], ascending=[True, False, True])
                  .drop_duplicates("aisle_id").set_index("aisle_id")["department_id"])
    aisle_q = prods[["aisle", "aisle_id"]].drop_duplicates().assign(department_id=lambda d: d["aisle_id"].map(aisle_dept),
                                                                    word=None, kind="aisle")
    dept_q = prods[["department", "department_id"]].drop_duplicates().assign(aisle_id=-1, word=None, kind="department")
    counts = words.groupby("word").size()
    frequent = words[words["word"].isin(counts.index[counts >= config.min_word_products])]
    home = (frequent.merge(products[["product_id", "aisle_id"]], on="product_id").groupby(["word", "aisle_id"]).size()
            .rename("n").reset_index().sort_values(["word", "n", "aisle_id"], ascending=[True, False, True])
            .drop_duplicates("word"))
    home = home[home["aisle_id"].isin(aisle_dept.index)]
    word_q = home.assign(department_id=home["aisle_id"].map(aisle_dept), kind="word")
    queries = pd.concat([aisle_q.rename(columns={"aisle": "query"}), dept_q.rename(columns={"department": "query"}),
                         word_q.assign(query=word_q["word"])], ignore_index=True)
    queries["query"] = normalized(queries["query"])
    queries = queries.drop_duplicates("query")  # aisle > department > word (concat order)
    queries = queries[["query", "kind", "aisle_id", "department_id", "word"]].reset_index(drop=True)
    log.info("derived %d relevance queries (%s)", len(queries), queries["kind"].value_counts().to_dict())

    word_codes = pd.Index(sorted(frequent["word"].unique()))
    query_word = word_codes.get_indexer(queries["word"].fillna(""))
    pid = products["product_id"].to_numpy()
    pools = [  # same aisle, same department, products with the word (then any product)
        (queries["aisle_id"].to_numpy(), products["aisle_id"].to_numpy(), pid),
        (queries["department_id"].to_numpy(), products["department_id"].to_numpy(), pid),
        (query_word, word_codes.get_indexer(frequent["word"]), frequent["product_id"].to_numpy()),
    ]
    relevance, drawn_counts = sample_relevance_pairs(queries["query"].to_numpy(), pools, pid, config.pairs_per_query,
                                                     partial(label_pairs, queries, products, words), rng)
    return relevance, {"queries_by_kind": {k: int(v) for k, v in queries["kind"].value_counts().sort_index().items()},
                       "pairs_drawn_before_balancing": drawn_counts}


def build(config: InstacartConfig) -> AdapterOutput:
    rng = np.random.default_rng(config.seed)
    products, lines = load_source(config)
    log.info("read %d products and %d order lines of %d users", len(products), len(lines), lines["user_id"].nunique())
    orders = build_timeline(lines, config.end_date)
    timed_lines = lines[["order_id", "product_id"]].merge(
        orders[["order_id", "user_id", "order_number", "day", "ts"]], on="order_id")
    purchases = timed_lines[["ts", "user_id", "product_id"]].sort_values(["ts", "user_id", "product_id"])
    targets, cutoff = select_targets(orders, config.train_orders)
    log.info("%d target orders (%s); evaluation = ts >= %s", len(targets), targets["split"].value_counts().to_dict(), cutoff)
    impressions = build_impressions(targets, timed_lines, products, config)
    relevance, derived = build_relevance(products, rng, config)
    eval_rows = impressions["ts"] >= cutoff
    derived.update({
        "end_date": config.end_date,
        "eval_cutoff_ts": str(cutoff),
        "target_orders": {k: int(v) for k, v in targets["split"].value_counts().sort_index().items()},
        "impressions_eval": int(eval_rows.sum()),
        "impressions_train": int((~eval_rows).sum()),
        "click_rate_eval": round(float(impressions.loc[eval_rows, "clicked"].mean()), 4),
        "click_rate_train": round(float(impressions.loc[~eval_rows, "clicked"].mean()), 4),
    })
    catalog = pd.DataFrame({"product_id": products["product_id"], "title": products["product_name"],
                            "aisle": products["aisle"], "image": pd.Series([None] * len(products), dtype=object),
                            "brand": pd.Series([None] * len(products), dtype=object),
                            "department": products["department"], "aisle_id": products["aisle_id"],
                            "department_id": products["department_id"]})
    return AdapterOutput(catalog=catalog, relevance=relevance, impressions=impressions,
                         purchases=purchases.reset_index(drop=True), rules=RULES, derived=derived)


def main(argv: Sequence[str] | None = None) -> dict:
    config = parse_config(InstacartConfig, argv)
    config = dataclasses.replace(config, source=str(require_dir(config.source, "instacart")))
    return run_adapter(config, GENERATOR, build)


if __name__ == "__main__":
    run_main(main)
