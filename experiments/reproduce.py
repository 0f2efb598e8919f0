"""One command that reproduces every table and plot: ``python -m experiments.reproduce``.

Runs each stage's own command in order (each skips itself when its outputs are complete for the
same settings, so an interrupted run resumes where it stopped) and then writes ``DIR/report.md``:
the retrieval table (paper Table 1), the ranking table (Table 2), aisle and relevance F1
(section 5), the importance ranking, serving latency, every plot, and next to each table the
paper's own figures with a sentence on whether our result agrees in direction.

Sources: ``synth:<profile>`` (the embedded synthetic marketplace), ``fashion``, ``instacart``,
``completejourney`` (real public data through ``data.adapters``) and ``workdir`` (a user's own
four tables, already in ``DIR/data/``: validated with ``data.validate`` instead of generated).
A source without clicks (``fashion``, or a ``workdir`` whose ``impressions.parquet`` is empty)
stops after the embedding stage.

Each command's whole output (stdout and stderr) goes to ``DIR/logs/<stage>.log``; the command
runs on a pseudo-terminal, so its progress bars draw as they would in a terminal. The terminal
shows a line when each command starts and when it ends (with its wall time), and meanwhile the
command's latest progress line (tqdm's steps, rate and ETA) and elapsed time on one live line.
When stderr is not a terminal (CI, a pipe) the live line becomes at most one progress line every
30 s.

What each command cost goes to ``DIR/reproduce.json`` (``command_costs``) and the report's Cost
section: its wall time, its peak memory, the machine's load meanwhile, and the disk it wrote (the
files under ``DIR`` it created or changed) and the workdir's size after it (:class:`CommandCost`).
The peak is per command, never a running maximum over the commands before it: each command runs
under a small wrapper process (:data:`MEASURED`) that reports the kernel's high-water mark of the
largest single process among the command and the descendants it waited for, and the whole
process tree (workers and servers together) is sampled every 0.5 s (:class:`TreeSampler`). The
tree's memory is the sum of its processes' proportional sets (PSS: a page that n processes share, a mapped file or a
shared tensor, counts 1/n in each); the summed resident sets (RSS, such a page counted n times)
are recorded beside it.

A command that finds its outputs complete makes nothing (no file under ``DIR`` changes but its
log): its record keeps the cost of the earlier run that made them (with or without ``--force``), as
do the stages this invocation does not run, so a run resumed after a failure, or completed stage by
stage, reports what each command cost to make what is there. ``reproduce.json`` is rewritten after
every command that succeeds, so a command that fails (or a run that is killed) loses none of the
costs before it.
"""
from __future__ import annotations

import codecs
import dataclasses
import fcntl
import json
import logging
import os
import pty
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Literal, Optional, Sequence, TextIO

import psutil
import pyarrow.parquet as pq

from common.cli import DEFAULT_WORKDIR, UserError, check_config, parse_config, run_main
from common.io import prepare_workdir, read_json, write_json, write_text
from data.dataset import MANIFEST
from data.schema import TABLE_NAMES, table_path
from experiments.presets import PRESETS, Preset
from experiments.report import build_report, format_bytes, format_duration

log = logging.getLogger("experiments.reproduce")

RANKING_SOURCES = {"synth", "instacart", "completejourney"}
ADAPTER_SOURCES = ("fashion", "instacart", "completejourney")
WORKDIR_SOURCE = "workdir"
# the trained model that importance explains and serving exports: ranking.train always trains seed 0
EXPLAINED_MODEL = ("--variant", "dcn_pq_hist", "--model-seed", "0")
# the DashCLIP commands run one at a time on models far larger than the ranker: every core (--threads
# defaults to 1); a preset's own --threads comes later on the command line and wins
ALL_CORES = ("--threads", "0")
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")  # ANSI sequences, control chars


