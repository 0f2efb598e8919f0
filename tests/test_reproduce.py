"""The one-command reproduction: every stage on the tiny synthetic profile, then the report."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from common.cli import UserError
from common.io import write_json
from data.schema import TABLE_NAMES
from experiments import reproduce
from ranking import layout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: Path) -> Path:
    workdir = tmp_path_factory.mktemp("reproduce")
    shutil.copytree(tiny_workdir / "data", workdir / "data")  # the data stage then finds it complete
    reproduce.main(["--workdir", str(workdir), "--source", "synth:tiny", "--seeds", "2"])
    return workdir


def test_every_stage_runs_and_the_report_has_every_section(tiny_run: Path) -> None:
    report = (tiny_run / "report.md").read_text()
    for heading in ("## Data", "## Retrieval (paper Table 1 layout)", "## Aisle-category and relevance",
                    "## Ranking (paper Table 2 layout)", "## Feature importance", "## Serving latency", "## Plots"):
        assert heading in report, heading
    assert "has not run" not in report
    for variant in ("dcn", "dcn_pq", "dcn_pq_hist", "dcn_pq_hist_random"):
        assert f"| {variant} |" in report
    for png in ("tsne", "importance"):
        assert f"({'embeddings/plots' if png == 'tsne' else 'importance'}/{png}.png)" in report
    record = json.loads((tiny_run / "reproduce.json").read_text())
    assert record["stages"] == ["data", "embeddings", "ranking", "importance", "serving"]  # pipeline order (the order they run)
    assert set(record["stage_seconds"]) == set(record["stages"])


def test_each_commands_wall_time_and_peak_memory_are_recorded_and_reported(tiny_run: Path) -> None:
    record = json.loads((tiny_run / "reproduce.json").read_text())
    assert record["cpus"] >= 1
    costs = record["command_costs"]
    assert set(costs) == set(record["stage_seconds"])
    report = (tiny_run / "report.md").read_text()
    assert "## Cost" in report
    for stage, stage_costs in costs.items():
        assert [c["command"] for c in stage_costs] == record["commands"][stage]
        assert [c["seconds"] for c in stage_costs] == record["command_seconds"][stage]
        for cost in stage_costs:
            assert cost["seconds"] > 0 and cost["load_average"] >= 0
            assert 20e6 < cost["max_process_rss_bytes"] <= cost["peak_rss_bytes"] < 16e9  # a Python process
            assert cost["max_process_rss_bytes"] <= cost["peak_memory_bytes"] <= cost["peak_rss_bytes"]
            assert f"| {stage} | `{cost['command'].split()[2]}` |" in report
    # disk: the data stage found its tables complete and wrote nothing; ranking.train wrote its models;
    # after the last command the workdir held what it holds now (reproduce's own files left out)
    assert costs["data"][0]["written_bytes"] == 0
    models = sum(p.stat().st_size for p in (tiny_run / "ranking").rglob(layout.MODEL_FILE))
    assert models > 0 and models <= costs["ranking"][0]["written_bytes"] <= costs["ranking"][0]["workdir_bytes"]
    now = sum(p.stat().st_size for p in tiny_run.rglob("*")
              if p.is_file() and p.relative_to(tiny_run).parts[0] not in reproduce.OWN_FILES)
    assert costs[record["stages"][-1]][-1]["workdir_bytes"] == now
    assert "| written |" in report and "The most disk: the workdir held" in report
    # ranking.train's worker processes are part of its tree; their own memory is counted
    assert costs["ranking"][0]["peak_rss_bytes"] > costs["data"][0]["peak_rss_bytes"]
    assert costs["ranking"][0]["peak_memory_bytes"] > costs["data"][0]["peak_memory_bytes"]


def test_rerun_skips_complete_stages_and_publish_copies_plots(tiny_run: Path, tmp_path: Path) -> None:
    model = layout.run_dir(tiny_run, "dcn_pq_hist", 1) / layout.MODEL_FILE
    before = model.stat().st_mtime_ns
    costs = json.loads((tiny_run / "reproduce.json").read_text())["command_costs"]
    reproduce.main(["--workdir", str(tiny_run), "--source", "synth:tiny", "--seeds", "2",
                    "--stages", "ranking", "--publish", str(tmp_path / "pub")])
    assert model.stat().st_mtime_ns == before  # the finished seed was skipped, not retrained
    # ranking made nothing, so its record is still the run that trained; the stages not run keep theirs
    assert json.loads((tiny_run / "reproduce.json").read_text())["command_costs"] == costs
    shutil.rmtree(tiny_run / "importance")  # made again by the same command line: a new record
    reproduce.main(["--workdir", str(tiny_run), "--source", "synth:tiny", "--seeds", "2", "--stages", "importance"])
    now = json.loads((tiny_run / "reproduce.json").read_text())["command_costs"]
    assert now["importance"] != costs["importance"] and {**now, "importance": costs["importance"]} == costs
    reproduce.main(["--workdir", str(tiny_run), "--source", "synth:tiny", "--seeds", "2", "--stages", "importance",
                    "--force"])  # another command line: the other stages' records stay
    forced = json.loads((tiny_run / "reproduce.json").read_text())["command_costs"]
    assert "--force" in forced["importance"][0]["command"] and {**forced, "importance": now["importance"]} == now
    assert "skipping" in (tiny_run / "logs" / "ranking.log").read_text()
    published = (tmp_path / "pub" / "report.md").read_text()
    assert (tmp_path / "pub" / "embeddings" / "plots" / "tsne.png").exists()
    assert "## Ranking" in published


def test_bad_source_and_stage_are_one_line_errors(tmp_path: Path) -> None:
    for argv, needle in ((["--source", "synth:tiny", "--stages", "bogus"], "--stages"),
                         (["--source", "nowhere"], "--source 'nowhere'"),
                         (["--source", "workdir", "--data-path", "x"], "--data-path is not used"),
                         (["--source", "workdir", "--preset", "tiny"], "catalog.parquet")):
        proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--workdir", str(tmp_path), *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_ranking_section_handles_a_slice_without_impressions(tmp_path: Path) -> None:
    """Real sources where every user has a purchase history leave ``nw_nohist`` empty (None metrics)."""
    from experiments.report import ranking_section

    def slice_(auc: float | None) -> dict:
        return {"auc_mean": auc, "auc_std": None if auc is None else 0.01, "norm_logloss_mean": None if auc is None
                else 0.9, "norm_logloss_std": None if auc is None else 0.01, "p_value_vs_dcn": None,
                "impressions": 0 if auc is None else 100}

    results = {v: {"nw": slice_(auc), "nw_hist": slice_(auc), "nw_nohist": slice_(None)}
               for v, auc in (("dcn", 0.70), ("dcn_pq", 0.72), ("dcn_pq_hist", 0.75), ("dcn_pq_hist_random", 0.71))}
    (tmp_path / layout.ROOT).mkdir()
    (tmp_path / layout.RESULTS_JSON_REL).write_text(json.dumps(results))
    section = ranking_section(tmp_path)
    assert "No metrics for this slice (0 impressions: none, or only one class)" in section
    assert "| dcn_pq_hist | 0.7500 ± 0.0100 | +5.00 pt" in section
    assert "AUC dcn_pq_hist > dcn_pq > dcn on NW" in section and "users with history gain more" not in section


def test_demo_preset_trains_stage2_one_epoch_and_the_synthetic_stage1_one_step_stage2_six() -> None:
    from experiments.presets import PRESETS

    def train_cmd(source: str) -> tuple[str, ...]:
        cfg = reproduce.ReproduceConfig(workdir="runs/x", source=source)
        return next(s for s in reproduce.plan_stages(cfg, PRESETS["demo"]) if s.name == "embeddings").commands[0]

    for source in ("completejourney", "fashion", "instacart"):
        assert train_cmd(source)[-2:] == ("--stage2-epochs", "1") and "--stage1-max-steps" not in train_cmd(source)
    assert train_cmd("synth:demo")[-11:] == ("--stage1-max-steps", "1", "--stage2-epochs", "6",
                                             "--pqc-title-query-rate", "0.3", "--pqc-title-query-context",
                                             "--pqc-title-query-brand-share", "0.3", "--pqc-tau", "0.07")
    assert all("--pqc-title-query-rate" not in train_cmd(source) for source in ("completejourney", "fashion"))
    assert train_cmd("synth:demo").count("--stage2-epochs") == 1


def _own_workdir(tiny_workdir: Path, target: Path) -> Path:
    """A user's workdir: only the four tiny tables (no manifest, no generator files)."""
    (target / "data").mkdir(parents=True)
    for name in TABLE_NAMES:
        shutil.copyfile(tiny_workdir / "data" / f"{name}.parquet", target / "data" / f"{name}.parquet")
    return target


