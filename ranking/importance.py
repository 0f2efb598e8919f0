"""Feature importance of a trained ranking model with Captum (paper sec. 4.2.3).

``python -m ranking.importance --workdir DIR [--variant dcn_pq_hist] [--model-seed 0] [--seed 0]
[--method permutation|ablation|ig|all] [--repeats 5] [--max-rows N] [--force]``

Reads ``DIR/ranking/<variant>/seed<k>/model.pt`` with ``k`` = ``--model-seed`` (the run that
``python -m ranking.train`` trained with seed ``k``; its set must be intact) and the evaluation week ("NW", the last 7 days of ``DIR/data/impressions.parquet``); writes
``DIR/importance/importance.json``, ``importance.md`` (ranked table) and ``importance.png`` as one
:class:`common.provenance.OutputSet` (manifest ``DIR/importance/manifest.json``) made from the
trained set's hashes, the impressions and purchases tables' hashes and the settings (not
``--threads`` or ``--batch-size``); a rerun with the same inputs and settings is skipped.

The work is done by :mod:`ranking.attribution`: the model fed with its looked-up values so that
each vector and cosine can be permuted on its own (:mod:`~ranking.attribution.interaction`), the
feature groups (:mod:`~ranking.attribution.groups`), the Captum methods permutation, ablation and
integrated gradients (:mod:`~ranking.attribution.methods`) and the report
(:mod:`~ranking.attribution.report`). ``all`` runs the three methods and adds their agreement.

Rows: the NW impressions, or ``--max-rows`` of them drawn without replacement with ``--seed``
(``--ig-max-rows`` bounds the integrated-gradients rows further); ``--seed`` also draws the
permutations. Same model, same seed, same numbers.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, resolve_threads, run_main, threads_field
from common.io import prepare_workdir, read_json, write_json, write_text
from common.provenance import MadeFrom, OutputSet
from common.seed import seed_everything
from data.dataset import input_hashes
from data.schema import SchemaError, table_path
from ranking.attribution.groups import build_inputs
from ranking.attribution.interaction import InteractionInputModel
from ranking.attribution.methods import METHODS, batched_forward, run_methods
from ranking.attribution.report import importance_markdown, importance_report, plot_importance
from ranking.features import ImpressionCache, RankingData
from ranking.metrics import roc_auc
from ranking.model import load_model, trained_set
from ranking.spec import PurchaseIndex
from ranking.variants import get_variant

log = logging.getLogger(__name__)

Method = Literal["permutation", "ablation", "ig", "all"]


@dataclass
class ImportanceConfig:
    """Feature importance of a trained ranking model (Captum) on the evaluation week."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    variant: str = field(default="dcn_pq_hist", metadata={"help": "ranking variant whose model to explain"})
    model_seed: int = field(default=0, metadata={"help": "which trained model: the run of --variant trained with this "
                                                         "seed (DIR/ranking/<variant>/seed<k>/model.pt)", "min": 0})
    seed: int = field(default=0, metadata={"help": "random seed of the row subset and the permutations", "min": 0})
    method: Method = field(default="permutation", metadata={"help": "Captum method, or 'all' for the three and their agreement"})
    repeats: int = field(default=5, metadata={"help": "permutations per group (mean ± std of the AUC drop)", "min": 1})
    max_rows: int = field(default=50_000, metadata={"help": "NW impressions used (random subset with --seed; 0 = all)",
                                                    "min": 0})
    ig_steps: int = field(default=32, metadata={"help": "integrated-gradients steps", "min": 2})
    ig_max_rows: int = field(default=5_000, metadata={"help": "rows for integrated gradients (a subset of the rows above; 0 = all)",
                                                      "min": 0})
    batch_size: int = field(default=8192, metadata={"help": "forward batch size", "min": 1})
    threads: int = threads_field()
    force: bool = field(default=False, metadata={"help": "recompute even if the outputs are complete for these settings"})

    def check(self) -> None:
        """``--variant`` names a variant (common.cli.check_config runs the per-field rules first)."""
        get_variant(self.variant)


def importance_set(workdir: str | Path) -> OutputSet:
    """The output set of this stage: ``importance.json``, ``importance.md`` and ``importance.png``."""
    return OutputSet(workdir, "importance/manifest.json", [f"importance/importance.{ext}" for ext in ("json", "md", "png")],
                     what="python -m ranking.importance")


