"""experiments.gpu_bench: the plan, the time caps, and the whole run on the CPU with --quick sizes."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from common.io import read_json
from experiments import gpu_bench
from experiments.gpu_bench import GpuBenchConfig, Step, StepResult
from tests.serving_fixtures import copy_served, serving_workdir  # noqa: F401  (fixture)

PREP = ["prep_dashclip", "prep_tables", "prep_ranker", "prep_export", "prep_index"]


def test_plan_on_an_empty_workdir_makes_the_data_and_what_serving_needs(tmp_path: Path):
    quick = GpuBenchConfig(workdir=str(tmp_path), device="cpu", quick=True)
    steps, held = gpu_bench.plan(quick)
    assert [s.name for s in steps] == ["data", "embeddings", "index", "ranking", *PREP, "serving"]
    assert steps[0].args[:2] == ["--profile", "tiny"] and held["data"] == "made"
    embeddings = steps[1].args
    assert embeddings[embeddings.index("--backbone") + 1] == "tiny" and "--dtype" in embeddings
    full, _ = gpu_bench.plan(GpuBenchConfig(workdir=str(tmp_path), device="cuda"))
    args = {s.name: s.args for s in full}
    assert args["data"][:2] == ["--profile", "demo"]
    assert args["embeddings"][args["embeddings"].index("--backbone") + 1] == "blip-base"
    assert args["embeddings"][args["embeddings"].index("--dtype") + 1] == "bf16"
    assert args["ranking"][args["ranking"].index("--device") + 1] == "cuda"
    only_index, held = gpu_bench.plan(GpuBenchConfig(workdir=str(tmp_path), benches=["index"]))
    assert [s.name for s in only_index] == ["index"] and "data" not in held


def test_every_planned_step_parses_against_its_command(tmp_path: Path):
    from common.cli import parse_config
    from embeddings.config import EmbeddingsBenchConfig
    from ranking.bench import RankingBenchConfig
    from tests.test_presets import COMMAND_CONFIGS

    configs = {**COMMAND_CONFIGS, "embeddings.bench": EmbeddingsBenchConfig, "ranking.bench": RankingBenchConfig}
    for quick in (True, False):
        for device in ("cpu", "cuda"):
            steps, _ = gpu_bench.plan(GpuBenchConfig(workdir=str(tmp_path), device=device, quick=quick))
            for step in steps:
                parse_config(configs[step.module], step.args)


def test_some_but_not_all_tables_is_a_one_line_error(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "catalog.parquet").write_bytes(b"")
    with pytest.raises(gpu_bench.UserError, match="holds catalog but not impressions, purchases, relevance"):
        gpu_bench.plan(GpuBenchConfig(workdir=str(tmp_path)))


def test_bad_flags_are_one_line_errors(tmp_path: Path):
    with pytest.raises(gpu_bench.UserError, match="--budget-s must be > 0"):
        gpu_bench.main(["--workdir", str(tmp_path), "--budget-s", "0"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(gpu_bench.UserError, match="--device cuda: torch .* sees no CUDA device"):
            gpu_bench.main(["--workdir", str(tmp_path), "--device", "cuda"])
        assert not (tmp_path / "gpu_bench").exists()


def _state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


def test_a_step_past_its_cap_is_cut_with_the_processes_it_started(tmp_path: Path):
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('started pid', child.pid, flush=True)\n"
              "time.sleep(60)\n")
    log = tmp_path / "logs" / "slow.log"
    started = time.perf_counter()
    result = gpu_bench.run_step([sys.executable, "-c", script], 2.0, log)
    assert result.status == "cut" and result.returncode is None and "cap of 2 s" in result.reason
    assert time.perf_counter() - started < 20
    child = int(next(line.split()[2] for line in log.read_text().splitlines() if line.startswith("started pid")))
    deadline = time.time() + 10
    while _state(child) not in ("gone", "Z") and time.time() < deadline:
        time.sleep(0.1)
    assert _state(child) in ("gone", "Z")

    failed = gpu_bench.run_step([sys.executable, "-c", "import sys; print('error: no such table', file=sys.stderr); "
                                                       "sys.exit(2)"], 30.0, tmp_path / "logs" / "bad.log")
    assert (failed.status, failed.returncode, failed.reason) == ("failed", 2, "error: no such table")


def test_a_failed_preparation_skips_its_benchmark_and_leaves_the_others(tmp_path: Path):
    cfg = GpuBenchConfig(workdir=str(tmp_path), device="cpu", quick=True, budget_s=100.0)
    steps, _ = gpu_bench.plan(cfg)
    caps: dict[str, float] = {}

    def runner(argv, cap_s, log_path, env=None):
        name = Path(log_path).stem
        caps[name] = cap_s
        return StepResult("failed", 0.0, cap_s, 1, "boom") if name == "prep_ranker" else StepResult("ok", 0.0, cap_s, 0)

    outcomes = gpu_bench.run_plan(cfg, steps, tmp_path / "logs", runner=runner)
    assert outcomes["serving"].status == "skipped" and "prep_ranker failed: boom" in outcomes["serving"].reason
    assert "prep_export" in caps and all(outcomes[n].status == "ok" for n in ("embeddings", "ranking", "index"))
    # caps share the budget: the first step gets its share of all of it, none more than the budget
    shares = gpu_bench.SHARES
    assert caps["data"] == pytest.approx((100.0 - gpu_bench.RESERVE_S) * shares["data"] / sum(shares.values()), rel=1e-3)
    assert all(0 < c < 100.0 for c in caps.values())
    assert Step("x", "m", ["--a", "b c"]).command() == "python -m m --a 'b c'"


@pytest.mark.slow
def test_quick_cpu_run_has_an_entry_per_benchmark(serving_workdir: Path, tmp_path: Path):  # noqa: F811
    workdir = copy_served(serving_workdir, tmp_path / "run")
    results = gpu_bench.main(["--workdir", str(workdir), "--device", "cpu", "--quick"])
    saved = read_json(workdir / "gpu_bench" / "gpu_bench.json")
    assert saved["benchmarks"].keys() == set(gpu_bench.BENCHES) == results["benchmarks"].keys()
    assert saved["environment"]["device"] == "cpu" and saved["environment"]["torch"]
    assert saved["data"]["source"].startswith("the tables already in")
    assert [s["name"] for s in saved["steps"]] == ["embeddings", "index", "ranking", "serving"]  # nothing to prepare
    for name, entry in saved["benchmarks"].items():
        assert entry["status"] in ("ok", "cut", "skipped", "failed") and entry["command"], name
        assert entry.get("figures") if entry["status"] == "ok" else entry.get("reason"), (name, entry)
        if entry["status"] == "ok":
            assert entry["summary"] and entry["wall_s"] > 0
    ok = [name for name, entry in saved["benchmarks"].items() if entry["status"] == "ok"]
    md = (workdir / "gpu_bench" / "gpu_bench.md").read_text()
    assert "| benchmark | status | device | wall s | cap s | figures |" in md
    assert all(f"| {name} | " in md for name in gpu_bench.BENCHES) and all(f"## {name}" in md for name in ok)
    assert saved["wall_s"] < saved["budget_s"] + 30
