"""The service's request and response models and the request -> tensors conversion.

``POST /score`` (:func:`build_score_request_model`, :func:`build_columns_request_model`),
``POST /retrieve`` (:class:`RetrieveRequest`) and ``POST /recommend``
(:func:`build_recommend_request_model`); every error has the :class:`ErrorResponse` body.

The request model is built from the exported feature spec (:func:`build_score_request_model`), so
the OpenAPI schema names every dense and sparse feature the model takes, and a request that
misses one, adds an unknown one, or sends a non-finite number is rejected with an error naming
the field (``candidates[3].dense.price``).

Dense values must lie within the training mean +- ``max_dense_z`` (default :data:`DENSE_MAX_Z`)
training standard deviations, each feature's bounds being its schema ``minimum``/``maximum``: far
beyond them the model's arithmetic overflows (``price: 1e20`` gives NaN). Integer fields (ids,
``position``) also take a JSON number with a zero fraction (``785.0``); ``785.5`` is refused.
A query that normalises to the empty string (whitespace, emoji or punctuation only) is an unknown
query: it is scored with row 0 like any query missing from the table.

Time: ``now`` and purchase ``ts`` are ISO 8601 strings or unix seconds; a time without a zone
is UTC (the data's ``timestamp[s]`` columns are UTC). The purchase history is the one the model
was trained with: purchases with ``now - history_days <= ts < now``, most recent first, cut to
``history_len`` (:class:`ranking.spec.PurchaseIndex`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from operator import itemgetter
from typing import Annotated, Any, Callable, Sequence

import numpy as np
import torch
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model,
                      field_validator, model_validator)

from data.protocol import HISTORY_DAYS
from data.text import normalize_query
from embeddings.tables import UNKNOWN_ROW
from ranking.spec import FeatureSpec, PurchaseIndex

INT64_MAX = 2**63 - 1
MAX_HISTORY_ITEMS = 10_000
MAX_QUERY_CHARS = 512
DENSE_MAX_Z = 1000.0
RETRIEVE_MAX_K = 1000
DEFAULT_K = 10
DEFAULT_CANDIDATES_N = 200


def _whole_float_to_int(value: Any) -> Any:
    """``785.0`` -> ``785``; anything else unchanged (the strict integer check then refuses ``785.5``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# after the constraints in ``Annotated``, so that they stay in the JSON schema
ACCEPT_WHOLE_FLOATS = BeforeValidator(_whole_float_to_int)
Id64 = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX), ACCEPT_WHOLE_FLOATS]
ProductId = Annotated[Id64, Field(description="catalog product_id (int64)")]
POSITION_MAX = 2**31 - 1
Position = Annotated[int, Field(strict=True, ge=0, le=POSITION_MAX), ACCEPT_WHOLE_FLOATS]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Purchase(BaseModel):
    """One past purchase of the shopper."""

    model_config = ConfigDict(extra="forbid")
    product_id: ProductId
    ts: datetime = Field(description="purchase time: ISO 8601 or unix seconds (pydantic reads numbers above 2e10 "
                                     "as milliseconds); no zone = UTC",
                         examples=["2024-03-01T18:30:00Z"])


class ScoreRequestBase(BaseModel):
    """Fields of every scoring request; ``candidates`` is added per model (see :func:`build_score_request_model`)."""

    model_config = ConfigDict(extra="forbid")
    user_id: Id64 | None = Field(
        default=None, description=f"shopper id; their {HISTORY_DAYS}-day purchase history is read from purchases.parquet "
                                  "(unknown user = empty history). Give exactly one of user_id and purchase_history.")
    purchase_history: list[Purchase] | None = Field(
        default=None, max_length=MAX_HISTORY_ITEMS,
        description="the shopper's purchases (instead of user_id); only those in the history window before "
                    "`now` count. Give exactly one of user_id and purchase_history ([] for none).")
    query: str = Field(max_length=MAX_QUERY_CHARS,
                       description="search query as typed; normalised with data.text.normalize_query (one that "
                                   "normalises to the empty string is an unknown query, scored with row 0)")
    now: datetime | None = Field(default=None, description="request time (ISO 8601 or unix seconds; no zone = "
                                                            "UTC); default: the latest impression time in the data")

    @model_validator(mode="after")
    def _one_history_source(self) -> "ScoreRequestBase":
        if (self.user_id is None) == (self.purchase_history is None):
            raise ValueError("give exactly one of 'user_id' and 'purchase_history'")
        return self


