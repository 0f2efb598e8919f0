"""The Redis feature store: a real redis-server on a free localhost port."""
from __future__ import annotations

import numpy as np
import torch

from embeddings.tables import build_table
from ranking.features import ImpressionCache
from serving.bench import build_requests, model_tables
from serving.redis_store import VectorStore
from serving.server import Scorer
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.serving_fixtures import serving_workdir  # noqa: F401  (fixture)


def test_vector_store_round_trip_and_unknown_ids(redis_server):
    rng = np.random.default_rng(0)
    products = build_table("product", [11, 12, 13], rng.normal(size=(3, 8)).astype(np.float32))
    queries = build_table("query", ["Red Apples", "milk"], rng.normal(size=(2, 8)).astype(np.float32))
    store = VectorStore(redis_server.client(), dim=8, namespace="t1")
    assert store.load(products) == 3 and store.load(queries) == 2
    query_vec, product_vecs, history_vecs, found = store.fetch("red apples", [13, 99, 11], [12, 404])
    np.testing.assert_array_equal(query_vec, queries.vectors[1])
    np.testing.assert_array_equal(product_vecs, products.vectors[[3, 0, 1]])  # 99 unknown -> zeros (row 0)
    np.testing.assert_array_equal(history_vecs, products.vectors[[2, 0]])
    assert found.tolist() == [True, False]
    unknown_query, *_ = store.fetch("never seen", [], [])
    assert not unknown_query.any()


def test_redis_fetch_path_scores_like_the_fused_model(redis_server, serving_workdir):
    """The vectors model on vectors fetched from Redis == the fused model (tables inside) on rows."""
    scorer = Scorer(serving_workdir)
    product, query = model_tables(scorer)
    store = VectorStore(redis_server.client(), dim=product.dim, namespace="parity")
    store.load(product)
    store.load(query)
    vectors_model = torch.jit.load(str(serving_workdir / "serving" / "model_vectors.pt"))
    request_model = scorer.request_model(64)
    bodies = build_requests(ImpressionCache.open(serving_workdir), scorer.spec, 12, 16, np.random.default_rng(0))
    bodies[0]["query"] = "a query nobody typed"
    encoded = [scorer.encoder.encode(request_model.model_validate(b)) for b in bodies]
    assert any(e.meta["history_length"] > 0 for e in encoded) and any(e.meta["unknown_products"] for e in encoded)
    assert encoded[0].meta["unknown_query"]
    with torch.no_grad():
        for e in encoded:
            fused = scorer.model(*e.fused_inputs())
            fetched = vectors_model(*store.model_inputs(e))
            torch.testing.assert_close(fetched, fused, atol=1e-5, rtol=0)
