"""POST /retrieve and POST /recommend on a real uvicorn process (the shared ``service``), real FAISS,
real Parquet; the feature split rule on small arrays.

Expected results are computed here independently: nearest products by brute-force cosine over
the exported product table, query vectors from the table or from the DashCLIP encoder, and the
candidates' features read from ``serving/product_features.parquet`` and scored through POST /score.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from common.io import read_json
from data.text import normalize_query
from embeddings import tables
from embeddings.encode import load_encoder
from serving.funnel import CONSTANT, LATEST, REQUEST, ImpressionGroups
from serving.requests import RETRIEVE_MAX_K
from serving.server import EncoderOnce, Scorer, Served, create_app, load_served
from tests.serving_fixtures import MAX_CANDIDATES, serving_workdir, service  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def exact_neighbours(workdir: Path, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(product_ids [k], cosines [k])`` by brute force over the exported product table (row 0 left out)."""
    table = tables.read_embedding_table(tables.embedding_table_path(workdir, "product"), "product")
    vectors = table.vectors[1:] / np.linalg.norm(table.vectors[1:], axis=1, keepdims=True)
    cosines = vectors @ (vector / np.linalg.norm(vector))
    order = np.argsort(-cosines, kind="stable")[:k]
    return np.asarray(table.keys[1:], np.int64)[order], cosines[order]


def assert_same_ranking(got: list[int], ids: np.ndarray, cosines: np.ndarray, atol: float = 1e-6) -> None:
    """``got`` is the head of the brute-force ranking ``ids`` (longer than ``got``) up to the order of
    products whose cosines tie within float rounding (FAISS sums the inner products in another order
    than numpy)."""
    assert len(got) <= len(ids)
    position = {int(i): r for r, i in enumerate(ids)}
    for rank, product in enumerate(got):
        if product != ids[rank]:
            assert product in position and abs(cosines[position[product]] - cosines[rank]) <= atol, (rank, got, ids)


@pytest.fixture(scope="module")
def manifest(serving_workdir: Path) -> dict:
    return read_json(serving_workdir / "serving" / "manifest.json")


@pytest.fixture(scope="module")
def shopper(serving_workdir: Path) -> dict:
    """A user with purchases, a query of the query table and a time after the purchases."""
    purchases = pq.read_table(serving_workdir / "data" / "purchases.parquet").to_pandas()
    last = purchases.sort_values("ts").iloc[-1]
    query_table = tables.read_embedding_table(tables.embedding_table_path(serving_workdir, "query"), "query")
    return {"user_id": int(last["user_id"]), "query": query_table.keys[5],
            "now": int(last["ts"].timestamp()) + 3600}


def test_retrieve_a_known_query_takes_its_table_row(service: httpx.Client, serving_workdir: Path, shopper: dict):
    query_table = tables.read_embedding_table(tables.embedding_table_path(serving_workdir, "query"), "query")
    products = len(tables.read_embedding_table(tables.embedding_table_path(serving_workdir, "product")).keys) - 1
    typed = f"  {shopper['query'].upper()} !"  # normalises to the table's key
    resp = service.post("/retrieve", json={"query": typed, "k": 7})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["meta"] == {"query": shopper["query"], "query_encoded": False, "indexed_products": products,
                           "index": "exact"}
    ids, cosines = exact_neighbours(serving_workdir, query_table.vectors[query_table.lookup([shopper["query"]])[0]], 7)
    assert [p["product_id"] for p in out["products"]] == ids.tolist()
    np.testing.assert_allclose([p["cosine"] for p in out["products"]], cosines, atol=1e-5)


def test_retrieve_an_unknown_query_encodes_it_with_dashclip(service: httpx.Client, serving_workdir: Path):
    query = "Zorbly quantum oat crunch, family size"
    assert tables.read_embedding_table(tables.embedding_table_path(serving_workdir, "query")).lookup([query])[0] == 0
    resp = service.post("/retrieve", json={"query": query})  # k defaults to 10
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["meta"]["query_encoded"] is True and len(out["products"]) == 10
    vector = load_encoder(serving_workdir, "trained").queries([query])[0]
    ids, cosines = exact_neighbours(serving_workdir, vector, 20)
    assert_same_ranking([p["product_id"] for p in out["products"]], ids, cosines)
    np.testing.assert_allclose([p["cosine"] for p in out["products"]], cosines[:10], atol=1e-5)


