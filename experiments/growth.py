"""How each command's cost grows with the data: ``python -m experiments.growth --workdir DIR``.

Reads the scale runs under ``DIR`` (each ``DIR/<name>/reproduce.json`` written by
``python -m experiments.reproduce --workdir DIR/<name> --source synth:paper --scale F``) and
writes ``DIR/growth.json`` and ``DIR/growth.md``: one row per command, its wall time and peak
memory (:func:`experiments.report.peak_memory`) at each measured fraction F of the paper's sizes, and, at a target fraction that
was not measured (``--target``, default 1.0), the value of the least-squares line
``cost = a + b * F`` through the measured points. A line is what the stages promise (cost linear in
the data); the table also shows how far the measured points stray from it, and marks a peak that
the line puts over ``--memory-limit-gb``. A second table gives the disk each command wrote (the files
under the workdir it created or changed) and the most the workdir held, with their lines.

A run's ``reproduce.json`` records, for each command, the cost of the invocation that made its
outputs (a command that found them complete keeps that record), so a scale run may be made in
several invocations (stage by stage, or resumed after a failure). A run that stopped before some of
its planned commands (``commands`` in ``reproduce.json``) still gives its measured points; the
commands it lacks are listed beside the table and read "not run" in their cells.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow.parquet as pq

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import read_json, write_json, write_text
from data.schema import table_path
from experiments.report import disk_written, format_bytes, format_duration, peak_memory

log = logging.getLogger("experiments.growth")

ROWS = ("catalog", "relevance", "impressions")  # the sizes a scale run's table shows beside the fraction


@dataclass
class GrowthConfig:
    workdir: str = field(default=DEFAULT_WORKDIR, metadata={
        "help": "directory holding one scale run per subdirectory (each with its reproduce.json); "
                "growth.json and growth.md are written here"})
    target: float = field(default=1.0, metadata={"help": "fraction of the paper's sizes to extrapolate to when no "
                                                         "run measured it", "gt": 0.0, "max": 1.0})
    memory_limit_gb: float = field(default=12.0, metadata={"help": "peak memory a command must stay under "
                                                                   "at the target fraction", "gt": 0.0})


@dataclass(frozen=True)
class ScaleRun:
    """One scale run: its fraction, table sizes, per-command costs (``module -> (seconds, peak bytes)``),
    the modules of every command it planned, in pipeline order (empty for a record that does not
    say), and those of them with no cost (a run that failed or was stopped before them); the disk
    its commands wrote (records made before ``written_bytes`` have none)."""

    name: str
    fraction: float
    rows: dict[str, int]
    costs: dict[str, tuple[float, int]]
    planned: tuple[str, ...] = ()
    written: dict[str, int] = field(default_factory=dict)  # module -> bytes its commands wrote (recorded ones)
    workdir_bytes: int | None = None  # the most the workdir held after a command, where recorded

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(module for module in self.planned if module not in self.costs)


def command_module(command: str) -> str:
    """``<module>`` of a recorded command line ``python -m <module> ...``."""
    return command.split()[2]


def read_run(directory: Path) -> ScaleRun:
    """The costs of the scale run in ``directory`` (its ``reproduce.json``), stage by stage in the
    order the run planned them (``stages``; a record without it keeps its stages' key order). Several
    commands of one module (none today) add their times and written bytes and keep the larger peak."""
    record = read_json(directory / "reproduce.json")
    config = record.get("config") or {}
    if not str(config.get("source", "")).startswith("synth:"):
        raise UserError(f"{directory / 'reproduce.json'}: source {config.get('source')!r} is not a synthetic "
                        f"profile; growth compares synth:<profile> runs at several --scale values")
    recorded, planned = record.get("command_costs", {}), record.get("commands") or {}
    order = list(dict.fromkeys([*record.get("stages", []), *planned, *recorded]))
    costs: dict[str, tuple[float, int]] = {}
    written: dict[str, int] = {}
    for stage in order:
        for cost in recorded.get(stage, []):
            module = command_module(cost["command"])
            seconds, peak = costs.get(module, (0.0, 0))
            costs[module] = (seconds + float(cost["seconds"]), max(peak, peak_memory(cost)))
            if disk := disk_written(cost):
                written[module] = written.get(module, 0) + disk[0]
    sizes = [disk[1] for records in recorded.values() for cost in records if (disk := disk_written(cost))]
    modules = tuple(dict.fromkeys(command_module(command) for stage in order for command in planned.get(stage, [])))
    rows = {name: pq.ParquetFile(table_path(directory, name)).metadata.num_rows for name in ROWS
            if table_path(directory, name).exists()}
    scale = config.get("scale")
    run = ScaleRun(directory.name, 1.0 if scale is None else float(scale), rows, costs, modules, written,
                   max(sizes) if sizes else None)
    if run.missing:
        log.warning("%s: no record of %s (the run stopped before them)", directory, ", ".join(run.missing))
    return run


def fit_line(fractions: Sequence[float], values: Sequence[float], at: float) -> tuple[float, float]:
    """``(value at `at`, largest relative miss)`` of the least-squares line through the points (at
    least two distinct fractions)."""
    x, y = np.asarray(fractions, dtype=float), np.asarray(values, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    predicted = intercept + slope * x
    miss = float(np.max(np.abs(predicted - y) / np.maximum(np.abs(y), 1e-12)))
    return float(intercept + slope * at), miss


def growth(runs: Sequence[ScaleRun], target: float, memory_limit_bytes: float) -> dict:
    """Per command (in pipeline order): the measured ``(fraction, seconds, peak bytes, written bytes)``
    and, unless a run measured ``target``, the line's values there (``None`` for a command measured at
    fewer than two fractions; its ``written_bytes`` ``None`` where fewer than two runs recorded them);
    per run its table sizes, missing commands and the most its workdir held, with that size's line."""
    runs = sorted(runs, key=lambda r: r.fraction)
    modules = list(dict.fromkeys(m for r in runs for m in (*r.planned, *r.costs)))  # pipeline order
    measured_target = any(abs(r.fraction - target) < 1e-12 for r in runs)
    commands = {}
    for module in modules:
        points = [(r.fraction, *r.costs[module], r.written.get(module)) for r in runs if module in r.costs]
        entry = {"measured": [{"fraction": f, "seconds": s, "peak_memory_bytes": b, "written_bytes": w}
                              for f, s, b, w in points]}
        if not measured_target:
            seconds, seconds_miss = line_or_none([(p[0], p[1]) for p in points], target)
            peak, peak_miss = line_or_none([(p[0], p[2]) for p in points], target)
            written, written_miss = line_or_none([(p[0], p[3]) for p in points], target)
            entry["line"] = None if seconds is None else {  # one point (or none) says nothing of growth
                "fraction": target, "seconds": seconds, "peak_memory_bytes": peak, "seconds_miss": seconds_miss,
                "peak_miss": peak_miss, "over_memory_limit": peak > memory_limit_bytes,
                "written_bytes": written, "written_miss": written_miss}
        commands[module] = entry
    workdir, workdir_miss = (None, None) if measured_target else line_or_none(
        [(r.fraction, r.workdir_bytes) for r in runs], target)
    return {"runs": [{"name": r.name, "fraction": r.fraction, "rows": r.rows, "missing": list(r.missing),
                      "workdir_bytes": r.workdir_bytes} for r in runs],
            "target": target, "measured_target": measured_target, "memory_limit_bytes": memory_limit_bytes,
            "commands": commands, "workdir_line": {"bytes": workdir, "miss": workdir_miss}}


