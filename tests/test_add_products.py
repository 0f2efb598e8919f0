"""serving.add_products: new products served without retraining, as one atomic update that the running
service's file watch picks up; same bytes from the same inputs; --replace; staleness; bad input
changes nothing served.

Real components throughout: the shared tiny export (tests/serving_fixtures.py), the DashCLIP encoder,
TorchScript, FAISS, Parquet, and ``python -m serving.server`` / ``python -m serving.add_products``
in subprocesses where the process boundary matters.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from common.cli import UserError, run_main
from common.io import file_sha256, read_json
from embeddings import tables
from serving import add_products
from serving import index as product_index
from serving.published import ADDED_FILES, ADDED_MANIFEST
from serving.server import EncoderOnce, Scorer, ServiceProcess, load_served
from tests.serving_fixtures import (MAX_CANDIDATES, copy_served, left_out_products, serving_workdir,  # noqa: F401
                                    write_dashclip_checkpoint)

REPO = Path(__file__).resolve().parents[1]
NEW_TITLE = "Zorbly Quantum Oat Crunch"
PRODUCT_WEIGHT = "model.table_tower.tables.ebc.embedding_bags.product_table.weight"


def new_id(workdir: Path, offset: int = 0) -> int:
    catalog = pq.read_table(workdir / "data" / "catalog.parquet", columns=["product_id"])
    return int(pc.max(catalog.column(0)).as_py()) + 1000 + offset


def write_catalog(workdir: Path, path: Path, ids: list[int], new: dict[int, str] | None = None,
                  **columns: list) -> Path:
    """A catalog file: the catalog rows of ``ids`` (with their images), then title-only products
    ``new`` (id -> title), plus extra ``columns`` (one value per row)."""
    catalog = pq.read_table(workdir / "data" / "catalog.parquet").select(list(add_products.RECORD_COLUMNS))
    rows = catalog.filter(pc.is_in(catalog.column("product_id"), value_set=pa.array(ids, pa.int64())))
    rows = rows.take(pc.index_in(pa.array(ids, pa.int64()), rows.column("product_id")))  # in the order of ids
    new = new or {}
    extra = pa.table({"product_id": pa.array(list(new), pa.int64()), "title": list(new.values()),
                      "aisle": ["snacks"] * len(new), "image": pa.array([None] * len(new), pa.binary()),
                      "brand": pa.array(["Zorbly"] * len(new), pa.string())}).cast(rows.schema)
    table = pa.concat_tables([rows, extra])
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values))
    pq.write_table(table, path)
    return path


def served_bytes(workdir: Path) -> dict[str, str]:
    """SHA-256 of every served file (the export, the index, the added set), for "nothing changed"."""
    return {str(p.relative_to(workdir)): file_sha256(p) for p in sorted((workdir / "serving").rglob("*"))
            if p.is_file() and p.name != "server.log"}


def score_probe(workdir: Path, product_ids: list[int]) -> dict:
    """A /score body for ``product_ids`` with every feature at its documented default."""
    split = read_json(workdir / "serving" / "manifest.json")["features"]
    features = {kind: {e["field"]: e["default"] for e in split["product"] + split["request"] if e["kind"] == kind}
                for kind in ("dense", "sparse")}
    return {"purchase_history": [], "query": "milk", "candidates": [{"product_id": p, **features}
                                                                    for p in product_ids]}


def before_products(workdir: Path) -> int:
    """Products of the exported product table."""
    return len(tables.read_embedding_table(tables.embedding_table_path(workdir, "product")).keys) - 1


def wait_for(client: httpx.Client, key: str, value: object, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = client.get("/healthz").json()
        if health[key] == value:
            return health
        assert time.monotonic() < deadline, f"/healthz never had {key}={value!r}: {health}"
        time.sleep(0.2)


@pytest.mark.slow
def test_added_products_are_served_by_the_running_service(serving_workdir: Path, tmp_path: Path):
    workdir = copy_served(serving_workdir, tmp_path / "live")
    left = [int(i) for i in left_out_products(workdir)[:2]]
    added = new_id(workdir)
    base = int(tables.read_embedding_table(tables.embedding_table_path(workdir, "product")).keys[1])
    catalog = write_catalog(workdir, tmp_path / "new.parquet", left, {added: NEW_TITLE}, dense_price=[3.0, 4.0, 2.5])
    probe = score_probe(workdir, [added, left[0], base])
    command = [sys.executable, "-m", "serving.add_products", "--catalog", str(catalog), "--threads", "1"]
    twin = copy_served(serving_workdir, tmp_path / "twin")  # the same update in another process, meanwhile
    twin_run = subprocess.Popen([*command, "--workdir", str(twin)], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    with ServiceProcess(workdir, threads=1, max_candidates=MAX_CANDIDATES) as proc, \
            httpx.Client(base_url=proc.url, timeout=30.0) as client:
        health = client.get("/healthz").json()
        assert health["added_products"] == 0 and health["funnel"] is True
        before = client.post("/score", json=probe).json()
        assert before["meta"]["unknown_products"] == 2
        found = client.post("/retrieve", json={"query": NEW_TITLE, "k": 3}).json()["products"]
        assert added not in [p["product_id"] for p in found]

        # a client scoring all the time, across the reload: every answer from the old or the new model
        answers: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def keep_scoring() -> None:
            with httpx.Client(base_url=proc.url, timeout=30.0) as other:
                while not stop.is_set():
                    response = other.post("/score", json=probe)
                    answers.append((response.status_code, response.json().get("meta", {}).get("model")))

        scoring = threading.Thread(target=keep_scoring)
        scoring.start()
        try:
            run = subprocess.run([*command, "--workdir", str(workdir)], cwd=REPO, capture_output=True, text=True,
                                 timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            health = wait_for(client, "added_products", 3)
            settled = len(answers)
            while len(answers) < settled + 5:  # a few answers after the reload
                time.sleep(0.05)
        finally:
            stop.set()
            scoring.join(timeout=60)
        assert health["products"] == before_products(workdir) + 3 and health["reload_error"] is None

        found = client.post("/retrieve", json={"query": NEW_TITLE, "k": 3}).json()
        assert found["meta"]["query_encoded"] is True and found["products"][0]["product_id"] == added
        assert found["products"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)  # a title-only product, its own title
        after = client.post("/score", json=probe).json()
        assert after["meta"]["unknown_products"] == 0 and after["meta"]["model"] != before["meta"]["model"]
        assert {status for status, _ in answers} == {200}
        assert {model for _, model in answers} == {before["meta"]["model"], after["meta"]["model"]}
        assert answers[-1][1] == after["meta"]["model"]
        assert all(abs(after["scores"][i] - before["scores"][i]) > 1e-6 for i in (0, 1))  # no longer row 0
        assert after["scores"][2] == pytest.approx(before["scores"][2], abs=1e-6)  # a product served before: unchanged
        recommended = client.post("/recommend", json={"purchase_history": [], "query": NEW_TITLE, "k": 2,
                                                      "candidates_n": MAX_CANDIDATES})
        assert recommended.status_code == 200 and recommended.json()["meta"]["retrieved"] == MAX_CANDIDATES

    manifest = read_json(workdir / ADDED_MANIFEST)
    assert (manifest["added_products"], manifest["replaced_products"]) == (3, 0)
    assert manifest["parity"]["added_products_max_abs_diff"] <= 1e-5 and manifest["parity"]["export_max_abs_diff"] == 0
    features = pq.read_table(workdir / ADDED_FILES["product_features"]).to_pandas().set_index("product_id")
    exported = pq.read_table(workdir / "serving" / "product_features.parquet").to_pandas().set_index("product_id")
    assert features.loc[[*left, added], "dense_price"].tolist() == [3.0, 4.0, 2.5]  # from the catalog's column
    assert features.loc[left, "sparse_brand"].tolist() == exported.loc[left, "sparse_brand"].tolist()  # kept
    brand = next(e for e in read_json(workdir / "serving" / "manifest.json")["features"]["product"]
                 if e["column"] == "sparse_brand")
    assert features.loc[added, "sparse_brand"] == brand["default"]  # a new product without the column
    # the ranker's other weights untouched: every parameter equal, the product table grown by three rows
    old, new = (dict(torch.jit.load(str(workdir / rel)).named_parameters())
                for rel in ("serving/model.pt", ADDED_FILES["model"]))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old if k != PRODUCT_WEIGHT)
    assert torch.equal(new[PRODUCT_WEIGHT][:len(old[PRODUCT_WEIGHT])], old[PRODUCT_WEIGHT])
    assert len(new[PRODUCT_WEIGHT]) == len(old[PRODUCT_WEIGHT]) + 3
    _, errors = twin_run.communicate(timeout=600)
    assert twin_run.returncode == 0, errors[-3000:]
    added_files = {k: v for k, v in served_bytes(workdir).items() if "added" in k}
    assert added_files == {k: v for k, v in served_bytes(twin).items() if "added" in k}  # same inputs, same bytes


@pytest.mark.slow
def test_replace_and_staleness(serving_workdir: Path, tmp_path: Path):
    workdir = copy_served(serving_workdir, tmp_path / "a")
    left, added = [int(i) for i in left_out_products(workdir)[:2]], new_id(workdir)
    catalog = write_catalog(workdir, tmp_path / "new.parquet", left, {added: NEW_TITLE})
    first = add_products.main(["--workdir", str(workdir), "--catalog", str(catalog), "--threads", "1"])

    # an id already served is refused without --replace; nothing changes
    snapshot = served_bytes(workdir)
    with pytest.raises(UserError, match=rf"new.parquet: column 'product_id': product_id {left[0]} .*--replace"):
        add_products.main(["--workdir", str(workdir), "--catalog", str(catalog)])
    assert served_bytes(workdir) == snapshot

    # --replace: a product of the export and one added before, no new rows
    base = int(tables.read_embedding_table(tables.embedding_table_path(workdir, "product")).keys[3])
    replacing = write_catalog(workdir, tmp_path / "replace.parquet", [], {base: "Zorbly Replacement Gadget",
                                                                          added: NEW_TITLE + " Deluxe"})
    replaced = add_products.main(["--workdir", str(workdir), "--catalog", str(replacing), "--replace",
                                  "--threads", "1"])
    assert (replaced["added_products"], replaced["replaced_products"]) == (3, 1)
    assert replaced["products"] == first["products"] and replaced["index"]["products"] == first["index"]["products"]
    funnel = load_served(workdir, EncoderOnce(workdir)).funnel
    assert funnel.retrieve("Zorbly Replacement Gadget", 1).product_ids.tolist() == [base]
    assert funnel.retrieve(NEW_TITLE + " Deluxe", 1).product_ids.tolist() == [added]

    # the index published again: the added set no longer applies, and the next update encodes it anew
    product_index.main(["--workdir", str(workdir), "--kind", "hnsw", "--hnsw-m", "8", "--ef-construction", "32"])
    with pytest.raises(UserError, match="added.manifest.json was made from another .*index"):
        Scorer(workdir)
    later = new_id(workdir, 1)
    add_products.main(["--workdir", str(workdir), "--catalog",
                       str(write_catalog(workdir, tmp_path / "later.parquet", [], {later: "Zorbly Late Arrival"})),
                       "--threads", "1"])
    served = load_served(workdir, EncoderOnce(workdir))
    record = pq.read_table(workdir / ADDED_FILES["products"]).column("product_id").to_pylist()
    assert record == [*left, base, added, later] and served.funnel.index.kind == "hnsw"
    assert served.funnel.retrieve("Zorbly Replacement Gadget", 1).product_ids.tolist() == [base]


@pytest.mark.slow
def test_bad_input_is_one_error_line_and_changes_nothing(serving_workdir: Path, tmp_path: Path, capsys):
    workdir = copy_served(serving_workdir, tmp_path / "w")
    left = [int(i) for i in left_out_products(workdir)[:2]]
    good = write_catalog(workdir, tmp_path / "good.parquet", left)
    no_title = tmp_path / "no_title.parquet"
    pq.write_table(pq.read_table(good).drop_columns(["title"]), no_title)
    broken_image = tmp_path / "broken_image.parquet"
    table = pq.read_table(good)
    pq.write_table(table.set_column(table.column_names.index("image"), "image",
                                    pa.array([b"\x89PNG not really", None], pa.binary())), broken_image)
    not_parquet = tmp_path / "catalog.txt"
    not_parquet.write_text("product_id,title\n1,milk\n")
    cases = [  # catalog, what the error line must name
        (no_title, [str(no_title), "title"]),
        (broken_image, [str(broken_image), "image", "row 0", f"product_id {left[0]}"]),
        (write_catalog(workdir, tmp_path / "bad_price.parquet", left, dense_price=["cheap", "dear"]),
         ["bad_price.parquet", "dense_price"]),
        (write_catalog(workdir, tmp_path / "nan_price.parquet", left, dense_price=[1.0, float("nan")]),
         ["nan_price.parquet", "dense_price", "row 1"]),
        (not_parquet, [str(not_parquet), "Parquet"]),
        (tmp_path / "missing.parquet", ["missing.parquet", "no such file"]),
    ]
    snapshot = served_bytes(workdir)
    for catalog, needles in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(add_products.main, ["--workdir", str(workdir), "--catalog", str(catalog)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and lines[-1].startswith("error: "), (catalog, lines)
        assert all(n in lines[-1] for n in needles), (needles, lines[-1])
        assert served_bytes(workdir) == snapshot and not (workdir / ADDED_MANIFEST).exists()

    # an encoder whose vectors have another dimension than the served table: named, nothing changes
    write_dashclip_checkpoint(workdir, embed_dim=16)
    proc = subprocess.run([sys.executable, "-m", "serving.add_products", "--workdir", str(workdir), "--catalog",
                           str(good)], cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "vector dimension mismatch" in lines[0] and "16-d" in lines[0] and "checkpoints/model.pt" in lines[0]
    assert served_bytes(workdir) == snapshot


def test_the_grown_model_keeps_every_row_and_weight(serving_workdir: Path):
    from ranking.model import load_model

    model = load_model(serving_workdir / read_json(serving_workdir / "serving" / "manifest.json")["checkpoint"]["path"])
    spec = model.spec
    dim = spec.table_dim
    vectors = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    ids = np.array([spec.product_keys[5], 10**9, 10**9 + 1], np.int64)  # one replaced, two new
    grown = add_products.grown_model(model, ids, vectors)
    assert grown.spec.product_keys[:] == [*spec.product_keys, 10**9, 10**9 + 1]
    old, new = model.state_dict(), grown.state_dict()
    weight = new[add_products.PRODUCT_WEIGHT]
    assert torch.equal(weight[5], torch.from_numpy(vectors[0]))
    assert torch.equal(weight[-2:], torch.from_numpy(vectors[1:]))
    keep = torch.ones(len(old[add_products.PRODUCT_WEIGHT]), dtype=torch.bool)
    keep[5] = False
    assert torch.equal(weight[:len(keep)][keep], old[add_products.PRODUCT_WEIGHT][keep])
    assert all(torch.equal(old[k], new[k]) for k in old if k != add_products.PRODUCT_WEIGHT)
