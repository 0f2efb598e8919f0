"""Every benchmark on one device in one run: ``python -m experiments.gpu_bench --workdir DIR
[--device cuda|cpu] [--budget-s 540] [--quick] [--profile auto|tiny|demo] [--benches ...]``.

Runs, each as a process of its own module (so a crash in one loses none of the others) and each
under a time cap (a benchmark still running at its cap is stopped, with its whole process group,
and reported as ``cut``):

``embeddings``  ``python -m embeddings.bench``: DashCLIP stage-1/stage-2 training steps and
                inference on ``--device`` with the BLIP-base-shaped backbone (random weights) under
                bf16 autocast on CUDA (``--quick``: the tiny backbone in fp32), and the end-to-end
                encoder, fp32 against fast and bf16.
``ranking``     ``python -m ranking.bench --device``: train/eval samples/s of every ranking variant
                next to torchrec's DLRM_DCN on DIR's features.
``serving``     ``python -m serving.bench``: fused model vs Redis-fetched vectors, and the HTTP
                service. It has no device flag: it measures the CPU service.
``index``       ``python -m serving.index --bench``: FAISS exact / HNSW / IVF build time, recall@10
                and latency on random unit vectors (faiss-cpu: on the CPU).

What the benchmarks need is made first, with quick settings, only when DIR lacks it: the four
tables (``python -m data.synth --profile tiny`` with ``--quick``, ``demo`` otherwise, into DIR
when DIR has no ``data/``; the JSON says which), and for ``serving`` a tiny DashCLIP model
trained for two steps per stage and its exported tables, a ``dcn_pq_hist`` ranker trained for one
epoch, its serving export and the product index. A failed or cut preparation step skips the
benchmark that needed it, with the reason. ``ranking.bench`` runs before the DashCLIP tables exist
when DIR has none, so it times random tables of the paper's width (256).

Time: the caps share ``--budget-s`` (default 540 s) among the steps still to run, in proportion to
fixed shares (:data:`SHARES`), so a step that ends early leaves its time to the later ones; the
whole run stays within the budget plus a few seconds of start-up and writing.

Writes ``DIR/gpu_bench/gpu_bench.json`` (per benchmark: status ``ok``/``failed``/``cut``/``skipped``,
its wall time and cap, its command, the reason when not ok, and its figures, read from the
benchmark's own JSON; the device name, torch, CUDA and cuDNN versions, package versions, the data
source, and every preparation step) and ``DIR/gpu_bench/gpu_bench.md`` (the same as tables), and each
step's output in ``DIR/gpu_bench/logs/<step>.log``. Exit code 0 when every benchmark is ok, cut or
skipped, 1 when one failed, 2 on bad input.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from common.cli import UserError, parse_config, run_main
from common.io import prepare_workdir, read_json, write_json, write_text
from data.schema import TABLE_NAMES, table_path
from ranking import layout

log = logging.getLogger("experiments.gpu_bench")

BENCHES: tuple[str, ...] = ("embeddings", "ranking", "serving", "index")
OUT_DIR = "gpu_bench"
RANKER_VARIANT = "dcn_pq_hist"
# share of the remaining budget each step may take, relative to the steps still to run
SHARES: dict[str, float] = {
    "data": 0.08, "embeddings": 0.26, "index": 0.14, "ranking": 0.14, "prep_dashclip": 0.07, "prep_tables": 0.04,
    "prep_ranker": 0.07, "prep_export": 0.05, "prep_index": 0.02, "serving": 0.13}
MIN_CAP_S = 3.0  # a step offered less than this is not started
RESERVE_S = 3.0  # kept back from the budget for writing the results
TERM_GRACE_S = 5.0  # after SIGTERM, how long a cut step's processes get before SIGKILL
PACKAGES = ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "tensordict", "torchmetrics", "transformers",
            "faiss-cpu", "fastapi", "uvicorn", "numpy", "pyarrow")


@dataclass
class GpuBenchConfig:
    """Run every benchmark (embeddings, ranking, serving, index) on one device, each capped in time."""

    workdir: str = field(default="runs/gpu_bench", metadata={
        "help": "run directory: its data and trained outputs are used when present, made (quick settings) when not; "
                "results go to DIR/gpu_bench/"})
    device: Literal["cuda", "cpu"] = field(default="cuda", metadata={
        "help": "device of the embeddings and ranking benchmarks (serving and the FAISS index run on the CPU)"})
    budget_s: float = field(default=540.0, metadata={"help": "wall-time budget of the whole run, shared by the "
                                                             "steps' caps", "gt": 0.0})
    quick: bool = field(default=False, metadata={"help": "small sizes everywhere (a CPU check of the whole run)"})
    profile: Literal["auto", "tiny", "demo"] = field(default="auto", metadata={
        "help": "data.synth profile when DIR has no data: auto = tiny with --quick, demo otherwise"})
    embeddings_backbone: Literal["auto", "blip-base", "mini", "tiny"] = field(default="auto", metadata={
        "help": "embeddings.bench backbone: auto = tiny with --quick, blip-base (BLIP-base shapes, random weights) "
                "otherwise"})
    embeddings_dtype: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={
        "help": "embeddings.bench autocast dtype: auto = bf16 on cuda, fp32 on cpu"})
    benches: list[str] = field(default_factory=lambda: list(BENCHES), metadata={
        "help": "benchmarks to run", "choices": list(BENCHES), "min_items": 1})
    seed: int = field(default=0, metadata={"help": "seed of the data and of the quick DashCLIP model", "min": 0})


@dataclass
class Step:
    """One process of the run: a benchmark (``bench`` set) or a preparation step (``needed_by``)."""

    name: str
    module: str
    args: list[str]
    bench: str | None = None
    needed_by: tuple[str, ...] = ()
    after: tuple[str, ...] = ()  # steps that must have succeeded first

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def command(self) -> str:
        return shlex.join(["python", "-m", self.module, *self.args])


@dataclass
class StepResult:
    """How a step ended: ``ok``, ``failed`` (non-zero exit), ``cut`` (stopped at its cap) or ``skipped``."""

    status: str
    wall_s: float = 0.0
    cap_s: float = 0.0
    returncode: int | None = None
    reason: str = ""
    log: str = ""


# ------------------------------------------------------------------ plan
def data_present(workdir: Path) -> list[str]:
    """The names of the four tables that ``DIR/data`` holds."""
    return [name for name in TABLE_NAMES if table_path(workdir, name).is_file()]


def resolved(cfg: GpuBenchConfig) -> dict[str, str]:
    """The ``auto`` settings made concrete."""
    return {"profile": cfg.profile if cfg.profile != "auto" else ("tiny" if cfg.quick else "demo"),
            "backbone": cfg.embeddings_backbone if cfg.embeddings_backbone != "auto" else
            ("tiny" if cfg.quick else "blip-base"),
            "dtype": cfg.embeddings_dtype if cfg.embeddings_dtype != "auto" else
            ("bf16" if cfg.device == "cuda" else "fp32")}


def bench_steps(cfg: GpuBenchConfig, workdir: str) -> dict[str, Step]:
    """The four benchmark commands at the full (or ``--quick``) sizes."""
    r = resolved(cfg)
    dev = cfg.device
    emb = ["--workdir", workdir, "--backbone", r["backbone"], "--device", dev, "--dtype", r["dtype"]]
    if cfg.quick:
        emb += ["--batch-size", "4", "--steps", "1", "--warmup", "1", "--image-size", "32", "--title-tokens", "8",
                "--query-tokens", "4", "--negatives", "2", "--encode-products", "16", "--encode-queries", "32",
                "--encode-batch-size", "8", "--encode-rounds", "1", "--threads", "1"]
        rank = ["--batch-size", "256", "--steps", "2", "--warmup", "1"]
        serve = ["--iters", "5", "--warmup", "1", "--candidates", "1", "8", "--http-clients", "2",
                 "--http-requests", "10", "--http-candidates", "8", "--http-sequential", "3", "--http-seconds", "5",
                 "--http-workers", "1", "--funnel-candidates", "20", "--funnel-k", "5", "--threads", "1"]
        index = ["--bench-n", "2000", "--bench-dim", "32", "--bench-queries", "50", "--bench-ef-search", "16",
                 "--bench-nprobe", "4", "--hnsw-m", "8", "--ef-construction", "32", "--ef-search", "32", "--nprobe", "8"]
    else:
        emb += ["--batch-size", "32", "--steps", "5", "--warmup", "2", "--encode-products", "512",
                "--encode-queries", "2048", "--encode-rounds", "3", "--threads", "0"]
        rank = ["--batch-size", "4096", "--steps", "20", "--warmup", "3"]
        serve = ["--iters", "100", "--warmup", "10", "--candidates", "1", "64", "512", "--http-clients", "8",
                 "--http-requests", "2000", "--http-candidates", "64", "--http-sequential", "200",
                 "--http-seconds", "15", "--funnel-candidates", "200", "--funnel-k", "10"]
        index = ["--bench-n", "100000", "--bench-dim", "256", "--bench-queries", "500", "--bench-ef-search", "64",
                 "--bench-nprobe", "16", "--build-threads", str(max(1, os.cpu_count() or 1))]
    return {
        "embeddings": Step("embeddings", "embeddings.bench", emb, bench="embeddings"),
        "ranking": Step("ranking", "ranking.bench", ["--workdir", workdir, "--device", dev, *rank], bench="ranking",
                        after=("data",)),
        "index": Step("index", "serving.index", ["--workdir", workdir, "--bench", *index], bench="index"),
        "serving": Step("serving", "serving.bench", ["--workdir", workdir, *serve, "--force"], bench="serving",
                        after=("data", "prep_dashclip", "prep_tables", "prep_ranker", "prep_export", "prep_index")),
    }


def plan(cfg: GpuBenchConfig) -> tuple[list[Step], dict[str, str]]:
    """The steps to run, in order, and what DIR already held (``{what: "present" | "made"}``)."""
    root = Path(cfg.workdir)
    workdir = str(root)
    r = resolved(cfg)
    held: dict[str, str] = {}
    steps: list[Step] = []
    benches = bench_steps(cfg, workdir)
    wanted = [b for b in BENCHES if b in cfg.benches]
    needs_data = [b for b in wanted if b in ("embeddings", "ranking", "serving")]
    present = data_present(root)
    if present and len(present) < len(TABLE_NAMES):
        missing = sorted(set(TABLE_NAMES) - set(present))
        raise UserError(f"{root / 'data'} holds {', '.join(present)} but not {', '.join(missing)}: give a workdir "
                        f"with all four tables or none")
    if present:
        held["data"] = "present"
    elif needs_data:
        held["data"] = "made"
        steps.append(Step("data", "data.synth", ["--profile", r["profile"], "--workdir", workdir, "--seed",
                                                 str(cfg.seed)], needed_by=tuple(needs_data)))
    # independent of the DashCLIP tables: before they are made, so ranking times the paper's width
    for name in ("embeddings", "index", "ranking"):
        if name in wanted:
            steps.append(benches[name])
    if "serving" in wanted:
        quick = cfg.quick
        tables = all((root / f"embeddings/{kind}_table.parquet").is_file() for kind in ("product", "query"))
        checkpoint = (root / "embeddings/checkpoints/model.pt").is_file()
        ranker = (layout.run_dir(root, RANKER_VARIANT, 0) / layout.MODEL_FILE).is_file()
        export = all((root / "serving" / f).is_file() for f in ("model.pt", "model_vectors.pt", "manifest.json"))
        index = (root / "serving/index.faiss").is_file()
        needed = ("serving",)
        if not (tables or checkpoint):
            steps.append(Step("prep_dashclip", "embeddings.train", [
                "--workdir", workdir, "--backbone", "tiny", "--image-size", "32", "--device", cfg.device,
                "--seed", str(cfg.seed), "--stage1-max-steps", "2", "--stage2-max-steps", "2",
                "--stage1-batch-size", "8", "--stage2-batch-size", "8", "--stage1-eval-max", "8",
                "--stage2-eval-max", "8", "--pqc-negatives", "2", "--query-side-negatives", "0"], needed_by=needed))
        if not tables:
            steps.append(Step("prep_tables", "embeddings.export", ["--workdir", workdir, "--device", cfg.device],
                              needed_by=needed))
        if not ranker:
            steps.append(Step("prep_ranker", "ranking.train", [
                "--workdir", workdir, "--variant", RANKER_VARIANT, "--seeds", "1", "--epochs", "1",
                "--batch-size", "256" if quick else "2048", "--lr", "0.01", "--workers", "1",
                "--threads", "1" if quick else "4"], needed_by=needed))
        if not export:
            steps.append(Step("prep_export", "serving.export", ["--workdir", workdir, "--variant", RANKER_VARIANT,
                                                                "--model-seed", "0", "--threads", "1" if quick else "4"],
                              needed_by=needed))
        if not index:
            steps.append(Step("prep_index", "serving.index", ["--workdir", workdir], needed_by=needed))
        held.update({"dashclip_tables": "present" if tables else "made",
                     "ranker": "present" if ranker else "made",
                     "serving_export": "present" if export else "made",
                     "product_index": "present" if index else "made"})
        steps.append(benches["serving"])
    return steps, held


# ------------------------------------------------------------------ run
def _reason_from_log(path: Path) -> str:
    """The last ``error:`` line of a log, else its last non-empty line (at most 300 characters)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1][-300:]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the step's process group (the step and what it started): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM:  # the leader is gone; its children get the SIGKILL too
                continue
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(argv: Sequence[str], cap_s: float, log_path: Path, env: dict[str, str] | None = None) -> StepResult:
    """Run ``argv`` in a new process group, output to ``log_path``, stopped after ``cap_s`` seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "wb") as sink:
        sink.write(f"$ {shlex.join(argv)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        try:
            returncode = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            wall = time.perf_counter() - started
            return StepResult("cut", wall, cap_s, None, f"stopped at its cap of {cap_s:.0f} s", str(log_path))
        except BaseException:
            _kill_group(proc)
            raise
    wall = time.perf_counter() - started
    if returncode == 0:
        return StepResult("ok", wall, cap_s, 0, "", str(log_path))
    return StepResult("failed", wall, cap_s, returncode, _reason_from_log(log_path) or f"exit code {returncode}",
                      str(log_path))


def step_env(cfg: GpuBenchConfig) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cfg.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu means no GPU for any step, the preparation too
    return env


def run_plan(cfg: GpuBenchConfig, steps: list[Step], log_dir: Path,
             runner: Callable[..., StepResult] = run_step) -> dict[str, StepResult]:
    """Run the steps in order under the budget; a step whose ``after`` step did not succeed is skipped."""
    started = time.perf_counter()
    results: dict[str, StepResult] = {}
    env = step_env(cfg)
    for k, step in enumerate(steps):
        blocked = [n for n in step.after if n in results and results[n].status != "ok"]
        if blocked:
            first = results[blocked[0]]
            results[step.name] = StepResult("skipped", reason=f"preparation step {blocked[0]} {first.status}: "
                                                             f"{first.reason}")
            log.info("%s: skipped (%s)", step.name, results[step.name].reason)
            continue
        remaining = cfg.budget_s - RESERVE_S - (time.perf_counter() - started)
        to_run = [s for s in steps[k:] if not any(n in results and results[n].status != "ok" for n in s.after)]
        cap = remaining * SHARES[step.name] / sum(SHARES[s.name] for s in to_run)
        if cap < MIN_CAP_S:
            results[step.name] = StepResult("skipped", cap_s=max(cap, 0.0),
                                            reason=f"budget spent: its share of the {max(remaining, 0.0):.0f} s "
                                                   f"left was {max(cap, 0.0):.1f} s (under {MIN_CAP_S:g} s)")
            log.info("%s: skipped (%s)", step.name, results[step.name].reason)
            continue
        log.info("%s: %s (cap %.0f s)", step.name, step.command(), cap)
        result = runner(step.argv(), cap, log_dir / f"{step.name}.log", env)
        results[step.name] = result
        log.info("%s: %s in %.1f s%s", step.name, result.status, result.wall_s,
                 f" ({result.reason})" if result.reason else "")
    return results


# ------------------------------------------------------------------ figures
def _fresh(path: Path, since: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= since


def embeddings_figures(cfg: GpuBenchConfig, workdir: Path, since: float) -> dict[str, Any] | None:
    """This run's entry of ``DIR/embeddings/bench.json`` (matched by backbone, device, dtype, batch size)."""
    path = workdir / "embeddings" / "bench.json"
    if not _fresh(path, since):
        return None
    step = bench_steps(cfg, str(workdir))["embeddings"]
    args = {flag[2:].replace("-", "_"): value for flag, value in zip(step.args[::2], step.args[1::2])}
    prefix = f"{args['backbone']}/{cfg.device}/{args['dtype']}/batch{args['batch_size']}/"
    entries = {k: v for k, v in read_json(path).items() if k.startswith(prefix)
               and all(str(v.get("config", {}).get(name)) == value for name, value in args.items())}
    if not entries:
        return None
    key = sorted(entries)[-1]  # keys differ only in the thread count: the same settings on another machine
    entry = entries[key]
    return {"key": key, "results": entry.get("results", {}), "encoder": entry.get("encoder")}


