"""Plumbing shared by the real-data adapters: config, source checks, relevance sampling, writing.

An adapter turns one public data set into the four tables of the on-disk contract
(:mod:`data.schema`) and ``DIR/data/manifest.json``. The shared steps live here:

* :class:`AdapterConfig`: the flags every adapter has (``--source --workdir --seed --force``).
* :func:`require_dir`, :func:`require_file`, :func:`read_parquet`, :func:`require_columns`: a bad source
  becomes one :class:`~common.cli.UserError` line naming the path, file or column.
* :func:`sample_relevance_pairs`: relevance pairs of the attribute-derived queries are drawn per
  query from candidate pools (:func:`draw_from_pools`: e.g. same exact attributes, same type, same
  category, then anywhere), labelled by the adapter's rule, then subsampled so that IR/MR/HR lands
  on the paper's 69/20.5/9.9 split (:func:`balance_labels`).
* :func:`run_adapter`: skip when the manifest says the same settings are already written, else
  build, validate all four tables in memory (ids against the catalog, images decoded), and only
  then write each table atomically; the manifest goes last, so it marks a complete data set.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import DEFAULT_WORKDIR, UserError, check_config
from common.io import prepare_workdir
from common.provenance import MadeFrom
from data.dataset import data_set, table_rel
from data.schema import (DENSE_PREFIX, HR, IR, LABEL_NAMES, MR, SCHEMA_VERSION, SPARSE_PREFIX, TABLE_NAMES,
                         SchemaError, TableName, schema, validate)
from data.text import normalize_query

log = logging.getLogger(__name__)

# The paper's relevance label split (Section 4.1): 69% IR, 20.5% MR, 9.9% HR.
PAPER_LABEL_SPLIT: dict[int, float] = {IR: 0.69, MR: 0.205, HR: 0.099}
# Draws per query from the pool of every product, in units of the draws from one attribute pool:
# that pool (nearly all IR) needs about 7x an attribute pool for the paper's 69% IR to 9.9% HR.
ANYWHERE_DRAWS = 7

# Repository root (.../main); the shared real data sit beside it in ../shared/data.
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@dataclass
class AdapterConfig:
    """Flags every adapter has."""

    source: str = field(default="", metadata={"help": "the source data set directory"})
    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "output directory; tables go to WORKDIR/data"})
    seed: int = field(default=0, metadata={"help": "seed of every sampling step", "min": 0})
    force: bool = field(default=False, metadata={"help": "rebuild even if the same settings are already written"})


@dataclass
class AdapterOutput:
    """What an adapter's build step returns: the four tables as DataFrames, and what to record.

    ``impressions``/``purchases`` may be None for a source without clicks (written empty).
    ``rules`` maps each derived thing to the rule that derived it; ``derived`` holds facts of
    this build (label counts, cut-off times) for the manifest.
    """

    catalog: pd.DataFrame
    relevance: pd.DataFrame
    impressions: pd.DataFrame | None
    purchases: pd.DataFrame | None
    rules: dict[str, str]
    derived: dict[str, Any] = field(default_factory=dict)
    proxy_labels: bool = True


# --------------------------------------------------------------------------------------------
# source checks


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as an absolute Path; a one-line error if it is not an existing directory."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise UserError(f"--source {path}: {what} directory not found")
    return resolved


def require_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise UserError(f"{path}: missing source file (expected {name} in --source {directory})")
    return path


def require_columns(found: Iterable[str], path: str | Path, required: Iterable[str]) -> None:
    found = list(found)
    for col in required:
        if col not in found:
            raise UserError(f"{path}: missing column '{col}' (found columns {found})")


def read_parquet(path: Path, columns: list[str], **kwargs: Any) -> pa.Table:
    """Read ``columns`` of a Parquet file after checking they exist (one-line errors)."""
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    require_columns(names, path, columns)
    return pq.read_table(path, columns=columns, **kwargs)


# --------------------------------------------------------------------------------------------
# relevance sampling


def draw_from_pools(query_keys: np.ndarray, pool_keys: np.ndarray, pool_products: np.ndarray, per_query: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``per_query`` products (with replacement) for each query from the pool sharing its key.

    ``query_keys`` [Q] and ``pool_keys``/``pool_products`` [P] are integer arrays; a pool row
    (k, p) puts product p in pool k. Queries whose pool is empty get nothing.
    Returns (query index [N], product id [N]).
    """
    order = np.argsort(pool_keys, kind="stable")
    keys, products = pool_keys[order], pool_products[order]
    start = np.searchsorted(keys, query_keys, side="left")
    size = np.searchsorted(keys, query_keys, side="right") - start
    query_idx = np.repeat(np.flatnonzero(size > 0), per_query)
    offsets = (rng.random(query_idx.size) * size[query_idx]).astype(np.int64)
    return query_idx, products[start[query_idx] + offsets]