def test_workdir_source_validates_the_users_tables_and_plans_every_stage(tiny_workdir: Path, tmp_path: Path) -> None:
    """The later stages are the commands the synthetic tiny run executes; here only the data stage runs."""
    workdir = _own_workdir(tiny_workdir, tmp_path / "own")
    reproduce.main(["--workdir", str(workdir), "--source", "workdir", "--preset", "tiny", "--stages", "data"])
    record = json.loads((workdir / "reproduce.json").read_text())
    assert record["commands"]["data"] == [f"python -m data.validate --workdir {workdir}"]
    assert set(record["commands"]) == {"data", "embeddings", "ranking", "importance", "serving"}
    assert list(record["stage_seconds"]) == ["data"] and len(record["command_seconds"]["data"]) == 1
    counts = {name: pq.ParquetFile(workdir / "data" / f"{name}.parquet").metadata.num_rows for name in TABLE_NAMES}
    assert f"impressions\t{counts['impressions']}" in (workdir / "logs" / "data.log").read_text()
    manifest = json.loads((workdir / "data" / "manifest.json").read_text())
    assert manifest["source"] == "workdir" and manifest["row_counts"] == counts
    report = (workdir / "report.md").read_text()
    assert "# dashrec reproduction report: `workdir`" in report
    assert f"| impressions | {counts['impressions']:,} |" in report
    assert sorted(p.name for p in (workdir / "data").iterdir()) == sorted(
        [f"{name}.parquet" for name in TABLE_NAMES] + ["manifest.json"])  # nothing was generated


