"""serving.server: a real uvicorn process on a free localhost port, hit with httpx.

The expected scores come from the exported TorchScript file on the ranking stage's own features
(``ranking.features.RankingData``: the training-time 84-day history as of the impression), so a
pass means the service turns a request into exactly the tensors the model was trained on. The
one check that needs other limits (``max_dense_z``) drives the same app in process with FastAPI's
``TestClient``.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from data.schema import table_path
from embeddings.keys import TableKeys
from embeddings.tables import UNKNOWN_ROW
from ranking.features import ImpressionCache, RankingData
from ranking.model import load_model
from ranking.spec import PurchaseIndex
from serving.export import checkpoint_path
from serving.requests import (ErrorResponse, FastRequestParser, RequestEncoder, build_columns_request_model,
                              build_score_request_model, dense_bounds, feature_key)
from serving.server import MicroBatcher, Scorer, Served, ServerConfig, create_app
from tests.serving_fixtures import MAX_CANDIDATES, serving_workdir, service  # noqa: F401  (fixtures)

EXAMPLE_REQUEST = Path(__file__).resolve().parents[1] / "examples" / "request.json"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def session_case(serving_workdir: Path) -> dict:
    """A NW search (one user, query and time, several candidates) whose user has a purchase history,
    as a request body plus the TorchScript model's scores on the ranking stage's features."""
    spec = load_model(checkpoint_path(serving_workdir, "dcn_pq_hist", 0)).spec
    cache = ImpressionCache.open(serving_workdir)
    purchases = PurchaseIndex.from_workdir(serving_workdir)
    cols = cache.columns
    rows = np.asarray(cache.split_index("eval"))
    _, count = purchases.history(cols["user_id"][rows], cols["ts"][rows])
    keys = np.stack([cols["user_id"][rows], cols["ts"][rows], cols["query_code"][rows]], axis=1)
    uniq, inverse, sizes = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    good = [g for g in range(len(uniq)) if sizes[g] >= 2 and count[inverse == g].min() > 0]
    assert good, "the tiny data should have a NW search with several candidates and a purchase history"
    picked = rows[inverse.reshape(-1) == good[0]][:MAX_CANDIDATES]
    batch = RankingData(cache, purchases, spec).batch(picked)
    model = torch.jit.load(str(serving_workdir / "serving" / "model.pt"))
    with torch.no_grad():
        expected = torch.sigmoid(model(*batch.inputs())).numpy()
    raw = pq.read_table(table_path(serving_workdir, "impressions")).take(pa.array(picked))
    user = int(cols["user_id"][picked[0]])
    body = {
        "user_id": user, "query": raw.column("query")[0].as_py(), "now": int(cols["ts"][picked[0]]),
        "candidates": [{"product_id": int(raw.column("product_id")[i].as_py()),
                        "position": int(raw.column("position")[i].as_py()),
                        "dense": {feature_key(c): float(raw.column(c)[i].as_py()) for c in spec.dense_names},
                        "sparse": {feature_key(c): int(raw.column(c)[i].as_py()) for c in spec.sparse_names}}
                       for i in range(len(picked))],
    }
    all_purchases = pq.read_table(table_path(serving_workdir, "purchases"))
    mine = all_purchases.filter(pa.compute.equal(all_purchases.column("user_id"), user))
    history = [{"product_id": int(p), "ts": int(t)} for p, t in
               zip(mine.column("product_id").to_pylist(),
                   mine.column("ts").cast(pa.timestamp("s")).cast(pa.int64()).to_pylist())]
    return {"body": body, "expected": expected, "history_rows": batch.history_rows[0], "purchases": history,
            "spec": spec}


def test_scores_equal_the_torchscript_model_on_training_features(service: httpx.Client, session_case: dict):
    resp = service.post("/score", json=session_case["body"])
    assert resp.status_code == 200, resp.text
    out = resp.json()
    np.testing.assert_allclose(out["scores"], session_case["expected"], atol=1e-6, rtol=0)
    assert out["meta"]["history_length"] == int((session_case["history_rows"] >= 0).sum()) > 0
    assert out["meta"]["now"] == session_case["body"]["now"]
    assert len(out["meta"]["model"]) == 16


def test_explicit_purchase_history_is_windowed_like_the_user_lookup(service: httpx.Client, session_case: dict):
    body = {k: v for k, v in session_case["body"].items() if k != "user_id"}
    body["purchase_history"] = session_case["purchases"]  # every purchase of the user, in and out of the window
    now, window = body["now"], session_case["spec"].history_days * 86_400
    outside = [p for p in body["purchase_history"] if not now - window <= p["ts"] < now]
    assert outside and len(outside) < len(body["purchase_history"])
    resp = service.post("/score", json=body)
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(resp.json()["scores"], session_case["expected"], atol=1e-6, rtol=0)
    no_history = service.post("/score", json={**body, "purchase_history": []}).json()
    assert no_history["meta"]["history_length"] == 0
    assert np.abs(np.array(no_history["scores"]) - session_case["expected"]).max() > 1e-4, "history should matter"


def _unknown_query_scores(workdir: Path, session_case: dict, body: dict) -> np.ndarray:
    """The TorchScript model's scores of ``body``'s candidates with the session's history and query row 0."""
    spec, candidates = session_case["spec"], body["candidates"]
    dense = torch.tensor([[c["dense"][feature_key(n)] for n in spec.dense_names] for c in candidates])
    sparse = torch.tensor([[c["sparse"][feature_key(n)] for n in spec.sparse_names] for c in candidates])
    rows = torch.from_numpy(spec.product_rows([c["product_id"] for c in candidates]))
    history = session_case["history_rows"].expand(len(candidates), -1)
    model = torch.jit.load(str(workdir / "serving" / "model.pt"))
    with torch.no_grad():
        return torch.sigmoid(model(dense, sparse, rows, torch.full_like(rows, UNKNOWN_ROW), history)).numpy()


