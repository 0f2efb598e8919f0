"""Export a trained ranking model for serving: TorchScript files that load with torch + fbgemm_gpu.

``python -m serving.export --workdir DIR [--variant dcn_pq_hist] [--model-seed 0] [--table-dtype fp32|fp16|int8] [--force]``

Reads ``DIR/ranking/<variant>/seed<k>/model.pt`` with ``k`` = ``--model-seed`` (the run that
``ranking.train`` trained with seed ``k``; :func:`ranking.model.load_model`) and the
evaluation week of ``DIR/data/impressions.parquet`` (through the ranking feature cache). Writes:

``DIR/serving/model.pt``
    The fused model: :class:`ranking.plain.PlainInputModel` (frozen tables inside) traced with
    ``torchrec.fx.symbolic_trace`` and compiled with ``torch.jit.script``.
    ``forward(dense [B,D] f32, sparse_ids [B,S] i64, product_rows [B] i64, query_rows [B] i64,
    history_rows [B,L] i64 (-1 = padding)) -> logits [B]``.
``DIR/serving/model_weights.pt``
    Every tensor of ``model.pt`` by name (``torch.save``): the service maps them from here, so
    its worker processes share one copy (:func:`serving.published.load_served_model`).
``DIR/serving/model_vectors.pt``
    The same weights without the tables (:class:`VectorInputModel`), for a feature store that
    hands over the vectors: ``forward(dense, sparse_ids, product_vec [B,d], query_vec [B|1,d],
    history_vecs [B|1,L,d], history_mask [B|1,L] bool) -> logits [B]``. Only for variants with tables.
``DIR/serving/product_ids.parquet``, ``query_ids.parquet``
    The id maps of the tables inside the model (``row_id`` -> ``product_id`` / normalised ``query``).
``DIR/serving/product_features.parquet``
    The product-level ranking features of every product with impressions (``product_id`` sorted,
    then one column per product-level feature, its value on the product's latest impression), for
    the candidates of ``POST /recommend``. Which features are product-level is decided from the
    impressions (:func:`serving.funnel.feature_split`, rule in :mod:`serving.funnel`).
``DIR/serving/manifest.json``
    Input names, shapes and dtypes, the feature order and dense normalisation, the request field
    names, the feature split (``features``: product-level and request-level columns, the rule and
    each column's default), the sha256 of every file written and of the checkpoint and of the
    table files the model was trained from, the parity check and the NW ROC-AUC of the exported
    model (and its change for fp16/int8 tables).

These files are one :class:`common.provenance.OutputSet` (:func:`export_set`, manifest
``DIR/serving/export.manifest.json``), made from the hashes of the trained set (``model.pt`` and
``metrics.json`` of ``ranking.train``, which must be intact), of the impressions and purchases
tables, and the settings (not ``--threads`` or ``--eval-batch-size``). They are published
together and a rerun with the same inputs and settings is skipped; a forced one writes the same
bytes (the TorchScript archives are written through an open file, so no temp name enters them,
and the command runs with ``PYTHONHASHSEED=0``, see :func:`common.cli.with_fixed_hash_seed`). A file of
an earlier export of a variant with tables that the new set lacks (``model_vectors.pt``, the id
maps) is deleted after the publication.

Parity: the loaded files must score the first ``--parity-rows`` NW impressions like the eager
model (max |logit diff| <= 1e-5), else the export fails and writes nothing.
Reduced-precision tables (``--table-dtype fp16|int8``) swap the frozen tables for torchrec's
quantized EmbeddingBagCollection (``torchrec.quant.embedding_modules``; fbgemm's CPU inference
kernels, row-wise int8 with a per-row scale and bias, outputs in fp32); the rest of the model
stays fp32. The parity check then compares with the eager quantized model, and the AUC change
against fp32 tables is measured on the whole NW split.
"""
# No `from __future__ import annotations` here: fx copies VectorInputModel.forward's signature into
# the traced module, and TorchScript cannot read string annotations there.
import gc
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.cli import (DEFAULT_WORKDIR, UserError, check_config, parse_config, resolve_threads, run_main,
                        threads_field, with_fixed_hash_seed)
