"""Where the ranking stage keeps its files in a run directory: the one definition of the layout.

``DIR/ranking/``::

    <variant>/seed<k>/model.pt, metrics.json   one trained run (its set: ranking.model.trained_set)
    <variant>/seed<k>/manifest.json            the run's provenance manifest
    results.json, results.md                   Table 2 over variants and seeds (ranking.train.results_set)
    results.manifest.json                      their provenance manifest
    cache/<key>/                               the impression cache (ranking.features.ImpressionCache)
    bench.json                                 ranking.bench's figures (plain file)

Names ending in ``_REL`` and :func:`run_rel` are workdir-relative POSIX paths, what
:class:`common.provenance.OutputSet` and :func:`common.io.prepare_workdir` take; :func:`run_dir`
and :func:`cache_dir` are paths under a given workdir.
"""
from __future__ import annotations

from pathlib import Path

ROOT = "ranking"
CACHE_REL = f"{ROOT}/cache"
RESULTS_JSON_REL = f"{ROOT}/results.json"
RESULTS_MD_REL = f"{ROOT}/results.md"
RESULTS_MANIFEST_REL = f"{ROOT}/results.manifest.json"
BENCH_JSON_REL = f"{ROOT}/bench.json"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
RUN_MANIFEST_FILE = "manifest.json"


def run_rel(variant: str, seed: int) -> str:
    """``ranking/<variant>/seed<k>``: the directory of ``variant`` trained with ``seed``, relative to the workdir."""
    return f"{ROOT}/{variant}/seed{seed}"


def run_dir(workdir: str | Path, variant: str, seed: int) -> Path:
    """``DIR/ranking/<variant>/seed<k>``."""
    return Path(workdir) / run_rel(variant, seed)


def cache_dir(workdir: str | Path, key: str) -> Path:
    """``DIR/ranking/cache/<key>``: the impression cache of one impressions file and split."""
    return Path(workdir) / CACHE_REL / key

