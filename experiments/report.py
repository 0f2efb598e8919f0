"""Assemble ``DIR/report.md`` from the stages' result files.

Each section reads one stage's documented output (``embeddings/metrics.json``,
``ranking/results.json``, ``importance/importance.json``, ``serving/bench.json``), lays it out
like the paper's table, puts the paper's own figures next to it (:mod:`experiments.paper`) and
states whether our result agrees in direction. A stage that has not run yields a short note.
The Cost section reads ``reproduce.json``: each command's wall time and peak memory.
"""
from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

from experiments import paper
from ranking import layout
from ranking.metrics import SLICE_TITLES, SLICES
from ranking.variants import VARIANTS

RETRIEVAL_NAMES = {"random": "Random vectors", "untuned_text": "Untuned text encoder (title)",
                   "untuned_image": "Untuned image encoder", "untuned": "Untuned multimodal fusion",
                   "dashclip": "DashCLIP (ours, trained)"}
RETRIEVAL_BASELINES = ("random", "untuned_text", "untuned_image", "untuned")
RETRIEVAL_KEYS = paper.TABLE1_METRICS
PAPER_LABEL = paper.LABEL
PAPER_TABLE1 = paper.TABLE1
PAPER_DASHCLIP = paper.TABLE1_DASHCLIP
# our system -> the paper's closest row (DashCLIP starts from BLIP-14M: its untuned encoders)
PAPER_ANALOGUE = {"random": "Random", "untuned_text": "BLIP-14M (text)", "untuned_image": "BLIP-14M (image)",
                  "dashclip": PAPER_DASHCLIP}


