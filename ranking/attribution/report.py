"""The importance report: ``importance.json`` (as a dict), the ranked markdown table and the plot.

With several methods, the report adds the Spearman rank correlation of every pair of methods'
scores (``agreement``); its top-level ``groups`` are the first method's results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_path
from ranking.attribution.groups import FeatureGroup
from ranking.attribution.methods import METRICS, MethodResult


def _json_number(x: float) -> float | None:
    """``x`` as a float, NaN as None (JSON null)."""
    x = float(x)
    return None if np.isnan(x) else x


def groups_json(result: MethodResult, groups: list[FeatureGroup]) -> dict[str, dict]:
    """Group name -> score, score_std, rank, attribution and kind of one method's result."""
    ranks = result.ranks()
    return {g.name: {"score": _json_number(result.scores[i]), "score_std": _json_number(result.score_std[i]),
                     "rank": int(ranks[i]), "attribution": _json_number(result.attribution[i]), "kind": g.kind}
            for i, g in enumerate(groups)}


def agreement(results: dict[str, MethodResult]) -> dict[str, dict]:
    """Spearman rank correlation of the scores of every pair of methods."""
    from scipy.stats import spearmanr

    out = {}
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ok = ~(np.isnan(results[a].scores) | np.isnan(results[b].scores))
            rho, p = spearmanr(results[a].scores[ok], results[b].scores[ok]) if ok.sum() > 2 else (np.nan, np.nan)
            out[f"{a}_vs_{b}"] = {"spearman": _json_number(rho), "p_value": _json_number(p), "groups": int(ok.sum())}
    return out


def importance_report(results: dict[str, MethodResult], groups: list[FeatureGroup], *, method: str, variant: str,
                      model_seed: int, baseline_auc: float, rows: int, settings: dict[str, Any], model: str) -> dict:
    """The ``importance.json`` content: ``results`` (method -> result, in run order) over ``groups``,
    ``method`` as asked (a method or ``all``), the explained ``variant`` and, as ``seed``, the seed
    its model was trained with (``model_seed``, as in its ``metrics.json``), the model's
    ``baseline_auc`` on the ``rows`` impressions, the ``settings`` and the ``model`` path."""
    methods = list(results)
    primary = methods[0]
    report = {
        "method": method, "methods": methods, "variant": variant, "seed": model_seed,
        "metric": METRICS[primary], "baseline_auc": baseline_auc, "rows": rows,
        "groups": groups_json(results[primary], groups),
        "by_method": {m: groups_json(r, groups) for m, r in results.items()},
        "settings": settings,
        "model": model,
    }
    if len(results) > 1:
        report["agreement"] = agreement(results)
    return report


def importance_markdown(report: dict) -> str:
    """The ranked table (one column pair per method when several ran) and the agreement."""
    methods = report["methods"]
    primary = report["groups"]
    order = sorted(primary, key=lambda g: primary[g]["rank"])
    head = ["rank", "feature group"]
    for m in methods:
        head += [f"{m} {METRICS[m]}", f"{m} rank"] + (["mean abs attr (logit)"] if m == "permutation" else [])
    lines = [f"# Feature importance: {report['variant']} seed {report['seed']}", "",
             f"NW ROC-AUC of the model on {report['rows']} evaluation impressions: {report['baseline_auc']:.4f}. "
             "auc_drop = NW ROC-AUC minus NW ROC-AUC with the group permuted (mean ± std over "
             f"{report['settings']['repeats']} permutations) or replaced by its baseline (ablation); "
             "mean_abs_attribution = mean |integrated gradients| of the group's inputs, in logits.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in order:
        row = [str(primary[g]["rank"]), g]
        for m in methods:
            r = report["by_method"][m][g]
            score = "n/a" if r["score"] is None else (
                f"{r['score']:.4f} ± {r['score_std']:.4f}" if m == "permutation" else f"{r['score']:.4f}")
            row += [score, str(r["rank"])] + ([f"{r['attribution']:.4f}"] if m == "permutation" else [])
        lines.append("| " + " | ".join(row) + " |")
    if report.get("agreement"):
        lines += ["", "Agreement between methods (Spearman rank correlation of the group scores):", ""]
        lines += [f"- {pair}: rho = {'n/a' if a['spearman'] is None else format(a['spearman'], '.3f')} "
                  f"over {a['groups']} groups" for pair, a in report["agreement"].items()]
    return "\n".join(lines) + "\n"


def plot_importance(report: dict, path: Path) -> Path:
    """Horizontal bars per method (rank 1 at the top) with std error bars; PNG, Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    colors = {"table": "tab:blue", "dense": "tab:orange", "sparse": "tab:green"}
    n = len(report["groups"])
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 1.2 + 0.32 * n), squeeze=False)
    for ax, m in zip(axes[0], methods):
        groups = report["by_method"][m]
        order = sorted(groups, key=lambda g: groups[g]["rank"])[::-1]
        values = [groups[g]["score"] or 0.0 for g in order]
        errors = [groups[g]["score_std"] or 0.0 for g in order]
        ax.barh(range(len(order)), values, xerr=errors if any(errors) else None, capsize=3,
                color=[colors[groups[g]["kind"]] for g in order])
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("NW ROC-AUC drop" if METRICS[m] == "auc_drop" else "mean |IG attribution| (logit)")
        ax.set_title(m)
    fig.suptitle(f"Feature importance, {report['variant']} seed {report['seed']} (blue: embedding-table "
                 "vectors and cosines, orange: dense, green: sparse)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
