"""The paper's funnel in the scoring service: retrieve candidates by DashCLIP cosine, rank them by pCTR.

``POST /retrieve {query, k}`` (:meth:`Funnel.retrieve`): the query's DashCLIP vector is the row of
``DIR/embeddings/query_table.parquet`` when the normalised query is in it, else the trained DashCLIP
query encoder (``embeddings.encode.load_encoder(DIR, "trained")``, loaded once per process) encodes
it for the request; the ``k`` nearest products come from the FAISS product index
(:class:`serving.index.ProductIndex`, built by ``python -m serving.index``), which never holds
row 0 (the unknown product).

``POST /recommend``: retrieve ``candidates_n`` products (:meth:`Funnel.retrieve`), give each its
ranking features (:meth:`CandidateFeatures.arrays`), score them with the fused pCTR model through
the same code path as ``POST /score`` (:class:`serving.server.Scorer`), and return the ``k`` most
likely to be clicked.

Features of the candidates. Every ``dense_``/``sparse_`` column of the impressions is either
*product-level* (a property of the product; read from the per-product file
``DIR/serving/product_features.parquet`` that ``serving.export`` writes) or *request-level* (a
property of the search: given in the request, else a default). :class:`ImpressionGroups` decides
from the impressions (:data:`SPLIT_RULE`):

* ``constant``: the column has one value per product over all its impressions (e.g. price, aisle,
  brand) -> product-level, that value;
* ``latest``: it varies per product over time but has one value per product and UTC day, and is not
  one value per day for all products (a daily product statistic, e.g. past click rate) ->
  product-level, its value on the product's latest impression (as of the data's end);
* ``request``: anything else (hour, platform, store, discount, weekday, ...).

Nothing is product-level unless some product has two impressions or more (no evidence otherwise).
Defaults: a dense feature's is its training mean; a product-level sparse feature's is the id
reserved for ids unseen in training (what a new product is); a request-level sparse feature's is
its most frequent training id. A product without impressions (never shown, or added by
``serving.add_products`` without feature columns) takes the product-level defaults. The split,
each column's rule and default are in the export manifest (``features``) and ``/openapi.json``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import UserError
from common.io import file_sha256
from data.protocol import DAY_S
from data.text import normalize_query
from embeddings import tables
from embeddings.keys import UNKNOWN_ROW, TableKeys
from ranking.features import ImpressionCache
from ranking.spec import FeatureSpec
from serving.index import MISSING_ID, ProductIndex
from serving.published import ADDED_FILES, ENCODER_CHECKPOINT
from serving.requests import feature_key

log = logging.getLogger("serving.funnel")

SPLIT_RULE = ("product-level: one value per product over all its impressions (constant), or one value per "
              "product and UTC day that is not one value per day for all products (latest: the value on the "
              "product's latest impression); request-level: every other column. Nothing is product-level "
              "unless a product has two impressions or more.")
CONSTANT, LATEST, REQUEST = "constant", "latest", "request"


# the split ------------------------------------------------------------------------------------
def _group_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    """The first row of each run of equal ``sorted_keys`` (aligned ``[N]`` arrays, sorted together)."""
    new_group = np.zeros(len(sorted_keys[0]), bool)
    new_group[:1] = True
    for key in sorted_keys:
        new_group[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(new_group)


def _constant(column: np.ndarray, starts: np.ndarray) -> bool:
    """Whether ``column`` (grouped: each group a run from one of ``starts`` to the next) has one value per group."""
    return np.array_equal(np.minimum.reduceat(column, starts), np.maximum.reduceat(column, starts))


class ImpressionGroups:
    """The impressions grouped by product, by (product, UTC day) and by day, for :meth:`levels`.

    Two sorts serve every column: (product, day) order holds the product groups and, nested in
    them, the product-day groups; day order holds the day groups. Args: ``product_ids`` and ``ts``
    (unix seconds) ``[N]``.
    """

    def __init__(self, product_ids: np.ndarray, ts: np.ndarray) -> None:
        day = np.asarray(ts) // DAY_S
        product_ids = np.asarray(product_ids)
        self.by_product_day = np.lexsort((day, product_ids))
        product_sorted, day_sorted = product_ids[self.by_product_day], day[self.by_product_day]
        self.product_starts = _group_starts(product_sorted)
        self.product_day_starts = _group_starts(product_sorted, day_sorted)
        self.by_day = np.argsort(day, kind="stable")  # linear when the impressions are in time order
        self.day_starts = _group_starts(day[self.by_day])
        # nothing is product-level without a product seen twice
        self.evidence = len(self.product_starts) < len(product_ids)

    def levels(self, values: np.ndarray) -> list[str]:
        """:data:`CONSTANT`, :data:`LATEST` or :data:`REQUEST` per column of ``values`` ``[N, F]``
        (dense or sparse feature columns, compared exactly; see the module docstring)."""
        if not self.evidence:
            return [REQUEST] * values.shape[1]
        levels = []
        for j in range(values.shape[1]):  # a column at a time: [N] in memory, not a sorted copy of [N, F]
            column = np.ascontiguousarray(values[:, j])
            by_product_day = column[self.by_product_day]
            if _constant(by_product_day, self.product_starts):
                levels.append(CONSTANT)
            elif _constant(by_product_day, self.product_day_starts) and not _constant(column[self.by_day],
                                                                                      self.day_starts):
                levels.append(LATEST)
            else:
                levels.append(REQUEST)
        return levels


def latest_rows(product_ids: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [P] sorted, rows [P])``: each product and the row of its latest impression (ties: the last row)."""
    order = np.lexsort((np.arange(len(ts)), ts, product_ids))
    ids = product_ids[order]
    last = np.ones(len(order), bool)
    last[:-1] = ids[1:] != ids[:-1]
    return ids[last], order[last]