class ScoreMeta(BaseModel):
    """What the model saw for this request."""

    unknown_query: bool = Field(description="the normalised query is not in the query table (scored with row 0)")
    unknown_products: int = Field(description="candidates whose product_id is not in the product table (row 0)")
    unknown_history_products: int = Field(description="history purchases of products not in the table (zeros)")
    history_length: int = Field(description="purchases in the history window that the model used (after the cap)")
    now: int = Field(description="request time used, unix seconds")
    model: str = Field(description="sha256 of the served model.pt (first 16 hex digits)")


class ScoreResponse(BaseModel):
    """Scores in candidate order and what the model saw."""

    scores: list[float] = Field(description="click probability per candidate, in request order (always finite)")
    meta: ScoreMeta


class ErrorDetail(BaseModel):
    """One reason a request was refused."""

    field: str = Field(description="what was wrong: a body field (candidates[2].dense.price), 'body', "
                                   "'content-type', 'path', 'method' or 'funnel' (retrieval unavailable)")
    type: str = Field(description="machine-readable kind (pydantic error types, json_invalid, too_long, "
                                  "too_large, unsupported_media_type, not_found, method_not_allowed, "
                                  "non_finite_score, unavailable)")
    msg: str = Field(description="human-readable explanation")


class ErrorResponse(BaseModel):
    """The body of every error response (4xx and the 500 for a non-finite score)."""

    message: str = Field(description="'field: msg' of every error, joined with '; '")
    detail: list[ErrorDetail]


def _retrievable(query: str) -> str:
    """``query`` unchanged, if it keeps a character under :func:`data.text.normalize_query`."""
    if not normalize_query(query):
        raise ValueError("the query normalises to the empty string (only whitespace, emoji or punctuation): "
                         "nothing to retrieve")
    return query


RetrievableQuery = Annotated[str, Field(max_length=MAX_QUERY_CHARS), AfterValidator(_retrievable)]


class RetrieveRequest(BaseModel):
    """Retrieve the products nearest to a query by DashCLIP cosine."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "organic whole milk",
                                                                                 "k": DEFAULT_K}]})
    query: RetrievableQuery = Field(description="search query as typed; normalised with data.text.normalize_query. "
                                                "Its vector is the exported query table's row when the normalised "
                                                "query is in it, else the trained DashCLIP query encoder computes it "
                                                "for this request. One that normalises to nothing is refused (422).")
    k: Annotated[int, Field(strict=True, ge=1, le=RETRIEVE_MAX_K), ACCEPT_WHOLE_FLOATS] = Field(
        default=DEFAULT_K, description=f"how many products (1 to {RETRIEVE_MAX_K}; fewer when the index holds fewer)")


class RetrievedProduct(BaseModel):
    """One retrieved product."""

    product_id: int = Field(description="catalog product_id")
    cosine: float = Field(description="cosine of the product's and the query's DashCLIP vectors")


class RetrieveMeta(BaseModel):
    """How the products were found."""

    query: str = Field(description="the normalised query")
    query_encoded: bool = Field(description="the query is not in the exported query table: the DashCLIP query "
                                            "encoder computed its vector for this request")
    indexed_products: int = Field(description="products in the served index (row 0, the unknown product, is never "
                                              "one)")
    index: str = Field(description="index kind (exact, hnsw or ivf)")


class RetrieveResponse(BaseModel):
    """The nearest products, best first."""

    products: list[RetrievedProduct]
    meta: RetrieveMeta


class RecommendRequestBase(ScoreRequestBase):
    """Fields of every recommendation request; ``k``, ``candidates_n`` and ``features`` are added per
    model (see :func:`build_recommend_request_model`)."""

    @field_validator("query")
    @classmethod
    def _query_retrievable(cls, query: str) -> str:
        return _retrievable(query)


class RecommendedProduct(BaseModel):
    """One recommended product."""

    product_id: int = Field(description="catalog product_id")
    cosine: float = Field(description="cosine of the product's and the query's DashCLIP vectors (retrieval)")
    score: float = Field(description="click probability from the pCTR model (ranking; always finite)")


class RecommendMeta(ScoreMeta):
    """What retrieval and the ranking model saw for this request."""

    query_encoded: bool = Field(description="the query is not in the exported query table: the DashCLIP query "
                                            "encoder computed its vector for retrieval (the ranking model then sees "
                                            "an unknown query, row 0, as unknown_query says)")
    retrieved: int = Field(description="candidates retrieved and scored (candidates_n, or fewer when the index "
                                       "holds fewer)")


class RecommendResponse(BaseModel):
    """The ``k`` candidates most likely to be clicked, best first, with both scores."""

    products: list[RecommendedProduct]
    meta: RecommendMeta


def _feature_fields(names: dict[str, str], annotation: Any,
                    field_args: Callable[[int, str], dict[str, Any]]) -> dict[str, Any]:
    """Pydantic fields keyed ``f<i>`` with the request name as alias (names need not be identifiers);
    ``field_args(i, column)`` gives the rest of ``Field``'s arguments."""
    return {f"f{i}": (annotation, Field(alias=key, **field_args(i, column)))
            for i, (key, column) in enumerate(names.items())}


