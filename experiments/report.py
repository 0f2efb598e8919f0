"""Assemble ``DIR/report.md`` from the stages' result files.

Each section reads one stage's documented output (``embeddings/metrics.json``,
``ranking/results.json``, ``importance/importance.json``, ``serving/bench.json``), lays it out
like the paper's table, puts the paper's own figures next to it (:mod:`experiments.paper`) and
states whether our result agrees in direction. A stage that has not run yields a short note.
"""
from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

from experiments import paper

RANKING_VARIANTS = ("dcn", "dcn_pq", "dcn_pq_hist", "dcn_pq_hist_random")
SLICES = {"nw": "NW (all users)", "nw_hist": "NW, users with purchase history", "nw_nohist": "NW, users without"}


def _load(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _verdict(ok: bool, claim: str) -> str:
    return f"**Agrees in direction**: {claim}." if ok else f"**Does not agree**: expected {claim}."


def _git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_section(root: Path) -> str:
    manifest = _load(root / "data" / "manifest.json")
    if manifest is None:
        return "## Data\n\nNo `data/manifest.json`: the data stage has not run.\n"
    counts = manifest.get("row_counts") or manifest.get("counts") or {}
    rows = [[name, f"{n:,}"] for name, n in counts.items()]
    extra = {k: manifest[k] for k in ("label_split", "click_rate", "proxy_labels") if k in manifest}
    return ("## Data\n\n" + (_table(["table", "rows"], rows) + "\n\n" if rows else "")
            + "".join(f"- {k}: `{json.dumps(v)}`\n" for k, v in extra.items()))


def retrieval_section(root: Path) -> str:
    metrics = _load(root / "embeddings" / "metrics.json")
    out = ["## Retrieval (paper Table 1 layout)\n"]
    if metrics is None:
        return out[0] + "\nThe embedding evaluation has not run.\n"
    names = {"random": "Random vectors", "untuned_text": "Untuned text encoder (title)",
             "untuned_image": "Untuned image encoder", "dashclip": "DashCLIP (ours, trained)"}
    keys = ("graded_relevance", "recall_at_10", "precision_at_10")
    rows = [[label] + [_fmt(metrics["retrieval"].get(k, {}).get(m)) for m in keys]
            for k, label in names.items() if k in metrics.get("retrieval", {})]
    out.append(_table(["model", "graded relevance", "Recall@10", "Precision@10"], rows))
    out.append("\nPaper (DashCLIP, Table 1):\n")
    out.append(_table(["model", "graded relevance", "Recall@10", "Precision@10"],
                      [[m, *(_fmt(v, 3) if isinstance(v, float) else str(v) for v in vals)]
                       for m, vals in paper.TABLE1.items()]))
    ret = metrics["retrieval"]
    best_untuned = max(ret[k]["recall_at_10"] for k in ("untuned_text", "untuned_image", "random") if k in ret)
    ok = all(ret["dashclip"][m] > max(ret[k][m] for k in ("untuned_text", "untuned_image", "random") if k in ret)
             for m in keys)
    out.append("\n" + _verdict(ok, "DashCLIP above every untuned encoder and random on all three metrics")
               + f" (DashCLIP Recall@10 {ret['dashclip']['recall_at_10']:.3f} vs best baseline {best_untuned:.3f}).\n")
    complete = metrics.get("retrieval_complete")
    if complete:
        out.append("\nThe relevance table judges a few products per query and counts the rest as irrelevant. With "
                   "complete judgments (the synthetic generator's every relevant product, "
                   f"{complete['dashclip']['n_queries']} held-out queries):\n")
        out.append(_table(["model", "graded relevance", "Recall@10", "Precision@10"],
                          [[label] + [_fmt(complete[k].get(m)) for m in keys]
                           for k, label in names.items() if k in complete]))
        baselines = [k for k in ("untuned_text", "untuned_image", "random") if k in complete]
        ok = all(complete["dashclip"][m] > max(complete[k][m] for k in baselines) for m in keys)
        out.append("\n" + _verdict(ok, "DashCLIP above every untuned encoder and random on all three metrics, with "
                                        "complete judgments") + "\n")
    judged = metrics.get("retrieval_judged")
    if judged:
        out.append("\nFull-catalog retrieval counts every unjudged product as irrelevant. Ranking each held-out "
                   "query's judged candidates only (condensed lists; the similarity the ranking stage uses):\n")
        out.append(_table(["model", "nDCG@10 (judged)", "AUC cosine, MR/HR vs IR", "judged share of top 10"],
                          [[label, _fmt(judged[k]["ndcg_at_10"]), _fmt(judged[k]["auc_relevant_vs_ir"]),
                            _fmt(judged[k].get("judged_share_of_top_10"))]
                           for k, label in names.items() if k in judged]))
        baselines = [k for k in ("untuned_text", "untuned_image", "random") if k in judged]
        ok = all(judged["dashclip"][m] > max(judged[k][m] for k in baselines)
                 for m in ("ndcg_at_10", "auc_relevant_vs_ir"))
        out.append("\n" + _verdict(ok, "DashCLIP ranks the judged candidates better than every untuned encoder "
                                        "and random") + "\n")
    out.append("\n## Aisle-category and relevance classification (paper section 5)\n")
    rows = []
    for task, label in (("aisle_f1", "aisle-category macro F1"), ("relevance_f1", "3-class relevance macro F1")):
        if task in metrics:
            rows.append([label, _fmt(metrics[task].get("untuned")), _fmt(metrics[task].get("dashclip")),
                         paper.SECTION5.get(task, "n/a")])
    out.append(_table(["task", "untuned", "DashCLIP", "paper"], rows))
    out.append("")
    for task, claim in (("aisle_f1", "DashCLIP product vectors classify aisles better than untuned ones"),
                        ("relevance_f1", "DashCLIP vectors classify (query, product) relevance better than untuned ones")):
        if task in metrics:
            out.append(f"- {_verdict(metrics[task]['dashclip'] > metrics[task]['untuned'], claim)}")
    out.append("")
    return "\n".join(out)


def ranking_section(root: Path) -> str:
    results = _load(root / "ranking" / "results.json")
    head = "## Ranking (paper Table 2 layout)\n"
    if results is None:
        return head + "\nThe ranking stage has not run (no clicks in this source, or not run yet).\n"
    variants = [v for v in RANKING_VARIANTS if v in results]
    out = [head]
    for slice_key, slice_name in SLICES.items():
        base = results.get("dcn", {}).get(slice_key) or {}
        rows = []
        for v in variants:
            r = results[v].get(slice_key)
            if not r or r.get("auc_mean") is None:
                continue
            gain = (r["auc_mean"] - base["auc_mean"]) * 100 if base.get("auc_mean") is not None else None
            rows.append([v, f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}",
                         "" if gain is None else f"{gain:+.2f} pt",
                         f"{r['norm_logloss_mean']:.4f} ± {r['norm_logloss_std']:.4f}",
                         "—" if r.get("p_value_vs_dcn") is None else f"{r['p_value_vs_dcn']:.2g}"])
        out.append(f"\n**{slice_name}** (`{slice_key}`)\n")
        if not rows:
            n = results.get("dcn", {}).get(slice_key, {}).get("impressions", 0)
            out.append(f"No metrics for this slice ({n} impressions: none, or only one class).")
            continue
        out.append(_table(["variant", "ROC-AUC (mean ± std)", "AUC vs dcn", "normalized logloss", "p vs dcn"], rows))
    out.append("\nPaper (DashCLIP, Table 2):\n")
    out.append(_table(["variant", *paper.TABLE2_COLUMNS], [[v, *vals] for v, vals in paper.TABLE2.items()]))
    auc = {v: results[v]["nw"]["auc_mean"] for v in variants}
    checks = []
    if {"dcn", "dcn_pq", "dcn_pq_hist"} <= auc.keys():
        checks.append((auc["dcn_pq_hist"] > auc["dcn_pq"] > auc["dcn"], "AUC dcn_pq_hist > dcn_pq > dcn on NW"))
        slice_auc = {(v, s): results[v].get(s, {}).get("auc_mean") for v in ("dcn", "dcn_pq_hist")
                     for s in ("nw_hist", "nw_nohist")}
        if None not in slice_auc.values():
            gain = {s: slice_auc["dcn_pq_hist", s] - slice_auc["dcn", s] for s in ("nw_hist", "nw_nohist")}
            checks.append((gain["nw_hist"] > gain["nw_nohist"],
                           f"users with history gain more ({gain['nw_hist'] * 100:+.2f} pt) than users without "
                           f"({gain['nw_nohist'] * 100:+.2f} pt)"))
    if {"dcn_pq_hist", "dcn_pq_hist_random"} <= auc.keys():
        checks.append((auc["dcn_pq_hist_random"] < auc["dcn_pq_hist"],
                       "randomly initialised tables below the frozen DashCLIP tables"))
    out.append("\n" + "\n".join(f"- {_verdict(ok, claim)}" for ok, claim in checks) + "\n")
    return "\n".join(out)