def feature_split(cache: ImpressionCache, spec: FeatureSpec) -> dict[str, Any]:
    """The export manifest's ``features`` section: each feature column's level, rule and default
    (see the module docstring), decided on every impression of ``cache``."""
    cols = cache.columns
    sparse = np.asarray(cols["sparse"])
    groups = ImpressionGroups(cols["product_id"], cols["ts"])
    levels = {"dense": groups.levels(np.asarray(cols["dense"])), "sparse": groups.levels(sparse)}
    train = np.asarray(cache.split_index("train"))
    out: dict[str, Any] = {"rule": SPLIT_RULE, "product": [], "request": []}
    for kind, names in (("dense", spec.dense_names), ("sparse", spec.sparse_names)):
        for j, column in enumerate(names):
            level = levels[kind][j]
            entry: dict[str, Any] = {"column": column, "field": feature_key(column), "kind": kind}
            if kind == "dense":
                entry.update(default=float(spec.dense_mean[j]), default_is="training mean")
            elif level == REQUEST:
                values, counts = np.unique(sparse[train, j], return_counts=True)
                entry.update(default=int(values[counts.argmax()]) if len(values) else 0,
                             default_is="most frequent training id")
            else:
                entry.update(default=int(spec.sparse_num_embeddings[j] - 1), default_is="id reserved for unseen ids")
            if level == REQUEST:
                out["request"].append(entry)
            else:
                out["product"].append({**entry, "value": "one value per product" if level == CONSTANT else
                                       "value on the product's latest impression (one value per product and day)"})
    return out


def product_feature_table(cache: ImpressionCache, spec: FeatureSpec, split: dict[str, Any]) -> pa.Table:
    """``product_features.parquet``: ``product_id`` (sorted) and each product-level column of
    ``split``, its value on the product's latest impression (the constant ones have one value)."""
    cols = cache.columns
    ids, rows = latest_rows(np.asarray(cols["product_id"]), np.asarray(cols["ts"]))
    columns: dict[str, pa.Array] = {"product_id": pa.array(ids, pa.int64())}
    for entry in split["product"]:
        names = spec.dense_names if entry["kind"] == "dense" else spec.sparse_names
        values = np.asarray(cols[entry["kind"]][rows, names.index(entry["column"])])
        columns[entry["column"]] = pa.array(values, pa.float32() if entry["kind"] == "dense" else pa.int64())
    return pa.table(columns)