def feature_key(column: str) -> str:
    """Request field name of an impressions feature column: ``dense_price`` -> ``price``."""
    return column.split("_", 1)[1] if "_" in column else column


def request_fields(spec: FeatureSpec) -> dict[str, dict[str, str]]:
    """``{"dense": {request name: column}, "sparse": {...}}`` in feature-spec order."""
    return {"dense": {feature_key(c): c for c in spec.dense_names},
            "sparse": {feature_key(c): c for c in spec.sparse_names}}


def dense_bounds(spec: FeatureSpec, max_dense_z: float = DENSE_MAX_Z) -> list[tuple[float, float]]:
    """``(lowest, highest)`` raw value accepted per dense feature: training mean -+ ``max_dense_z`` stds."""
    return [(mean - max_dense_z * std, mean + max_dense_z * std) for mean, std in zip(spec.dense_mean, spec.dense_std)]


def build_score_request_model(spec: FeatureSpec, max_candidates: int,
                              max_dense_z: float = DENSE_MAX_Z) -> type[ScoreRequestBase]:
    """The ``ScoreRequest`` pydantic model of one exported model: every dense and sparse feature of
    ``spec`` is a required field named by :func:`feature_key`, unknown ones are rejected, dense values
    must be finite numbers within :func:`dense_bounds` and ids non-negative integers."""
    fields = request_fields(spec)
    dense, sparse = fields["dense"], fields["sparse"]
    bounds = dense_bounds(spec, max_dense_z)
    forbid = ConfigDict(extra="forbid")
    dense_model = create_model(
        "DenseFeatures", __config__=forbid,
        __doc__=f"Raw dense features (all required, finite, within training mean +- {max_dense_z:g} stds).",
        **_feature_fields(dense, FiniteFloat, lambda i, col: {
            "ge": bounds[i][0], "le": bounds[i][1],
            "description": f"raw value of impressions column {col} (training mean {spec.dense_mean[i]:.4g}, "
                           f"std {spec.dense_std[i]:.4g}; the model normalises)"}))
    sparse_model = create_model(
        "SparseFeatures", __config__=forbid, __doc__="Categorical ids (all required, >= 0).",
        **_feature_fields(sparse, Id64, lambda i, col: {
            "description": f"id of impressions column {col}; ids >= {spec.sparse_num_embeddings[i] - 1} (unseen "
                           f"in training) share one reserved bucket"}))
    candidate = create_model(
        "Candidate", __config__=forbid, __doc__="One candidate product to score.",
        product_id=(ProductId, ...),
        position=(Position | None, Field(
            default=None, description="ad slot (0 = top); informational: this model has no position input")),
        dense=(dense_model, ... if dense else Field(default_factory=dense_model)),
        sparse=(sparse_model, ... if sparse else Field(default_factory=sparse_model)),
    )
    example = {"user_id": 42, "query": "Organic Whole Milk", "candidates": [{
        "product_id": spec.product_keys[1] if len(spec.product_keys) > 1 else 1,
        "dense": {key: round(spec.dense_mean[i], 3) for i, key in enumerate(dense)},
        "sparse": {key: 0 for key in sparse}}]}
    request = create_model(
        "ScoreRequest", __base__=ScoreRequestBase, __doc__="Score candidate products for one shopper and query.",
        candidates=(list[candidate], Field(min_length=1, max_length=max_candidates,
                                           description=f"products to score (1 to {max_candidates})")))
    request.model_config["json_schema_extra"] = {"examples": [example]}
    request.model_rebuild(force=True)
    return request


