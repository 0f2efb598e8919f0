"""serving.index: the FAISS product index over the exported product table (small tables, fast)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from common.cli import UserError  # noqa: E402
from common.provenance import MadeFrom  # noqa: E402
from embeddings import tables  # noqa: E402
from serving import index as product_index  # noqa: E402
from serving.index import (IDS_REL, INDEX_REL, MANIFEST_REL, MISSING_ID, DimensionMismatch,  # noqa: E402
                           ProductIndex, bench_vectors, build_faiss_index, index_set, index_settings)

REPO = Path(__file__).resolve().parents[1]
DIM = 32


def publish_tables(workdir: Path, vectors: np.ndarray, ids=None, tag: str = "t") -> np.ndarray:
    """Publish a product table (``vectors`` [N, d], ids default 1000 + 7 i) and a one-query table
    the way ``embeddings.export`` does; returns the product ids."""
    ids = np.asarray(ids if ids is not None else 1000 + 7 * np.arange(len(vectors)), dtype=np.int64)
    rng = np.random.default_rng(1)
    with tables.tables_set(workdir).publish(MadeFrom({}, {"test": tag})) as staged:
        tables.write_table(tables.build_table("product", ids.tolist(), vectors, "test"),
                           staged[tables.embedding_table_rel("product")])
        query = tables.build_table("query", ["some query"], rng.standard_normal((1, vectors.shape[1])), "test")
        tables.write_table(query, staged[tables.embedding_table_rel("query")])
    return ids


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(workdir: Path, *flags: str) -> dict:
    return product_index.main(["--workdir", str(workdir), *flags])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(found, truth)]))


def test_exact_index_maps_ids_and_never_returns_row_0(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng, 300)
    ids = publish_tables(tmp_path, vectors, rng.permutation(5000)[:300] + 1)
    manifest = build(tmp_path)
    assert manifest["kind"] == "exact" and manifest["products"] == 300 and manifest["dim"] == DIM
    index = ProductIndex.load(tmp_path)
    assert len(index) == 300 and index.dim == DIM
    found, cosines = index.search(vectors, 5)
    assert found.dtype == np.int64 and cosines.dtype == np.float32 and found.shape == cosines.shape == (300, 5)
    np.testing.assert_array_equal(found[:, 0], ids)  # each product's own vector retrieves itself first
    np.testing.assert_allclose(cosines[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(cosines, axis=1) <= 1e-6)  # best first
    exact = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ vectors.T
    np.testing.assert_allclose(cosines[:, 1], np.sort(exact, axis=1)[:, -2], atol=1e-5)
    # k is capped at the number of products; every id is a real product (never row 0's None / 0)
    all_ids, all_cos = index.search(vectors[:3] * 7.0, 10_000)  # queries are normalised
    assert all_ids.shape == (3, 300) and set(all_ids[0].tolist()) == set(ids.tolist())
    np.testing.assert_allclose(all_cos[:, 0], 1.0, atol=1e-5)
    assert 0 not in set(all_ids.ravel().tolist()) and MISSING_ID not in set(all_ids.ravel().tolist())
    # a zero query scores 0 everywhere and still returns real products
    zero_ids, zero_cos = index.search(np.zeros((1, DIM), np.float32), 4)
    assert np.all(zero_cos == 0) and set(zero_ids[0].tolist()) <= set(ids.tolist())


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_agrees_with_exact(tmp_path: Path, kind: str) -> None:
    products, queries = bench_vectors(4000, DIM, 200, "clustered", seed=3)
    ids = publish_tables(tmp_path, products)
    manifest = build(tmp_path, "--kind", kind, "--hnsw-m", "16", "--ef-construction", "64", "--ef-search", "64",
                     "--nprobe", "16")
    assert manifest["kind"] == kind and manifest["made_from"]["settings"]["kind"] == kind
    ann = ProductIndex.load(tmp_path)
    exact = ProductIndex(build_faiss_index(products, {"kind": "exact"}), ids, "exact")
    found, cos = ann.search(queries, 10)
    truth, truth_cos = exact.search(queries, 10)
    assert recall(found, truth) >= 0.95
    assert np.all(cos <= truth_cos[:, :1] + 1e-5)  # an ANN never beats the exact best
    own, _ = ann.search(products[:200], 1)
    assert np.mean(own[:, 0] == ids[:200]) >= 0.98
    # a per-call override is honoured and does not change the stored setting
    wide, _ = ann.search(queries, 10, ef_search=256, nprobe=64)
    assert recall(wide, truth) >= recall(found, truth) - 1e-9
    if kind == "hnsw":
        assert ann.index.hnsw.efSearch == 64
    else:
        assert ann.index.nprobe == 16


def test_zero_rows_and_unnormalised_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    vectors = unit(rng, 50) * 3.0  # not unit vectors: normalised, logged
    vectors[7] = 0.0  # an all-zero product: left out, logged
    ids = publish_tables(tmp_path, vectors)
    with caplog.at_level(logging.WARNING, logger="serving.index"):
        manifest = build(tmp_path)
    assert manifest["products"] == 49 and manifest["zero_rows_left_out"] == 1 and manifest["renormalised_rows"] == 49
    assert "all-zero" in caplog.text and "not unit vectors" in caplog.text
    index = ProductIndex.load(tmp_path)
    found, cos = index.search(vectors, 60)
    assert found.shape == (50, 49) and ids[7] not in set(found.ravel().tolist())
    np.testing.assert_allclose(cos[np.arange(50) != 7, 0], 1.0, atol=1e-5)


def test_rebuilt_when_table_or_settings_change_else_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(4)
    publish_tables(tmp_path, unit(rng, 200))
    first = build(tmp_path, "--kind", "hnsw", "--hnsw-m", "8")
    faiss_path = tmp_path / INDEX_REL
    inode = faiss_path.stat().st_ino
    with caplog.at_level(logging.INFO, logger="serving.index"):
        again = build(tmp_path, "--kind", "hnsw", "--hnsw-m", "8")
    assert "skipping" in caplog.text and again == first and faiss_path.stat().st_ino == inode
    # a search-time setting stored in the file rebuilds it
    changed = build(tmp_path, "--kind", "hnsw", "--hnsw-m", "8", "--ef-search", "77")
    assert changed["made_from"]["settings"]["ef_search"] == 77 and faiss_path.stat().st_ino != inode
    assert ProductIndex.load(tmp_path).index.hnsw.efSearch == 77
    # --force rebuilds
    inode = faiss_path.stat().st_ino
    build(tmp_path, "--kind", "hnsw", "--hnsw-m", "8", "--ef-search", "77", "--force")
    assert faiss_path.stat().st_ino != inode
    # settings of another kind do not rebuild an exact index
    exact = build(tmp_path, "--kind", "exact")
    inode = faiss_path.stat().st_ino
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serving.index"):
        build(tmp_path, "--kind", "exact", "--ef-search", "5", "--nprobe", "3")
    assert "skipping" in caplog.text and faiss_path.stat().st_ino == inode
    # a new product table: the loaded index is refused as stale, the next build rebuilds
    new_vectors = unit(rng, 120)
    new_ids = publish_tables(tmp_path, new_vectors, 90_000 + np.arange(120), tag="second")
    with pytest.raises(UserError, match="built from another"):
        ProductIndex.load(tmp_path)
    rebuilt = build(tmp_path, "--kind", "exact")
    product_rel = tables.embedding_table_rel("product")
    assert rebuilt["made_from"]["inputs"] == {product_rel: tables.tables_set(tmp_path).verify()[product_rel]}
    assert rebuilt["made_from"]["inputs"] != exact["made_from"]["inputs"] and rebuilt["products"] == 120
    found, _ = ProductIndex.load(tmp_path).search(new_vectors, 1)
    np.testing.assert_array_equal(found[:, 0], new_ids)


def test_one_output_set_with_both_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    publish_tables(tmp_path, unit(rng, 64))
    build(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_REL).read_text())
    assert sorted(manifest["files"]) == sorted([INDEX_REL, IDS_REL])
    assert set(index_set(tmp_path).verify()) == {INDEX_REL, IDS_REL}
    assert not [p.name for p in (tmp_path / "serving").iterdir() if p.name.startswith(".")]  # no temp leftovers
    ids = np.load(tmp_path / IDS_REL)
    assert ids.dtype == np.int64 and len(ids) == 64
    np.save(tmp_path / IDS_REL, ids[::-1].copy())  # a file from another publication
    with pytest.raises(UserError, match="index_ids.npy"):
        ProductIndex.load(tmp_path)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_same_table_and_settings_give_the_same_bytes(tmp_path: Path, kind: str) -> None:
    products, _ = bench_vectors(1500, DIM, 1, "clustered", seed=6)
    hashes = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        publish_tables(workdir, products)
        manifest = build(workdir, "--kind", kind, "--hnsw-m", "12", "--ef-construction", "40", "--nlist", "20")
        hashes.append({rel: entry["sha256"] for rel, entry in manifest["files"].items()})
        assert (workdir / MANIFEST_REL).read_bytes() == (tmp_path / "a" / MANIFEST_REL).read_bytes()
    assert hashes[0] == hashes[1]


def test_concurrent_searches_match_sequential(tmp_path: Path) -> None:
    products, queries = bench_vectors(3000, DIM, 64, "clustered", seed=7)
    ids = np.arange(1, len(products) + 1)
    settings = index_settings(product_index.IndexConfig(hnsw_m=16, ef_construction=40), "hnsw", len(products))
    index = ProductIndex(build_faiss_index(products, settings), ids, "hnsw")
    expected = {ef: index.search(queries, 10, ef_search=ef) for ef in (16, 128)}
    errors: list[BaseException] = []

    def worker(ef: int) -> None:
        try:
            for _ in range(20):
                for i in range(0, len(queries), 8):
                    got = index.search(queries[i:i + 8], 10, ef_search=ef)
                    np.testing.assert_array_equal(got[0], expected[ef][0][i:i + 8])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ef,)) for ef in (16, 128, 16, 128)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_bad_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    # missing product table: one error line naming it, exit code 2
    result = subprocess.run([sys.executable, "-m", "serving.index", "--workdir", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "product_table.parquet" in lines[-1]
    assert "Traceback" not in result.stderr
    with pytest.raises(UserError, match="index.manifest.json|index.faiss"):
        ProductIndex.load(tmp_path)
    # bad flags
    with pytest.raises(UserError, match="--hnsw-m"):
        build(tmp_path, "--hnsw-m", "0")
    # dimension mismatch names both dimensions
    publish_tables(tmp_path, unit(rng, 40))
    build(tmp_path)
    index = ProductIndex.load(tmp_path)
    with pytest.raises(DimensionMismatch, match=rf"dimension {DIM + 1}.*dimension {DIM}"):
        index.search(unit(rng, 2, DIM + 1), 3)
    assert issubclass(DimensionMismatch, ValueError) and issubclass(DimensionMismatch, UserError)
    with pytest.raises(ValueError, match="k must be"):
        index.search(unit(rng, 1), 0)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, DIM), np.nan, np.float32), 3)
    # non-finite table vector: named
    bad = unit(rng, 10)
    bad[3, 0] = np.nan
    publish_tables(tmp_path, bad, tag="nan")
    with pytest.raises(UserError, match=r"product_table.parquet.*row_id 4"):
        build(tmp_path)
    # --nlist larger than the table
    publish_tables(tmp_path, unit(rng, 10), tag="small")
    with pytest.raises(UserError, match="--nlist 50"):
        build(tmp_path, "--kind", "ivf", "--nlist", "50")


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_index_with_added_and_replaced_products(tmp_path: Path, kind: str) -> None:
    products, _ = bench_vectors(800, DIM, 1, "clustered", seed=9)
    ids = publish_tables(tmp_path, products)
    build(tmp_path, "--kind", kind, "--hnsw-m", "8", "--ef-construction", "32", "--nlist", "8", "--nprobe", "8")
    published = {rel: (tmp_path / rel).read_bytes() for rel in (INDEX_REL, IDS_REL)}
    rng = np.random.default_rng(10)
    new_ids, new_vectors = np.array([10**9, 10**9 + 1]), unit(rng, 2) * 2.0  # normalised on the way in
    index, index_ids = product_index.index_with(tmp_path, new_ids, new_vectors)
    assert index.ntotal == len(index_ids) == len(ids) + 2 and index_ids[-2:].tolist() == new_ids.tolist()
    grown = ProductIndex(index, index_ids, kind)
    assert grown.search(new_vectors, 1)[0][:, 0].tolist() == new_ids.tolist()
    assert grown.search(products[:50], 1)[0][:, 0].tolist() == ids[:50].tolist()  # the others stay found
    # replacing an indexed product: its old vector is gone (a rebuild), its new one found
    replaced, replaced_ids = product_index.index_with(tmp_path, ids[:1], new_vectors[:1])
    assert replaced.ntotal == len(ids) and int((replaced_ids == ids[0]).sum()) == 1
    found, cosines = ProductIndex(replaced, replaced_ids, kind).search(new_vectors[:1], 1)
    assert found[0, 0] == ids[0] and cosines[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert {rel: (tmp_path / rel).read_bytes() for rel in (INDEX_REL, IDS_REL)} == published  # the set untouched
    with pytest.raises(UserError, match="all-zero vector"):
        product_index.index_with(tmp_path, new_ids[:1], np.zeros((1, DIM), np.float32))


def test_bench_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = product_index.main(["--bench", "--workdir", str(tmp_path), "--bench-n", "2000", "--bench-dim", "16",
                                  "--bench-queries", "60", "--hnsw-m", "8", "--ef-construction", "32",
                                  "--bench-ef-search", "16", "--bench-nprobe", "4"])
    saved = json.loads((tmp_path / "serving" / "index_bench.json").read_text())
    assert set(saved["kinds"]) == {"exact", "hnsw", "ivf"} == set(results["kinds"])
    exact = saved["kinds"]["exact"]["searches"][0]
    assert exact["recall_at_10"] == 1.0 and exact["p99_ms"] >= exact["p50_ms"] > 0
    for kind in ("hnsw", "ivf"):
        entry = saved["kinds"][kind]
        assert entry["index_bytes"] > 0 and entry["rss_peak_build_bytes"] >= entry["rss_before_build_bytes"] > 0
        assert len(entry["searches"]) == 2 and all(0 <= row["recall_at_10"] <= 1 for row in entry["searches"])
    assert "| hnsw | ef_search=128 (default)" in capsys.readouterr().out
