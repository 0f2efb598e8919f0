"""Trusting the embedding stages' outputs: reuse only for the same data and settings, checkpoints
that load as plain data, byte-identical reruns, validation before anything is changed."""
from __future__ import annotations

import hashlib
import json
import logging
import pickletools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.cli import UserError
from data import synth
from embeddings import encode, export, runtime, tables, train

REPO = Path(__file__).resolve().parents[1]
# two steps of each stage with the tiny random backbone
FLAGS = ["--backbone", "tiny", "--image-size", "32", "--stage1-batch-size", "16", "--stage1-max-steps", "2",
         "--eval-every", "2", "--stage1-eval-max", "32", "--stage2-batch-size", "16", "--stage2-max-steps", "2",
         "--pqc-negatives", "4", "--stage2-eval-max", "32", "--threads", "1"]
STAGE1 = "embeddings/checkpoints/stage1.pt"
PUBLISHED = (STAGE1, "embeddings/checkpoints/model.pt", "embeddings/config.json",
             "embeddings/product_table.parquet", "embeddings/query_table.parquet")


def train_and_export(workdir: Path, *extra: str) -> None:
    train.main(["--workdir", str(workdir), *FLAGS, *extra])
    export.main(["--workdir", str(workdir)])


def digests(workdir: Path, rels=PUBLISHED) -> dict[str, str]:
    return {rel: hashlib.sha256((workdir / rel).read_bytes()).hexdigest() for rel in rels}


def skipped(caplog: pytest.LogCaptureFixture) -> int:
    return sum("skipping" in r.getMessage() for r in caplog.records)


class Payload:
    """Unpickling this object opens (creates) ``marker``: code run by a checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "step": 1}, path)


def payload_calls(path: Path) -> list[tuple[str, str | None]]:
    """The opcodes of a checkpoint's pickle that import or call something."""
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    return [(op.name, arg) for op, arg, _ in pickletools.genops(pickled)
            if op.name in ("GLOBAL", "STACK_GLOBAL", "REDUCE")]


def test_new_data_retrains_and_reexports(tiny_workdir_copy: Path, caplog: pytest.LogCaptureFixture):
    workdir = tiny_workdir_copy
    caplog.set_level(logging.INFO)
    train_and_export(workdir)
    before = digests(workdir)
    stage1_made_from = runtime.stage_set(workdir, 1).manifest()["made_from"]
    caplog.clear()
    train_and_export(workdir)  # same data, same settings: everything is reused
    assert skipped(caplog) == 3 and digests(workdir) == before

    synth.main(["--profile", "tiny", "--workdir", str(workdir), "--seed", "1"])  # other data, same settings
    caplog.clear()
    train_and_export(workdir)
    assert skipped(caplog) == 0
    after = digests(workdir)
    changed = {rel for rel in PUBLISHED if after[rel] != before[rel]}
    # stage 1 keeps its best evaluated step: when that is step 0 (the initial weights, which the
    # data does not change) stage1.pt is byte-identical, but it was remade from the new data
    log = json.loads((workdir / "embeddings" / "train_log.json").read_text())
    unchanged_ok = {"embeddings/config.json"} | ({STAGE1} if log["stage1"]["best_step"] == 0 else set())
    assert set(PUBLISHED) - unchanged_ok <= changed
    assert runtime.stage_set(workdir, 1).manifest()["made_from"] != stage1_made_from
    catalog = pq.read_table(workdir / "data" / "catalog.parquet").to_pandas()
    products = tables.read_embedding_table(tables.embedding_table_path(workdir, "product"), "product")
    assert products.keys[1:] == catalog["product_id"].tolist()
    some = catalog.iloc[:6]
    np.testing.assert_allclose(products.vectors[1:7], encode.load_encoder(workdir).products(some), atol=1e-5)
    recorded = tables.tables_set(workdir).verify()
    assert recorded == {rel: after[rel] for rel in recorded}
    manifest = tables.tables_set(workdir).manifest()
    assert manifest["made_from"]["inputs"]["data/catalog.parquet"] == hashlib.sha256(
        (workdir / "data" / "catalog.parquet").read_bytes()).hexdigest()


