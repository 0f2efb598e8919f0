"""The DashCLIP recipe ablation: one row per change, trained and evaluated on the same data.

``python -m experiments.ablation --workdir DIR [--rows paper,...] [--flags "..."]``

``DIR/data/`` holds the four tables (run ``python -m data.synth`` or ``experiments.reproduce
--stages data`` first). Each row trains DashCLIP with its flags (after ``--flags``, the budget
every row shares) in ``DIR/ablation/<row>/`` and evaluates it there (``embeddings.evaluate``). The
data files are hard links to ``DIR/data/``, so every row reads the same bytes. Both commands run
on every core (``--threads 0``, unless ``--flags`` says otherwise for training). A row whose stage-1
settings equal an earlier row's starts from that row's published stage-1 checkpoint (hard links
of its output set; ``embeddings.train`` reuses it only when the inputs and the stage-1 settings
match, else it trains its own), so rows that differ in stage 2 only are measured on the same
stage-1 checkpoint.

Writes ``DIR/ablation/ablation.json`` and ``ablation.md``: per row, Recall@10 over the whole
catalog with the relevance labels, Precision@10 and graded relevance with complete judgments
(synthetic data), Recall@10 under the paper's Table 1 protocol and on cold-start products, the
aisle probe (random split and seen -> cold) and the relevance probe, DashCLIP's and the best
untuned encoder's, and each command's wall time. Rows already complete are skipped by the stages
themselves; each command's output goes to ``DIR/ablation/<row>/logs/``.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import prepare_workdir, read_json, write_json, write_text
from experiments.reproduce import ALL_CORES, Console, Stage, run_stage

PAPER_RECIPE = ("--pooling", "cls", "--cross-attention", "plain", "--multimodal-itc-weight", "0",
                "--pqc-in-batch-weight", "0", "--query-side-negatives", "0")


@dataclass(frozen=True)
class Row:
    name: str
    change: str
    flags: tuple[str, ...]


# Cumulative: each row adds one change to the row before it; the last is the default recipe.
UNCORRECTED = ("--pqc-in-batch-popularity", "0")
ROWS: tuple[Row, ...] = (
    Row("paper", "the paper's recipe: [CLS] pooling, plain cross-attention, ITC + ITM, PQC only", PAPER_RECIPE),
    Row("mm_itc_in_batch", "+ multimodal contrast in stage 1 and in-batch product-query contrast in stage 2",
        ("--pooling", "cls", "--cross-attention", "plain", "--query-side-negatives", "0", *UNCORRECTED)),
    Row("mean_pooling", "+ mean pooling (how MiniLM was pretrained)",
        ("--cross-attention", "plain", "--query-side-negatives", "0", *UNCORRECTED)),
    Row("gated_cross_attention", "+ cross-attention gated from zero (grounded encoder starts as the text encoder)",
        ("--query-side-negatives", "0", *UNCORRECTED)),
    Row("query_side_negatives", "+ query-side negatives: products the query ranks lower", UNCORRECTED),
    Row("popularity_correction", "+ in-batch contrast corrected for how often each product is drawn (keeps "
                                 "popularity; the default recipe)", ()),
)
ROW_NAMES = tuple(row.name for row in ROWS)

COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("R@10 labels", ("retrieval", "{system}", "recall_at_10")),
    ("P@10 complete", ("retrieval_complete", "{system}", "precision_at_10")),
    ("graded complete", ("retrieval_complete", "{system}", "graded_relevance")),
    ("R@10 Table-1 protocol", ("retrieval_table1", "systems", "{system}", "recall_at_10")),
    ("R@10 cold start", ("cold_start", "retrieval", "systems", "{system}", "recall_at_10")),
    ("aisle F1", ("aisle_f1", "{probe}")),
    ("aisle F1 cold", ("cold_start", "aisle_f1", "{probe}")),
    ("relevance F1", ("relevance_f1", "{probe}")),
)
UNTUNED_RETRIEVAL = ("untuned_text", "untuned_image", "untuned")


@dataclass
class AblationConfig:
    """Train and evaluate each ablation row on DIR/data and tabulate them."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory holding data/"})
    rows: str = field(default=",".join(ROW_NAMES), metadata={"help": f"comma list of rows: {', '.join(ROW_NAMES)}"})
    flags: str = field(default="", metadata={"help": "embeddings.train flags every row shares (quoted), e.g. "
                                                     "\"--stage1-max-steps 30 --stage2-epochs 1\""})

    def chosen(self) -> list[str]:
        """The row names of ``--rows``."""
        return [name.strip() for name in self.rows.split(",") if name.strip()]

    def check(self) -> None:
        """``--rows`` names rows (common.cli.check_config runs the per-field rules first)."""
        unknown = sorted(set(self.chosen()) - set(ROW_NAMES))
        if unknown or not self.chosen():
            raise UserError(f"--rows: unknown {unknown}; expected a comma list of {', '.join(ROW_NAMES)}")