def build_columns_request_model(spec: FeatureSpec, max_candidates: int,
                                max_dense_z: float = DENSE_MAX_Z) -> type[ScoreRequestBase]:
    """The ``ScoreColumnsRequest`` model: :func:`build_score_request_model`'s request with the candidates
    given column-wise, ``{"product_id": [..], "position": [..]?, "dense": {"price": [..], ..},
    "sparse": {"store": [..], ..}}``: the same field names and constraints, one array per field, every
    array one value per candidate (in the same order)."""
    fields = request_fields(spec)
    dense, sparse = fields["dense"], fields["sparse"]
    bounds = dense_bounds(spec, max_dense_z)
    forbid = ConfigDict(extra="forbid")
    sized = {"min_length": 1, "max_length": max_candidates}
    dense_model = create_model(
        "DenseColumns", __config__=forbid,
        __doc__=f"Raw dense features, one array per feature (all required, finite, within training mean +- "
                f"{max_dense_z:g} stds).",
        **{f"f{i}": (list[Annotated[FiniteFloat, Field(ge=bounds[i][0], le=bounds[i][1])]], Field(
            alias=key, **sized, description=f"raw values of impressions column {col} (training mean "
                                            f"{spec.dense_mean[i]:.4g}, std {spec.dense_std[i]:.4g})"))
           for i, (key, col) in enumerate(dense.items())})
    sparse_model = create_model(
        "SparseColumns", __config__=forbid, __doc__="Categorical ids, one array per feature (all required, >= 0).",
        **{f"f{i}": (list[Id64], Field(alias=key, **sized, description=f"ids of impressions column {col}"))
           for i, (key, col) in enumerate(sparse.items())})

    def same_lengths(self: Any) -> Any:
        lengths = {"product_id": len(self.product_id)}
        if self.position is not None:
            lengths["position"] = len(self.position)
        for group, names in (("dense", dense), ("sparse", sparse)):
            values = getattr(self, group).__dict__.values()
            lengths.update({f"{group}.{key}": len(column) for key, column in zip(names, values)})
        if len(set(lengths.values())) > 1:
            raise ValueError("every column needs one value per candidate; lengths: "
                             + ", ".join(f"{k} {n}" for k, n in lengths.items()))
        return self

    columns = create_model(
        "CandidateColumns", __config__=forbid, __validators__={"same_lengths": model_validator(mode="after")(
            same_lengths)},
        __doc__="The candidates column-wise: one array per Candidate field, one value per candidate.",
        product_id=(list[ProductId], Field(**sized, description="catalog product_id per candidate")),
        position=(list[Position | None] | None, Field(default=None, max_length=max_candidates,
                                                     description="ad slot per candidate (informational)")),
        dense=(dense_model, ... if dense else Field(default_factory=dense_model)),
        sparse=(sparse_model, ... if sparse else Field(default_factory=sparse_model)),
    )
    ids = spec.product_keys[1:3] or [1, 2]
    example = {"user_id": 42, "query": "Organic Whole Milk", "candidates": {
        "product_id": ids, "dense": {key: [round(spec.dense_mean[i], 3)] * len(ids) for i, key in enumerate(dense)},
        "sparse": {key: [0] * len(ids) for key in sparse}}}
    request = create_model(
        "ScoreColumnsRequest", __base__=ScoreRequestBase,
        __doc__="Score candidate products for one shopper and query, the candidates given column-wise.",
        candidates=(columns, Field(description=f"products to score (1 to {max_candidates}), one array per field")))
    request.model_config["json_schema_extra"] = {"examples": [example]}
    request.model_rebuild(force=True)
    return request


