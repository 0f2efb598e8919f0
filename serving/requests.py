"""The scoring API's request and response models and the request -> tensors conversion.

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
``history_len`` (:class:`ranking.features.PurchaseIndex`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from data.text import normalize_query
from embeddings.tables import UNKNOWN_ROW
from ranking.features import FeatureSpec, PurchaseIndex

INT64_MAX = 2**63 - 1
MAX_HISTORY_ITEMS = 10_000
MAX_QUERY_CHARS = 512
DENSE_MAX_Z = 1000.0


def _whole_float_to_int(value: Any) -> Any:
    """``785.0`` -> ``785``; anything else unchanged (the strict integer check then refuses ``785.5``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# after the constraints in ``Annotated``, so that they stay in the JSON schema
ACCEPT_WHOLE_FLOATS = BeforeValidator(_whole_float_to_int)
Id64 = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX), ACCEPT_WHOLE_FLOATS]
ProductId = Annotated[Id64, Field(description="catalog product_id (int64)")]
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
        default=None, description="shopper id; their 84-day purchase history is read from purchases.parquet "
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
                                   "'content-type', 'path' or 'method'")
    type: str = Field(description="machine-readable kind (pydantic error types, json_invalid, too_long, "
                                  "too_large, unsupported_media_type, not_found, method_not_allowed, "
                                  "non_finite_score)")
    msg: str = Field(description="human-readable explanation")


class ErrorResponse(BaseModel):
    """The body of every error response (4xx and the 500 for a non-finite score)."""

    message: str = Field(description="'field: msg' of every error, joined with '; '")
    detail: list[ErrorDetail]


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
        position=(Annotated[int, Field(strict=True, ge=0, le=2**31 - 1), ACCEPT_WHOLE_FLOATS] | None, Field(
            default=None, description="ad slot (0 = top); informational: this model has no position input")),
        dense=(dense_model, ... if dense else Field(default_factory=dense_model)),
        sparse=(sparse_model, ... if sparse else Field(default_factory=sparse_model)),
    )
    example = {"user_id": 42, "query": "Organic Whole Milk", "candidates": [{
        "product_id": int(spec.product_ids[0]) if spec.product_ids else 1,
        "dense": {key: round(spec.dense_mean[i], 3) for i, key in enumerate(dense)},
        "sparse": {key: 0 for key in sparse}}]}
    request = create_model(
        "ScoreRequest", __base__=ScoreRequestBase, __doc__="Score candidate products for one shopper and query.",
        candidates=(list[candidate], Field(min_length=1, max_length=max_candidates,
                                           description=f"products to score (1 to {max_candidates})")))
    request.model_config["json_schema_extra"] = {"examples": [example]}
    request.model_rebuild(force=True)
    return request


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
        spec = self.spec
        now = unix_seconds(request.now) if request.now is not None else self.default_now
        candidates = request.candidates  # type: ignore[attr-defined]
        dense = np.array([tuple(c.dense.__dict__.values()) for c in candidates], np.float32).reshape(
            len(candidates), len(spec.dense_names))
        sparse = np.array([tuple(c.sparse.__dict__.values()) for c in candidates], np.int64).reshape(
            len(candidates), len(spec.sparse_names))
        product_ids = [c.product_id for c in candidates]
        product_rows = spec.product_rows(product_ids)
        query = normalize_query(request.query)
        query_row = spec.query_rows([query]) if query else np.array([UNKNOWN_ROW], np.int64)
        history_ids = self.history_ids(request, now)
        history = spec.history_rows([history_ids])
        has_tables = spec.table_dim > 0  # a model without tables (variant dcn) has no unknown ids
        meta = {"unknown_query": has_tables and bool(query_row[0] == UNKNOWN_ROW),
                "unknown_products": int((product_rows == UNKNOWN_ROW).sum()) if has_tables else 0,
                "unknown_history_products": int((history == UNKNOWN_ROW).sum()) if has_tables else 0,
                "history_length": int(len(history_ids)), "now": now}
        return EncodedRequest(
            dense=torch.from_numpy(dense), sparse_ids=torch.from_numpy(sparse),
            product_rows=torch.from_numpy(product_rows), query_rows=torch.from_numpy(np.repeat(query_row, len(candidates))),
            history_rows=torch.from_numpy(history), product_ids=product_ids, query=query,
            history_ids=[int(i) for i in history_ids], meta=meta)