def ranking_figures(workdir: Path, since: float) -> dict[str, Any] | None:
    path = workdir / layout.BENCH_JSON_REL
    return read_json(path) if _fresh(path, since) else None


def serving_figures(workdir: Path, since: float) -> dict[str, Any] | None:
    path = workdir / "serving" / "bench.json"
    if not _fresh(path, since):
        return None
    data = read_json(path)
    return {key: data.get(key) for key in ("settings", "environment", "model", "latency", "paper_comparison", "http")}


def index_figures(workdir: Path, since: float) -> dict[str, Any] | None:
    path = workdir / "serving" / "index_bench.json"
    return read_json(path) if _fresh(path, since) else None


def figures_of(name: str, cfg: GpuBenchConfig, workdir: Path, since: float) -> dict[str, Any] | None:
    if name == "embeddings":
        return embeddings_figures(cfg, workdir, since)
    if name == "ranking":
        return ranking_figures(workdir, since)
    if name == "serving":
        return serving_figures(workdir, since)
    return index_figures(workdir, since)


OUTPUTS = {"embeddings": "embeddings/bench.json", "ranking": layout.BENCH_JSON_REL, "serving": "serving/bench.json",
           "index": "serving/index_bench.json"}
DEVICE_NOTE = {"serving": "cpu (serving.bench has no --device)", "index": "cpu (faiss-cpu)"}