def build_recommend_request_model(spec: FeatureSpec, split: dict[str, Any], max_candidates: int,
                                  max_dense_z: float = DENSE_MAX_Z) -> type[RecommendRequestBase]:
    """The ``RecommendRequest`` pydantic model of one exported model: the shopper and query of a
    ``ScoreRequest``, ``k`` and ``candidates_n`` (at most ``max_candidates``), and ``features``: the
    request-level features of ``split`` (the export manifest's ``features`` section,
    :func:`serving.funnel.feature_split`), each optional with its documented default, dense values
    within :func:`dense_bounds`. Product-level features are not request fields (an extra field is
    refused): they come from the per-product file."""
    bounds = dict(zip(spec.dense_names, dense_bounds(spec, max_dense_z)))
    forbid = ConfigDict(extra="forbid")
    product_level = ", ".join(entry["field"] for entry in split["product"]) or "none"
    dense = [e for e in split["request"] if e["kind"] == "dense"]
    sparse = [e for e in split["request"] if e["kind"] == "sparse"]

    def described(entry: dict[str, Any]) -> str:
        return f"request-level feature (impressions column {entry['column']}); default {entry['default']:.6g} " \
               f"({entry['default_is']})"

    dense_model = create_model(
        "RequestDenseFeatures", __config__=forbid,
        __doc__=f"Request-level dense features (optional; finite, within training mean +- {max_dense_z:g} stds).",
        **{f"f{i}": (FiniteFloat, Field(default=e["default"], alias=e["field"], ge=bounds[e["column"]][0],
                                        le=bounds[e["column"]][1], description=described(e)))
           for i, e in enumerate(dense)})
    sparse_model = create_model(
        "RequestSparseFeatures", __config__=forbid, __doc__="Request-level categorical ids (optional, >= 0).",
        **{f"f{i}": (Id64, Field(default=e["default"], alias=e["field"], description=described(e)))
           for i, e in enumerate(sparse)})
    features_model = create_model(
        "RequestFeatures", __config__=forbid,
        __doc__=f"The request-level ranking features of every candidate (each optional, with a default). The "
                f"product-level ones ({product_level}) come from the served per-product file.",
        dense=(dense_model, Field(default_factory=dense_model)),
        sparse=(sparse_model, Field(default_factory=sparse_model)))

    def k_within_candidates(self: Any) -> Any:
        if self.k > self.candidates_n:
            raise ValueError(f"k ({self.k}) must not exceed candidates_n ({self.candidates_n})")
        return self

    count = Annotated[int, Field(strict=True, ge=1, le=max_candidates), ACCEPT_WHOLE_FLOATS]
    request = create_model(
        "RecommendRequest", __base__=RecommendRequestBase,
        __validators__={"k_within_candidates": model_validator(mode="after")(k_within_candidates)},
        __doc__="Recommend products for one shopper and query: retrieve candidates_n by DashCLIP cosine, score "
                "them with the pCTR model, return the k most likely to be clicked.",
        k=(count, Field(default=min(DEFAULT_K, max_candidates),
                        description="how many products to return (1 to candidates_n)")),
        candidates_n=(count, Field(default=min(DEFAULT_CANDIDATES_N, max_candidates),
                                   description=f"how many products to retrieve and score (1 to {max_candidates})")),
        features=(features_model, Field(default_factory=features_model, description=(
            f"request-level features (hour, platform, ...; every candidate gets the same); product-level features "
            f"({product_level}) come from the served per-product file"))))
    request.model_config["json_schema_extra"] = {"examples": [{
        "user_id": 42, "query": "Organic Whole Milk", "k": min(DEFAULT_K, max_candidates),
        "candidates_n": min(DEFAULT_CANDIDATES_N, max_candidates),
        "features": {"dense": {e["field"]: round(e["default"], 3) for e in dense},
                     "sparse": {e["field"]: e["default"] for e in sparse}}}]}
    request.model_rebuild(force=True)
    return request


def request_feature_values(request: RecommendRequestBase) -> tuple[np.ndarray, np.ndarray]:
    """``(dense [Rd] float32, sparse [Rs] int64)``: the request-level feature values of a validated
    ``RecommendRequest``, in the order of the split's ``request`` list."""
    features = request.features  # type: ignore[attr-defined]
    return (np.array(list(features.dense.__dict__.values()), np.float32),
            np.array(list(features.sparse.__dict__.values()), np.int64))