from common.io import file_sha256, prepare_workdir, read_json, temp_sibling, write_json, write_parquet
from common.provenance import MadeFrom, OutputSet
from data.dataset import input_hashes
from data.schema import SchemaError
from ranking.features import ImpressionCache, RankingData
from ranking.metrics import roc_auc
from ranking.model import RankingModel, load_model, shared_copy, trained_set
from ranking.plain import PlainInputModel
from ranking.spec import FeatureSpec, PurchaseIndex
from ranking.tables import PRODUCT_TABLE, QUERY_TABLE
from ranking.variants import get_variant
from serving.funnel import feature_split, product_feature_table
from serving.published import (FILES, TABLE_FILES, export_files, export_set, load_served_model, published_export,
                               write_id_map,
                               scripted_tensors)
from serving.requests import request_fields

log = logging.getLogger("serving.export")

MANIFEST_VERSION = 2  # 2: product_features.parquet and the feature split
PARITY_TOLERANCE = 1e-5
TableDtype = Literal["fp32", "fp16", "int8"]
QUANT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "int8": torch.qint8}


@dataclass
class ServingExportConfig:
    """Export a trained ranking model as TorchScript plus a serving manifest (DIR/serving/)."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    variant: str = field(default="dcn_pq_hist", metadata={"help": "ranking variant to export"})
    model_seed: int = field(default=0, metadata={"help": "which trained model: the run of --variant trained with "
                                                         "this seed (DIR/ranking/<variant>/seed<k>)", "min": 0})
    table_dtype: TableDtype = field(default="fp32", metadata={
        "help": "storage of the frozen tables inside the fused model (fp16/int8: torchrec quantized EBC)"})
    parity_rows: int = field(default=4096, metadata={"help": "NW impressions in the parity check", "min": 1})
    eval_batch_size: int = field(default=8192, metadata={"help": "batch size of the NW AUC pass", "min": 1})
    threads: int = threads_field()
    force: bool = field(default=False, metadata={"help": "export again even when the outputs are complete"})

    def check(self) -> None:
        """``--variant`` names a variant (common.cli.check_config runs the per-field rules first)."""
        get_variant(self.variant)



def save_script(module: torch.jit.ScriptModule, path: Path) -> None:
    """``torch.jit.save`` to ``path`` by way of a file named ``archive.pt`` in a fresh directory
    beside it: the archive inside the zip is named after the file, so a temporary name would give
    other bytes on every export, and saving through an open file (which names it ``archive`` too:
    the same bytes) would first copy every tensor into one buffer in memory."""
    directory = temp_sibling(path)
    directory.mkdir()
    try:
        torch.jit.save(module, str(directory / "archive.pt"))
        os.replace(directory / "archive.pt", path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def checkpoint_path(workdir: str | Path, variant: str, model_seed: int) -> Path:
    """``model.pt`` of the run of ``variant`` trained with ``model_seed``."""
    trained = trained_set(workdir, variant, model_seed)
    return trained.path(trained.files[0])


class VectorInputModel(nn.Module):
    """The ranking model with the frozen-table lookups taken out: the vectors are inputs.

    ``forward(dense [B, D] f32, sparse_ids [B, S] i64, product_vec [B, d], query_vec [B|1, d],
    history_vecs [B|1, L, d], history_mask [B|1, L] bool) -> logits [B]``. The purchase history
    is mean-pooled over the unmasked entries (an unknown product counts with a zero vector, an
    empty history pools to zeros) exactly like the MEAN-pooled EBC bag of the fused model.
    A leading dimension of 1 is broadcast over the B candidates (one user and query per request).

    After the lookup it calls the model's own ``DCNTower.interact`` and ``TableTower.interact``,
    so the two scripted files share every layer; the Redis parity test checks they agree.
    """

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        if model.table_tower is None:
            raise ValueError(f"variant {model.variant} has no tables: nothing to take as vector inputs")
        self.plain = PlainInputModel(model)
        self.with_history: bool = model.table_tower.with_history

    def forward(self, dense: torch.Tensor, sparse_ids: torch.Tensor, product_vec: torch.Tensor,
                query_vec: torch.Tensor, history_vecs: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        model = self.plain.model
        no_rows = torch.zeros_like(product_vec[:, 0], dtype=torch.int64)  # sparse-only KJT: empty table bags
        features = self.plain.features(sparse_ids, no_rows, no_rows, no_rows.unsqueeze(1) - 1)
        batch = product_vec.shape[0]
        query = query_vec.expand(batch, -1)
        cosine_pq = F.cosine_similarity(product_vec, query, dim=1, eps=1e-8)
        history = cosine_ph = None
        if self.with_history:
            mask = history_mask.to(history_vecs.dtype)
            weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
            history = (weights.unsqueeze(2) * history_vecs).sum(dim=1).expand(batch, -1)
            cosine_ph = F.cosine_similarity(product_vec, history, dim=1, eps=1e-8)
        table_out = model.table_tower.interact(product_vec, query, cosine_pq, history, cosine_ph)
        return model.head(torch.cat([model.dcn_tower(dense, features), table_out], dim=1)).squeeze(1)


def quantize_tables(model: RankingModel, table_dtype: TableDtype) -> None:
    """Swap the frozen tables' EBC for torchrec's quantized EBC with ``table_dtype`` rows (in place).

    Call after building :class:`PlainInputModel` (it reads the table sizes from the float EBC).
    """
    if table_dtype == "fp32":
        return
    if model.table_tower is None:
        raise UserError(f"--table-dtype {table_dtype}: variant {model.variant} has no tables to quantize")
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

    tables = model.table_tower.tables
    observer = torch.ao.quantization.PlaceholderObserver
    tables.ebc.qconfig = torch.ao.quantization.QConfig(activation=observer.with_args(dtype=torch.float),
                                                       weight=observer.with_args(dtype=QUANT_DTYPES[table_dtype]))
    tables.ebc = QuantEmbeddingBagCollection.from_float(tables.ebc)


def fused_model(model: RankingModel, table_dtype: TableDtype) -> PlainInputModel:
    """What ``model.pt`` holds: ``model`` behind the plain-tensor front door (eval mode), its frozen
    tables swapped in place for ``table_dtype`` ones (:func:`quantize_tables`)."""
    plain = PlainInputModel(model).eval()
    quantize_tables(model, table_dtype)
    return plain


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torchrec.fx.symbolic_trace`` then ``torch.jit.script`` (TorchRec's route to TorchScript)."""
    import torchrec.fx

    return torch.jit.script(torchrec.fx.symbolic_trace(module.eval()))


