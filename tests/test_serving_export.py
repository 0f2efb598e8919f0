"""serving.export: TorchScript parity, a fresh process with torch + fbgemm_gpu only, the manifest, fp16 tables."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from common.cli import UserError, run_main
from common.io import file_sha256, read_json
from embeddings.tables import embedding_table_path
from ranking import layout
from ranking.features import ImpressionCache, RankingData
from ranking.model import load_model
from ranking.plain import PlainInputModel
from ranking.spec import PurchaseIndex
from serving import export
from tests.serving_fixtures import copy_workdir, serving_workdir  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def _nw_batch(workdir: Path, rows: int = 300):
    model = load_model(export.checkpoint_path(workdir, "dcn_pq_hist", 0))
    cache = ImpressionCache.open(workdir)
    data = RankingData(cache, PurchaseIndex.from_workdir(workdir), model.spec)
    return model, data.batch(np.asarray(cache.split_index("eval"))[:rows])


def test_manifest_records_hashes_inputs_and_parity(serving_workdir: Path):
    out = serving_workdir / "serving"
    manifest = read_json(out / "manifest.json")
    assert set(manifest["files"]) == {"model", "model_weights", "vectors_model", "product_ids", "query_ids",
                                      "product_features"}
    for entry in manifest["files"].values():
        assert file_sha256(out / entry["path"]) == entry["sha256"]
    published = export.published_export(serving_workdir).verify()  # one set, with the descriptive manifest
    assert set(published) == {f"serving/{e['path']}" for e in manifest["files"].values()} | {"serving/manifest.json"}
    for kind in ("product", "query"):
        assert manifest["source_tables"][kind]["sha256"] == file_sha256(embedding_table_path(serving_workdir, kind))
    checkpoint = export.checkpoint_path(serving_workdir, "dcn_pq_hist", 0)
    assert manifest["checkpoint"]["sha256"] == file_sha256(checkpoint)
    assert [i["name"] for i in manifest["inputs"]] == ["dense", "sparse_ids", "product_rows", "query_rows", "history_rows"]
    spec = load_model(checkpoint).spec
    assert manifest["inputs"][0]["features"] == spec.dense_names == manifest["feature_spec"]["dense_names"]
    assert manifest["feature_spec"]["dense_mean"] == spec.dense_mean
    assert [f["column"] for f in manifest["request_fields"]["sparse"]] == spec.sparse_names
    assert manifest["request_fields"]["dense"][0] == {"field": spec.dense_names[0].removeprefix("dense_"),
                                                      "column": spec.dense_names[0]}
    parity = manifest["parity"]
    assert max(parity["fused_max_abs_diff"], parity["fused_mapped_max_abs_diff"], parity["vectors_max_abs_diff"]) <= 1e-5
    assert manifest["parity"]["rows"] > 0 and 0.0 <= manifest["nw_auc"]["fp32"] <= 1.0


def test_the_feature_split_and_the_product_features_follow_the_impressions(serving_workdir: Path):
    split = read_json(serving_workdir / "serving" / "manifest.json")["features"]
    spec = load_model(export.checkpoint_path(serving_workdir, "dcn_pq_hist", 0)).spec
    levels = {e["column"]: e.get("value", "request") for e in split["product"] + split["request"]}
    assert sorted(levels) == sorted(spec.dense_names + spec.sparse_names)
    # the synthetic marketplace's features (data/synth/simulate.py): what the rule should find
    assert levels["dense_price"] == levels["sparse_brand"] == levels["sparse_product"] == "one value per product"
    assert levels["dense_product_ctr_past"].startswith("value on the product's latest impression")
    assert levels["dense_hour"] == levels["sparse_platform"] == levels["sparse_weekday"] == "request"
    impressions = pq.read_table(serving_workdir / "data" / "impressions.parquet").to_pandas()
    day = impressions["ts"].dt.floor("D")
    for entry in split["product"]:
        assert impressions.groupby(["product_id", day])[entry["column"]].nunique().max() == 1, entry["column"]
    for entry in split["request"]:
        per_product_day = impressions.groupby(["product_id", day])[entry["column"]].nunique().max()
        assert per_product_day > 1 or impressions.groupby(day)[entry["column"]].nunique().max() == 1, entry["column"]
    latest = impressions.sort_values(["product_id", "ts"], kind="stable").groupby("product_id").tail(1)
    table = pq.read_table(serving_workdir / "serving" / "product_features.parquet").to_pandas()
    assert table["product_id"].tolist() == sorted(impressions["product_id"].unique())
    assert list(table.columns) == ["product_id", *(e["column"] for e in split["product"])]
    for entry in split["product"]:
        np.testing.assert_array_equal(table[entry["column"]].to_numpy(), latest[entry["column"]].to_numpy())
    means = dict(zip(spec.dense_names, spec.dense_mean))
    assert all(e["default"] == means[e["column"]] for e in split["product"] + split["request"] if e["kind"] == "dense")
    reserved = dict(zip(spec.sparse_names, spec.sparse_num_embeddings))
    assert all(e["default"] == reserved[e["column"]] - 1 for e in split["product"] if e["kind"] == "sparse")


def test_exported_files_score_like_the_eager_model(serving_workdir: Path):
    model, batch = _nw_batch(serving_workdir)
    with torch.no_grad():
        eager = PlainInputModel(model).eval()(*batch.inputs())
        fused = torch.jit.load(str(serving_workdir / "serving" / "model.pt"))(*batch.inputs())
        product, query = export.table_vectors(model)
        vectors = torch.jit.load(str(serving_workdir / "serving" / "model_vectors.pt"))(
            *export.vector_inputs(product, query, batch.inputs()))
    assert (batch.history_rows >= 0).any(), "the parity batch should include purchase histories"
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(vectors, eager, atol=1e-5, rtol=0)


def test_the_served_model_maps_its_tensors_from_the_weights_file(serving_workdir: Path, tmp_path: Path):
    """load_served_model: model.pt's module with every tensor mapped from model_weights.pt (the pages
    the service's workers share), scoring bit for bit like torch.jit.load of model.pt; a weights
    file of another model is a one-line error naming it."""
    from common.cli import UserError
    from serving.published import load_served_model, scripted_tensors

    out = serving_workdir / "serving"
    _, batch = _nw_batch(serving_workdir)
    mapped = load_served_model(out / "model.pt", out / "model_weights.pt")
    tensors = scripted_tensors(mapped)
    assert not any(t.is_meta for t in tensors.values())
    table = next(t for name, t in tensors.items() if name.endswith("query_table.weight"))
    mappings = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    weights_ranges = [[int(a, 16) for a in m[0].split("-")] for m in mappings
                      if len(m) == 6 and m[5] == str(out / "model_weights.pt")]
    assert any(start <= table.data_ptr() < end for start, end in weights_ranges)  # mapped from the file, not read
    with torch.no_grad():
        assert torch.equal(mapped(*batch.inputs()), torch.jit.load(str(out / "model.pt"))(*batch.inputs()))
    other = torch.load(out / "model_weights.pt", weights_only=True)
    other.pop(next(iter(other)))
    torch.save(other, tmp_path / "model_weights.pt")
    with pytest.raises(UserError, match="model_weights.pt: its tensors are not those of"):
        load_served_model(out / "model.pt", tmp_path / "model_weights.pt")


def test_fresh_process_loads_with_torch_and_fbgemm_only(serving_workdir: Path, tmp_path: Path):
    model, batch = _nw_batch(serving_workdir)
    with torch.no_grad():
        expected = PlainInputModel(model).eval()(*batch.inputs())
    torch.save(dict(zip(("dense", "sparse_ids", "product_rows", "query_rows", "history_rows"), batch.inputs())),
               tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, json, torch, fbgemm_gpu
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        model = torch.jit.load({str(serving_workdir / 'serving' / 'model.pt')!r})
        with torch.no_grad():
            logits = model(inputs["dense"], inputs["sparse_ids"], inputs["product_rows"], inputs["query_rows"],
                           inputs["history_rows"])
        mods = sorted(m.split(".")[0] for m in sys.modules)
        print(json.dumps({{"logits": logits.tolist(), "torchrec": "torchrec" in sys.modules,
                          "ranking": "ranking" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torchrec"] is False and result["ranking"] is False
    np.testing.assert_allclose(result["logits"], expected.numpy(), atol=1e-5, rtol=0)


def test_rerun_skips_and_fp16_tables_report_the_auc_change(serving_workdir: Path, tmp_path: Path, capsys):
    before = (serving_workdir / "serving" / "model.pt").stat().st_mtime_ns
    export.main(["--workdir", str(serving_workdir), "--threads", "1"])
    assert (serving_workdir / "serving" / "model.pt").stat().st_mtime_ns == before

    workdir = copy_workdir(serving_workdir, tmp_path / "fp16")
    manifest = export.main(["--workdir", str(workdir), "--table-dtype", "fp16", "--threads", "1"])
    auc = manifest["nw_auc"]
    assert set(auc) == {"impressions", "fp32", "fp16", "delta"}
    assert auc["delta"] == pytest.approx(auc["fp16"] - auc["fp32"]) and abs(auc["delta"]) < 0.01
    assert auc["fp32"] == pytest.approx(read_json(serving_workdir / "serving" / "manifest.json")["nw_auc"]["fp32"])
    assert "fp16 tables" in capsys.readouterr().out
    assert max(manifest["parity"]["fused_max_abs_diff"], manifest["parity"]["fused_mapped_max_abs_diff"]) <= 1e-5
    model, batch = _nw_batch(workdir)
    from serving.published import load_served_model
    with torch.no_grad():
        fp32 = PlainInputModel(model).eval()(*batch.inputs())
        fp16 = torch.jit.load(str(workdir / "serving" / "model.pt"))(*batch.inputs())
        mapped = load_served_model(workdir / "serving" / "model.pt", workdir / "serving" / "model_weights.pt")
        assert torch.equal(mapped(*batch.inputs()), fp16)  # the quantized tables map like fp32 ones
    diff = (fp16 - fp32).abs().max().item()
    assert 0 < diff < 1e-2, "fp16 rows change the logits a little, not at all or a lot"


def test_a_checkpoint_of_another_variant_is_named(serving_workdir: Path):
    path = export.checkpoint_path(serving_workdir, "dcn_pq_hist", 0)
    assert load_model(path, variant="dcn_pq_hist").variant == "dcn_pq_hist"
    with pytest.raises(UserError, match="holds variant 'dcn_pq_hist', expected 'dcn'"):
        load_model(path, variant="dcn")


def test_missing_checkpoint_is_a_one_line_error(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(export.main, ["--workdir", str(tmp_path), "--model-seed", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seed3/model.pt" in err and "ranking.train" in err and "Traceback" not in err


def test_a_mixed_trained_set_is_refused_and_nothing_is_exported(serving_workdir: Path, tmp_path: Path, capsys):
    workdir = copy_workdir(serving_workdir, tmp_path / "mixed")
    metrics = layout.run_dir(workdir, "dcn_pq_hist", 0) / layout.METRICS_FILE
    metrics.write_text(metrics.read_text().replace('"seed": 0', '"seed": 0 '))  # as if another run wrote it
    with pytest.raises(SystemExit) as exit_info:
        run_main(export.main, ["--workdir", str(workdir), "--threads", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "metrics.json" in err[-1] and "ranking.train" in err[-1]
    assert not (workdir / "serving").exists()


def test_forced_export_writes_the_same_bytes(serving_workdir: Path, tmp_path: Path):
    """Two processes exporting the same checkpoint write byte-identical TorchScript files."""
    written = []
    for run in ("a", "b"):
        workdir = copy_workdir(serving_workdir, tmp_path / run)
        proc = subprocess.run([sys.executable, "-m", "serving.export", "--workdir", str(workdir), "--force",
                               "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        written.append({name: (workdir / "serving" / name).read_bytes()
                        for name in ("model.pt", "model_weights.pt", "model_vectors.pt")})
    assert written[0] == written[1]