def _made_from(cfg: ImportanceConfig, model_hashes: dict[str, str]) -> MadeFrom:
    """What the outputs are made from: the trained set's and the impressions and purchases tables'
    hashes, and the settings that change the numbers."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force", "threads", "batch_size")}
    return MadeFrom({**model_hashes, **input_hashes(cfg.workdir, ["impressions", "purchases"])}, settings)


def trained_model(cfg: ImportanceConfig) -> tuple[Path, dict[str, str]]:
    """The path of the model of ``cfg.variant`` / ``cfg.model_seed`` and the hashes of its (intact)
    set; a clear error when it has not been trained. The model itself is not loaded: a current
    output set is recognised from the hashes alone."""
    trained = trained_set(cfg.workdir, cfg.variant, cfg.model_seed)
    path = trained.path(trained.files[0])
    if not path.exists():
        raise UserError(f"{path}: missing ranking model; run `python -m ranking.train --workdir {cfg.workdir} "
                        f"--variant {cfg.variant} --seeds {cfg.model_seed + 1}` first")
    return path, trained.verify()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the stage (or skip it when its outputs are current); returns the report."""
    cfg = parse_config(ImportanceConfig, argv)
    workdir = Path(cfg.workdir)
    model_path, model_hashes = trained_model(cfg)
    prepare_workdir(workdir, "importance")
    out = importance_set(workdir)
    json_rel, md_rel, png_rel = out.files
    made_from = _made_from(cfg, model_hashes)
    if not cfg.force and out.current(made_from):
        log.info("%s is complete for these inputs and settings; skipping (--force redoes it)", out.path(json_rel))
        return read_json(out.path(json_rel))

    model = load_model(model_path, variant=cfg.variant)
    torch.set_num_threads(resolve_threads(cfg.threads))
    try:
        cache = ImpressionCache.open(workdir)
        purchases = PurchaseIndex.from_workdir(workdir)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    spec = model.spec
    if (list(cache.meta.dense_names), list(cache.meta.sparse_names)) != (list(spec.dense_names), list(spec.sparse_names)):
        raise UserError(f"{model_path}: trained on features {spec.dense_names + spec.sparse_names}, but "
                        f"{table_path(workdir, 'impressions')} has {cache.meta.dense_names + cache.meta.sparse_names}; "
                        "retrain with `python -m ranking.train --force`")
    rng = seed_everything(cfg.seed)
    eval_rows = np.asarray(cache.split_index("eval"))
    if cfg.max_rows and len(eval_rows) > cfg.max_rows:
        eval_rows = np.sort(rng.choice(eval_rows, cfg.max_rows, replace=False))
    if len(eval_rows) < 2:
        raise UserError(f"{table_path(workdir, 'impressions')}: {len(eval_rows)} impressions in the evaluation "
                        "week; permutation importance needs at least 2")
    inputs = build_inputs(model, RankingData(cache, purchases, spec), eval_rows, cfg.batch_size)
    if len(np.unique(inputs.labels)) < 2:
        raise UserError(f"{table_path(workdir, 'impressions')}: the evaluation week has only "
                        f"{'clicks' if inputs.labels[0] else 'non-clicks'}; ROC-AUC is undefined")
    vmodel = InteractionInputModel(model).eval()
    with torch.no_grad():
        logits = batched_forward(vmodel, inputs, cfg.batch_size)(*inputs.captum_inputs()).double().numpy()
    baseline_auc = roc_auc(inputs.labels, logits)
    log.info("%s seed %d: NW ROC-AUC %.4f on %d impressions, %d feature groups", cfg.variant, cfg.model_seed,
             baseline_auc, len(eval_rows), len(inputs.groups))

    methods = list(METHODS) if cfg.method == "all" else [cfg.method]
    results = run_methods(vmodel, inputs, logits, methods, repeats=cfg.repeats, seed=cfg.seed, ig_steps=cfg.ig_steps,
                          ig_max_rows=cfg.ig_max_rows, batch_size=cfg.batch_size)
    report = importance_report(
        results, inputs.groups, method=cfg.method, variant=cfg.variant, model_seed=cfg.model_seed,
        baseline_auc=baseline_auc,
        rows=int(len(eval_rows)), settings={k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force")},
        model=str(model_path.relative_to(workdir)))
    with out.publish(made_from) as staged:
        write_json(report, staged[json_rel])
        write_text(importance_markdown(report), staged[md_rel])
        plot_importance(report, staged[png_rel])
    log.info("wrote %s, %s and %s", *(out.path(rel) for rel in out.files))
    return report


if __name__ == "__main__":
    run_main(main)