def line_or_none(points: Sequence[tuple[float, float | None]], at: float) -> tuple[float | None, float | None]:
    """:func:`fit_line` through the points that have a value (``(None, None)`` with fewer than two
    distinct fractions among them)."""
    known = [(f, v) for f, v in points if v is not None]
    if len({f for f, _ in known}) < 2:
        return None, None
    value, miss = fit_line([f for f, _ in known], [v for _, v in known], at)
    return max(value, 0.0), miss


def markdown(result: dict) -> str:
    runs = result["runs"]
    line = not result["measured_target"]
    target = result["target"]
    head = ["command"] + [f"F = {r['fraction']:g}" for r in runs] + ([f"F = {target:g} (line)"] if line else [])
    rule = "|" + "---|" * len(head)

    def row(module: str, entry: dict, measured: Callable[[dict], str], fitted: Callable[[dict], str]) -> str:
        by_fraction = {m["fraction"]: m for m in entry["measured"]}
        cells = [f"`{module}`"]
        for r in runs:
            m = by_fraction.get(r["fraction"])
            cells.append(measured(m) if m else "not run" if module in r["missing"] else "—")
        fit = entry.get("line")
        if line and fit is None:
            cells.append("one point: no line" if entry["measured"] else "not measured")
        elif line:
            cells.append(fitted(fit))
        return "| " + " | ".join(cells) + " |"

    def cost(m: dict) -> str:
        return f"{format_duration(m['seconds'])} / {format_bytes(m['peak_memory_bytes'])}"

    def cost_line(fit: dict) -> str:
        return (f"{format_duration(fit['seconds'])} / {format_bytes(int(fit['peak_memory_bytes']))}"
                f"{' **over**' if fit['over_memory_limit'] else ''} ({fit['seconds_miss']:.0%}, {fit['peak_miss']:.0%})")

    def written(m: dict) -> str:
        return "not recorded" if m["written_bytes"] is None else format_bytes(m["written_bytes"])

    def written_line(fit: dict) -> str:
        return ("no line" if fit["written_bytes"] is None
                else f"{format_bytes(int(fit['written_bytes']))} ({fit['written_miss']:.0%})")

    lines = ["# Cost as the data grows", "",
             "Wall time / peak memory (the command's whole process tree: its processes' proportional sets summed, "
             "a shared page counted once, never less than its largest process's resident set) of each command of a scale run "
             "(`python -m experiments.reproduce --source synth:paper --scale F`). "
             + ("The last column is the least-squares line `a + b F` through the measured points (none through "
                "a single point), in brackets the largest relative miss of that line at a measured point (time, memory); "
                f"**over** marks a peak over {result['memory_limit_bytes'] / 1e9:g} GB." if line else ""),
             "", "Rows: " + "; ".join(f"F = {r['fraction']:g}: " + ", ".join(f"{n} {v:,}" for n, v in r["rows"].items())
                                     for r in runs), "",
             *[f"- F = {r['fraction']:g} is incomplete: no record of " + ", ".join(f"`{m}`" for m in r["missing"])
               + " (the run stopped before them)." for r in runs if r["missing"]],
             *([""] if any(r["missing"] for r in runs) else []),
             "| " + " | ".join(head) + " |", rule,
             *[row(module, entry, cost, cost_line) for module, entry in result["commands"].items()],
             "", "## Disk", "",
             "What each command wrote: the size of the files under the workdir it created or changed (a record made "
             "before this was measured says \"not recorded\"); the last row, the most the workdir held after a "
             "command." + (" The line and its miss as above." if line else ""), "",
             "| " + " | ".join(head) + " |", rule,
             *[row(module, entry, written, written_line) for module, entry in result["commands"].items()]]
    workdir = ["**workdir**"] + ["not recorded" if r["workdir_bytes"] is None else format_bytes(r["workdir_bytes"])
                                 for r in runs]
    if line:
        fit = result["workdir_line"]
        workdir.append("no line" if fit["bytes"] is None else f"{format_bytes(int(fit['bytes']))} ({fit['miss']:.0%})")
    lines.append("| " + " | ".join(workdir) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(GrowthConfig, argv)
    root = Path(cfg.workdir)
    directories = sorted(p.parent for p in root.glob("*/reproduce.json"))
    if not directories:
        raise UserError(f"{root}: no scale run (expected DIR/<name>/reproduce.json from python -m "
                        f"experiments.reproduce --workdir DIR/<name> --source synth:paper --scale F)")
    runs = [read_run(d) for d in directories]
    fractions = [r.fraction for r in runs]
    if len(set(fractions)) < len(fractions):
        raise UserError(f"{root}: two scale runs at the same fraction ({sorted(fractions)}); keep one per --scale")
    result = growth(runs, cfg.target, cfg.memory_limit_gb * 1e9)
    write_json(result, root / "growth.json")
    path = write_text(markdown(result), root / "growth.md")
    log.info("growth of %d commands over %d runs -> %s", len(result["commands"]), len(runs), path)
    return result


if __name__ == "__main__":
    run_main(main)