def balance_labels(pairs: pd.DataFrame, rng: np.random.Generator,
                   split: Mapping[int, float] = PAPER_LABEL_SPLIT) -> pd.DataFrame:
    """Subsample labelled pairs (column ``label``) so the label shares match ``split``.

    Keeps as many pairs as possible: the scarcest label (relative to its share) is kept whole.
    Raises UserError if a label has no pair at all (the source slice is too small).
    """
    shares = {lab: share / sum(split.values()) for lab, share in split.items()}
    counts = pairs["label"].value_counts()
    for lab in shares:
        if counts.get(lab, 0) == 0:
            raise UserError(f"no {LABEL_NAMES[lab]} relevance pair could be derived (source too small?)")
    total = min(counts[lab] / share for lab, share in shares.items())
    keep = {lab: int(np.floor(total * share)) for lab, share in shares.items()}
    ranked = pairs.assign(_key=rng.random(len(pairs))).sort_values(["label", "_key"], kind="stable")
    rank = ranked.groupby("label", sort=False).cumcount().to_numpy()
    limit = ranked["label"].map(keep).to_numpy()
    return ranked[rank < limit].drop(columns="_key").reset_index(drop=True)


def label_counts(labels: pd.Series) -> dict[str, int]:
    """Pairs per label name (IR, MR, HR) of a label column."""
    counts = labels.value_counts()
    return {LABEL_NAMES[lab]: int(counts.get(lab, 0)) for lab in (IR, MR, HR)}


def sample_relevance_pairs(queries: np.ndarray, pools: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                           products: np.ndarray, pairs_per_query: int,
                           label: Callable[[np.ndarray, np.ndarray], np.ndarray],
                           rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, int]]:
    """The relevance table of attribute-derived queries: draw pairs, label them, balance the labels.

    ``queries`` [Q] holds the query texts; each attribute pool is ``(query keys [Q], pool keys
    [P], pool products [P])`` as :func:`draw_from_pools` takes it. Every query draws
    ``pairs_per_query`` products from each attribute pool in order, then ``ANYWHERE_DRAWS *
    pairs_per_query`` from ``products`` [P] (any product). The distinct (query, product) pairs,
    sorted, are labelled by ``label(query index [N], product id [N]) -> int8 labels [N]`` and
    subsampled to the paper's split (:func:`balance_labels`).

    Returns the relevance table (``query``, ``product_id``, ``label`` int8; sorted by query and
    product) and the label counts drawn before balancing.
    """
    anywhere = (np.zeros(len(queries), np.int64), np.zeros(len(products), np.int64), products)
    draws = [1] * len(pools) + [ANYWHERE_DRAWS]
    drawn = [draw_from_pools(query_keys, pool_keys, pool_products, pairs_per_query * times, rng)
             for (query_keys, pool_keys, pool_products), times in zip([*pools, anywhere], draws)]
    pairs = pd.DataFrame({"query_idx": np.concatenate([query_idx for query_idx, _ in drawn]),
                          "product_id": np.concatenate([product_ids for _, product_ids in drawn])}).drop_duplicates()
    pairs = pairs.sort_values(["query_idx", "product_id"]).reset_index(drop=True)
    pairs["label"] = label(pairs["query_idx"].to_numpy(), pairs["product_id"].to_numpy())
    drawn_counts = label_counts(pairs["label"])
    pairs = balance_labels(pairs, rng)
    relevance = pd.DataFrame({"query": queries[pairs["query_idx"].to_numpy()],
                              "product_id": pairs["product_id"].to_numpy(),
                              "label": pairs["label"].to_numpy(np.int8)})
    return relevance.sort_values(["query", "product_id"]).reset_index(drop=True), drawn_counts


# --------------------------------------------------------------------------------------------
# table helpers


def compact_codes(values: pd.Series, vocabulary: Iterable[Any]) -> np.ndarray:
    """Categorical ids for sparse features: 1..n in sorted order of ``vocabulary``, 0 = missing/unknown."""
    vocab = pd.Index(sorted(set(vocabulary)))
    codes = vocab.get_indexer(values)
    return (codes + 1).astype(np.int64)  # get_indexer gives -1 for unknown or missing values


def rank_within(df: pd.DataFrame, group: list[str], by: list[str], ascending: list[bool]) -> np.ndarray:
    """0-based rank of each row inside its ``group`` when sorted by ``by`` (ties keep row order)."""
    order = df.sort_values(group + by, ascending=[True] * len(group) + ascending, kind="stable")
    rank = order.groupby(group, sort=False).cumcount()
    return rank.reindex(df.index).to_numpy()


