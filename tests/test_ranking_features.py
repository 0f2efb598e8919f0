"""Ranking features: as-of-time purchase history (no leakage), the streamed cache, the spec."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schema import SchemaError, schema, table_path
from embeddings.tables import build_table
from data.protocol import DAY_S
from ranking.features import ImpressionCache, RankingData, build_spec
from ranking.spec import FeatureSpec, PurchaseIndex

T = 1_700_000_000  # an impression time (seconds)


def test_history_window_is_strictly_before_the_impression():
    index = PurchaseIndex(
        user_id=[1, 1, 1, 1, 1, 2],
        ts=[T, T - 84 * DAY_S, T - 84 * DAY_S - 1, T - 10, T - 5, T - 100],
        product_id=[100, 101, 102, 103, 104, 200],
    )
    ids, count = index.history(np.array([1, 2, 3]), np.array([T, T, T]), max_len=4, days=84)
    # user 1: the purchase at exactly T is excluded (same second = not before), the one at T-84d is
    # included, the one a second earlier is not; most recent first.
    assert ids[0].tolist() == [104, 103, 101, -1]
    assert count.tolist() == [3, 1, 0]
    assert ids[1].tolist() == [200, -1, -1, -1]
    assert ids[2].tolist() == [-1, -1, -1, -1]  # a user with no purchases
    capped, count = index.history(np.array([1]), np.array([T + 1]), max_len=2, days=84)
    assert capped.tolist() == [[100, 104]] and count.tolist() == [3]  # cap keeps the most recent; count is uncapped


def test_history_matches_a_brute_force_scan():
    rng = np.random.default_rng(0)
    n = 400
    users, ts, products = rng.integers(0, 20, n), T + rng.integers(-200, 200, n) * DAY_S // 2, rng.integers(0, 50, n)
    index = PurchaseIndex(users, ts, products)
    q_users, q_ts = rng.integers(0, 22, 100), T + rng.integers(-200, 200, 100) * DAY_S // 2
    ids, count = index.history(q_users, q_ts, max_len=10, days=84)
    for i in range(100):
        hit = (users == q_users[i]) & (ts >= q_ts[i] - 84 * DAY_S) & (ts < q_ts[i])
        order = np.lexsort((products[hit], ts[hit]))[::-1]
        expected = products[hit][order][:10]
        assert count[i] == hit.sum()
        assert sorted(ids[i][: len(expected)].tolist()) == sorted(expected.tolist())  # ties in ts: any order
        assert (ids[i][len(expected):] == -1).all()
        assert np.all(np.diff(ts[hit][order][:10]) <= 0)


def _write_impressions(workdir, rows: int, *, row_group: int = 7):
    rng = np.random.default_rng(1)
    ts = T - rng.integers(0, 30 * DAY_S, rows)
    ts[0] = T  # the max: eval = ts >= T - 7 days
    table = pa.table({
        "ts": pa.array(ts, pa.timestamp("s")), "session_id": pa.array(np.arange(rows), pa.int64()),
        "user_id": pa.array(rng.integers(0, 5, rows), pa.int64()),
        "query": [["Milk", "  milk ", "EGGS!", "bread"][i % 4] for i in range(rows)],
        "product_id": pa.array(rng.choice([11, 12, 13, 99], rows), pa.int64()),
        "position": pa.array(np.zeros(rows), pa.int32()), "clicked": pa.array(rng.integers(0, 2, rows), pa.int8()),
        "dense_price": pa.array(rng.normal(3, 2, rows), pa.float32()),
        "dense_rating": pa.array(rng.random(rows), pa.float32()),
        "sparse_store": pa.array(rng.integers(0, 9, rows), pa.int64()),
    })
    path = table_path(workdir, "impressions")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    pq.write_table(pa.table({"ts": pa.array([T - 8 * DAY_S], pa.timestamp("s")), "user_id": pa.array([1], pa.int64()),
                             "product_id": pa.array([12], pa.int64())}, schema=schema("purchases")),
                   table_path(workdir, "purchases"))
    return table.to_pandas()


def test_cache_streams_splits_and_computes_train_statistics(tmp_path):
    frame = _write_impressions(tmp_path, 60)
    cache = ImpressionCache.open(tmp_path, batch_rows=16)  # four streamed batches
    meta = cache.meta
    ts = frame["ts"].to_numpy().astype("datetime64[s]").astype(np.int64)
    train = ts < T - 7 * DAY_S
    assert meta.max_ts == T and meta.eval_start_ts == T - 7 * DAY_S
    assert (meta.num_train, meta.num_eval) == (train.sum(), (~train).sum())
    np.testing.assert_array_equal(cache.split_index("train"), np.flatnonzero(train))
    np.testing.assert_allclose(meta.dense_mean, frame.loc[train, ["dense_price", "dense_rating"]].mean(), rtol=1e-5)
    np.testing.assert_allclose(meta.dense_std, frame.loc[train, ["dense_price", "dense_rating"]].std(ddof=0), rtol=1e-4)
    assert meta.sparse_max_train_id == [int(frame.loc[train, "sparse_store"].max())]
    assert meta.train_click_rate == pytest.approx(frame.loc[train, "clicked"].mean())
    assert sorted(cache.queries.to_pylist()) == ["bread", "eggs", "milk"]  # normalised: "Milk" and "  milk " are one query
    np.testing.assert_array_equal(cache.columns["dense"][:, 0], frame["dense_price"].to_numpy())
    mtime = (cache.directory / "meta.json").stat().st_mtime_ns
    assert ImpressionCache.open(tmp_path).directory == cache.directory
    assert (cache.directory / "meta.json").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_batches_join_spec_ids_and_history(tmp_path):
    frame = _write_impressions(tmp_path, 40)
    cache = ImpressionCache.open(tmp_path)
    product = build_table("product", [11, 12, 13], np.eye(3, 4))
    query = build_table("query", ["milk", "eggs"], np.eye(2, 4))
    spec = build_spec(cache.meta, (product, query), history_len=3)
    assert spec.sparse_num_embeddings == [cache.meta.sparse_max_train_id[0] + 2]
    data = RankingData(cache, PurchaseIndex.from_workdir(tmp_path), spec)
    batches = list(data.batches("eval", 4))
    rows = np.asarray(cache.split_index("eval"))
    assert sum(len(b) for b in batches) == len(rows)
    batch = data.batch(rows)
    expect_product = frame["product_id"].to_numpy()[rows]
    assert batch.product_rows.tolist() == [{11: 1, 12: 2, 13: 3}.get(p, 0) for p in expect_product]
    expect_query = frame["query"].to_numpy()[rows]
    assert batch.query_rows.tolist() == [{"milk": 1, "eggs": 2}.get(q.strip().lower().rstrip("!"), 0) for q in expect_query]
    users = frame["user_id"].to_numpy()[rows]
    assert batch.history_rows[:, 0].tolist() == [2 if u == 1 else -1 for u in users]  # user 1 bought 12 before the eval week
    assert batch.has_history.tolist() == (users == 1).tolist()
    assert batch.labels.tolist() == frame["clicked"].to_numpy()[rows].astype(float).tolist()
    shuffled = [b.labels for b in data.batches("train", 8, shuffle=True, rng=np.random.default_rng(3))]
    again = [b.labels for b in data.batches("train", 8, shuffle=True, rng=np.random.default_rng(3))]
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, again))


def test_spec_round_trip_and_history_rows():
    spec = FeatureSpec(dense_names=["dense_a"], dense_mean=[0.0], dense_std=[1.0], sparse_names=[],
                       sparse_num_embeddings=[], train_click_rate=0.2, history_len=3).with_tables(
        build_table("product", [5, 7], np.ones((2, 4))), build_table("query", ["a b"], np.ones((1, 4))))
    again = FeatureSpec.from_dict(spec.to_dict(), spec.key_tensors())
    assert again == spec and again.table_dim == 4
    assert again.history_rows([[7, 5, 8, 5], []]).tolist() == [[2, 1, 0], [-1, -1, -1]]
    assert again.query_rows(["A  B!", "c"]).tolist() == [1, 0]


def test_cache_errors_name_the_file_and_column(tmp_path):
    with pytest.raises(SchemaError, match="impressions.parquet.*missing table file"):
        ImpressionCache.open(tmp_path)
    frame = _write_impressions(tmp_path, 10)
    bad = pa.Table.from_pandas(frame.drop(columns=["clicked"]), preserve_index=False)
    pq.write_table(bad, table_path(tmp_path, "impressions"))
    with pytest.raises(SchemaError, match="impressions.parquet: column 'clicked': missing required column"):
        ImpressionCache.open(tmp_path)
    recent = frame.assign(ts=pd.Timestamp(T, unit="s"))
    pq.write_table(pa.Table.from_pandas(recent, preserve_index=False, schema=pa.Table.from_pandas(frame, preserve_index=False).schema),
                   table_path(tmp_path, "impressions"))
    with pytest.raises(SchemaError, match="no training impressions"):
        ImpressionCache.open(tmp_path)