@dataclass
class ReproduceConfig:
    """Run every stage that is not complete yet and write DIR/report.md."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    source: str = field(default="synth:demo", metadata={
        "help": "synth:<tiny|demo|paper>, fashion, instacart, completejourney, or workdir (your own four "
                "tables, already in DIR/data/: validated instead of generated)"})
    data_path: str = field(default="", metadata={
        "help": "source location for real data (default: ../shared/data/<name> next to the repo)"})
    preset: Literal["auto", "tiny", "demo", "full", "scale"] = field(default="auto", metadata={
        "help": "stage settings (experiments/presets.py): tiny (tests, seconds), demo (2-core budget), full (each "
                "command's own defaults), scale (every stage at the source's full size with training capped by a "
                "step budget: the cost of each command as the data grows); auto = tiny for synth:tiny, scale for "
                "synth:paper, else demo"})
    scale: Optional[float] = field(default=None, metadata={
        "help": "synth sources: multiply the profile's sizes by F, a fraction of them (data.synth --scale F)",
        "gt": 0.0, "max": 1.0})
    seed: int = field(default=0, metadata={"help": "random seed of the data, embeddings and importance commands",
                                           "min": 0})
    seeds: int = field(default=0, metadata={"help": "ranking seeds per variant; 0 = the preset's (5; scale: 1)",
                                            "min": 0})
    stages: str = field(default="all", metadata={
        "help": "comma list of stages to run (data,embeddings,ranking,importance,serving) or 'all'; "
                "'none' only rewrites the report"})
    force: bool = field(default=False, metadata={"help": "redo every stage"})
    publish: str = field(default="", metadata={
        "help": "also copy report.md and its plots into this directory (e.g. experiments/results/<source>)"})

    def check(self) -> None:
        """``--source`` names a source, and ``--scale`` and ``--data-path`` go with it (common.cli.check_config
        runs the per-field rules first)."""
        kind = self.source.partition(":")[0]
        if kind != "synth" and kind not in ADAPTER_SOURCES and self.source != WORKDIR_SOURCE:
            raise UserError(f"--source {self.source!r}: expected synth:<profile>, {', '.join(ADAPTER_SOURCES)} "
                            f"or {WORKDIR_SOURCE}")
        if self.scale is not None and kind != "synth":
            raise UserError(f"--scale is data.synth's size factor: only for synth:<profile> sources, not --source "
                            f"{self.source}")
        if self.data_path and self.source == WORKDIR_SOURCE:
            raise UserError(f"--data-path is not used with --source {WORKDIR_SOURCE}: put the four tables in "
                            f"{Path(self.workdir) / 'data'}/")


@dataclass(frozen=True)
class Stage:
    """One stage: a name (for --stages) and the commands that make it."""

    name: str
    commands: tuple[tuple[str, ...], ...]


def _default_data_path(name: str) -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / {
        "fashion": "fashion_small", "instacart": "instacart"}.get(name, name)


def row_count(workdir: str, name: str) -> int | None:
    """Rows of ``DIR/data/<name>.parquet`` from its footer; None when the file is missing or unreadable."""
    try:
        return pq.ParquetFile(table_path(workdir, name)).metadata.num_rows
    except (OSError, ValueError):  # missing, or not a parquet file (pyarrow's ArrowInvalid is a ValueError)
        return None


def plan_stages(cfg: ReproduceConfig, preset: Preset) -> list[Stage]:
    """The ordered commands for ``cfg.source`` with ``preset`` flags."""
    check_config(cfg)  # also when called with a config built in code
    kind, _, profile = cfg.source.partition(":")
    common = ["--workdir", cfg.workdir] + (["--force"] if cfg.force else [])
    seed = ["--seed", str(cfg.seed)]
    if kind == "synth":
        data_cmd = ("data.synth", "--profile", profile or "demo", *seed, *common,
                    *(["--scale", str(cfg.scale)] if cfg.scale is not None else []))
    elif kind in ADAPTER_SOURCES:
        source = cfg.data_path or (str(_default_data_path(kind)) if kind != "completejourney" else "")
        data_cmd = (f"data.adapters.{kind}", *(["--source", source] if source else []), *seed, *common,
                    *preset.adapter_flags.get(kind, ()))
    else:  # WORKDIR_SOURCE (ReproduceConfig.check)
        missing = [f"{name}.parquet" for name in TABLE_NAMES if not table_path(cfg.workdir, name).is_file()]
        if missing:
            raise UserError(f"--source {WORKDIR_SOURCE}: {Path(cfg.workdir) / 'data'} has no {', '.join(missing)}; "
                            f"put your four tables there (columns: data/schema.py)")
        data_cmd = ("data.validate", "--workdir", cfg.workdir)
    stages = [
        Stage("data", (data_cmd,)),
        Stage("embeddings", (
            ("embeddings.train", "--stage", "all", *seed, *common, *ALL_CORES,
             *preset.source_embeddings_train.get(kind, preset.embeddings_train)),
            ("embeddings.export", *common),
            ("embeddings.evaluate", *seed, *common, *ALL_CORES, *preset.embeddings_evaluate),
        )),
    ]
    if kind in RANKING_SOURCES or (kind == WORKDIR_SOURCE and (row_count(cfg.workdir, "impressions") or 0) > 0):
        stages += [
            Stage("ranking", (("ranking.train", "--variant", "all", "--seeds", str(cfg.seeds or preset.seeds),
                               *common, *preset.ranking_train),)),
            Stage("importance", (("ranking.importance", *EXPLAINED_MODEL, *seed, *common, *preset.importance),)),
            Stage("serving", (("serving.export", *EXPLAINED_MODEL, *common),
                              ("serving.index", *common),
                              ("serving.bench", *common, *preset.serving_bench))),
        ]
    return stages


def describe_workdir_data(workdir: str) -> None:
    """Record the row counts of a user's own tables in ``DIR/data/manifest.json`` for the report.

    Only where there is no manifest or one this function wrote: a manifest that ``data.synth`` or an
    adapter published (listing every file's hash, which the stages check) is left as it is. The
    written one lists no files, so the stages take the tables as hand-placed.
    """
    path = Path(workdir) / MANIFEST
    if path.exists() and read_json(path).get("source") != WORKDIR_SOURCE:
        return
    write_json({"source": WORKDIR_SOURCE, "validated_by": shlex.join(["python", "-m", "data.validate", "--workdir",
                                                                      workdir]),
                "row_counts": {name: row_count(workdir, name) for name in TABLE_NAMES}}, path)


class Console:
    """What a person sees while a command runs: its latest output line, live or throttled.

    ``feed`` takes the command's raw output. Output is cut at carriage returns and newlines; the
    last piece (tqdm redraws its bar after a ``\\r``) is the command's current progress, without
    ANSI sequences. On a terminal it is redrawn in place with the command's elapsed time (at most
    every 0.2 s, and each ``tick``); elsewhere it is logged at most every ``quiet_interval_s``.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, quiet_interval_s: float = 30.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval_s = 0.2 if self.live else quiet_interval_s
        self.label = ""
        self.current = ""
        self._pending = ""
        self._shown = ""
        self._started = self._drawn_at = time.monotonic()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def columns(self) -> int:
        """Width of the terminal (80 when unknown)."""
        return shutil.get_terminal_size().columns

    def begin(self, label: str, command: str) -> None:
        """Announce a command; its progress is then shown under ``label``."""
        self.say(f"[{label}] {command}")
        self.label, self.current, self._pending, self._shown = label, "", "", ""
        self._started = self._drawn_at = time.monotonic()
        self._decoder.reset()

    def feed(self, chunk: bytes) -> None:
        """Take more of the command's output."""
        pieces = re.split(r"[\r\n]", self._pending + self._decoder.decode(chunk))
        self._pending = pieces[-1][-4096:]
        latest = next((p for p in reversed(pieces) if p), None)
        if latest is not None:  # a bar erased with spaces ("\r   \r") clears the line
            self.current = _CONTROL.sub("", latest).strip()
        self.tick()

    def tick(self) -> None:
        """Redraw (terminal) or log (elsewhere) the current progress when due."""
        now = time.monotonic()
        if now - self._drawn_at < self.interval_s:
            return
        self._drawn_at = now
        status = f"[{self.label} {format_duration(now - self._started)}] {self.current}".rstrip()
        if self.live:
            self.stream.write("\r\x1b[K" + status[: self.columns - 1])
            self.stream.flush()
        elif self.current and self.current != self._shown:
            self._shown = self.current
            log.info("%s", status)

    def say(self, message: str) -> None:
        """A line of its own (the live line is cleared first)."""
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        log.info("%s", message)