def summary(name: str, figures: dict[str, Any] | None) -> str:
    """One line of headline figures of a benchmark."""
    if not figures:
        return ""
    try:
        if name == "embeddings":
            res = figures["results"]
            parts = [f"{k.split(' (')[0]} {v['per_s']:,.1f} {v['unit']}/s" for k, v in res.items()]
            enc = figures.get("encoder")
            if enc:
                parts += [f"encoder {p} vs fp32 {enc['products'][p]['speedup']:.2f}x products, "
                          f"{enc['queries'][p]['speedup']:.2f}x queries" for p in enc["precisions"] if p != "fp32"]
            return "; ".join(parts)
        if name == "ranking":
            rows = {r["model"]: r for r in figures["rows"]}
            picks = [m for m in (RANKER_VARIANT, "torchrec DLRM_DCN (+p,q,hist)") if m in rows] or list(rows)[:2]
            return "; ".join(f"{m}: train {rows[m]['train_samples_per_s']:,.0f} / eval "
                             f"{rows[m]['eval_samples_per_s']:,.0f} samples/s" for m in picks)
        if name == "serving":
            parts = [f"{n} cand. fused p50/p99 {c['fused']['p50_ms']:.2f}/{c['fused']['p99_ms']:.2f} ms"
                     for n, c in figures["latency"].items()]
            http = figures.get("http")
            if http and http.get("load", {}).get("/score"):
                load = http["load"]["/score"]
                parts.append(f"POST /score {load['clients']} clients {load['requests_per_s']:,.0f} req/s, "
                             f"p99 {load['p99_ms']:.1f} ms")
            return "; ".join(parts)
        parts = []
        for kind, k in figures["kinds"].items():
            default = next((s for s in k["searches"] if s.get("default")), k["searches"][-1])
            parts.append(f"{kind} recall@{figures.get('k', 10)} {default['recall_at_10']:.3f} "
                         f"p50 {default['p50_ms']:.3f} ms (build {k['build_s']:.1f} s)")
        return f"{figures['n']:,} x {figures['dim']}: " + "; ".join(parts) if "n" in figures else "; ".join(parts)
    except (KeyError, TypeError, StopIteration) as exc:
        return f"(figures in the JSON; no summary: {type(exc).__name__} {exc})"