def to_arrow(df: pd.DataFrame, name: TableName) -> pa.Table:
    """DataFrame -> Arrow with the contract's required dtypes first, then the extra columns.

    ``dense_*`` become float32 and ``sparse_*`` int64; other extra columns keep their inferred type.
    """
    required = schema(name)
    extras = []
    for col in df.columns:
        if col in required.names:
            continue
        if name == "impressions" and col.startswith(DENSE_PREFIX):
            extras.append(pa.field(col, pa.float32(), nullable=False))
        elif name == "impressions" and col.startswith(SPARSE_PREFIX):
            extras.append(pa.field(col, pa.int64(), nullable=False))
        else:
            inferred = pa.Table.from_pandas(df[[col]], preserve_index=False).schema.field(col).type
            extras.append(pa.field(col, pa.string() if pa.types.is_null(inferred) else inferred))  # all-null: string
    missing = [c for c in required.names if c not in df.columns]
    if missing:
        raise ValueError(f"adapter bug: {name} frame lacks required columns {missing}")
    ordered = df[required.names + [f.name for f in extras]]
    return pa.Table.from_pandas(ordered, schema=schema(name, extras), preserve_index=False)


def normalized(texts: pd.Series) -> pd.Series:
    """:func:`data.text.normalize_query` of each text, computed once per distinct text."""
    unique = texts.unique()
    return texts.map(dict(zip(unique, map(normalize_query, unique))))


def empty_table(name: TableName) -> pa.Table:
    """A zero-row table of ``name`` with the contract's schema (for a source that lacks it)."""
    return schema(name).empty_table()


# --------------------------------------------------------------------------------------------
# running an adapter


def settings_of(config: AdapterConfig) -> dict[str, Any]:
    """The settings that determine the output (everything but workdir and force), JSON-normalised."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("workdir", "force")}
    return json.loads(json.dumps(settings, default=str))


def source_fingerprint(source: str) -> list[list[Any]]:
    """``[relative path, size]`` of every file under the source (a cheap check that it is the same
    data set; content hashes of multi-GB image folders would cost more than the adapter)."""
    root = Path(source)
    if not source or not root.exists():
        return []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[p.relative_to(root).as_posix() if p != root else p.name, p.stat().st_size] for p in files]


def validate_output(out: AdapterOutput, data_dir: Path) -> dict[TableName, pa.Table]:
    """Convert and validate the four tables in memory (before anything is written)."""
    tables: dict[TableName, pa.Table] = {}
    catalog = validate(to_arrow(out.catalog, "catalog"), data_dir / "catalog.parquet", "catalog", check_images=True)
    ids = catalog.column("product_id").to_numpy()
    tables["catalog"] = catalog
    for name, frame in (("relevance", out.relevance), ("impressions", out.impressions), ("purchases", out.purchases)):
        table = empty_table(name) if frame is None else to_arrow(frame, name)
        tables[name] = validate(table, data_dir / f"{name}.parquet", name, catalog_ids=ids)
    return tables


def run_adapter(config: AdapterConfig, generator: str, build: Callable[[AdapterConfig], AdapterOutput]) -> dict[str, Any]:
    """Build (unless already complete), validate and write the data set; return the manifest."""
    check_config(config)  # also when called with a config built in code
    root = prepare_workdir(config.workdir, "data")
    data_dir = root / "data"
    settings = settings_of(config)
    output = data_set(root, [table_rel(name) for name in TABLE_NAMES], what=f"python -m {generator}")
    made_from = MadeFrom(settings={"generator": generator, **settings,
                                   "source_files": source_fingerprint(settings["source"])})
    if not config.force and output.current(made_from):
        log.info("%s: %s already holds this data set from the same source and settings; skipping (--force to redo)",
                 generator, data_dir)
        return output.manifest() or {}
    started = time.perf_counter()
    out = build(config)
    log.info("validating the four tables before writing")
    try:
        tables = validate_output(out, data_dir)
    except SchemaError as exc:  # e.g. an undecodable source image: nothing is written
        raise UserError(f"the source {settings['source']} gives an invalid table: {exc}") from None
    manifest: dict[str, Any] = {}
    with output.publish(made_from, manifest) as staged:
        for name, table in tables.items():
            pq.write_table(table, staged[table_rel(name)])
        counts = {name: table.num_rows for name, table in tables.items()}
        labels = label_counts(tables["relevance"].column("label").to_pandas())
        clicks = tables["impressions"].column("clicked").to_numpy()
        manifest.update({
            "schema_version": SCHEMA_VERSION,
            "source": generator.rsplit(".", 1)[-1],
            "generator": generator,
            "source_path": settings["source"],
            "settings": settings,
            "proxy_labels": out.proxy_labels,
            "rules": out.rules,
            "derived": out.derived,
            "row_counts": counts,
            "click_rate": round(float(clicks.mean()), 4) if clicks.size else None,
            "label_counts": labels,
            "label_split": {name: round(n / max(1, sum(labels.values())), 4) for name, n in labels.items()},
        })
    log.info("%s: wrote %s to %s in %.1f s", generator,
             ", ".join(f"{n} {c:,} rows" for n, c in counts.items()), data_dir, time.perf_counter() - started)
    return output.manifest() or manifest