def unix_seconds(value: datetime) -> int:
    """Unix seconds of ``value`` (a time without a zone is UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(np.floor(value.timestamp()))


@dataclass
class EncodedRequest:
    """One request as model inputs (``B`` candidates, ``L`` = the spec's ``history_len``).

    dense ``[B, D]`` float32 and sparse_ids ``[B, S]`` int64 in feature-spec order,
    product_rows ``[B]``, query_rows ``[B]``, history_rows ``[1, L]`` (-1 padded; the same for every
    candidate: :meth:`fused_inputs` broadcasts it), plus the raw keys a feature store needs:
    ``product_ids``, the normalised ``query`` and ``history_ids`` (most recent first).
    """

    dense: torch.Tensor
    sparse_ids: torch.Tensor
    product_rows: torch.Tensor
    query_rows: torch.Tensor
    history_rows: torch.Tensor
    product_ids: list[int]
    query: str
    history_ids: list[int]
    meta: dict[str, Any]

    def fused_inputs(self) -> tuple[torch.Tensor, ...]:
        """Positional inputs of the fused model (``history_rows`` expanded to ``[B, L]``, no copy)."""
        batch = self.dense.shape[0]
        return self.dense, self.sparse_ids, self.product_rows, self.query_rows, self.history_rows.expand(batch, -1)


class RequestEncoder:
    """Validated request -> :class:`EncodedRequest`, with the training-time history definition.

    Args:
        spec: the exported model's feature spec (with its id maps).
        purchases: every purchase in the data, for requests that give a ``user_id``.
        default_now: request time (unix seconds) when the request gives none.
    """

    def __init__(self, spec: FeatureSpec, purchases: PurchaseIndex, default_now: int) -> None:
        self.spec, self.purchases, self.default_now = spec, purchases, int(default_now)

    def history_ids(self, request: ScoreRequestBase, now: int) -> np.ndarray:
        """Product ids purchased in ``[now - history_days, now)``, most recent first, at most ``history_len``."""
        if request.purchase_history is not None:
            items = request.purchase_history
            index = PurchaseIndex(np.zeros(len(items), np.int64), np.array([unix_seconds(p.ts) for p in items], np.int64),
                                  np.array([p.product_id for p in items], np.int64))
            user = 0
        else:
            index, user = self.purchases, request.user_id
        ids, _ = index.history(np.array([user], np.int64), np.array([now], np.int64),
                               self.spec.history_len, self.spec.history_days)
        return ids[0][ids[0] >= 0]

    def encode(self, request: ScoreRequestBase) -> EncodedRequest:
        """A validated ``ScoreRequest`` or ``ScoreColumnsRequest`` as model inputs."""
        return self.encode_arrays(request, *candidate_arrays(request, self.spec))

    def encode_arrays(self, request: ScoreRequestBase, product_ids: np.ndarray, dense: np.ndarray,
                      sparse: np.ndarray) -> EncodedRequest:
        """Model inputs from the request's shopper, query and time (``request``'s own candidates, if any,
        are not read) and the candidates' ``product_ids [B]`` int64, ``dense [B, D]`` float32 and
        ``sparse [B, S]`` int64 in feature-spec order."""
        spec = self.spec
        now = unix_seconds(request.now) if request.now is not None else self.default_now
        batch = len(product_ids)
        product_rows = spec.product_rows(product_ids)
        query = normalize_query(request.query)
        query_row = spec.query_rows([query]) if query else np.array([UNKNOWN_ROW], np.int64)
        history_ids = self.history_ids(request, now)
        history = spec.history_rows([history_ids])
        has_tables = spec.has_tables  # a model without tables (variant dcn) has no unknown ids
        meta = {"unknown_query": has_tables and bool(query_row[0] == UNKNOWN_ROW),
                "unknown_products": int((product_rows == UNKNOWN_ROW).sum()) if has_tables else 0,
                "unknown_history_products": int((history == UNKNOWN_ROW).sum()) if has_tables else 0,
                "history_length": int(len(history_ids)), "now": now}
        return EncodedRequest(
            dense=torch.from_numpy(dense), sparse_ids=torch.from_numpy(sparse),
            product_rows=torch.from_numpy(product_rows), query_rows=torch.from_numpy(np.repeat(query_row, batch)),
            history_rows=torch.from_numpy(history), product_ids=product_ids.tolist(), query=query,
            history_ids=[int(i) for i in history_ids], meta=meta)


def candidate_arrays(request: ScoreRequestBase, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(product_ids [B] int64, dense [B, D] float32, sparse [B, S] int64)`` of a validated request's
    candidates, row-wise (``ScoreRequest``) or column-wise (``ScoreColumnsRequest``)."""
    candidates = request.candidates  # type: ignore[attr-defined]
    dims = len(spec.dense_names), len(spec.sparse_names)
    if isinstance(candidates, list):
        batch = len(candidates)
        dense = np.array([tuple(c.dense.__dict__.values()) for c in candidates], np.float32).reshape(batch, dims[0])
        sparse = np.array([tuple(c.sparse.__dict__.values()) for c in candidates], np.int64).reshape(batch, dims[1])
        return np.array([c.product_id for c in candidates], np.int64), dense, sparse
    batch = len(candidates.product_id)
    dense = np.array(list(candidates.dense.__dict__.values()), np.float32).reshape(dims[0], batch)
    sparse = np.array(list(candidates.sparse.__dict__.values()), np.int64).reshape(dims[1], batch)
    return (np.array(candidates.product_id, np.int64), np.ascontiguousarray(dense.T),
            np.ascontiguousarray(sparse.T))