def test_unknown_query_and_products_score_with_row_zero_and_are_counted(service: httpx.Client, session_case: dict,
                                                                        serving_workdir: Path):
    spec = session_case["spec"]
    body = json.loads(json.dumps(session_case["body"]))
    original = spec.product_rows([c["product_id"] for c in body["candidates"]])
    body["query"] = "zzqx never searched"
    body["candidates"][0]["product_id"] = int(spec.product_keys.values.max()) + 12345
    resp = service.post("/score", json=body)
    assert resp.status_code == 200, resp.text
    meta = resp.json()["meta"]
    assert meta["unknown_query"] is True and meta["unknown_products"] == int((original[1:] == 0).sum()) + 1
    known = service.post("/score", json=session_case["body"]).json()["meta"]
    assert known["unknown_query"] is False and known["unknown_products"] == int((original == 0).sum())
    assert spec.product_rows([body["candidates"][0]["product_id"]])[0] == UNKNOWN_ROW
    np.testing.assert_allclose(resp.json()["scores"], _unknown_query_scores(serving_workdir, session_case, body),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("query", ["", "   ", "\U0001F6D2\U0001F642", " ?!* "])
def test_a_query_that_normalises_to_nothing_is_an_unknown_query(service: httpx.Client, session_case: dict,
                                                                 serving_workdir: Path, query: str):
    body = {**session_case["body"], "query": query}
    resp = service.post("/score", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["meta"]["unknown_query"] is True
    np.testing.assert_allclose(resp.json()["scores"], _unknown_query_scores(serving_workdir, session_case, body),
                               atol=1e-6, rtol=0)


def test_an_empty_query_is_unknown_even_when_the_query_table_has_an_empty_key(serving_workdir: Path,
                                                                              session_case: dict):
    spec = session_case["spec"]
    with_empty = spec.with_keys(spec.product_keys, TableKeys("query", pa.concat_arrays([spec.query_keys.values,
                                                                                         pa.array([""], pa.large_string())])))
    assert with_empty.query_rows([""])[0] == spec.num_query_rows
    encoder = RequestEncoder(with_empty, PurchaseIndex.from_workdir(serving_workdir), default_now=0)
    request_model = build_score_request_model(with_empty, MAX_CANDIDATES)
    encoded = encoder.encode(request_model.model_validate({**session_case["body"], "query": "\U0001F642 !"}))
    assert encoded.query == "" and encoded.meta["unknown_query"] is True
    assert encoded.query_rows.tolist() == [UNKNOWN_ROW] * len(session_case["body"]["candidates"])


def _bad_requests(good: dict) -> list[tuple[str, object, int, str]]:
    """(case, body, expected status, text the error message must contain)."""
    cand = good["candidates"][0]
    dense_key, sparse_key = next(iter(cand["dense"])), next(iter(cand["sparse"]))

    def with_candidate(**changes) -> dict:
        return {**good, "candidates": [{**cand, **changes}]}

    missing_query = {k: v for k, v in good.items() if k != "query"}
    nan_body = json.dumps(with_candidate(dense={**cand["dense"], dense_key: 1.0})).replace(
        f'"{dense_key}": 1.0', f'"{dense_key}": NaN')
    dense_field, sparse_field = f"candidates[0].dense.{dense_key}", f"candidates[0].sparse.{sparse_key}"
    return [
        ("missing field", missing_query, 422, "query"),
        ("wrong type", {**good, "query": 17}, 422, "query"),
        ("string id", with_candidate(product_id="abc"), 422, "candidates[0].product_id"),
        ("float id", with_candidate(product_id=3.5), 422, "candidates[0].product_id"),
        ("negative sparse id", with_candidate(sparse={**cand["sparse"], sparse_key: -1}), 422, sparse_field),
        ("fractional sparse id", with_candidate(sparse={**cand["sparse"], sparse_key: 785.5}), 422, sparse_field),
        ("string sparse id", with_candidate(sparse={**cand["sparse"], sparse_key: "785"}), 422, sparse_field),
        ("empty candidates", {**good, "candidates": []}, 422, "candidates"),
        ("too many candidates", {**good, "candidates": [cand] * (MAX_CANDIDATES + 1)}, 413, "candidates"),
        ("NaN", nan_body, 422, dense_field),
        ("infinity", nan_body.replace("NaN", "-Infinity"), 422, dense_field),
        ("huge dense value", with_candidate(dense={**cand["dense"], dense_key: 1e20}), 422, dense_field),
        ("hugely negative dense value", with_candidate(dense={**cand["dense"], dense_key: -1e20}), 422, dense_field),
        ("unknown dense feature", with_candidate(dense={**cand["dense"], "not_a_feature": 1.0}), 422,
         "candidates[0].dense.not_a_feature"),
        ("missing sparse feature", with_candidate(sparse={k: v for k, v in cand["sparse"].items() if k != sparse_key}),
         422, f"candidates[0].sparse.{sparse_key}"),
        ("both history sources", {**good, "purchase_history": []}, 422, "purchase_history"),
        ("bad time", {**good, "now": "yesterday-ish"}, 422, "now"),
        ("not JSON", "{this is not json", 400, "JSON"),
        ("JSON but not an object", "[1, 2, 3]", 422, "body"),
    ]


def _error_body(resp: httpx.Response, case: str) -> ErrorResponse:
    """The response's :class:`ErrorResponse` (and nothing else in the body)."""
    assert resp.headers["content-type"] == "application/json", f"{case}: {resp.headers['content-type']}"
    body = resp.json()
    assert set(body) == {"message", "detail"} and body["detail"], f"{case}: {body}"
    assert all(set(d) == {"field", "type", "msg"} for d in body["detail"]), f"{case}: {body}"
    return ErrorResponse.model_validate(body)


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(service: httpx.Client,
                                                                            session_case: dict):
    good = session_case["body"]
    for case, body, status, needle in _bad_requests(good):
        content = body if isinstance(body, str) else json.dumps(body)
        resp = service.post("/score", content=content, headers=JSON)
        assert resp.status_code == status, f"{case}: {resp.status_code} {resp.text[:300]}"
        assert needle in _error_body(resp, case).message, f"{case}: {resp.json()['message']}"
    resp = service.post("/score", json=good)
    assert resp.status_code == 200
    np.testing.assert_allclose(resp.json()["scores"], session_case["expected"], atol=1e-6, rtol=0)
    assert service.get("/healthz").json()["status"] == "ok"


def test_every_http_error_has_the_one_error_body(service: httpx.Client, session_case: dict):
    body = json.dumps(session_case["body"]).encode()
    limit = int(ServerConfig.max_body_mb * 2**20)
    cases = [  # case, method, path, content, headers, status, field of the error
        ("not JSON", "POST", "/score", b"{this is not json", JSON, 400, "body"),
        ("unknown path", "GET", "/nope", None, {}, 404, "path"),
        ("wrong method", "GET", "/score", None, {}, 405, "method"),
        ("declared body over the limit", "POST", "/score", b" " * (limit + 1), JSON, 413, "body"),
        ("chunked body over the limit", "POST", "/score", iter([b" " * 2**20] * (limit // 2**20 + 1)), JSON, 413,
         "body"),
        ("text/plain", "POST", "/score", body, {"content-type": "text/plain"}, 415, "content-type"),
        ("curl -d default", "POST", "/score", body, {"content-type": "application/x-www-form-urlencoded"}, 415,
         "content-type"),
        ("no content type", "POST", "/score", body, {}, 415, "content-type"),
        ("unknown field", "POST", "/score", json.dumps({**session_case["body"], "x": 1}).encode(), JSON, 422, "x"),
    ]
    for case, method, path, content, headers, status, field in cases:
        resp = service.request(method, path, content=content, headers=headers)
        assert resp.status_code == status, f"{case}: {resp.status_code} {resp.text[:300]}"
        assert [d.field for d in _error_body(resp, case).detail] == [field], case
    assert service.post("/score", content=body, headers={"content-type": "application/merge-patch+json"}).is_success
    assert service.get("/healthz").json()["status"] == "ok"


def test_dense_values_are_bounded_and_scores_are_always_finite(service: httpx.Client, session_case: dict,
                                                              serving_workdir: Path):
    spec = session_case["spec"]
    bounds = dense_bounds(spec)
    schema = service.get("/openapi.json").json()["components"]["schemas"]["DenseFeatures"]["properties"]
    assert [(schema[feature_key(c)]["minimum"], schema[feature_key(c)]["maximum"]) for c in spec.dense_names] == bounds
    cand = session_case["body"]["candidates"][0]
    extremes = [{**cand, "dense": {feature_key(c): bound[side] for c, bound in zip(spec.dense_names, bounds)}}
                for side in (0, 1)]
    resp = service.post("/score", json={**session_case["body"], "candidates": extremes})
    assert resp.status_code == 200, resp.text
    assert np.isfinite(resp.json()["scores"]).all()
    first = feature_key(spec.dense_names[0])
    beyond = {**cand, "dense": {**cand["dense"], first: float(np.nextafter(bounds[0][1], np.inf))}}
    resp = service.post("/score", json={**session_case["body"], "candidates": [cand, beyond]})
    assert resp.status_code == 422 and _error_body(resp, "beyond").detail[0].field == f"candidates[1].dense.{first}"

    # with the bound lifted, a price of 1e20 overflows the model: a 500 naming the candidate, never a null score
    loose = TestClient(create_app(Served(Scorer(serving_workdir)), MAX_CANDIDATES, max_dense_z=1e30))
    huge = {**cand, "dense": {**cand["dense"], first: 1e20}}
    resp = loose.post("/score", json={**session_case["body"], "candidates": [cand, huge]})
    assert resp.status_code == 500, resp.text
    assert [(d.field, d.type) for d in _error_body(resp, "1e20").detail] == [("candidates[1]", "non_finite_score")]


def test_whole_floats_are_accepted_as_ids(service: httpx.Client, session_case: dict):
    body = json.loads(json.dumps(session_case["body"]))
    body["user_id"] = float(body["user_id"])
    for cand in body["candidates"]:
        cand["product_id"], cand["position"] = float(cand["product_id"]), float(cand["position"])
        cand["sparse"] = {key: float(value) for key, value in cand["sparse"].items()}
    assert '.0' in json.dumps(body["candidates"][0]["sparse"])
    resp = service.post("/score", json=body)
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(resp.json()["scores"], session_case["expected"], atol=1e-6, rtol=0)


def test_the_example_request_scores(service: httpx.Client):
    example = json.loads(EXAMPLE_REQUEST.read_text())
    schemas = service.get("/openapi.json").json()["components"]["schemas"]
    for cand in example["candidates"]:
        assert cand["dense"].keys() == schemas["DenseFeatures"]["properties"].keys()
        assert cand["sparse"].keys() == schemas["SparseFeatures"]["properties"].keys()
    resp = service.post("/score", content=EXAMPLE_REQUEST.read_bytes(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    scores = resp.json()["scores"]
    assert len(scores) == len(example["candidates"]) and all(0 <= s <= 1 for s in scores)


def test_openapi_describes_every_feature(service: httpx.Client, session_case: dict):
    spec = session_case["spec"]
    schemas = service.get("/openapi.json").json()["components"]["schemas"]
    dense, sparse = schemas["DenseFeatures"], schemas["SparseFeatures"]
    assert set(dense["properties"]) == set(dense["required"]) == {feature_key(c) for c in spec.dense_names}
    assert set(sparse["properties"]) == set(sparse["required"]) == {feature_key(c) for c in spec.sparse_names}
    assert dense["additionalProperties"] is False and sparse["additionalProperties"] is False
    first = feature_key(spec.dense_names[0])
    assert spec.dense_names[0] in dense["properties"][first]["description"]
    assert all(p["minimum"] == 0 for p in sparse["properties"].values())
    candidate = schemas["Candidate"]
    assert {"product_id", "dense", "sparse"} <= set(candidate["required"]) and "position" in candidate["properties"]
    request = schemas["ScoreRequest"]
    cands = request["properties"]["candidates"]
    assert cands["minItems"] == 1 and cands["maxItems"] == MAX_CANDIDATES
    assert set(request["properties"]) == {"user_id", "purchase_history", "query", "now", "candidates"}
    assert all(request["properties"][f].get("description") for f in request["properties"])
    assert request["examples"][0]["candidates"][0]["dense"].keys() == dense["properties"].keys()
    assert set(schemas["ScoreResponse"]["properties"]) == {"scores", "meta"}
    assert "minLength" not in request["properties"]["query"]


def test_openapi_gives_every_error_response_the_error_body(service: httpx.Client):
    api = service.get("/openapi.json").json()
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    expected = {"/score": {"post": {"400", "413", "415", "422", "500", "4XX"}}, "/healthz": {"get": {"4XX"}},
                "/retrieve": {"post": {"400", "413", "415", "422", "503", "4XX"}},
                "/recommend": {"post": {"400", "413", "415", "422", "500", "503", "4XX"}}}
    for path, methods in expected.items():
        for method, codes in methods.items():
            responses = api["paths"][path][method]["responses"]
            assert set(responses) == codes | {"200"}, (path, set(responses))
            assert all(responses[code]["content"] == error and responses[code]["description"] for code in codes)
    schemas = api["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert set(schemas["ErrorResponse"]["properties"]) == set(schemas["ErrorResponse"]["required"]) == {"message",
                                                                                                         "detail"}
    assert set(schemas["ErrorDetail"]["properties"]) == {"field", "type", "msg"}


def _columns(body: dict) -> dict:
    """``body`` with its candidates column-wise (``POST /score/columns``)."""
    rows = body["candidates"]
    columns = {"product_id": [c["product_id"] for c in rows], "position": [c.get("position") for c in rows]}
    for group in ("dense", "sparse"):
        columns[group] = {key: [c[group][key] for c in rows] for key in rows[0][group]}
    return {**body, "candidates": columns}


def test_the_columnar_form_scores_like_the_per_candidate_form(service: httpx.Client, session_case: dict):
    rows = service.post("/score", json=session_case["body"])
    columns = service.post("/score/columns", json=_columns(session_case["body"]))
    assert rows.status_code == columns.status_code == 200, columns.text
    assert columns.json() == rows.json()
    np.testing.assert_allclose(columns.json()["scores"], session_case["expected"], atol=1e-6, rtol=0)
    # the pydantic route (another JSON content type skips the fast path) answers the same
    slow = service.post("/score/columns", content=json.dumps(_columns(session_case["body"])),
                        headers={"content-type": "application/merge-patch+json"})
    assert slow.status_code == 200 and slow.json() == rows.json()
    assert all(r.headers["server-timing"].startswith("app;dur=") for r in (rows, columns, slow))


def test_the_columnar_form_rejects_like_the_per_candidate_form(service: httpx.Client, session_case: dict):
    good = _columns(session_case["body"])
    cols = good["candidates"]
    first = next(iter(cols["dense"]))
    n = len(cols["product_id"])
    cases = [  # case, candidates, status, field
        ("short column", {**cols, "dense": {**cols["dense"], first: cols["dense"][first][:-1]}}, 422, "candidates"),
        ("value beyond the bounds", {**cols, "dense": {**cols["dense"], first: [*cols["dense"][first][:-1], 1e20]}}, 422,
         f"candidates.dense.{first}[{n - 1}]"),
        ("unknown column", {**cols, "sparse": {**cols["sparse"], "nope": [0] * n}}, 422, "candidates.sparse.nope"),
        ("too many", {k: (v * (MAX_CANDIDATES + 1) if isinstance(v, list) else
                          {f: c * (MAX_CANDIDATES + 1) for f, c in v.items()}) for k, v in cols.items()}, 413,
         "candidates"),
        ("rows sent to columns", session_case["body"]["candidates"], 422, "candidates"),
    ]
    for case, candidates, status, field in cases:
        resp = service.post("/score/columns", json={**good, "candidates": candidates})
        assert resp.status_code == status, f"{case}: {resp.status_code} {resp.text[:300]}"
        assert field in [d.field for d in _error_body(resp, case).detail], f"{case}: {resp.json()['message']}"
    whole = {**cols, "product_id": [float(p) for p in cols["product_id"]]}  # whole floats: the pydantic route
    resp = service.post("/score/columns", json={**good, "candidates": whole})
    assert resp.status_code == 200 and resp.json() == service.post("/score", json=session_case["body"]).json()


def test_openapi_describes_the_columnar_form(service: httpx.Client, session_case: dict):
    spec = session_case["spec"]
    api = service.get("/openapi.json").json()
    schemas = api["components"]["schemas"]
    body = api["paths"]["/score/columns"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ScoreColumnsRequest"}
    dense, columns = schemas["DenseColumns"], schemas["CandidateColumns"]
    assert set(dense["properties"]) == set(dense["required"]) == {feature_key(c) for c in spec.dense_names}
    first = feature_key(spec.dense_names[0])
    assert dense["properties"][first]["type"] == "array" and dense["properties"][first]["maxItems"] == MAX_CANDIDATES
    assert (dense["properties"][first]["items"]["minimum"],
            dense["properties"][first]["items"]["maximum"]) == dense_bounds(spec)[0]
    assert set(schemas["SparseColumns"]["properties"]) == {feature_key(c) for c in spec.sparse_names}
    assert {"product_id", "dense", "sparse"} <= set(columns["required"]) and "position" in columns["properties"]
    assert set(api["paths"]["/score/columns"]["post"]["responses"]) == {"200", "400", "413", "415", "422", "500",
                                                                       "4XX"}


def _tricky_bodies(good: dict) -> list[tuple[str, dict]]:
    """Bodies that differ from a good one in the ways the fast parser must get right or leave alone."""
    cand = good["candidates"][0]
    dense_key, sparse_key = next(iter(cand["dense"])), next(iter(cand["sparse"]))

    def with_candidate(**changes) -> dict:
        return {**good, "candidates": [*good["candidates"][:-1], {**good["candidates"][-1], **changes}]}

    reordered = [{"sparse": dict(reversed(c["sparse"].items())), "dense": dict(reversed(c["dense"].items())),
                  "product_id": c["product_id"]} for c in good["candidates"]]
    return [
        ("good", good),
        ("keys in another order", {**good, "candidates": reordered}),
        ("position on some candidates", with_candidate(position=3)),
        ("null position", with_candidate(position=None)),
        ("negative position", with_candidate(position=-1)),
        ("int dense value", with_candidate(dense={**cand["dense"], dense_key: 2})),
        ("bool dense value", with_candidate(dense={**cand["dense"], dense_key: True})),
        ("string dense value", with_candidate(dense={**cand["dense"], dense_key: "1.5"})),
        ("bool sparse id", with_candidate(sparse={**cand["sparse"], sparse_key: True})),
        ("whole float id", with_candidate(product_id=float(cand["product_id"]))),
        ("id beyond int64", with_candidate(product_id=2**63)),
        ("dense beyond float64", with_candidate(dense={**cand["dense"], dense_key: 10**400})),
        ("extra candidate field", with_candidate(colour="red")),
        ("dense as a list", with_candidate(dense=list(cand["dense"].values()))),
        ("missing sparse", {**good, "candidates": [{k: v for k, v in cand.items() if k != "sparse"}]}),
        ("candidate not an object", {**good, "candidates": [1]}),
        ("extra top-level field", {**good, "debug": True}),
        ("both history sources", {**good, "purchase_history": []}),
        ("purchase history", {k: v for k, v in good.items() if k != "user_id"} | {
            "purchase_history": [{"product_id": cand["product_id"], "ts": good["now"] - 3600}]}),
    ]


def test_the_fast_parser_gives_the_pydantic_models_values_or_leaves_the_body_to_them(session_case: dict,
                                                                                     serving_workdir: Path):
    spec = session_case["spec"]
    encoder = RequestEncoder(spec, PurchaseIndex.from_workdir(serving_workdir), default_now=0)
    parser = FastRequestParser(spec, MAX_CANDIDATES)
    models = {"rows": build_score_request_model(spec, MAX_CANDIDATES),
              "columns": build_columns_request_model(spec, MAX_CANDIDATES)}
    accepted = set()
    for case, body in _tricky_bodies(json.loads(json.dumps(session_case["body"]))):
        for form in ("rows", "columns"):
            try:
                candidate_body = _columns(body) if form == "columns" else body
            except (KeyError, TypeError):
                continue  # no columnar equivalent
            fast = getattr(parser, form)(json.loads(json.dumps(candidate_body)))
            try:
                reference = encoder.encode(models[form].model_validate(candidate_body))
            except ValidationError:
                assert fast is None, f"{form}, {case}: the fast parser accepted what pydantic refuses"
                continue
            if fast is None:
                continue  # left to pydantic, which gives the answer
            accepted.add((form, case))
            encoded = encoder.encode_arrays(fast.head, fast.product_ids, fast.dense, fast.sparse)
            for name in ("dense", "sparse_ids", "product_rows", "query_rows", "history_rows"):
                assert torch.equal(getattr(encoded, name), getattr(reference, name)), (form, case, name)
            assert encoded.meta == reference.meta and encoded.product_ids == reference.product_ids, (form, case)
    assert {("rows", "good"), ("columns", "good"), ("rows", "keys in another order"), ("rows", "int dense value"),
            ("rows", "position on some candidates"), ("rows", "purchase history")} <= accepted


def test_requests_ready_together_share_one_model_call(serving_workdir: Path, session_case: dict):
    scorer = Scorer(serving_workdir)
    request_model = scorer.request_model(MAX_CANDIDATES)
    bodies = [session_case["body"], {**session_case["body"], "query": "zzqx never searched"},
              {**session_case["body"], "candidates": session_case["body"]["candidates"][:1]}]
    encoded = [scorer.encoder.encode(request_model.model_validate(b)) for b in bodies]
    alone = [scorer.probabilities([e])[0] for e in encoded]
    batcher = MicroBatcher(scorer, max_rows=1024)

    async def together(batcher: MicroBatcher) -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher.score(e) for e in encoded))

    batched = asyncio.run(together(batcher))
    assert batcher.calls == 1
    for a, b in zip(alone, batched):  # rows are independent; kernels may round differently per batch size
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-6, rtol=0)
    small = MicroBatcher(scorer, max_rows=len(bodies[0]["candidates"]) + 1)  # [0], then [1] and [2] together
    asyncio.run(together(small))
    assert small.calls == 2
