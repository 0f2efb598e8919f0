"""One command that reproduces every table and plot: ``python -m experiments.reproduce``.

Runs each stage's own command in order (each skips itself when its outputs are complete for the
same settings, so an interrupted run resumes where it stopped) and then writes ``DIR/report.md``:
the retrieval table (paper Table 1), the ranking table (Table 2), aisle and relevance F1
(section 5), the importance ranking, serving latency, every plot, and next to each table the
paper's own figures with a sentence on whether our result agrees in direction.

Sources: ``synth:<profile>`` (the embedded synthetic marketplace), ``fashion``, ``instacart``,
``completejourney`` (real public data through ``data.adapters``). ``fashion`` has no clicks, so
its report stops after the embedding stage.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import prepare_workdir, write_json, write_text
from experiments.presets import PRESETS, Preset
from experiments.report import build_report

log = logging.getLogger("experiments.reproduce")

RANKING_SOURCES = {"synth", "instacart", "completejourney"}


@dataclass
class ReproduceConfig:
    """Run every stage that is not complete yet and write DIR/report.md."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    source: str = field(default="synth:demo", metadata={
        "help": "synth:<tiny|demo|paper>, fashion, instacart or completejourney"})
    data_path: str = field(default="", metadata={
        "help": "source location for real data (default: ../shared/data/<name> next to the repo)"})
    preset: Literal["auto", "tiny", "demo", "full"] = field(default="auto", metadata={
        "help": "stage settings: tiny (tests, seconds), demo (2-core budget), full (paper-size flags); "
                "auto = tiny for synth:tiny, else demo"})
    seed: int = 0
    seeds: int = field(default=5, metadata={"help": "ranking seeds per variant"})
    stages: str = field(default="all", metadata={
        "help": "comma list of stages to run (data,embeddings,ranking,importance,serving) or 'all'; "
                "'none' only rewrites the report"})
    force: bool = field(default=False, metadata={"help": "redo every stage"})
    publish: str = field(default="", metadata={
        "help": "also copy report.md and its plots into this directory (e.g. experiments/results/<source>)"})


@dataclass(frozen=True)
class Stage:
    """One stage: a name (for --stages) and the commands that make it."""

    name: str
    commands: tuple[tuple[str, ...], ...]


def _default_data_path(name: str) -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / {
        "fashion": "fashion_small", "instacart": "instacart"}.get(name, name)


def plan_stages(cfg: ReproduceConfig, preset: Preset) -> list[Stage]:
    """The ordered commands for ``cfg.source`` with ``preset`` flags."""
    kind, _, profile = cfg.source.partition(":")
    common = ["--workdir", cfg.workdir] + (["--force"] if cfg.force else [])
    seed = ["--seed", str(cfg.seed)]
    if kind == "synth":
        data_cmd = ("data.synth", "--profile", profile or "demo", *seed, *common)
    elif kind in ("fashion", "instacart", "completejourney"):
        source = cfg.data_path or (str(_default_data_path(kind)) if kind != "completejourney" else "")
        data_cmd = (f"data.adapters.{kind}", *(["--source", source] if source else []), *seed, *common,
                    *preset.adapter_flags.get(kind, ()))
    else:
        raise UserError(f"--source {cfg.source!r}: expected synth:<profile>, fashion, instacart or completejourney")
    stages = [
        Stage("data", (data_cmd,)),
        Stage("embeddings", (
            ("embeddings.train", "--stage", "all", *seed, *common, *preset.embeddings_train,
             *preset.source_embeddings_train.get(kind, ())),
            ("embeddings.export", *common),
            ("embeddings.evaluate", *seed, *common, *preset.embeddings_evaluate),
        )),
    ]
    if kind in RANKING_SOURCES:
        stages += [
            Stage("ranking", (("ranking.train", "--variant", "all", "--seeds", str(cfg.seeds), *common,
                               *preset.ranking_train),)),
            Stage("importance", (("ranking.importance", "--variant", "dcn_pq_hist", *seed, *common,
                                  *preset.importance),)),
            Stage("serving", (("serving.export", "--variant", "dcn_pq_hist", *common),
                              ("serving.bench", *common, *preset.serving_bench))),
        ]
    return stages


def run_stage(stage: Stage, log_dir: Path) -> float:
    """Run the stage's commands (``python -m ...``), teeing output to ``log_dir/<stage>.log``."""
    start = time.perf_counter()
    for cmd in stage.commands:
        argv = [sys.executable, "-m", *cmd]
        log.info("[%s] %s", stage.name, shlex.join(["python", "-m", *cmd]))
        with open(log_dir / f"{stage.name}.log", "a") as sink:
            sink.write(f"$ {shlex.join(argv)}\n")
            sink.flush()
            proc = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, env=os.environ.copy())
        if proc.returncode != 0:
            tail = (log_dir / f"{stage.name}.log").read_text().splitlines()[-5:]
            raise UserError(f"stage {stage.name} failed ({cmd[0]}, exit {proc.returncode}); "
                            f"see {log_dir / (stage.name + '.log')}: {' | '.join(tail)}")
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(ReproduceConfig, argv)
    kind, _, profile = cfg.source.partition(":")
    preset_name = cfg.preset if cfg.preset != "auto" else ("tiny" if profile == "tiny" else "demo")
    preset = PRESETS[preset_name]
    root = prepare_workdir(cfg.workdir, "logs")
    stages = plan_stages(cfg, preset)
    wanted = {s.name for s in stages} if cfg.stages == "all" else (
        set() if cfg.stages == "none" else set(cfg.stages.split(",")))
    unknown = wanted - {s.name for s in stages}
    if unknown:
        raise UserError(f"--stages: unknown or not applicable to {cfg.source}: {sorted(unknown)}; "
                        f"expected a subset of {[s.name for s in stages]}")
    timings: dict[str, float] = {}
    for stage in stages:
        if stage.name in wanted:
            timings[stage.name] = run_stage(stage, root / "logs")
            log.info("[%s] done in %.1f s", stage.name, timings[stage.name])
    commands = {s.name: [shlex.join(["python", "-m", *c]) for c in s.commands] for s in stages}
    write_json({"config": dataclasses.asdict(cfg), "preset": preset_name, "stage_seconds": timings,
                "commands": commands}, root / "reproduce.json")
    report = build_report(root, source=cfg.source, commands=commands,
                          invocation=shlex.join(["python", "-m", "experiments.reproduce", *(argv or sys.argv[1:])]))
    path = write_text(report, root / "report.md")
    log.info("report written to %s", path)
    if cfg.publish:
        log.info("report published to %s", publish_report(root, Path(cfg.publish)))
    return path


def publish_report(root: Path, target: Path) -> Path:
    """Copy ``root/report.md`` and every plot it links into ``target`` (paths kept relative)."""
    report = (root / "report.md").read_text()
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, dest)
    return write_text(report, target / "report.md")


if __name__ == "__main__":
    run_main(main)