def _read_json_or_none(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _relative(ours: float | None, base: float | None) -> str:
    """``ours`` over ``base`` as a signed percentage."""
    return "n/a" if ours is None or not base else f"{(ours / base - 1.0) * 100:+.1f}%"


def format_duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s`` or ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_bytes(n: int) -> str:
    """``700 B``, ``83 kB``, ``512 MB`` or ``3.25 GB`` (decimal units)."""
    if n < 1e3:
        return f"{int(n)} B"
    return f"{n / 1e3:.0f} kB" if n < 1e6 else f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _verdict(ok: bool, claim: str) -> str:
    return f"**Agrees in direction**: {claim}." if ok else f"**Does not agree**: expected {claim}."


def _git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_section(root: Path) -> str:
    manifest = _read_json_or_none(root / "data" / "manifest.json")
    if manifest is None:
        return "## Data\n\nNo `data/manifest.json`: the data stage has not run.\n"
    counts = manifest.get("row_counts") or manifest.get("counts") or {}
    rows = [[name, f"{n:,}"] for name, n in counts.items()]
    extra = {k: manifest[k] for k in ("label_split", "click_rate", "proxy_labels") if k in manifest}
    return ("## Data\n\n" + (_table(["table", "rows"], rows) + "\n\n" if rows else "")
            + "".join(f"- {k}: `{json.dumps(v)}`\n" for k, v in extra.items()))


# Expected scores beside the systems of a retrieval view: a uniformly random ranking, and (with complete
# judgments) every product ranked by its true grade with ties at random, what relevance alone scores on a
# sample of labels.
EXPECTED_ROWS = {"chance": "Chance (uniformly random ranking, expected)",
                 "oracle": "Relevance oracle (true grades, ties at random, expected)"}


def _pool_table(view: dict, *, paper_columns: bool = False) -> str:
    """Our systems (chance and the relevance oracle) on a pooled retrieval view of ``metrics.json``; with
    ``paper_columns``, the paper's closest row beside each."""
    systems = view["systems"]
    header = ["model", "graded relevance", "Recall@10", "Precision@10"]
    rows = []
    for key, label in [*RETRIEVAL_NAMES.items(), *EXPECTED_ROWS.items()]:
        scores = view.get(key) if key in EXPECTED_ROWS else systems.get(key)
        if scores is None:
            continue
        row = [label, *(_fmt(scores.get(m)) for m in RETRIEVAL_KEYS)]
        if paper_columns:
            analogue = PAPER_ANALOGUE.get(key)
            row += [analogue or "—", *(_fmt(v, 3) for v in PAPER_TABLE1[analogue])] if analogue else ["—"] * 4
        rows.append(row)
    if paper_columns:
        header += [f"{PAPER_LABEL}: closest row", "graded", "R@10", "P@10"]
    return _table(header, rows)


def _beats_baselines(systems: dict, keys: tuple[str, ...] = RETRIEVAL_KEYS) -> bool:
    baselines = [k for k in RETRIEVAL_BASELINES if k in systems]
    return all(systems["dashclip"][m] > max(systems[k][m] for k in baselines) for m in keys)


def _metrics_view(root: Path, key: str) -> tuple[dict | None, str]:
    """The view ``key`` of ``embeddings/metrics.json``, or None and a note saying why it is missing."""
    metrics = _read_json_or_none(root / "embeddings" / "metrics.json")
    if metrics is None:
        return None, "\nThe embedding evaluation has not run.\n"
    if metrics.get(key) is None:
        return None, ("\nNot in this run's `embeddings/metrics.json` (written before this view existed): rerun "
                      "`python -m embeddings.evaluate --force`.\n")
    return metrics[key], ""


def table1_protocol_section(root: Path) -> str:
    """The paper's Table 1 protocol (``retrieval_table1``) with the paper's figures beside ours."""
    head = "## Retrieval, paper Table 1 protocol (held-out products)\n"
    view, missing = _metrics_view(root, "retrieval_table1")
    if view is None:
        return head + missing
    excluded = view.get("n_cold_excluded", 0)
    out = [head, f"Candidates: the {view['n_products']} products of the held-out relevance pairs that training saw"
                 + (f" ({excluded} cold-start products of those pairs are scored under Cold start)" if excluded else "")
                 + ", as in the paper; graded relevance over IR/MR/HR, Recall@10 and Precision@10 count MR and HR. "
                 f"The columns labelled \"{PAPER_LABEL}\" are the paper's own figures on DoorDash's data: compare "
                 "directions and sizes of gains, never absolute values.\n"]
    if "systems" not in view:
        return "\n".join(out) + f"\nNot scored: {view['skipped']}.\n"
    systems = view["systems"]
    out.append(f"{systems['dashclip']['n_queries']} held-out queries scored.\n")
    out.append(_pool_table(view, paper_columns=True))
    out.append("\nThe paper's whole Table 1 (DoorDash, private data):\n")
    out.append(_table(["embedding", "graded relevance", "Recall@10", "Precision@10"],
                      [[name, *(_fmt(v, 3) for v in vals)] for name, vals in PAPER_TABLE1.items()]))
    baselines = [k for k in RETRIEVAL_BASELINES if k in systems]
    ours = {m: systems["dashclip"][m] / max(systems[k][m] for k in baselines) - 1.0 for m in RETRIEVAL_KEYS}
    theirs = paper.table1_relative_gains()
    out.append("\nDashCLIP over the best baseline on each metric, relative:\n")
    out.append(_table(["", "graded relevance", "Recall@10", "Precision@10"],
                      [["ours (best of random and the untuned encoders)", *(f"{ours[m]:+.1%}" for m in RETRIEVAL_KEYS)],
                       [f"{PAPER_LABEL}, best of its 7 baselines", *(f"{theirs[m]:+.1%}" for m in RETRIEVAL_KEYS)]]))
    out.append("\n" + _verdict(_beats_baselines(systems), "DashCLIP above random and every untuned encoder on "
                                                          "all three metrics, as in the paper") + "\n")
    return "\n".join(out)


def cold_start_section(root: Path) -> str:
    """Retrieval over, and the aisle probe on, the products no training stage saw (``cold_start``)."""
    head = "## Cold start: products no training stage saw\n"
    cold, missing = _metrics_view(root, "cold_start")
    if cold is None:
        return head + missing
    if "skipped" in cold:
        return head + f"\nNot evaluated: {cold['skipped']}.\n"
    out = [head, f"{cold['n_products']} products ({cold['fraction']:.0%} of the catalog, stratified by aisle, seed "
                 f"{cold['seed']}) took no part in either training stage (neither their image-title pairs nor their "
                 "relevance pairs). The paper has no such figure: its stage 1 trains on the whole catalog.\n",
           "### Retrieval over the cold products only\n"]
    retrieval = cold["retrieval"]
    checks = []
    if "systems" in retrieval:
        out.append(f"Candidates: the {retrieval['n_products']} cold products; "
                   f"{retrieval['systems']['dashclip']['n_queries']} held-out queries with an MR/HR cold product.\n")
        out.append(_pool_table(retrieval))
        checks.append((_beats_baselines(retrieval["systems"]), "DashCLIP retrieves unseen products better than "
                                                              "random and every untuned encoder on all three metrics"))
    else:
        out.append(f"Not scored: {retrieval['skipped']}.")
    complete = cold.get("retrieval_complete")
    if complete and "systems" in complete:
        out.append(f"\nWith complete judgments (synthetic generator, {complete['systems']['dashclip']['n_queries']} "
                   "held-out queries with a relevant cold product):\n")
        out.append(_pool_table(complete))
        checks.append((_beats_baselines(complete["systems"]), "the same with complete judgments"))
    out.append("\n### Aisle probe: trained on the seen products, tested on the cold ones\n")
    probe_names = {**RETRIEVAL_NAMES, "random": "Random vectors (chance)"}
    out.append(_table(["product vectors", "macro F1", "aisles tested", "train products", "test products"],
                      [[label, _fmt(cold["aisle_probe"][k]["macro_f1"]), str(cold["aisle_probe"][k]["n_classes"]),
                        str(cold["aisle_probe"][k]["n_train"]), str(cold["aisle_probe"][k]["n_test"])]
                       for k, label in probe_names.items() if k in cold.get("aisle_probe", {})]))
    f1 = cold.get("aisle_f1", {})
    if {"dashclip", "untuned"} <= f1.keys():
        checks.append((f1["dashclip"] > f1["untuned"], "DashCLIP product vectors of unseen products classify aisles "
                                                       "better than the untuned fusion"))
    out.append("\n" + "\n".join(f"- **{'Holds' if ok else 'Does not hold'}**: {claim}." for ok, claim in checks)
               + "\n")
    return "\n".join(out)


def retrieval_section(root: Path) -> str:
    metrics = _read_json_or_none(root / "embeddings" / "metrics.json")
    out = ["## Retrieval (paper Table 1 layout)\n"]
    if metrics is None:
        return out[0] + "\nThe embedding evaluation has not run.\n"
    names = RETRIEVAL_NAMES
    keys = RETRIEVAL_KEYS
    split = metrics.get("split", {})
    n_cold, n_queries = split.get("n_cold_products", 0), split.get("n_heldout_queries", 0)
    n_all = split.get("n_heldout_queries_all", n_queries)
    out.append(f"Candidates: all {metrics.get('counts', {}).get('products', '?')} catalog products"
               + (f" ({n_cold} of them cold-start)" if n_cold else "")
               + ", a harder pool than the paper's; the paper's figures are beside the Table 1 protocol above."
               + (f" Queries: a seeded sample of {n_queries} of the {n_all} held-out queries (`--max-queries`), in "
                  "every view." if n_all > n_queries else "") + "\n")
    rows = [[label] + [_fmt(metrics["retrieval"].get(k, {}).get(m)) for m in keys]
            for k, label in names.items() if k in metrics.get("retrieval", {})]
    if "retrieval_oracle" in metrics:
        rows.append([EXPECTED_ROWS["oracle"]] + [_fmt(metrics["retrieval_oracle"].get(m)) for m in keys])
    out.append(_table(["model", "graded relevance", "Recall@10", "Precision@10"], rows))
    ret = metrics["retrieval"]
    best_untuned = max(ret[k]["recall_at_10"] for k in RETRIEVAL_BASELINES if k in ret)
    ok = _beats_baselines(ret)
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
        ok = _beats_baselines(complete)
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
        ok = _beats_baselines(judged, ("ndcg_at_10", "auc_relevant_vs_ir"))
        out.append("\n" + _verdict(ok, "DashCLIP ranks the judged candidates better than every untuned encoder "
                                        "and random") + "\n")
    out.append("\n## Aisle-category and relevance classification (paper section 5)\n")
    rows = []
    for task, label in (("aisle_f1", "aisle-category macro F1"), ("relevance_f1", "3-class relevance macro F1")):
        if task in metrics:
            dashclip, blip = paper.SECTION5[task]
            rows.append([label, _fmt(metrics[task].get("untuned")), _fmt(metrics[task].get("dashclip")),
                         _relative(metrics[task].get("dashclip"), metrics[task].get("untuned")),
                         f"{blip:.3f}", f"{dashclip:.3f}", _relative(dashclip, blip)])
    out.append(_table(["task", "untuned", "DashCLIP", "relative gain", f"{PAPER_LABEL}: BLIP-14M", "DashCLIP",
                       "relative gain"], rows))
    out.append("")
    for task, claim in (("aisle_f1", "DashCLIP product vectors classify aisles better than untuned ones"),
                        ("relevance_f1", "DashCLIP vectors classify (query, product) relevance better than untuned ones")):
        if task in metrics:
            out.append(f"- {_verdict(metrics[task]['dashclip'] > metrics[task]['untuned'], claim)}")
    out.append("")
    return "\n".join(out)


def ranking_section(root: Path) -> str:
    results = _read_json_or_none(root / layout.RESULTS_JSON_REL)
    head = "## Ranking (paper Table 2 layout)\n"
    if results is None:
        return head + "\nThe ranking stage has not run (no clicks in this source, or not run yet).\n"
    variants = [v for v in VARIANTS if v in results]
    out = [head]
    for slice_key in SLICES:
        slice_name = SLICE_TITLES[slice_key]
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
    out.append(f"\n{PAPER_LABEL}, Table 2 (ROC-AUC over 5 runs; AUC points against its DCN baseline):\n")
    paper_rows = []
    for v, by_slice in paper.TABLE2_AUC.items():
        base = paper.TABLE2_AUC["dcn"]
        paper_rows.append([v, *(f"{by_slice[s]:.4f} ({(by_slice[s] - base[s]) * 100:+.2f} pt)" if s in by_slice else "—"
                                for s in SLICES)])
    out.append(_table(["variant", *(SLICE_TITLES[s] for s in SLICES)], paper_rows))
    out.append(f"\nPaper: {paper.TABLE2_NOTE}.")
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
    imp = _read_json_or_none(root / "importance" / "importance.json")
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
    bench = _read_json_or_none(root / "serving" / "bench.json")
    head = "## Serving latency (paper section 4.3.2)\n"
    if bench is None:
        return head + "\nThe serving benchmark has not run.\n"
    md = root / "serving" / "bench.md"
    body = md.read_text() if md.exists() else "```json\n" + json.dumps(bench, indent=2) + "\n```"
    return head + "\n" + body + f"\n\nPaper: {paper.SERVING}\n"


def cost_section(root: Path) -> str:
    """Wall time, peak resident memory and disk written of each command of the last ``experiments.reproduce`` run."""
    head = "## Cost\n"
    record = _read_json_or_none(root / "reproduce.json")
    costs = (record or {}).get("command_costs")
    if not costs:
        return head + "\nNo command costs in `reproduce.json` (written by `python -m experiments.reproduce`).\n"
    rows = [[stage, f"`{c['command'].split()[2]}`", format_duration(c["seconds"]), format_bytes(peak_memory(c)),
             format_bytes(c["max_process_rss_bytes"]) if "max_process_rss_bytes" in c else "—",
             f"{c['load_average']:.1f}" if "load_average" in c else "—",  # records made before these fields lack them
             format_bytes(disk_written(c)[0]) if disk_written(c) else "—"]
            for stage, stage_costs in costs.items() for c in stage_costs]
    every = [c for stage_costs in costs.values() for c in stage_costs]
    top = max(every, key=peak_memory)
    rows.append(["**all**", "", format_duration(sum(c["seconds"] for c in every)), format_bytes(peak_memory(top)), "", "",
                 ""])
    return (head + "\nEach command of this invocation of `experiments.reproduce` (a command that found its outputs "
            "complete only checked them). Peak memory: the most memory the command's process tree held at once "
            "(sampled: the sum of its processes' proportional sets, a page shared by n processes "
            "counted 1/n in each, and never less than its largest process); largest process: the kernel's "
            "high-water mark of the resident set of its largest single process; load: the mean 1-minute load "
            f"average while it ran, on {record.get('cpus', '?')} CPUs; written: the size of the files under the "
            "workdir that it created or changed.\n\n"
            + _table(["stage", "command", "wall time", "peak memory", "largest process", "load", "written"], rows)
            + f"\n\nThe most memory: `{top['command'].split()[2]}`, {format_bytes(peak_memory(top))}."
            + (f" The most disk: the workdir held {format_bytes(max(sizes))} after a command."
               if (sizes := [disk[1] for c in every if (disk := disk_written(c))]) else "") + "\n")


def peak_memory(cost: dict) -> int:
    """The peak memory of one recorded command cost (``reproduce.json``): its ``peak_memory_bytes``
    (proportional sets), or for a record made before that field, its summed resident sets."""
    return int(cost.get("peak_memory_bytes") or cost["peak_rss_bytes"])


def disk_written(cost: dict) -> tuple[int, int] | None:
    """``(written bytes, workdir bytes after it)`` of one recorded command cost (``reproduce.json``),
    or None for a record made before the disk was measured."""
    return (int(cost["written_bytes"]), int(cost["workdir_bytes"])) if "workdir_bytes" in cost else None


def plots_section(root: Path) -> str:
    pngs = sorted(p for sub in ("embeddings", layout.ROOT, "importance", "serving") for p in (root / sub).rglob("*.png"))
    if not pngs:
        return "## Plots\n\nNo plots yet.\n"
    return "## Plots\n\n" + "\n".join(f"### {p.stem}\n\n![{p.stem}]({p.relative_to(root).as_posix()})\n" for p in pngs)


SECTIONS: tuple[Callable[[Path], str], ...] = (
    data_section, table1_protocol_section, retrieval_section, cold_start_section, ranking_section, importance_section,
    serving_section, cost_section, plots_section)


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