def detail_markdown(name: str, figures: dict[str, Any]) -> list[str]:
    """A benchmark's figures as a Markdown table (empty when their layout is not the expected one)."""
    try:
        if name == "embeddings":
            lines = ["| measurement | ms/step | throughput |", "|---|---:|---:|"]
            lines += [f"| {k} | {v['ms_per_step']:.2f} | {v['per_s']:,.1f} {v['unit']}/s |"
                      for k, v in figures["results"].items()]
            enc = figures.get("encoder")
            if enc:
                lines += ["", "| encoder end to end | precision | per s | speed-up vs fp32 | cosine min with fp32 |",
                          "|---|---|---:|---:|---:|"]
                lines += [f"| {kind} | {p} | {enc[kind][p]['per_s']:,.1f} | {enc[kind][p]['speedup']:.2f}x | "
                          f"{enc[kind][p]['cos_min']:.6f} |"
                          for kind in ("products", "queries") for p in enc["precisions"]]
            return lines
        if name == "ranking":
            lines = ["| model | train samples/s | eval samples/s | train step ms | data ms/batch |",
                     "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['model']} | {r['train_samples_per_s']:,.0f} | {r['eval_samples_per_s']:,.0f} | "
                      f"{r['train_step_ms']:.2f} | {r['data_ms_per_batch']:.2f} |" for r in figures["rows"]]
            return lines
        if name == "serving":
            cell = lambda c: f"{c['p50_ms']:.3f} / {c['p99_ms']:.3f}"  # noqa: E731
            lines = ["| candidates | fused model | vectors model | Redis fetch | fetch + vectors model |",
                     "|---|---|---|---|---|"]
            lines += [f"| {n} | {cell(c['fused'])} | {cell(c['vectors_model'])} | {cell(c['redis_fetch'])} | "
                      f"{cell(c['fetch_and_model'])} |" for n, c in figures["latency"].items()]
            http = figures.get("http")
            if http:
                lines += ["", "| POST (HTTP load) | clients | requests | errors | requests/s | p50 / p99 ms |",
                          "|---|---:|---:|---:|---:|---|"]
                lines += [f"| {path} | {p['clients']} | {p['requests']} | {p['errors']} | {p['requests_per_s']:,.0f} | "
                          f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} |" for path, p in http.get("load", {}).items()]
                rows = http.get("funnel", {}).get("rows", {})
                lines += [f"| {path} (1 client) | 1 | {row['requests']} | {row['errors']} | - | "
                          f"{row['client']['p50_ms']:.2f} / {row['client']['p99_ms']:.2f} |"
                          for path, row in rows.items() if row.get("client")]
            return lines
        lines = ["| kind | setting | build s | recall@10 | p50 ms | p99 ms |", "|---|---|---:|---:|---:|---:|"]
        for kind, k in figures["kinds"].items():
            for s in k["searches"]:
                setting = "-" if s.get("param") is None else f"{s['param']}={s['value']}"
                lines.append(f"| {kind} | {setting}{' (default)' if s.get('default') and s.get('param') else ''} | "
                             f"{k['build_s']:.2f} | {s['recall_at_10']:.4f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} |")
        return lines
    except (KeyError, TypeError):
        return []