def importance_section(root: Path) -> str:
    imp = _load(root / "importance" / "importance.json")
    head = "## Feature importance (paper section 4.2.3)\n"
    if imp is None:
        return head + "\nThe importance stage has not run.\n"
    groups = imp.get("groups", imp)
    ranked = sorted(((g, v) for g, v in groups.items() if isinstance(v, dict) and "rank" in v), key=lambda kv: kv[1]["rank"])
    rows = [[str(v["rank"]), g, _fmt(v.get("score", v.get("auc_drop_mean"))),
             _fmt(v.get("score_std", v.get("auc_drop_std")))] for g, v in ranked]
    top = {g for g, v in ranked[:5]}
    ok = bool({"query_embedding", "product_embedding", "purchase_history"} & top)
    return (head + f"\nMethod: `{imp.get('method', 'permutation')}`, drop in NW ROC-AUC when the group is permuted.\n\n"
            + _table(["rank", "feature group", "score", "std"], rows)
            + f"\n\nPaper: {paper.IMPORTANCE}\n\n"
            + _verdict(ok, "DashCLIP query/product embeddings or purchase history among the top features") + "\n")


def serving_section(root: Path) -> str:
    bench = _load(root / "serving" / "bench.json")
    head = "## Serving latency (paper section 4.3.2)\n"
    if bench is None:
        return head + "\nThe serving benchmark has not run.\n"
    md = root / "serving" / "bench.md"
    body = md.read_text() if md.exists() else "```json\n" + json.dumps(bench, indent=2) + "\n```"
    return head + "\n" + body + f"\n\nPaper: {paper.SERVING}\n"