def test_retrieve_returns_every_product_at_most_and_never_row_zero(service: httpx.Client, serving_workdir: Path):
    table = tables.read_embedding_table(tables.embedding_table_path(serving_workdir, "product"), "product")
    resp = service.post("/retrieve", json={"query": "milk", "k": RETRIEVE_MAX_K})
    assert resp.status_code == 200, resp.text
    ids = [p["product_id"] for p in resp.json()["products"]]
    assert sorted(ids) == sorted(table.keys[1:]) and len(ids) == resp.json()["meta"]["indexed_products"]
    cosines = [p["cosine"] for p in resp.json()["products"]]
    assert cosines == sorted(cosines, reverse=True)


def _error(resp: httpx.Response) -> list[str]:
    body = resp.json()
    assert set(body) == {"message", "detail"} and all(set(d) == {"field", "type", "msg"} for d in body["detail"])
    return [d["field"] for d in body["detail"]]


@pytest.mark.parametrize("body, status, field", [
    ({"query": "milk", "k": 0}, 422, "k"),
    ({"query": "milk", "k": RETRIEVE_MAX_K + 1}, 422, "k"),
    ({"query": "milk", "k": "3"}, 422, "k"),
    ({"query": " ?! \U0001F642 "}, 422, "query"),
    ({"k": 3}, 422, "query"),
    ({"query": "milk", "top": 3}, 422, "top"),
    ("{not json", 400, "body"),
])
def test_retrieve_refuses_bad_requests_with_the_error_body(service: httpx.Client, body, status: int, field: str):
    content = body if isinstance(body, str) else json.dumps(body)
    resp = service.post("/retrieve", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert _error(resp) == [field]


def _score_body(workdir: Path, manifest: dict, request: dict, product_ids: list[int]) -> dict:
    """The POST /score body for ``product_ids`` with the documented features: product-level from
    ``serving/product_features.parquet`` (the manifest's defaults for a product it lacks),
    request-level from ``request["features"]`` or the manifest's defaults."""
    split = manifest["features"]
    known = pq.read_table(workdir / "serving" / "product_features.parquet").to_pandas().set_index("product_id")
    given = request.get("features", {})
    candidates = []
    for product in product_ids:
        features: dict[str, dict] = {"dense": {}, "sparse": {}}
        for entry in split["product"]:
            value = known.at[product, entry["column"]] if product in known.index else entry["default"]
            features[entry["kind"]][entry["field"]] = float(value) if entry["kind"] == "dense" else int(value)
        for entry in split["request"]:
            features[entry["kind"]][entry["field"]] = given.get(entry["kind"], {}).get(entry["field"], entry["default"])
        candidates.append({"product_id": product, **features})
    return {k: v for k, v in request.items() if k in ("user_id", "purchase_history", "query", "now")} | {
        "candidates": candidates}


def test_recommend_ranks_the_retrieved_candidates_with_the_score_path(service: httpx.Client, serving_workdir: Path,
                                                                       manifest: dict, shopper: dict):
    request_dense = next(e for e in manifest["features"]["request"] if e["kind"] == "dense")
    request_sparse = next(e for e in manifest["features"]["request"] if e["kind"] == "sparse")
    body = {**shopper, "k": 3, "candidates_n": MAX_CANDIDATES,
            "features": {"dense": {request_dense["field"]: request_dense["default"] + 1.0},
                         "sparse": {request_sparse["field"]: 1}}}
    resp = service.post("/recommend", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    retrieved = service.post("/retrieve", json={"query": shopper["query"], "k": MAX_CANDIDATES}).json()["products"]
    cosine = {p["product_id"]: p["cosine"] for p in retrieved}
    # every candidate scored through POST /score with the documented features: the top 3 of those
    scored = service.post("/score", json=_score_body(serving_workdir, manifest, body, list(cosine))).json()
    expected = sorted(zip(scored["scores"], cosine.values(), cosine), key=lambda t: (-t[0], -t[1], t[2]))[:3]
    assert [p["product_id"] for p in out["products"]] == [t[2] for t in expected]
    np.testing.assert_allclose([p["score"] for p in out["products"]], [t[0] for t in expected], atol=1e-6)
    assert [p["cosine"] for p in out["products"]] == [cosine[p["product_id"]] for p in out["products"]]
    meta = out["meta"]
    assert meta["retrieved"] == MAX_CANDIDATES and meta["query_encoded"] is False and meta["unknown_query"] is False
    assert meta["history_length"] == scored["meta"]["history_length"] > 0 and meta["model"] == scored["meta"]["model"]
    assert meta["unknown_products"] == 0 and meta["now"] == shopper["now"]


def test_recommend_defaults_and_an_unknown_query(service: httpx.Client, serving_workdir: Path, manifest: dict,
                                                 shopper: dict):
    body = {"purchase_history": [], "query": "a query nobody typed before", "candidates_n": 5}
    resp = service.post("/recommend", json=body)  # k defaults to 10 > candidates_n 5: refused
    assert resp.status_code == 422 and _error(resp) == ["body"] and "candidates_n" in resp.json()["message"]
    resp = service.post("/recommend", json={**body, "k": 5})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["meta"]["query_encoded"] is True and out["meta"]["unknown_query"] is True
    ids = [p["product_id"] for p in out["products"]]
    scored = service.post("/score", json=_score_body(serving_workdir, manifest, {**body, "now": out["meta"]["now"]},
                                                     ids)).json()
    np.testing.assert_allclose([p["score"] for p in out["products"]], scored["scores"], atol=1e-6)
    assert sorted(scored["scores"], reverse=True) == pytest.approx(scored["scores"])


def test_recommend_refuses_product_level_features_and_out_of_range_counts(service: httpx.Client, manifest: dict,
                                                                          shopper: dict):
    product_dense = next(e for e in manifest["features"]["product"] if e["kind"] == "dense")
    cases = [({"features": {"dense": {product_dense["field"]: 1.0}}}, f"features.dense.{product_dense['field']}"),
             ({"candidates_n": MAX_CANDIDATES + 1}, "candidates_n"), ({"k": 0}, "k"),
             ({"query": "  "}, "query"), ({"user_id": None}, "body")]
    for change, field in cases:
        resp = service.post("/recommend", json={**shopper, "k": 2, "candidates_n": 4, **change})
        assert resp.status_code == 422, (change, resp.text)
        assert field in _error(resp), (change, resp.json()["message"])


def test_openapi_lists_the_request_features_with_defaults_and_names_the_product_ones(service: httpx.Client,
                                                                                     manifest: dict):
    api = service.get("/openapi.json").json()
    schemas = api["components"]["schemas"]
    split = manifest["features"]
    for kind, model in (("dense", "RequestDenseFeatures"), ("sparse", "RequestSparseFeatures")):
        properties = schemas[model]["properties"]
        assert {f: p["default"] for f, p in properties.items()} == {
            e["field"]: e["default"] for e in split["request"] if e["kind"] == kind}
        assert schemas[model]["additionalProperties"] is False and not schemas[model].get("required")
    description = api["paths"]["/recommend"]["post"]["description"]
    assert all(e["field"] in description for e in split["product"])
    recommend = schemas["RecommendRequest"]["properties"]
    assert recommend["candidates_n"]["maximum"] == MAX_CANDIDATES and recommend["k"]["minimum"] == 1
    retrieve = schemas["RetrieveRequest"]["properties"]
    assert (retrieve["k"]["minimum"], retrieve["k"]["maximum"], retrieve["k"]["default"]) == (1, RETRIEVE_MAX_K, 10)
    assert set(schemas["RecommendedProduct"]["properties"]) == {"product_id", "cosine", "score"}


def test_the_example_requests_answer(serving_workdir: Path):
    """``examples/{retrieve,recommend}.json`` against the service's default limits (in process)."""
    client = TestClient(create_app(load_served(serving_workdir, EncoderOnce(serving_workdir))))
    for name, path in (("retrieve.json", "/retrieve"), ("recommend.json", "/recommend")):
        body = (REPO / "examples" / name).read_bytes()
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 200, (name, resp.text)
        assert len(resp.json()["products"]) == json.loads(body)["k"]


def test_the_funnels_query_vectors_are_the_served_models_fp32_table_rows(serving_workdir: Path, tmp_path: Path):
    """One copy of the query vectors in a process that scores and retrieves: with fp32 tables the funnel
    reads the served model's own query table (its rows are the table file's); with quantized tables,
    which are not the vectors, it maps the table file."""
    from serving import export
    from tests.serving_fixtures import copy_served

    served = load_served(serving_workdir, EncoderOnce(serving_workdir))
    vectors = served.funnel.queries.vectors
    assert served.scorer.query_table is not None and np.shares_memory(vectors, served.scorer.query_table)
    table = tables.read_embedding_table(tables.embedding_table_path(serving_workdir, "query"), "query")
    assert np.array_equal(vectors, table.vectors) and served.funnel.queries.keys == table.keys

    workdir = copy_served(serving_workdir, tmp_path / "int8")  # the index is built from the table file
    export.main(["--workdir", str(workdir), "--table-dtype", "int8", "--force", "--threads", "1"])
    quantized = load_served(workdir, EncoderOnce(workdir))
    assert quantized.scorer.query_table is None and isinstance(quantized.funnel.queries.vectors, np.memmap)
    assert np.array_equal(quantized.funnel.queries.vectors, table.vectors)


def test_without_the_funnel_files_retrieval_answers_503_and_scoring_goes_on(serving_workdir: Path, shopper: dict):
    served = Served(Scorer(serving_workdir), None, "serving/index.faiss not found: run python -m serving.index")
    client = TestClient(create_app(served, MAX_CANDIDATES))
    for path, body in (("/retrieve", {"query": "milk"}), ("/recommend", {**shopper, "k": 1, "candidates_n": 2})):
        resp = client.post(path, json=body)
        assert resp.status_code == 503 and _error(resp) == ["funnel"] and "serving.index" in resp.json()["message"]
    health = client.get("/healthz").json()
    assert health["funnel"] is False and "serving.index" in health["funnel_error"]


def test_feature_levels_follow_the_documented_rule():
    day = 86_400
    product = np.array([1, 1, 1, 2, 2, 3])
    ts = np.array([0, 10, day + 5, 20, day + 30, 2 * day])
    values = np.array([
        [5.0, 0.1, 1, 3, 9],   # product 1 day 0
        [5.0, 0.1, 1, 4, 8],   # product 1 day 0
        [5.0, 0.2, 2, 3, 7],   # product 1 day 1
        [7.0, 0.3, 1, 3, 6],   # product 2 day 0
        [7.0, 0.4, 2, 5, 5],   # product 2 day 1
        [9.0, 0.5, 3, 3, 4],   # product 3 day 2
    ])
    # price: constant per product; ctr: one value per product and day; weekday: one value per day for all
    # products (a time feature); store and hour: neither
    assert ImpressionGroups(product, ts).levels(values) == [CONSTANT, LATEST, REQUEST, REQUEST, REQUEST]
    assert ImpressionGroups(product[[0, 3, 5]], ts[[0, 3, 5]]).levels(values[[0, 3, 5]]) == [REQUEST] * 5  # no evidence
    assert ImpressionGroups(product[:0], ts[:0]).levels(values[:0]) == [REQUEST] * 5


def test_feature_levels_match_a_groupby_over_random_impressions():
    rng = np.random.default_rng(0)
    n, day = 5000, 86_400
    product = rng.integers(0, 30, n)  # about 33 impressions per product and day
    ts = np.sort(rng.integers(0, 5 * day, n))
    days = ts // day
    columns = {
        "constant": product * 3 + 1,
        "latest": product * 100 + days,
        "per_day": days * 7,
        "request": rng.integers(0, 4, n),
        "constant_but_one": np.where(np.arange(n) == n // 2, -1, product),
        "latest_but_one": np.where(np.arange(n) == n // 3, -1, product * 100 + days),
    }
    frame = pd.DataFrame({"product": product, "day": days, **columns})

    def one_value_per(keys: list[str], column: str) -> bool:
        return bool((frame.groupby(keys)[column].nunique() == 1).all())

    expected = [CONSTANT if one_value_per(["product"], c) else
                LATEST if one_value_per(["product", "day"], c) and not one_value_per(["day"], c) else REQUEST
                for c in columns]
    shuffled = rng.permutation(n)  # row order does not matter
    levels = ImpressionGroups(product[shuffled], ts[shuffled]).levels(np.stack(list(columns.values()), 1)[shuffled])
    assert levels == expected == [CONSTANT, LATEST, REQUEST, REQUEST, REQUEST, REQUEST]


@pytest.mark.slow
def test_the_service_never_imports_torchrec(serving_workdir: Path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from serving.server import EncoderOnce, load_served
        workdir = Path({str(serving_workdir)!r})
        served = load_served(workdir, EncoderOnce(workdir))
        assert served.funnel is not None, served.funnel_error
        served.warm_up()
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torchrec"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