def table_vectors(model: RankingModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 product ``[Rp, d]`` and query ``[Rq, d]`` tables held by the (unquantized) model."""
    bags = model.table_tower.tables.ebc.embedding_bags
    return bags[PRODUCT_TABLE].weight.detach(), bags[QUERY_TABLE].weight.detach()


def vector_inputs(product: torch.Tensor, query: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The :class:`VectorInputModel` inputs equivalent to the row inputs of a batch (table lookups)."""
    dense, sparse_ids, product_rows, query_rows, history_rows = inputs
    mask = history_rows >= 0
    return dense, sparse_ids, product[product_rows], query[query_rows], product[history_rows.clamp(min=0)], mask


def _inputs_spec(spec: FeatureSpec) -> tuple[list[dict], list[dict]]:
    """Input descriptions of the fused and the vectors model, for the manifest."""
    d, s, l, dim = len(spec.dense_names), len(spec.sparse_names), spec.history_len, spec.table_dim
    return [
        {"name": "dense", "dtype": "float32", "shape": ["B", d], "features": spec.dense_names,
         "note": "raw values; the model normalises with dense_mean/dense_std"},
        {"name": "sparse_ids", "dtype": "int64", "shape": ["B", s], "features": spec.sparse_names,
         "note": "negative ids or ids >= sparse_num_embeddings-1 go to the reserved bucket"},
        {"name": "product_rows", "dtype": "int64", "shape": ["B"], "note": "row in product_ids.parquet; 0 = unknown"},
        {"name": "query_rows", "dtype": "int64", "shape": ["B"], "note": "row in query_ids.parquet; 0 = unknown"},
        {"name": "history_rows", "dtype": "int64", "shape": ["B", l],
         "note": f"product rows of the purchases in the {spec.history_days} days before the request, most recent "
                 f"first, -1 = padding (any L works)"},
    ], [
        {"name": "dense", "dtype": "float32", "shape": ["B", d]},
        {"name": "sparse_ids", "dtype": "int64", "shape": ["B", s]},
        {"name": "product_vec", "dtype": "float32", "shape": ["B", dim]},
        {"name": "query_vec", "dtype": "float32", "shape": ["B or 1", dim]},
        {"name": "history_vecs", "dtype": "float32", "shape": ["B or 1", "L", dim]},
        {"name": "history_mask", "dtype": "bool", "shape": ["B or 1", "L"], "note": "True = a purchase (unknown "
                                                                                      "products count with zeros)"},
    ]


def _write_id_maps(spec: FeatureSpec, paths: dict[str, Path]) -> None:
    write_id_map(spec.product_keys, paths["product_ids"])
    write_id_map(spec.query_keys, paths["query_ids"])


@torch.no_grad()
def _nw_auc(module: nn.Module, data: RankingData, batch_size: int) -> tuple[float, int]:
    labels, logits = [], []
    for batch in data.batches("eval", batch_size):
        logits.append(module(*batch.inputs()).numpy())
        labels.append(batch.labels.numpy())
    y = np.concatenate(labels)
    return roc_auc(y, np.concatenate(logits)), int(len(y))


def _settings(cfg: ServingExportConfig) -> dict:
    return {"variant": cfg.variant, "model_seed": cfg.model_seed, "table_dtype": cfg.table_dtype,
            "parity_rows": cfg.parity_rows, "manifest_version": MANIFEST_VERSION}


def export(cfg: ServingExportConfig) -> dict:
    """Run the export (see module docstring); returns the manifest (``serving/manifest.json``)."""
    workdir = Path(cfg.workdir)
    check_config(cfg)  # also when called with a config built in code
    checkpoint = checkpoint_path(workdir, cfg.variant, cfg.model_seed)
    if not checkpoint.exists():
        raise UserError(f"{checkpoint}: missing ranking model (run `python -m ranking.train --workdir {workdir} "
                        f"--variant {cfg.variant}` first)")
    trained = trained_set(workdir, cfg.variant, cfg.model_seed)
    made_from = MadeFrom({**trained.verify(), **input_hashes(workdir, ["impressions", "purchases"])}, _settings(cfg))
    torch.set_num_threads(resolve_threads(cfg.threads))
    prepare_workdir(workdir, "serving")
    has_tables = get_variant(cfg.variant).uses_tables
    files = export_files(has_tables)
    out = export_set(workdir, has_tables)
    if not cfg.force and out.current(made_from):
        log.info("serving export in %s is complete for these inputs and settings; skipping (--force redoes it)",
                 workdir / "serving")
        return read_manifest(workdir)
    try:
        cache = ImpressionCache.open(workdir)
        purchases = PurchaseIndex.from_workdir(workdir)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    with out.publish(made_from) as staged:
        paths = {key: staged[rel] for key, rel in files.items()}
        manifest = _export_to(paths, cfg, workdir, checkpoint, trained, cache, purchases)
    for rel in set(export_files(True).values()) - set(files.values()):  # an earlier export's table files
        (workdir / rel).unlink(missing_ok=True)
    log.info("exported %s seed %d (%s tables) to %s; model sha256 %s", cfg.variant, cfg.model_seed, cfg.table_dtype,
             workdir / "serving", manifest["files"]["model"]["sha256"][:16])
    return manifest


def read_manifest(workdir: str | Path) -> dict:
    """``serving/manifest.json`` of the published export (checked against its set first)."""
    out = published_export(workdir)
    out.verify()
    return read_json(out.path(export_files(False)["manifest"]))


def _script_models(eager: RankingModel, cfg: ServingExportConfig, paths: dict[str, Path], data: RankingData,
                   inputs: Sequence[torch.Tensor]) -> dict:
    """Script ``eager`` into ``paths["model"]`` (and, with tables, ``paths["vectors_model"]``) and
    return what the loaded files are checked against: the reference logits of ``inputs`` (the
    parity batch), the vectors model's inputs and, for reduced-precision tables, the NW AUC with
    fp32 tables. All of it is computed here, so that the caller can drop ``eager`` (and the
    checkpoint it maps) before loading the files: the tables are then held once at a time."""
    eager_plain = PlainInputModel(eager).eval()
    served_plain = fused_model(shared_copy(eager), cfg.table_dtype)  # over the same tensors
    log.info("tracing and scripting %s (tables %s)", cfg.variant, cfg.table_dtype)
    scripted = script(served_plain)
    save_script(scripted, paths["model"])
    with open(paths["model_weights"], "wb") as f:  # an open file: no temporary name in the archive
        torch.save(scripted_tensors(scripted), f)
    del scripted
    if eager.table_tower is not None:  # traced with gradients on, as the fused one (layers pick ops by grad mode)
        save_script(script(VectorInputModel(shared_copy(eager))), paths["vectors_model"])
    references: dict = {}
    with torch.no_grad():
        references["fused"] = served_plain(*inputs)
        if eager.table_tower is not None:
            references["vectors"] = eager_plain(*inputs)
            references["vector_inputs"] = vector_inputs(*table_vectors(eager), inputs)  # gathered rows: copies
    if cfg.table_dtype != "fp32":
        references["auc_fp32"] = _nw_auc(eager_plain, data, cfg.eval_batch_size)[0]
    return references


def _export_to(paths: dict[str, Path], cfg: ServingExportConfig, workdir: Path, checkpoint: Path,
               trained: OutputSet, cache: ImpressionCache, purchases: PurchaseIndex) -> dict:
    """Script, check and describe the model of ``checkpoint`` into ``paths`` (file key -> temp path
    of the set, keys of :data:`FILES` and, for a model with tables, :data:`TABLE_FILES`); returns
    the manifest. One copy of the tables at a time: the mapped checkpoint while scripting, the
    loaded file while checking it."""
    eager = load_model(checkpoint, variant=cfg.variant)
    spec, has_tables = eager.spec, eager.table_tower is not None
    data = RankingData(cache, purchases, spec)
    if data.num_rows("eval") == 0:
        raise UserError(f"{workdir}/data/impressions.parquet: no NW (last-week) impressions for the parity check")
    parity_batch = data.batch(np.asarray(cache.split_index("eval"))[: cfg.parity_rows])
    inputs = parity_batch.inputs()
    references = _script_models(eager, cfg, paths, data, inputs)
    del eager
    gc.collect()  # scripted and traced modules hold reference cycles; the mapped checkpoint goes with them

    with torch.no_grad():
        self_contained = float((torch.jit.load(str(paths["model"]))(*inputs) - references["fused"]).abs().max())
        gc.collect()
        loaded = load_served_model(paths["model"], paths["model_weights"])  # as the service loads it
        parity = {"rows": len(parity_batch), "tolerance": PARITY_TOLERANCE, "fused_max_abs_diff": self_contained,
                  "fused_mapped_max_abs_diff": float((loaded(*inputs) - references["fused"]).abs().max()),
                  "reference": "eager model" + (f" with {cfg.table_dtype} tables" if cfg.table_dtype != "fp32" else "")}
        if has_tables:
            vectors_loaded = torch.jit.load(str(paths["vectors_model"]))
            parity["vectors_max_abs_diff"] = float(
                (vectors_loaded(*references["vector_inputs"]) - references["vectors"]).abs().max())
    bad = {k: v for k, v in parity.items() if k.endswith("max_abs_diff") and not v <= PARITY_TOLERANCE}
    if bad:
        raise UserError(f"parity check failed on {len(parity_batch)} NW impressions: {bad} exceeds "
                        f"{PARITY_TOLERANCE:g}; nothing exported")
    log.info("parity on %d NW impressions: %s", len(parity_batch), parity)

    auc_exported, n = _nw_auc(loaded, data, cfg.eval_batch_size)
    del loaded
    auc = {"impressions": n, cfg.table_dtype: auc_exported}
    if cfg.table_dtype != "fp32":
        auc_fp32 = references["auc_fp32"]
        auc.update(fp32=auc_fp32, delta=auc_exported - auc_fp32)
        print(f"NW ROC-AUC over {n} impressions: fp32 tables {auc_fp32:.6f}, {cfg.table_dtype} tables "
              f"{auc_exported:.6f} (change {auc_exported - auc_fp32:+.6f})")
    else:
        print(f"NW ROC-AUC over {n} impressions: {auc_exported:.6f} (fp32 tables)")

    if has_tables:
        _write_id_maps(spec, paths)
    split = feature_split(cache, spec)
    product_features = product_feature_table(cache, spec, split)
    write_parquet(product_features, paths["product_features"])
    log.info("feature split: product-level %s; request-level %s", [e["field"] for e in split["product"]],
             [e["field"] for e in split["request"]])
    trained_from = (trained.manifest() or {})["made_from"]["inputs"]
    sources = {rel.split("/")[-1].removesuffix("_table.parquet"): {"path": rel, "sha256": digest}
               for rel, digest in trained_from.items() if rel.startswith("embeddings/") and digest}
    fused_inputs, vector_input_spec = _inputs_spec(spec)
    import fbgemm_gpu  # noqa: F401  (version for the manifest)
    import torchrec

    file_names = {**FILES, **TABLE_FILES}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "variant": cfg.variant, "seed": cfg.model_seed, "table_dtype": cfg.table_dtype,
        "settings": _settings(cfg),
        "checkpoint": {"path": str(checkpoint.relative_to(workdir)), "sha256": file_sha256(checkpoint)},
        "files": {key: {"path": file_names[key], "sha256": file_sha256(path), "bytes": path.stat().st_size}
                  for key, path in paths.items() if key != "manifest"},
        "source_tables": sources,
        "inputs": fused_inputs,
        "vectors_inputs": vector_input_spec if has_tables else [],
        "output": {"name": "logits", "dtype": "float32", "shape": ["B"], "note": "click probability = sigmoid(logits)"},
        "feature_spec": spec.to_dict(),
        "request_fields": {kind: [{"field": key, "column": column} for key, column in names.items()]
                           for kind, names in request_fields(spec).items()},
        "table_rows": {"product": spec.num_product_rows, "query": spec.num_query_rows},
        "features": {**split, "file": FILES["product_features"], "products": product_features.num_rows,
                     "as_of": int(cache.meta.max_ts)},
        "data_max_ts": int(cache.meta.max_ts),
        "parity": parity,
        "nw_auc": auc,
        "versions": {"torch": torch.__version__, "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "unknown"),
                     "torchrec": getattr(torchrec, "__version__", "unknown")},
        "load": "import torch, fbgemm_gpu; torch.jit.load(path)",
    }
    write_json(manifest, paths["manifest"])
    return manifest


def main(argv: Sequence[str] | None = None) -> dict:
    return export(parse_config(ServingExportConfig, argv))


if __name__ == "__main__":
    with_fixed_hash_seed("serving.export")
    run_main(main)