def plots_section(root: Path) -> str:
    pngs = sorted(p for sub in ("embeddings", "ranking", "importance", "serving") for p in (root / sub).rglob("*.png"))
    if not pngs:
        return "## Plots\n\nNo plots yet.\n"
    return "## Plots\n\n" + "\n".join(f"### {p.stem}\n\n![{p.stem}]({p.relative_to(root).as_posix()})\n" for p in pngs)


SECTIONS: tuple[Callable[[Path], str], ...] = (
    data_section, retrieval_section, ranking_section, importance_section, serving_section, plots_section)


def build_report(root: Path, source: str, commands: dict[str, list[str]], invocation: str) -> str:
    """The Markdown report for the run in ``root``."""
    header = (f"# dashrec reproduction report: `{source}`\n\n"
              f"- command: `{invocation}`\n- date: {dt.date.today().isoformat()}\n"
              f"- code version: `{_git_commit(root)}`\n\nStage commands:\n\n"
              + "".join(f"- {name}: " + "; ".join(f"`{c}`" for c in cmds) + "\n" for name, cmds in commands.items()))
    if source in ("fashion", "instacart", "completejourney"):
        header += ("\n> Queries and relevance labels of real sources are **proxy labels** derived from product "
                   "attributes by documented rules (see `data/manifest.json`).\n")
    return header + "\n" + "\n".join(section(root) for section in SECTIONS)