def _get(metrics: dict, path: tuple[str, ...], **names: str) -> float | None:
    node: Any = metrics
    for key in path:
        node = node.get(key.format(**names)) if isinstance(node, dict) else None
    return node if isinstance(node, (int, float)) else None


def row_figures(metrics: dict) -> dict[str, dict[str, float | None]]:
    """Per column: DashCLIP's figure and the best untuned encoder's (retrieval: text, image or fusion;
    probes: the untuned fusion)."""
    out = {}
    for column, path in COLUMNS:
        if "{probe}" in path:
            ours, best = _get(metrics, path, probe="dashclip"), _get(metrics, path, probe="untuned")
        else:
            ours = _get(metrics, path, system="dashclip")
            untuned = [v for s in UNTUNED_RETRIEVAL if (v := _get(metrics, path, system=s)) is not None]
            best = max(untuned) if untuned else None
        out[column] = {"dashclip": ours, "best_untuned": best}
    return out


def link_tree(source: Path, target: Path) -> None:
    """Hard-link every file under ``source`` to the same place under ``target`` (existing files kept)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if not destination.exists():
                os.link(path, destination)


def share_stage1(source: Path, target: Path) -> None:
    """Offer ``source``'s published stage-1 set to ``target`` (the trainer decides whether it applies)."""
    for rel in ("embeddings/stage1.manifest.json", "embeddings/checkpoints/stage1.pt"):
        if not (source / rel).exists():
            return
    for rel in ("embeddings/checkpoints/stage1.pt", "embeddings/stage1.manifest.json"):
        destination = target / rel
        if not destination.exists():
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.link(source / rel, destination)


def markdown(results: dict[str, dict]) -> str:
    header = ["row", "change", *(column for column, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cells = []
        for column, _ in COLUMNS:
            figures = result["figures"][column]
            ours, best = figures["dashclip"], figures["best_untuned"]
            cells.append("n/a" if ours is None else f"{ours:.3f}" + ("" if best is None else
                                                                     f" ({(ours / best - 1) * 100:+.0f}%)" if best else ""))
        lines.append("| " + " | ".join([name, result["change"], *cells]) + " |")
    first = next(iter(results.values()), None)
    if first:
        best = [f"{column} {first['figures'][column]['best_untuned']:.3f}" for column, _ in COLUMNS
                if first["figures"][column]["best_untuned"] is not None]
        lines.append("\nIn brackets: relative to the best untuned encoder of the same row (retrieval: the best of the "
                     "untuned text, image and fusion; probes: the untuned fusion). Best untuned, first row: "
                     + ", ".join(best) + ".")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    cfg = parse_config(AblationConfig, argv)
    root = prepare_workdir(cfg.workdir, "ablation")
    chosen = cfg.chosen()
    if not (root / "data" / "manifest.json").exists():
        raise UserError(f"{root / 'data'}: no published data set; run python -m data.synth --workdir {root} first")
    shared = tuple(shlex.split(cfg.flags))
    console = Console()
    results: dict[str, dict] = {}
    done: list[Path] = []
    for number, row in enumerate((r for r in ROWS if r.name in chosen), 1):
        row_dir = root / "ablation" / row.name
        link_tree(root / "data", row_dir / "data")
        for earlier in done:
            share_stage1(earlier, row_dir)
        workdir = ("--workdir", str(row_dir))
        stage = Stage(row.name, (("embeddings.train", *workdir, *ALL_CORES, *shared, *row.flags),
                                 ("embeddings.evaluate", *workdir, *ALL_CORES)))
        costs = run_stage(stage, prepare_workdir(row_dir, "logs") / "logs", console, f"{number}/{len(chosen)}")
        metrics = read_json(row_dir / "embeddings" / "metrics.json")
        results[row.name] = {"change": row.change, "flags": [*shared, *row.flags], "figures": row_figures(metrics),
                             "command_seconds": dict(zip(("train", "evaluate"), (c.seconds for c in costs)))}
        done.append(row_dir)
        write_json(results, root / "ablation" / "ablation.json")
        write_text(markdown(results), root / "ablation" / "ablation.md")
    console.say(f"ablation table: {root / 'ablation' / 'ablation.md'}")
    return results


if __name__ == "__main__":
    run_main(main)