# serving --------------------------------------------------------------------------------------
class CandidateFeatures:
    """The ranking features of retrieved candidates: product-level columns from the per-product
    file (defaults for products it lacks), request-level ones from the request.

    Args:
        spec: the served model's feature spec (feature order).
        split: the export manifest's ``features`` section (:func:`feature_split`).
        table: the per-product file (``product_id`` sorted, and the product-level columns).
    """

    def __init__(self, spec: FeatureSpec, split: dict[str, Any], table: pa.Table) -> None:
        self.split = split
        self.ids = table.column("product_id").to_numpy()
        if len(self.ids) > 1 and not (np.diff(self.ids) > 0).all():
            raise UserError("product features: column 'product_id' must be sorted and unique")
        names = {"dense": spec.dense_names, "sparse": spec.sparse_names}
        self.rows: dict[str, np.ndarray] = {}  # kind -> [P + 1, D or S]: one row per product, then the default row
        self.request_columns: dict[str, np.ndarray] = {}
        for kind, dtype in (("dense", np.float32), ("sparse", np.int64)):
            entries = [e for e in [*split["product"], *split["request"]] if e["kind"] == kind]
            defaults = np.zeros(len(names[kind]), dtype)
            for entry in entries:
                defaults[names[kind].index(entry["column"])] = entry["default"]
            rows = np.tile(defaults, (len(self.ids) + 1, 1))
            for entry in split["product"]:
                if entry["kind"] == kind:
                    rows[:-1, names[kind].index(entry["column"])] = table.column(entry["column"]).to_numpy()
            self.rows[kind] = rows
            self.request_columns[kind] = np.array([names[kind].index(e["column"]) for e in split["request"]
                                                   if e["kind"] == kind], np.int64)

    @classmethod
    def read(cls, path: Path, spec: FeatureSpec, split: dict[str, Any]) -> "CandidateFeatures":
        table = pq.read_table(path)
        missing = [c for c in ["product_id", *(e["column"] for e in split["product"])] if c not in table.column_names]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; run python -m serving.export --force")
        return cls(spec, split, table)

    def arrays(self, product_ids: np.ndarray, request_dense: np.ndarray,
               request_sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dense [n, D] float32, sparse [n, S] int64)`` for candidates ``product_ids [n]``, with the
        request-level values ``request_dense [Rd]`` and ``request_sparse [Rs]`` (in the split's order)."""
        if len(self.ids):
            pos = np.clip(np.searchsorted(self.ids, product_ids), 0, len(self.ids) - 1)
            rows = np.where(self.ids[pos] == product_ids, pos, len(self.ids))
        else:
            rows = np.zeros(len(product_ids), np.int64)
        dense, sparse = self.rows["dense"][rows], self.rows["sparse"][rows]
        dense[:, self.request_columns["dense"]] = request_dense
        sparse[:, self.request_columns["sparse"]] = request_sparse
        return dense, sparse


class QueryVectors:
    """Query -> DashCLIP vector ``[d]``: the query table's row when the normalised query is in it,
    else the trained encoder's vector for it (computed for the request).

    ``vectors`` ``[R, d]`` are the table's rows and ``keys`` its keys: the served model's own query
    table and its feature spec's keys when the model holds the fp32 table (one copy of both in a
    process that scores and retrieves), else the exported table file."""

    def __init__(self, vectors: np.ndarray, keys: TableKeys, encoder: Any) -> None:
        self.vectors, self.keys, self.encoder = vectors, keys, encoder

    def vector(self, query: str) -> tuple[np.ndarray, bool]:
        """``(vector [d] float32, encoded)`` for a raw query; ``encoded`` = not in the table."""
        key = normalize_query(query)
        row = int(self.keys.rows([key], normalized=True)[0])
        if row != UNKNOWN_ROW:
            return self.vectors[row], False
        return self.encoder.queries([key])[0], True


@dataclass
class Retrieved:
    """The nearest products of one query: ``product_ids [n]`` int64 and ``cosines [n]`` float32, best
    first; ``query`` normalised; ``encoded``: its vector was computed for this request."""

    product_ids: np.ndarray
    cosines: np.ndarray
    query: str
    encoded: bool


class FunnelUnavailable(UserError):
    """The files retrieval needs are missing or do not belong together (the service answers 503)."""


class Funnel:
    """Retrieval over the served product index and the candidates' ranking features.

    Thread-safe (read-only FAISS searches and lookups; the encoder runs under ``inference_mode``).
    """

    def __init__(self, index: ProductIndex, queries: QueryVectors, features: CandidateFeatures) -> None:
        self.index, self.queries, self.features = index, queries, features

    def retrieve(self, query: str, k: int) -> Retrieved:
        """The ``min(k, N)`` products nearest to ``query`` by cosine (an approximate index's unfilled
        slots left out)."""
        vector, encoded = self.queries.vector(query)
        ids, cosines = self.index.search(vector[None, :], k)
        filled = ids[0] != MISSING_ID
        return Retrieved(ids[0][filled], cosines[0][filled], normalize_query(query), encoded)

    def warm_up(self) -> None:
        """One search and one encoding, so that neither is a worker's first request."""
        self.index.search(np.zeros((1, self.index.dim), np.float32), 1)
        self.queries.encoder.queries(["warm up"])


def _no_progress(batches: Iterable, desc: str, total: int | None = None) -> Iterable:
    return batches


def load_encoder_once(workdir: str | Path) -> tuple[Any, str] | None:
    """``(encoder, checkpoint sha256)`` of the trained DashCLIP model, or None when there is none.
    The encoder draws no progress bars (the service encodes one query per request)."""
    checkpoint = Path(workdir) / ENCODER_CHECKPOINT
    if not checkpoint.is_file():
        return None
    from embeddings.encode import load_encoder

    encoder = load_encoder(workdir, "trained")
    encoder._progress = _no_progress  # (DashEncoder draws a tqdm bar per call by default)
    return encoder, file_sha256(checkpoint)


def load_funnel(workdir: str | Path, spec: FeatureSpec, export_manifest: dict[str, Any],
                added: dict[str, Any] | None, encoder: Callable[[], tuple[Any, str] | None],
                model_query_table: np.ndarray | None = None) -> Funnel:
    """The funnel over the served files, checked to belong together: the DashCLIP tables the exported
    model was trained with, the index built from that product table (or the added set's index), and
    the query table made by the checkpoint of the encoder (``encoder()`` gives ``(DashEncoder,
    checkpoint sha256)``, or None when there is no checkpoint; called last). :class:`FunnelUnavailable`
    names what is missing or does not match.

    ``model_query_table``: the served model's fp32 query table ``[R, d]``, the rows of that same
    table file (the check above) in ``spec``'s order; the query vectors are then its rows, not a
    second mapping of the file."""
    workdir = Path(workdir)
    if "features" not in export_manifest:
        raise FunnelUnavailable(f"{workdir / 'serving/manifest.json'} has no feature split: run python -m "
                                f"serving.export --force")
    try:
        table_hashes = tables.tables_set(workdir).verify()
        for kind, source in export_manifest.get("source_tables", {}).items():
            if table_hashes.get(source["path"]) != source["sha256"]:
                raise UserError(f"{workdir / source['path']} is not the {kind} table the served model was trained "
                                f"with: retrain (python -m ranking.train) and export again")
        if added is not None:
            index = ProductIndex.read(workdir / ADDED_FILES["index"], workdir / ADDED_FILES["index_ids"],
                                      added.get("index", {}).get("kind", ""), added)
        else:
            index = ProductIndex.load(workdir)
    except UserError as exc:
        raise FunnelUnavailable(str(exc)) from None
    loaded = encoder()
    if loaded is None:
        raise FunnelUnavailable(f"{workdir / ENCODER_CHECKPOINT} not found: retrieval needs the trained DashCLIP "
                                f"query encoder")
    dashclip, checkpoint_sha = loaded
    made_by = (tables.tables_set(workdir).manifest() or {}).get("made_from", {}).get("inputs", {})
    if made_by.get(ENCODER_CHECKPOINT) != checkpoint_sha:
        raise FunnelUnavailable(f"{tables.embedding_table_path(workdir, 'query')} was not made by the DashCLIP "
                                f"checkpoint this process loaded ({workdir / ENCODER_CHECKPOINT}): run python -m "
                                f"embeddings.export, then restart the service")
    if model_query_table is not None and spec.has_tables:
        if model_query_table.shape[0] != spec.num_query_rows:
            raise FunnelUnavailable(f"the served model's query table has {model_query_table.shape[0]} rows, its "
                                    f"feature spec {spec.num_query_rows}: run python -m serving.export --force")
        queries = QueryVectors(model_query_table, spec.query_keys, dashclip)
    else:  # mapped, not read: the service's workers share one copy of the query vectors
        table = tables.mapped_table(workdir, "query", table_hashes[tables.embedding_table_rel("query")])
        queries = QueryVectors(table.vectors, table.keys, dashclip)
    query_dim = int(queries.vectors.shape[1])
    if not index.dim == query_dim == dashclip.dim:
        raise FunnelUnavailable(f"vector dimensions differ: product index {index.dim}, query table "
                                f"{query_dim}, DashCLIP encoder {dashclip.dim}")
    features_path = workdir / (ADDED_FILES["product_features"] if added is not None
                               else "serving/product_features.parquet")
    features = CandidateFeatures.read(features_path, spec, export_manifest["features"])
    log.info("funnel: %d products indexed (%s), %d queries in the table", len(index), index.kind or "?",
             len(queries.keys) - 1)
    return Funnel(index, queries, features)