def test_workdir_source_without_impressions_stops_after_embeddings(tiny_workdir: Path, tmp_path: Path) -> None:
    workdir = _own_workdir(tiny_workdir, tmp_path / "own")
    for name in ("impressions", "purchases"):
        path = workdir / "data" / f"{name}.parquet"
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    cfg = reproduce.ReproduceConfig(workdir=str(workdir), source="workdir")
    assert [s.name for s in reproduce.plan_stages(cfg, reproduce.PRESETS["tiny"])] == ["data", "embeddings"]
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--workdir", str(workdir), "--source",
                           "workdir", "--stages", "ranking"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not applicable to workdir" in proc.stderr


def test_a_failing_stage_names_its_command_log_and_last_output(tiny_workdir: Path, tmp_path: Path) -> None:
    workdir = _own_workdir(tiny_workdir, tmp_path / "own")
    (workdir / "data" / "relevance.parquet").write_bytes(b"not parquet")
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--workdir", str(workdir), "--source",
                           "workdir"], capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last.startswith("error: stage data failed (data.validate, exit 2); see ") and "relevance.parquet" in last
    assert "[data 1/1] python -m data.validate" in proc.stderr


def test_a_command_killed_for_memory_is_named_as_such(tmp_path: Path, monkeypatch) -> None:
    """A SIGKILL (what the OOM killer sends) is one line naming the stage, the signal and memory."""
    (tmp_path / "greedy.py").write_text("import os, signal\nprint('holding', flush=True)\n"
                                        "os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    console = reproduce.Console(io.StringIO(), live=False)
    with pytest.raises(UserError) as caught:
        reproduce.run_stage(reproduce.Stage("ranking", (("greedy",),)), tmp_path, console, "4/5")
    message = str(caught.value)
    assert message.startswith("stage ranking failed (greedy, killed by SIGKILL: out of memory?") and "holding" in message
    assert "\n" not in message
    assert reproduce.exit_reason(2) == "exit 2" and reproduce.exit_reason(-15) == "killed by SIGTERM"


def test_costs_are_recorded_per_command_so_a_failure_keeps_them_and_the_resumed_run_reports_them(
        tmp_path: Path, monkeypatch) -> None:
    """A run that fails in its second stage keeps the first stage's cost; resumed, the first stage
    makes nothing and its record stays the cost of the run that made its output; a run failing
    after that keeps every record of the complete one."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "make_once.py").write_text(
        "import sys, time\nfrom pathlib import Path\nout = Path(sys.argv[1]) / sys.argv[2]\n"
        "if not out.exists():\n    time.sleep(0.5)\n    out.write_text('made')\n")
    (modules / "fail_unless.py").write_text(
        "import sys\nfrom pathlib import Path\nsys.exit(0 if (Path(sys.argv[1]) / 'fixed').exists() else 3)\n")
    monkeypatch.setenv("PYTHONPATH", str(modules))
    workdir = tmp_path / "run"
    workdir.mkdir()
    stages = [reproduce.Stage("data", (("make_once", str(workdir), "a"),)),
              reproduce.Stage("embeddings", (("make_once", str(workdir), "b"), ("fail_unless", str(workdir)))),
              reproduce.Stage("ranking", (("make_once", str(workdir), "c"),))]
    monkeypatch.setattr(reproduce, "plan_stages", lambda cfg, preset: stages)
    argv = ["--workdir", str(workdir), "--source", "synth:tiny"]
    with pytest.raises(UserError, match="stage embeddings failed"):
        reproduce.main(argv)
    first = json.loads((workdir / "reproduce.json").read_text())["command_costs"]
    assert list(first) == ["data", "embeddings"] and len(first["embeddings"]) == 1  # the command before the failure
    assert first["data"][0]["seconds"] >= 0.5 and first["embeddings"][0]["seconds"] >= 0.5  # they made files

    (workdir / "fixed").write_text("")
    reproduce.main(argv)
    resumed = json.loads((workdir / "reproduce.json").read_text())["command_costs"]
    assert resumed["data"] == first["data"]  # made nothing now: the record of the run that made it
    assert len(resumed["embeddings"]) == 2 and resumed["embeddings"][0] == first["embeddings"][0]
    assert resumed["ranking"][0]["seconds"] >= 0.5

    (workdir / "fixed").unlink()  # a later run that fails loses none of the complete run's records
    with pytest.raises(UserError, match="stage embeddings failed"):
        reproduce.main(argv)
    assert json.loads((workdir / "reproduce.json").read_text())["command_costs"] == resumed


def test_a_forced_runs_record_is_kept_by_the_run_without_the_flag_that_finds_its_outputs(
        tmp_path: Path, monkeypatch) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "make.py").write_text(
        "import sys, time\nfrom pathlib import Path\nout = Path(sys.argv[1]) / 'made.txt'\n"
        "if '--force' in sys.argv or not out.exists():\n    time.sleep(0.5)\n    out.write_text('made')\n")
    monkeypatch.setenv("PYTHONPATH", str(modules))
    workdir = tmp_path / "run"
    workdir.mkdir()
    monkeypatch.setattr(reproduce, "plan_stages", lambda cfg, preset: [
        reproduce.Stage("data", (("make", str(workdir), *(["--force"] if cfg.force else [])),))])
    argv = ["--workdir", str(workdir), "--source", "synth:tiny"]
    reproduce.main([*argv, "--force"])
    forced = json.loads((workdir / "reproduce.json").read_text())["command_costs"]
    assert forced["data"][0]["command"].endswith("--force") and forced["data"][0]["seconds"] >= 0.5
    reproduce.main(argv)  # finds the forced run's output: keeps its cost, under this command line
    kept = json.loads((workdir / "reproduce.json").read_text())["command_costs"]
    assert kept["data"][0] == {**forced["data"][0], "command": forced["data"][0]["command"].removesuffix(" --force")}
    assert reproduce.made_by_key("python -m x --workdir 'a b' --force") == "python -m x --workdir 'a b'"


def test_commands_run_on_a_terminal_and_their_progress_reaches_the_console(tmp_path: Path) -> None:
    """A bar that tqdm leaves off for pipes (disable=None) is drawn; the log keeps the whole output."""
    script = tmp_path / "work.py"
    script.write_text("import sys, time\nfrom tqdm import tqdm\nprint('a log line', flush=True)\n"
                      "for _ in tqdm(range(3), desc='steps', unit='step', disable=None, mininterval=0):\n    pass\n"
                      "time.sleep(0.5)\n"  # the bar is read (and shown) before the next line
                      "print('tty', sys.stderr.isatty(), file=sys.stderr)\n")
    shown = io.StringIO()
    console = reproduce.Console(shown, live=True)
    console.interval_s = 0.0
    console.begin("demo 1/1", "python work.py")
    sink = io.BytesIO()
    assert reproduce.run_command([sys.executable, str(script)], sink, console).exit_code == 0
    output = sink.getvalue().decode()
    assert output.startswith("a log line\n") and "\rsteps: 100%" in output and "3/3" in output
    assert "tty True" in output and "\r\n" not in output
    assert "[demo 1/1 " in shown.getvalue() and "steps:" in shown.getvalue() and "\x1b[K" in shown.getvalue()


def test_peak_memory_is_per_command_and_counts_the_whole_process_tree(tmp_path: Path) -> None:
    """Two children holding 150 MB at once: the tree held 300 MB, its largest process 150 MB; a small command
    run afterwards reports its own small peak (never a running maximum over earlier commands)."""
    (tmp_path / "hold.py").write_text("import time\nx = b'1' * 150_000_000\ntime.sleep(1.5)\n")
    (tmp_path / "two.py").write_text(f"import subprocess, sys\nhold = [subprocess.Popen([sys.executable, "
                                     f"{str(tmp_path / 'hold.py')!r}]) for _ in range(2)]\n"
                                     "assert all(p.wait() == 0 for p in hold)\nsys.exit(3)\n")
    console = reproduce.Console(io.StringIO(), live=False)
    big = reproduce.run_command([sys.executable, str(tmp_path / "two.py")], io.BytesIO(), console)
    small = reproduce.run_command([sys.executable, "-c", "pass"], io.BytesIO(), console)
    assert big.exit_code == 3 and small.exit_code == 0
    assert 150e6 < big.max_process_rss_bytes < 250e6
    assert big.peak_rss_bytes > 300e6 and big.peak_memory_bytes > 300e6  # private pages: PSS = RSS
    assert small.peak_rss_bytes < 100e6 and small.max_process_rss_bytes < 100e6
    assert small.max_process_rss_bytes <= small.peak_memory_bytes < 100e6
    assert big.seconds > 1.5 and big.load_average >= 0


def test_pages_that_processes_share_count_once_in_the_peak_memory(tmp_path: Path) -> None:
    """Two processes reading the same 200 MB mapped file: their resident sets hold it twice, the
    peak memory (proportional sets) once."""
    data = tmp_path / "shared.bin"
    data.write_bytes(b"\1" * 200_000_000)
    (tmp_path / "map.py").write_text(f"import mmap, time\nf = open({str(data)!r}, 'rb')\n"
                                     "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
                                     "sum(m[i] for i in range(0, len(m), 4096))\ntime.sleep(2.0)\n")
    (tmp_path / "two.py").write_text(f"import subprocess, sys\nmaps = [subprocess.Popen([sys.executable, "
                                     f"{str(tmp_path / 'map.py')!r}]) for _ in range(2)]\n"
                                     "assert all(p.wait() == 0 for p in maps)\n")
    cost = reproduce.run_command([sys.executable, str(tmp_path / "two.py")], io.BytesIO(),
                                 reproduce.Console(io.StringIO(), live=False))
    assert cost.exit_code == 0 and cost.peak_rss_bytes > 400e6
    assert 200e6 < cost.peak_memory_bytes < 300e6


def test_scale_preset_and_scale_flag() -> None:
    """synth:paper runs the scale preset (one seed, one ranking epoch); --scale reaches data.synth only."""
    cfg = reproduce.ReproduceConfig(workdir="runs/x", source="synth:paper", scale=0.01)
    assert reproduce.preset_name(cfg) == "scale"
    stages = {s.name: s.commands for s in reproduce.plan_stages(cfg, reproduce.PRESETS["scale"])}
    assert stages["data"][0][-2:] == ("--scale", "0.01")
    ranking = stages["ranking"][0]
    assert ranking[ranking.index("--seeds") + 1] == "1" and ranking[ranking.index("--epochs") + 1] == "1"
    assert "--stage1-max-steps" in stages["embeddings"][0] and "--max-rows" in stages["importance"][0]
    assert [c[0] for c in stages["serving"]] == ["serving.export", "serving.index", "serving.bench"]
    seeds = reproduce.plan_stages(dataclasses.replace(cfg, seeds=3), reproduce.PRESETS["scale"])
    assert next(s for s in seeds if s.name == "ranking").commands[0][3:5] == ("--seeds", "3")
    demo = reproduce.ReproduceConfig(workdir="runs/x", source="synth:demo")
    assert reproduce.preset_name(demo) == "demo"
    planned = reproduce.plan_stages(demo, reproduce.PRESETS["demo"])
    assert "--scale" not in planned[0].commands[0] and planned[2].commands[0][3:5] == ("--seeds", "5")
    for source, scale, needle in (("fashion", 0.1, "only for synth"), ("synth:demo", 0.0, r"must be in \(0, 1\]"),
                                  ("synth:demo", 1.5, r"must be in \(0, 1\]")):
        with pytest.raises(UserError, match=needle):
            reproduce.plan_stages(dataclasses.replace(demo, source=source, scale=scale), reproduce.PRESETS["demo"])


def test_importance_and_export_read_the_same_trained_model() -> None:
    """importance draws its rows with reproduce's --seed; it and serving.export read --model-seed 0, a run
    that ranking.train always makes."""
    cfg = reproduce.ReproduceConfig(workdir="runs/x", source="synth:demo", seed=7)
    stages = {s.name: s.commands for s in reproduce.plan_stages(cfg, reproduce.PRESETS["demo"])}
    importance, export = stages["importance"][0], stages["serving"][0]
    for command in (importance, export):
        assert command[command.index("--variant") + 1] == "dcn_pq_hist"
        assert command[command.index("--model-seed") + 1] == "0"
    assert importance[importance.index("--seed") + 1] == "7" and "--seed" not in export


def test_console_keeps_the_latest_redraw_and_is_quiet_off_a_terminal() -> None:
    stream = io.StringIO()
    console = reproduce.Console(stream, live=False, quiet_interval_s=3600.0)
    console.begin("ranking 1/1", "python -m ranking.train")
    console.feed(b"loading\n\rtrain:  10%|# | 1/10 [00:01<00:09]\rtrain:  20%|")
    assert console.current == "train:  20%|"
    console.feed("\u2588| 2/10 [00:02<00:08]\x1b[A".encode()[:4])  # a chunk that ends inside a UTF-8 character
    console.feed("\u2588| 2/10 [00:02<00:08]\x1b[A".encode()[4:])
    assert console.current == "train:  20%|\u2588| 2/10 [00:02<00:08]"
    console.feed(b"\r     \r")
    assert console.current == ""
    assert stream.getvalue() == ""  # nothing drawn in place, no progress line within the interval


def test_the_cost_section_reads_records_made_before_the_per_process_fields(tmp_path: Path) -> None:
    """A stage that made nothing keeps the record of the run that made its outputs, which may be older
    than the fields ``peak_memory_bytes``, ``max_process_rss_bytes``, ``load_average`` and the disk ones."""
    from experiments.report import cost_section

    new = {"command": "python -m ranking.train --workdir w", "seconds": 42.0, "peak_memory_bytes": 2_000_000_000,
           "peak_rss_bytes": 3_000_000_000, "max_process_rss_bytes": 1_500_000_000, "load_average": 2.5,
           "written_bytes": 700_000_000, "workdir_bytes": 1_250_000_000}
    old = {"command": "python -m data.synth --workdir w", "seconds": 5.0, "peak_rss_bytes": 264_000_000}
    write_json({"command_costs": {"data": [old], "ranking": [new]}}, tmp_path / "reproduce.json")
    section = cost_section(tmp_path)
    data_row = next(line for line in section.splitlines() if "`data.synth`" in line)
    assert "264" in data_row and data_row.count("—") == 3
    assert "`ranking.train`" in section and "2.5" in section and "| 700 MB |" in section
    assert "the workdir held 1.25 GB after a command" in section
