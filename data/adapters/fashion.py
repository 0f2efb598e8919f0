"""Fashion Product Images (Small) -> the four tables (catalog with real photos, proxy relevance).

Source: ``fashion_subset_8142_with_images.parquet`` in ``--source`` (default
``../shared/data/fashion_small``): Myntra titles, a ``description`` "masterCategory -
subCategory - articleType - baseColour - usage" and real 60x80 JPEG thumbnails (``image_jpeg``).
This source has no users, searches or clicks: impressions and purchases are written empty and the
data set feeds the embeddings stage only. Queries and relevance labels are derived from the
product attributes by the rules in :data:`RULES` (recorded in the manifest; proxy labels).

    python -m data.adapters.fashion --workdir runs/fashion [--aisle-level subcategory] [--limit N]
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from common.cli import UserError, parse_config, run_main
from data.adapters.common import (SHARED_DATA, AdapterConfig, AdapterOutput, normalized, read_parquet, require_dir,
                                  require_file, run_adapter, sample_relevance_pairs)
from data.schema import HR, IR, MR

log = logging.getLogger(__name__)

GENERATOR = "data.adapters.fashion"
SOURCE_FILE = "fashion_subset_8142_with_images.parquet"
SOURCE_COLUMNS = ["product_id", "title", "description", "image_jpeg"]
ATTRIBUTES = ["master_category", "sub_category", "article_type", "colour", "usage"]  # description order

# Gender words in titles (case-insensitive, whole words) -> gender value.
GENDER_WORDS = {"men": "Men", "mens": "Men", "women": "Women", "womens": "Women", "boys": "Boys", "boy": "Boys",
                "girls": "Girls", "girl": "Girls", "unisex": "Unisex"}
_GENDER_RE = r"(?<!\S)(" + "|".join(sorted(GENDER_WORDS, key=len, reverse=True)) + r")\b"  # "Men's" yes, "Mr.Men" no

# Query templates: the attributes a query names; every query names the article type.
QUERY_TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("article_type",),
    ("colour", "article_type"),
    ("gender", "article_type"),
    ("usage", "article_type"),
    ("colour", "gender", "article_type"),
)
OPTIONAL_QUERY_ATTRIBUTES = ("colour", "gender", "usage")

RULES = {
    "attributes": "description split on ' - ' into master_category, sub_category, article_type, colour, usage",
    "gender": "first title word (case-insensitive, after a space or at the start, so 'Mr.Men' is not one) among men/mens, women/womens, boys/boy, "
              "girls/girl, unisex -> Men/Women/Boys/Girls/Unisex; null if none",
    "brand": "title words before the gender word; if the title has none, the words before the first colour "
             "name of the data set; null if that leaves nothing",
    "title": "source title with runs of whitespace collapsed",
    "aisle": "article_type (141 values), or sub_category with --aisle-level subcategory",
    "image": "source JPEG bytes (image_jpeg), unchanged",
    "queries": "for every product and template in [type], [colour type], [gender type], [usage type], "
               "[colour gender type]: the attribute values joined by spaces, data.text.normalize_query'd "
               "(e.g. 'navy blue men tshirts'); one query per distinct text",
    "labels": "HR: same article_type and every other attribute the query names (colour, gender, usage) equal; "
              "MR: not HR but same article_type, or same sub_category as the query's type (the type's most "
              "common sub_category); IR: otherwise",
    "pairs": "per query, draws with replacement (deduplicated) from four pools: products matching all query "
             "attributes, same article_type, same sub_category (--pairs-per-query each), any product "
             "(7 x --pairs-per-query); "
             "then labels are subsampled to the paper's 69/20.5/9.9 IR/MR/HR split",
    "limit": "--limit N keeps N products stratified by article_type: rows ordered by (rank within type + "
             "uniform) / type size, first N kept",
    "impressions": "none (no users or clicks in this source): written empty",
    "purchases": "none: written empty",
}


@dataclass
class FashionConfig(AdapterConfig):
    """Fashion Product Images (Small) -> catalog with real photos and proxy relevance labels."""

    source: str = field(default=str(SHARED_DATA / "fashion_small"),
                        metadata={"help": f"directory holding {SOURCE_FILE}"})
    aisle_level: Literal["articletype", "subcategory"] = field(
        default="articletype", metadata={"help": "which attribute becomes the catalog aisle"})
    limit: int = field(default=0, metadata={"help": "keep this many products, stratified by article type (0 = all)",
                                            "min": 0})
    pairs_per_query: int = field(default=8, metadata={"help": "relevance draws per query from each attribute pool (7x that from all products)",
                                                      "min": 1})


def load_products(config: FashionConfig) -> pd.DataFrame:
    """Read and parse the source parquet into one attribute column per field."""
    path = require_file(require_dir(config.source, "fashion_small"), SOURCE_FILE)
    raw = read_parquet(path, SOURCE_COLUMNS).to_pandas()
    parts = raw["description"].str.split(" - ", n=4, expand=True).reindex(columns=range(5))
    incomplete = parts.isna().any(axis=1).to_numpy()
    if incomplete.any():
        bad = int(np.flatnonzero(incomplete)[0])
        raise UserError(f"{path}: column 'description' at row {bad} is {raw['description'].iloc[bad]!r}; expected "
                        "'masterCategory - subCategory - articleType - baseColour - usage'")
    products = pd.DataFrame({"product_id": raw["product_id"].astype(np.int64),
                             "title": raw["title"].str.split().str.join(" "),
                             "image": raw["image_jpeg"]})
    for i, name in enumerate(ATTRIBUTES):
        products[name] = parts[i].str.strip()
    products["gender"] = products["title"].str.extract(_GENDER_RE, flags=re.IGNORECASE, expand=False).str.lower().map(GENDER_WORDS)
    products["brand"] = extract_brand(products["title"], products["colour"].unique())
    return products


def extract_brand(titles: pd.Series, colours: Sequence[str]) -> pd.Series:
    """Brand = title words before the gender word, else before the first colour name; null if empty."""
    before_gender = titles.str.extract(r"^(.*?)\s*" + _GENDER_RE, flags=re.IGNORECASE, expand=True)[0]
    colour_re = r"\b(?:" + "|".join(re.escape(c) for c in sorted(colours, key=len, reverse=True)) + r")\b"
    before_colour = titles.str.extract(r"^(.*?)\s*" + colour_re, flags=re.IGNORECASE, expand=False)
    brand = before_gender.fillna(before_colour).str.strip()
    return brand.where(brand.str.len() > 0)


def stratified_limit(products: pd.DataFrame, limit: int, rng: np.random.Generator) -> pd.DataFrame:
    """Keep ``limit`` products, each article type in proportion to its size (see RULES['limit'])."""
    if limit <= 0 or limit >= len(products):
        return products
    key = rng.random(len(products))
    by_type = products.assign(_key=key).sort_values(["article_type", "_key"], kind="stable")
    rank = by_type.groupby("article_type", sort=False).cumcount()
    size = by_type.groupby("article_type", sort=False)["product_id"].transform("size")
    by_type["_order"] = (rank + by_type["_key"]) / size
    kept = by_type.sort_values(["_order", "product_id"], kind="stable").head(limit)
    return kept.drop(columns=["_key", "_order"]).sort_values("product_id").reset_index(drop=True)


def build_queries(products: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Queries from the templates, and the exact-match pool (query_id, product_id).

    Returns (queries [query_id, query, article_type, colour, gender, usage, template], exact pool).
    """
    frames = []
    for template in QUERY_TEMPLATES:
        rows = products[["product_id", *template]].dropna()
        text = rows[template[0]].astype(str)
        for attr in template[1:]:
            text = text + " " + rows[attr].astype(str)
        text = normalized(text)
        frame = pd.DataFrame({"product_id": rows["product_id"], "query": text, "template": " ".join(template)})
        for attr in ("article_type", *OPTIONAL_QUERY_ATTRIBUTES):
            frame[attr] = rows[attr] if attr in template else None
        frames.append(frame)
    members = pd.concat(frames, ignore_index=True)
    # one query per distinct text (templates never collide on this data; the first template wins if they did)
    queries = members.drop(columns="product_id").drop_duplicates("query").sort_values("query", kind="stable")
    queries = queries.reset_index(drop=True).rename_axis("query_id").reset_index()
    pool = members.merge(queries, on=["query", "template"], how="inner")[["query_id", "product_id"]]
    return queries, pool