def _spawn(argv: list[str], columns: int, pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` with stdout and stderr on a new pseudo-terminal ``columns`` wide; return the process and
    the descriptor to read its output from. A tty makes tqdm draw the bars it leaves off for pipes
    (``disable=None``); newline translation is off, so the log gets the bytes the command wrote.
    Falls back to a pipe where no pseudo-terminal can be opened. ``pass_fds`` stay open in the child."""
    try:
        reader, writer = pty.openpty()
    except OSError:
        reader, writer = os.pipe()
    else:
        attrs = termios.tcgetattr(writer)
        attrs[1] &= ~termios.ONLCR
        termios.tcsetattr(writer, termios.TCSANOW, attrs)
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, max(columns, 40), 0, 0))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, pass_fds=pass_fds)
    except OSError:
        os.close(reader)
        raise
    finally:
        os.close(writer)
    return proc, reader


@dataclass(frozen=True)
class CommandCost:
    """What one command took: its wall time, its memory, how busy the machine was meanwhile, and the
    disk it wrote."""

    exit_code: int
    seconds: float
    # the most resident memory the command's process tree held at once: the sampled sum of its
    # processes' resident sets (a page shared by several processes is in each one's), and never
    # less than max_process_rss_bytes
    peak_rss_bytes: int
    # the kernel's high-water mark of the largest single process of the tree (the command's own
    # process and the descendants it waited for), exact however briefly it was reached
    max_process_rss_bytes: int
    load_average: float  # the mean of the machine's 1-minute load average, sampled while it ran
    # the most memory the tree held at once: the sampled sum of its processes' proportional sets
    # (a page shared by n processes counts 1/n in each, so a file or tensor that workers map
    # together counts once), and never less than max_process_rss_bytes
    peak_memory_bytes: int = 0
    # the size of the files under the workdir that the command created or changed, and of every file
    # there once it ended (reproduce's own files left out: :func:`output_state`)
    written_bytes: int = 0
    workdir_bytes: int = 0


# Runs as ``python -I -S -c MEASURED FD ARGV...``: runs ARGV, writes the largest resident set (KiB)
# among ARGV's process and the descendants it waited for to descriptor FD, and exits as ARGV did.
# A command started by this small interpreter begins from its few MB: one started by a large
# process would report that process's resident set as its own (Linux counts the memory a process
# had just before exec in its high-water mark).
MEASURED = """
import os, resource, signal, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the command itself
signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
code = proc.wait()
os.write(int(sys.argv[1]), str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss).encode())
if code < 0:  # die of the same signal (SIGKILL cannot be handled: it needs no reset)
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


class TreeSampler:
    """Samples the summed resident (RSS) and proportional (PSS) memory of a process's descendants,
    and the machine's load.

    RSS is read every ``interval_s``. PSS is read from ``/proc/PID/smaps_rollup``, which walks the
    page tables and takes tens of ms for a process of a few GB: it is read at most every
    ``interval_s`` and otherwise only as often as keeps its cost under ``pss_cpu_share`` of one
    core, so the sampler does not slow the command it measures on a small machine.
    """

    def __init__(self, pid: int, interval_s: float = 0.5, pss_cpu_share: float = 0.02) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.pss_cpu_share = pss_cpu_share
        self.peak_rss_bytes = 0
        self.peak_pss_bytes = 0
        self.loads = [os.getloadavg()[0]]
        self._sampled_at = time.monotonic()  # the process tree is first sampled after one interval
        self._pss_due = self._sampled_at

    def sample(self) -> None:
        """Take a sample when ``interval_s`` has passed since the last one."""
        now = time.monotonic()
        if now - self._sampled_at < self.interval_s:
            return
        self._sampled_at = now
        self.loads.append(os.getloadavg()[0])
        try:
            processes = self.root.children(recursive=True)
        except psutil.NoSuchProcess:  # the command has exited
            return
        with_pss = now >= self._pss_due
        rss = pss = 0
        for process in processes:
            try:
                memory = process.memory_full_info() if with_pss else process.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone (or a zombie) since the listing
                continue
            rss += memory.rss
            pss += memory.pss if with_pss else 0
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        if with_pss:
            self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
            took = time.monotonic() - now
            self._pss_due = now + max(self.interval_s, took / self.pss_cpu_share)


def run_command(argv: list[str], sink: BinaryIO, console: Console) -> CommandCost:
    """Run ``argv`` (under :data:`MEASURED`) to the end, copying its output to ``sink`` and ``console``; return
    its exit code and cost."""
    start = time.perf_counter()
    report_reader, report_writer = os.pipe()
    try:
        proc, reader = _spawn([sys.executable, "-I", "-S", "-c", MEASURED, str(report_writer), *argv],
                              console.columns - len(console.label) - 16, pass_fds=(report_writer,))
    except OSError:
        os.close(report_reader)
        raise
    finally:
        os.close(report_writer)
    try:
        sampler = TreeSampler(proc.pid)
        while True:
            sampler.sample()
            ready, _, _ = select.select([reader], [], [], sampler.interval_s)
            if ready:
                try:
                    chunk = os.read(reader, 1 << 16)
                except OSError:  # EIO: every writer of the pseudo-terminal is gone
                    chunk = b""
                if not chunk:
                    break
                sink.write(chunk)
                console.feed(chunk)
            elif proc.poll() is not None:  # exited; a child it left behind may still hold the terminal
                break
            else:
                console.tick()
        code = proc.wait()
        max_rss = int(os.read(report_reader, 64) or 0) * 1024  # nothing when the wrapper itself was killed
        return CommandCost(exit_code=code, seconds=time.perf_counter() - start,
                           peak_rss_bytes=max(sampler.peak_rss_bytes, max_rss), max_process_rss_bytes=max_rss,
                           load_average=sum(sampler.loads) / len(sampler.loads),
                           peak_memory_bytes=max(sampler.peak_pss_bytes, max_rss))
    finally:
        os.close(reader)
        os.close(report_reader)
        if proc.poll() is None:  # interrupted while it ran
            proc.terminate()
            proc.wait()


def _log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` non-blank lines of a log as a terminal shows them (last redraw of each line)."""
    text = path.read_text(errors="replace")
    shown = [_CONTROL.sub("", line.split("\r")[-1]).strip() for line in text.split("\n")]
    return " | ".join([line for line in shown if line][-lines:])


def exit_reason(code: int) -> str:
    """``exit 2``, or the signal that killed the command (a negative ``code``), with the likely cause
    of a SIGKILL nobody asked for: memory."""
    if code >= 0:
        return f"exit {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by {name}: out of memory? the kernel's OOM killer and container limits send it"
    return f"killed by {name}"


OWN_FILES = ("logs", "reproduce.json", "report.md")  # what reproduce itself writes in DIR


def output_state(workdir: Path) -> dict[str, tuple[int, int]]:
    """``(mtime_ns, size)`` of every file under ``workdir`` but reproduce's own (:data:`OWN_FILES`):
    equal before and after a command that made nothing."""
    state = {}
    for path in workdir.rglob("*"):
        rel = path.relative_to(workdir)
        if rel.parts[0] in OWN_FILES:
            continue
        try:
            stat = path.stat()
        except OSError:  # removed while listed
            continue
        if not path.is_dir():
            state[str(rel)] = (stat.st_mtime_ns, stat.st_size)
    return state


def written_bytes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """The size of the files of ``after`` (an :func:`output_state`) that are new or changed since ``before``."""
    return sum(size for rel, (mtime, size) in after.items() if before.get(rel) != (mtime, size))


def previous_costs(root: Path) -> dict[str, list[dict]]:
    """The command records of the last ``reproduce.json`` in ``root`` by stage ({} without a readable one)."""
    try:
        costs = json.loads((root / "reproduce.json").read_text())["command_costs"]
        return {stage: [dict(cost) for cost in records] for stage, records in costs.items()
                if all(isinstance(cost, dict) and "command" in cost for cost in records)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def recorded_cost(record: dict) -> CommandCost:
    """The :class:`CommandCost` of a ``reproduce.json`` record (a successful command's)."""
    return CommandCost(exit_code=0, **{f.name: record[f.name] for f in dataclasses.fields(CommandCost)
                                       if f.name != "exit_code" and f.name in record})


def made_by_key(command: str) -> str:
    """The key under which a command's record is found again: the command line without ``--force``,
    which redoes the work but makes the same outputs (a forced run's record is the cost of making
    what a later run without the flag finds complete)."""
    return shlex.join(arg for arg in shlex.split(command) if arg != "--force")


def run_stage(stage: Stage, log_dir: Path, console: Console, position: str, workdir: Path | None = None,
              earlier: dict[str, dict] | None = None,
              done: Callable[[list[CommandCost]], None] | None = None) -> list[CommandCost]:
    """Run the stage's commands (``python -m ...``), all output appended to ``log_dir/<stage>.log``;
    return what each cost. ``position`` (``2/5``) labels the stage on the console. A command that
    left every file of ``workdir`` as it was gets the cost ``earlier`` records for it (keyed by
    :func:`made_by_key`: the run that made its outputs), when there is one. ``done`` gets the costs
    so far after each command that succeeded (to record them before a later command can fail)."""
    log_path = log_dir / f"{stage.name}.log"
    console.say(f"stage {position} {stage.name}: {len(stage.commands)} command(s), full output in {log_path}")
    costs = []
    for index, cmd in enumerate(stage.commands, 1):
        argv = [sys.executable, "-m", *cmd]
        label = f"{stage.name} {index}/{len(stage.commands)}"
        command = shlex.join(["python", "-m", *cmd])
        console.begin(label, command)
        before = output_state(workdir) if workdir is not None else None
        with open(log_path, "ab") as sink:
            sink.write(f"$ {shlex.join(argv)}\n".encode())
            sink.flush()
            cost = run_command(argv, sink, console)
            sink.write(f"\n# exit {cost.exit_code} after {cost.seconds:.1f} s, peak memory "
                       f"{format_bytes(cost.peak_memory_bytes)} (summed RSS {format_bytes(cost.peak_rss_bytes)})\n".encode())
        took = f"{format_duration(cost.seconds)}, peak memory {format_bytes(cost.peak_memory_bytes)}"
        if cost.exit_code != 0:
            console.say(f"[{label}] {cmd[0]} failed ({exit_reason(cost.exit_code)}) after {took}")
            raise UserError(f"stage {stage.name} failed ({cmd[0]}, {exit_reason(cost.exit_code)}); see {log_path}: "
                            f"{_log_tail(log_path)}")
        console.say(f"[{label}] {cmd[0]} done in {took}")
        made = (earlier or {}).get(made_by_key(command))
        if before is not None:
            after = output_state(workdir)
            if made is not None and after == before:
                console.say(f"[{label}] {cmd[0]} made nothing: its record keeps the cost of the run that made its outputs")
                cost = recorded_cost(made)
            else:
                cost = dataclasses.replace(cost, written_bytes=written_bytes(before, after),
                                           workdir_bytes=sum(size for _, size in after.values()))
        costs.append(cost)
        if done is not None:
            done(costs)
    console.say(f"stage {position} {stage.name} done in {format_duration(sum(c.seconds for c in costs))}")
    return costs


def preset_name(cfg: ReproduceConfig) -> str:
    """The preset ``cfg`` runs with: ``--preset``, or for ``auto`` tiny (``synth:tiny``), scale (``synth:paper``)
    or demo (every other source)."""
    if cfg.preset != "auto":
        return cfg.preset
    kind, _, profile = cfg.source.partition(":")
    return {"tiny": "tiny", "paper": "scale"}.get(profile, "demo") if kind == "synth" else "demo"


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(ReproduceConfig, argv)
    kind = cfg.source.partition(":")[0]
    preset = PRESETS[preset_name(cfg)]
    root = prepare_workdir(cfg.workdir, "logs")
    stages = plan_stages(cfg, preset)
    wanted = {s.name for s in stages} if cfg.stages == "all" else (
        set() if cfg.stages == "none" else set(cfg.stages.split(",")))
    unknown = wanted - {s.name for s in stages}
    if unknown:
        raise UserError(f"--stages: unknown or not applicable to {cfg.source}: {sorted(unknown)}; "
                        f"expected a subset of {[s.name for s in stages]}")
    console = Console()
    run = [s for s in stages if s.name in wanted]
    commands = {s.name: [shlex.join(["python", "-m", *c]) for c in s.commands] for s in stages}
    earlier = previous_costs(root)
    made_by = {made_by_key(cost["command"]): cost for records in earlier.values() for cost in records}
    records = dict(earlier)  # by stage; each keeps its earlier records until this run replaces them

    def record(stage: Stage, costs: list[CommandCost]) -> None:
        """Write ``reproduce.json`` with ``stage``'s costs so far (and the earlier records of its
        commands still to run): a later failure keeps them."""
        now = [{"command": command, **{k: v for k, v in dataclasses.asdict(cost).items() if k != "exit_code"}}
               for command, cost in zip(commands[stage.name], costs)]
        later = [made_by_key(c) for c in commands[stage.name][len(costs):]]
        records[stage.name] = now + [made_by[key] for key in later if key in made_by]
        ordered = {s.name: records[s.name] for s in stages if s.name in records}  # stage order
        write_json({"config": dataclasses.asdict(cfg), "preset": preset_name(cfg),
                    "cpus": len(os.sched_getaffinity(0)), "stages": [s.name for s in stages],
                    "stage_seconds": {name: sum(c["seconds"] for c in costs) for name, costs in ordered.items()},
                    "command_seconds": {name: [c["seconds"] for c in costs] for name, costs in ordered.items()},
                    "command_costs": ordered, "commands": commands}, root / "reproduce.json")

    for number, stage in enumerate(run, 1):
        run_stage(stage, root / "logs", console, f"{number}/{len(run)}", root, made_by,
                  done=lambda costs, stage=stage: record(stage, costs))
        if stage.name == "data" and kind == WORKDIR_SOURCE:
            describe_workdir_data(cfg.workdir)
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