@dataclass
class ParsedRequest:
    """A request that :class:`FastRequestParser` accepted: the validated shopper/query/time fields
    (a ``ScoreRequestBase``, no candidates) and the candidates as arrays (see
    :meth:`RequestEncoder.encode_arrays`)."""

    head: ScoreRequestBase
    product_ids: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray


_MISSING = object()
_NUMBER = frozenset({int, float})
_INT = frozenset({int})


def _getter(keys: Sequence[str]) -> Callable[[dict], tuple]:
    """``d -> tuple(d[k] for k in keys)`` (``itemgetter`` returns a bare value for one key)."""
    if len(keys) >= 2:
        return itemgetter(*keys)
    return (lambda d: (d[keys[0]],)) if keys else (lambda d: ())


class FastRequestParser:
    """Parsed JSON body -> :class:`ParsedRequest` in a few vectorised steps, or ``None``.

    The service's fast path. It accepts a subset of what the pydantic request models accept, and
    gives the same values: every model field present (``position`` optional) and no other, ids
    and positions as JSON integers in range, dense values as JSON numbers within
    :func:`dense_bounds`; the shopper/query/time fields are validated by ``ScoreRequestBase``
    itself. Anything else (a missing, unknown or mistyped field, a whole float as an id, NaN, a
    value out of range, too many candidates) returns ``None``: the caller then validates with the
    pydantic model, which gives the answer (whole-float ids) or the exact error.
    """

    def __init__(self, spec: FeatureSpec, max_candidates: int, max_dense_z: float = DENSE_MAX_Z) -> None:
        fields = request_fields(spec)
        self.dense_keys, self.sparse_keys = tuple(fields["dense"]), tuple(fields["sparse"])
        self._dense_set, self._sparse_set = frozenset(self.dense_keys), frozenset(self.sparse_keys)
        self._get_dense, self._get_sparse = _getter(self.dense_keys), _getter(self.sparse_keys)
        bounds = np.array(dense_bounds(spec, max_dense_z), np.float64).reshape(len(self.dense_keys), 2)
        self._low, self._high = bounds[:, 0], bounds[:, 1]
        self.max_candidates = max_candidates
        self._fields = frozenset({"product_id", "dense", "sparse"})
        self._fields_position = self._fields | {"position"}
        self._get_candidate = itemgetter("product_id", "dense", "sparse")
        self._dense_len, self._sparse_len = {len(self.dense_keys)}, {len(self.sparse_keys)}
        self._three, self._three_four, self._dict = {3}, {3, 4}, {dict}

    def _head(self, body: dict) -> ScoreRequestBase | None:
        try:
            return ScoreRequestBase.model_validate({k: v for k, v in body.items() if k != "candidates"})
        except ValidationError:
            return None

    @staticmethod
    def _checked(product_ids: Sequence, dense: list[Sequence], sparse: list[Sequence]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(ids, dense values, sparse ids)`` flat (``dense`` and ``sparse`` concatenated), if every
        id is an int, every dense value an int or float and each fits its dtype, else None."""
        if not (set(map(type, product_ids)) <= _INT and set(map(type, chain.from_iterable(dense))) <= _NUMBER
                and set(map(type, chain.from_iterable(sparse))) <= _INT):
            return None
        try:  # an int beyond int64 or float64 raises OverflowError
            return (np.fromiter(product_ids, np.int64, len(product_ids)),
                    np.fromiter(chain.from_iterable(dense), np.float64, sum(map(len, dense))),
                    np.fromiter(chain.from_iterable(sparse), np.int64, sum(map(len, sparse))))
        except (OverflowError, ValueError, TypeError):
            return None

    def _in_range(self, ids: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> bool:
        """ids and sparse ids >= 0 (int64 caps them), dense values within bounds (NaN is not)."""
        return bool((ids >= 0).all() and (sparse >= 0).all() and (dense >= self._low).all()
                    and (dense <= self._high).all())

    @staticmethod
    def _positions_ok(positions: list) -> bool:
        return all(p is None or (type(p) is int and 0 <= p <= POSITION_MAX) for p in positions)

    def rows(self, body: Any) -> ParsedRequest | None:
        """``{.., "candidates": [{"product_id", "position"?, "dense": {..}, "sparse": {..}}, ..]}``."""
        if type(body) is not dict:
            return None
        candidates = body.get("candidates")
        if type(candidates) is not list or not 1 <= len(candidates) <= self.max_candidates:
            return None
        # C-level maps over the candidates: a missing key raises KeyError, a non-object TypeError,
        # and an extra key shows in the lengths (the JSON objects have no duplicate keys)
        try:
            ids, dense, sparse = zip(*map(self._get_candidate, candidates))
            sizes = set(map(len, candidates))
            dense_rows = list(map(self._get_dense, dense))
            sparse_rows = list(map(self._get_sparse, sparse))
            if set(map(len, dense)) != self._dense_len or set(map(len, sparse)) != self._sparse_len:
                return None
        except (KeyError, TypeError):
            return None
        if sizes != self._three:
            if not sizes <= self._three_four:
                return None
            positions = [c.get("position", _MISSING) for c in candidates if len(c) == 4]
            if any(p is _MISSING for p in positions) or not self._positions_ok(positions):
                return None  # a fourth field other than position, or a bad position
        if {*map(type, dense), *map(type, sparse)} != self._dict:  # (a list or string of length 0 has no keys)
            return None
        arrays = self._checked(ids, dense_rows, sparse_rows)
        if arrays is None:
            return None
        ids_array, dense_values, sparse_ids = arrays
        batch = len(candidates)
        dense_values = dense_values.reshape(batch, len(self.dense_keys))
        sparse_ids = sparse_ids.reshape(batch, len(self.sparse_keys))
        head = self._head(body) if self._in_range(ids_array, dense_values, sparse_ids) else None
        if head is None:
            return None
        return ParsedRequest(head, ids_array, dense_values.astype(np.float32), sparse_ids)

    def columns(self, body: Any) -> ParsedRequest | None:
        """``{.., "candidates": {"product_id": [..], "position": [..]?, "dense": {"price": [..], ..},
        "sparse": {..}}}``."""
        if type(body) is not dict:
            return None
        candidates = body.get("candidates")
        if type(candidates) is not dict or not (candidates.keys() == self._fields
                                                or candidates.keys() == self._fields_position):
            return None
        ids, dense, sparse = candidates["product_id"], candidates["dense"], candidates["sparse"]
        if type(ids) is not list or not 1 <= len(ids) <= self.max_candidates:
            return None
        batch = len(ids)
        if not (type(dense) is dict and dense.keys() == self._dense_set
                and type(sparse) is dict and sparse.keys() == self._sparse_set):
            return None
        dense_columns = [dense[k] for k in self.dense_keys]
        sparse_columns = [sparse[k] for k in self.sparse_keys]
        if not all(type(c) is list and len(c) == batch for c in chain(dense_columns, sparse_columns)):
            return None
        positions = candidates.get("position")
        if positions is not None and not (type(positions) is list and len(positions) == batch
                                          and self._positions_ok(positions)):
            return None
        arrays = self._checked(ids, dense_columns, sparse_columns)
        if arrays is None:
            return None
        ids, dense_values, sparse_ids = arrays
        dense_values = dense_values.reshape(len(self.dense_keys), batch).T
        sparse_ids = sparse_ids.reshape(len(self.sparse_keys), batch).T
        head = self._head(body) if self._in_range(ids, dense_values, sparse_ids) else None
        if head is None:
            return None
        return ParsedRequest(head, ids, np.ascontiguousarray(dense_values, np.float32),
                             np.ascontiguousarray(sparse_ids))