def label_pairs(queries: pd.DataFrame, products: pd.DataFrame, query_idx: np.ndarray,
                product_ids: np.ndarray) -> np.ndarray:
    """The relevance label of each (query, product) pair by RULES['labels'] (int8 [N])."""
    prod = products.set_index("product_id").loc[product_ids]
    qry = queries.iloc[query_idx]
    same_type = qry["article_type"].to_numpy() == prod["article_type"].to_numpy()
    all_match = same_type.copy()
    for attr in OPTIONAL_QUERY_ATTRIBUTES:
        wanted = qry[attr].to_numpy(dtype=object)
        named = pd.notna(wanted)
        all_match &= ~named | (wanted == prod[attr].to_numpy(dtype=object))
    same_sub = qry["type_sub_category"].to_numpy() == prod["sub_category"].to_numpy()
    return np.where(all_match, HR, np.where(same_type | same_sub, MR, IR)).astype(np.int8)


def build_relevance(products: pd.DataFrame, rng: np.random.Generator, pairs_per_query: int) -> tuple[pd.DataFrame, dict]:
    queries, exact_pool = build_queries(products)
    # a type's sub_category: the most common one among its products (13 types span two)
    type_sub = (products.groupby(["article_type", "sub_category"]).size().rename("n").reset_index()
                .sort_values(["article_type", "n", "sub_category"], ascending=[True, False, True])
                .drop_duplicates("article_type").set_index("article_type")["sub_category"])
    queries["type_sub_category"] = queries["article_type"].map(type_sub)
    log.info("derived %d queries from %d products", len(queries), len(products))

    type_codes = pd.Index(sorted(products["article_type"].unique()))
    sub_codes = pd.Index(sorted(products["sub_category"].unique()))
    pid = products["product_id"].to_numpy()
    pools = [  # all query attributes match, same article_type, same sub_category (then any product)
        (queries["query_id"].to_numpy(), exact_pool["query_id"].to_numpy(), exact_pool["product_id"].to_numpy()),
        (type_codes.get_indexer(queries["article_type"]), type_codes.get_indexer(products["article_type"]), pid),
        (sub_codes.get_indexer(queries["type_sub_category"]), sub_codes.get_indexer(products["sub_category"]), pid),
    ]
    relevance, drawn_counts = sample_relevance_pairs(queries["query"].to_numpy(), pools, pid, pairs_per_query,
                                                     partial(label_pairs, queries, products), rng)
    derived = {"queries": int(relevance["query"].nunique()),
               "queries_by_template": {k: int(v) for k, v in queries.groupby("template").size().items()},
               "pairs_drawn_before_balancing": drawn_counts}
    return relevance, derived


def build(config: FashionConfig) -> AdapterOutput:
    rng = np.random.default_rng(config.seed)
    products = load_products(config)
    log.info("read %d fashion products", len(products))
    products = stratified_limit(products, config.limit, rng)
    aisle_col = "article_type" if config.aisle_level == "articletype" else "sub_category"
    catalog = products.assign(aisle=products[aisle_col])[
        ["product_id", "title", "aisle", "image", "brand", *ATTRIBUTES, "gender"]]
    relevance, derived = build_relevance(products, rng, config.pairs_per_query)
    derived.update({"products": len(catalog), "aisles": int(catalog["aisle"].nunique()),
                    "products_with_gender": int(catalog["gender"].notna().sum()),
                    "products_with_brand": int(catalog["brand"].notna().sum())})
    return AdapterOutput(catalog=catalog.sort_values("product_id").reset_index(drop=True), relevance=relevance,
                         impressions=None, purchases=None, rules=RULES, derived=derived)


def main(argv: Sequence[str] | None = None) -> dict:
    config = parse_config(FashionConfig, argv)
    config = dataclasses.replace(config, source=str(require_dir(config.source, "fashion_small")))
    return run_adapter(config, GENERATOR, build)


if __name__ == "__main__":
    run_main(main)