def test_an_interrupted_run_resumes_only_on_the_same_data(tiny_workdir_copy: Path, caplog: pytest.LogCaptureFixture):
    workdir = tiny_workdir_copy
    caplog.set_level(logging.INFO)
    one_step = ["--workdir", str(workdir), *FLAGS, "--max-steps-this-run", "1"]
    assert train.main(one_step)["stage1"]["steps_done"] == 1
    synth.main(["--profile", "tiny", "--workdir", str(workdir), "--seed", "1"])
    caplog.clear()
    assert train.main(one_step)["stage1"]["steps_done"] == 1
    assert "stage1_last.pt is from other data or settings; starting over" in caplog.text
    assert train.main(one_step)["stage1"]["steps_done"] == 2  # the same data: resumed


def test_fresh_runs_write_identical_bytes(tiny_workdir: Path, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        shutil.copytree(tiny_workdir / "data", tmp_path / name / "data")
        train_and_export(tmp_path / name)
        runs.append(digests(tmp_path / name))
    assert runs[0] == runs[1]
    train.main(["--workdir", str(tmp_path / "a"), *FLAGS, "--force"])
    export.main(["--workdir", str(tmp_path / "a"), "--force"])
    assert digests(tmp_path / "a") == runs[0]


def test_checkpoints_load_as_plain_data_only(tiny_workdir_copy: Path, tmp_path: Path):
    # the payload is real: its pickle calls open(marker, "w") (read with pickletools, never unpickled)
    control = tmp_path / "control.pt"
    write_payload(control, tmp_path / "control-ran")
    assert payload_calls(control) == [("GLOBAL", "io open"), ("REDUCE", None)]

    workdir = tiny_workdir_copy
    marker = tmp_path / "payload-ran"
    write_payload(workdir / "embeddings" / "checkpoints" / "stage1_last.pt", marker)
    proc = subprocess.run([sys.executable, "-m", "embeddings.train", "--workdir", str(workdir), *FLAGS],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "stage1_last.pt" in last and "Traceback" not in proc.stderr
    assert not marker.exists()

    model = workdir / "embeddings" / "checkpoints" / "model.pt"
    write_payload(model, marker)
    with pytest.raises(UserError, match="model.pt: not a DashCLIP checkpoint") as refused:
        encode.load_encoder(workdir, "trained")
    assert "\n" not in str(refused.value) and not marker.exists()
    torch.save(torch.zeros(2), model)
    with pytest.raises(UserError, match="model.pt: not a DashCLIP checkpoint .*Tensor"):
        runtime.load_checkpoint(model)
    model.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError, match="model.pt: not a DashCLIP checkpoint"):
        runtime.load_checkpoint(model)


def test_force_keeps_the_outputs_when_data_is_bad_or_training_diverges(tiny_workdir_copy: Path):
    workdir = tiny_workdir_copy
    (workdir / "data" / "manifest.json").unlink()  # hand-placed data, edited below
    train.main(["--workdir", str(workdir), *FLAGS])
    published = ("embeddings/checkpoints/stage1.pt", "embeddings/checkpoints/model.pt", "embeddings/config.json")
    before = digests(workdir, published)

    path = workdir / "data" / "catalog.parquet"
    shutil.copy2(path, workdir / "catalog.good")
    catalog = pq.read_table(path)
    images = catalog.column("image").to_pylist()
    images[3] = b"\x89PNG not really"
    pq.write_table(catalog.set_column(catalog.column_names.index("image"), "image", pa.array(images, pa.binary())),
                   path)
    with pytest.raises(UserError, match=r"catalog\.parquet: column 'image': unreadable image at row 3") as bad:
        train.main(["--workdir", str(workdir), *FLAGS, "--force"])
    assert "\n" not in str(bad.value)
    assert digests(workdir, published) == before

    shutil.copy2(workdir / "catalog.good", path)
    with pytest.raises(UserError, match="stage 1 diverged .* not finite; nothing was published"):
        train.main(["--workdir", str(workdir), *FLAGS, "--force", "--stage1-lr", "1e30", "--head-lr", "1e30"])
    assert digests(workdir, published) == before
    assert runtime.stage_set(workdir, 2).verify()  # still the published set
