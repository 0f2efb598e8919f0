"""Table keys held as one array (embeddings.keys): lookups, file and checkpoint round trips."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embeddings.keys import TableKeys, string_hashes
from ranking.spec import FeatureSpec


def test_string_hashes_are_per_string_and_stable():
    values = pa.array(["", "a", "ab", "ba", "a much longer query with words", "ab"], pa.large_string())
    hashes = string_hashes(values)
    assert hashes.dtype == np.uint64 and hashes[2] == hashes[5]
    assert len(set(hashes[:5].tolist())) == 5
    # a slice of an array (non-zero offset) and a plain string array hash alike
    np.testing.assert_array_equal(string_hashes(pa.array(["x", "ab", "ba"]).slice(1)), hashes[2:4])


def test_query_rows_normalise_and_miss_to_the_unknown_row():
    queries = [f"Query {i}!" for i in range(1000)]
    keys = TableKeys.from_keys("query", queries)
    assert len(keys) == 1001 and keys[0] is None and keys[1] == "query 0" and keys[-1] == "query 999"
    wanted = ["QUERY 999", "query 5", "never searched", "query 5 "]
    np.testing.assert_array_equal(keys.rows(wanted), [1000, 6, 0, 6])
    np.testing.assert_array_equal(keys.rows(["Query 5"], normalized=True), [0])  # taken as it is
    np.testing.assert_array_equal(keys.rows(pa.array(["query 7", "x"])), [8, 0])
    with pytest.raises(ValueError, match="not unique after normalisation"):
        TableKeys.from_keys("query", ["Milk", "milk "])


def test_product_rows_keep_the_shape_of_the_ids():
    keys = TableKeys.from_keys("product", [50, 10, 30])
    np.testing.assert_array_equal(keys.rows(np.array([[30, 99], [50, 10]])), [[3, 0], [1, 2]])
    assert keys[1:] == [50, 10, 30] and list(keys) == [None, 50, 10, 30]
    assert keys.to_arrow().to_pylist() == [None, 50, 10, 30]
    with pytest.raises(ValueError, match="not unique"):
        TableKeys.from_keys("product", [1, 2, 1])


def test_keys_that_share_a_hash_still_find_their_own_row():
    """With 3-bit hashes, 200 queries share 8 hash values: every lookup must still compare the strings."""
    values = pa.array([f"q{i}" for i in range(200)], pa.large_string())
    keys = TableKeys("query", values, hash_bits=3)
    assert keys.unique()
    order = np.random.default_rng(0).permutation(200)
    wanted = [f"q{i}" for i in order] + ["q200", "missing"]
    np.testing.assert_array_equal(keys.rows(wanted, normalized=True), [*(order + 1), 0, 0])
    assert not TableKeys("query", pa.array(["a", "b", "a"], pa.large_string()), hash_bits=3).unique()


def test_keys_round_trip_through_tensors_and_a_checkpoint(tmp_path):
    keys = TableKeys.from_keys("query", ["cola", "chips", "dog food", "çafé ünïcode"])
    products = TableKeys.from_keys("product", [7, 3])
    spec = FeatureSpec(dense_names=["d"], dense_mean=[0.0], dense_std=[1.0], sparse_names=[], sparse_num_embeddings=[],
                       train_click_rate=0.1, table_dim=4).with_keys(products, keys)
    torch.save({"spec": spec.to_dict(), "keys": spec.key_tensors()}, tmp_path / "spec.pt")
    loaded = torch.load(tmp_path / "spec.pt", weights_only=True, mmap=True)
    assert all(isinstance(t, torch.Tensor) for kind in loaded["keys"].values() for t in kind.values())
    back = FeatureSpec.from_dict(loaded["spec"], loaded["keys"])
    assert back == spec and back.query_rows(["Dog Food"])[0] == 3 and back.product_rows([3])[0] == 2
    # copies, not views of the file's mapping (views would keep every page of the file mapped)
    for kind in loaded["keys"].values():
        for tensor in kind.values():
            tensor.zero_()
    assert back == spec and back.query_rows(["Dog Food"])[0] == 3 and back.product_rows([3])[0] == 2
    # a dict written when the keys were lists in it reads to the same spec
    legacy = {**spec.to_dict(), "product_ids": [7, 3], "queries": ["cola", "chips", "dog food", "çafé ünïcode"]}
    assert FeatureSpec.from_dict(legacy) == spec
    assert "query_keys" not in spec.to_dict() and FeatureSpec.from_dict(spec.to_dict()).num_query_rows == 1


@pytest.mark.parametrize("keys, message", [([None, 5, 5], "keys must be unique"), ([None, 5, None], "1 null keys"),
                                           ([4, 5, 6], "row 0 .* null key")])
def test_a_table_file_with_bad_keys_is_named(tmp_path, keys, message):
    from data.schema import SchemaError
    from embeddings import tables

    good = tables.write_table(tables.build_table("product", [1, 2], np.ones((2, 3))), tmp_path / "product_table.parquet")
    arrow = pq.read_table(good)
    arrow = arrow.set_column(1, "product_id", pa.array(keys, pa.int64()))
    pq.write_table(arrow, good)
    with pytest.raises(SchemaError, match=f"product_id.*{message}"):
        tables.read_embedding_table(good, "product")