# ------------------------------------------------------------------ environment
def environment(device: str) -> dict[str, Any]:
    """Device name, torch / CUDA / cuDNN versions, CPU count and package versions."""
    import torch  # here, not at import: --help stays fast

    env: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(), "python": platform.python_version(),
                           "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                            f"(CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   device_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        env["device_name"] = env["processor"]
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    env["packages"] = versions
    return env


# ------------------------------------------------------------------ report
def markdown(results: dict[str, Any]) -> str:
    env, data = results["environment"], results["data"]
    device = env["device_name"] if env["device"] == "cuda" else f"CPU ({env['device_name']})"
    lines = [f"# Benchmarks on {device}", "",
             f"Device `{env['device']}`: {device}; torch {env['torch']}, CUDA {env['cuda'] or 'none'}"
             f"{', cuDNN ' + str(env['cudnn']) if env.get('cudnn') else ''}; Python {env['python']}; "
             f"{env['cpu_count']} CPU cores (1-minute load average {env['load_average_1min']:.1f} at the start). "
             f"Data: {data['source']}. Budget {results['budget_s']:.0f} s, whole run {results['wall_s']:.1f} s"
             f"{' (--quick sizes)' if results['settings']['quick'] else ''}.", "",
             "| benchmark | status | device | wall s | cap s | figures |", "|---|---|---|---:|---:|---|"]
    for name, b in results["benchmarks"].items():
        text = b.get("summary") or b.get("reason", "")
        if b["status"] != "ok" and b.get("reason") and b.get("summary"):
            text = f"{b['summary']} ({b['reason']})"
        lines.append(f"| {name} | {b['status']} | {b['device']} | {b['wall_s']:.1f} | {b['cap_s']:.0f} | "
                     f"{text.replace('|', '/')} |")
    prep = [s for s in results["steps"] if not s["bench"]]
    if prep:
        lines += ["", "Preparation (only what the workdir lacked):", "", "| step | status | wall s | cap s | command |",
                  "|---|---|---:|---:|---|"]
        lines += [f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {s['cap_s']:.0f} | `{s['command']}` |"
                  for s in prep]
    for name, b in results["benchmarks"].items():
        if b.get("figures"):
            detail = detail_markdown(name, b["figures"])
            if detail:
                lines += ["", f"## {name}", "", f"`{b['command']}`", "", *detail]
    return "\n".join(lines) + "\n"


def collect(cfg: GpuBenchConfig, steps: list[Step], outcomes: dict[str, StepResult], held: dict[str, str],
            env: dict[str, Any], started_wall: float, wall_s: float, argv: Sequence[str] | None) -> dict[str, Any]:
    """The results document: environment, data source, every step and per benchmark its status and figures."""
    root = Path(cfg.workdir)
    r = resolved(cfg)
    by_name = {s.name: s for s in steps}
    data_source = (f"made by `{by_name['data'].command()}`" if "data" in by_name else
                   f"the tables already in {root / 'data'}" if held.get("data") == "present" else "not needed")
    step_rows = [{"name": s.name, "bench": s.bench, "needed_by": list(s.needed_by), "command": s.command(),
                  **asdict(outcomes.get(s.name, StepResult("skipped", reason="not reached")))} for s in steps]
    benchmarks: dict[str, Any] = {}
    for name in BENCHES:
        if name not in cfg.benches:
            benchmarks[name] = {"status": "skipped", "reason": "not in --benches", "wall_s": 0.0, "cap_s": 0.0,
                                "device": "-", "command": ""}
            continue
        step, outcome = by_name[name], outcomes.get(name, StepResult("skipped", reason="not reached"))
        figures = figures_of(name, cfg, root, started_wall) if outcome.status in ("ok", "cut") else None
        entry: dict[str, Any] = {"status": outcome.status, "wall_s": round(outcome.wall_s, 2),
                                 "cap_s": round(outcome.cap_s, 1), "device": DEVICE_NOTE.get(name, cfg.device),
                                 "command": step.command(), "output": str(root / OUTPUTS[name]), "log": outcome.log}
        if outcome.status == "ok" and figures is None:
            entry.update(status="failed", reason=f"exit code 0 but no new {OUTPUTS[name]}")
        elif outcome.reason:
            entry["reason"] = outcome.reason
        if outcome.returncode not in (None, 0):
            entry["returncode"] = outcome.returncode
        if figures is not None:
            entry["figures"] = figures
            entry["summary"] = summary(name, figures)
        benchmarks[name] = entry
    return {"command": shlex.join(["python", "-m", "experiments.gpu_bench",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "settings": {**asdict(cfg), "resolved": r}, "environment": env,
            "data": {"source": data_source, "held": held,
                     "profile": r["profile"] if "data" in by_name else None},
            "budget_s": cfg.budget_s, "wall_s": round(wall_s, 2), "steps": step_rows, "benchmarks": benchmarks}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(GpuBenchConfig, argv)
    cfg.benches = [b for b in BENCHES if b in cfg.benches]
    started, started_wall = time.perf_counter(), time.time()
    env = environment(cfg.device)
    steps, held = plan(cfg)
    out_dir = prepare_workdir(cfg.workdir, OUT_DIR) / OUT_DIR
    log.info("device %s (%s), torch %s, CUDA %s; %d steps, budget %.0f s", cfg.device, env["device_name"],
             env["torch"], env["cuda"], len(steps), cfg.budget_s)
    budget_cfg = dataclasses.replace(cfg, budget_s=cfg.budget_s - (time.perf_counter() - started))
    outcomes = run_plan(budget_cfg, steps, out_dir / "logs")
    results = collect(cfg, steps, outcomes, held, env, started_wall, time.perf_counter() - started, argv)
    write_json(results, out_dir / "gpu_bench.json")
    table = markdown(results)
    write_text(table, out_dir / "gpu_bench.md")
    print(table)
    log.info("wrote %s and %s", out_dir / "gpu_bench.json", out_dir / "gpu_bench.md")
    return results


def exit_code(results: dict[str, Any]) -> int:
    """1 when a benchmark failed (crashed or wrote nothing), else 0."""
    return 1 if any(b["status"] == "failed" for b in results["benchmarks"].values()) else 0


if __name__ == "__main__":
    outcome: dict[str, Any] = {}
    run_main(lambda argv: outcome.update(main(argv)))
    sys.exit(exit_code(outcome) if outcome else 0)
