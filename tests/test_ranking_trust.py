"""What the ranking stage's outputs can be trusted for: made from this data, finite, whole, reproducible.

Real tiny workdirs (``data.synth --profile tiny``), real training, real Parquet; a second data
set comes from ``data.synth --seed 1``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.cli import run_main
from common.io import read_json
from data import synth
from data.dataset import MANIFEST, input_hashes
from data.protocol import DAY_S, EVAL_DAYS
from data.schema import table_path
from embeddings.tables import tables_set
from ranking import importance, layout, train
from ranking.features import ImpressionCache
from ranking.model import trained_set
from tests.test_ranking_train import FAST, write_random_tables

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root/ranking`` except the feature cache: path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / layout.ROOT).rglob("*"))
            if p.is_file() and "cache" not in p.parts}


def _error_line(argv: list[str], capsys) -> str:
    """Run ranking.train's CLI expecting exit code 2; its one ``error:`` line, the last on stderr
    (after the log lines)."""
    with pytest.raises(SystemExit) as exc:
        run_main(train.main, argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], lines[-5:]
    return errors[0]


def test_new_data_drops_stale_variants_from_results_and_retrains(tiny_workdir_copy: Path, caplog):
    workdir = tiny_workdir_copy
    write_random_tables(workdir)
    train.main(["--workdir", str(workdir), "--variant", "dcn,dcn_pq", "--seeds", "2", *FAST])
    first = read_json(workdir / layout.RESULTS_JSON_REL)
    assert {"dcn", "dcn_pq"} <= first.keys() and first["dcn_pq"]["nw"]["p_value_vs_dcn"] is not None
    assert first["inputs"] == {**input_hashes(workdir, ["impressions", "purchases"]), **tables_set(workdir).hashes()}
    old_metrics = (layout.run_dir(workdir, "dcn", 0) / layout.METRICS_FILE).read_bytes()

    synth.main(["--profile", "tiny", "--workdir", str(workdir), "--seed", "1"])  # other data, same tables
    caplog.clear()
    with caplog.at_level("INFO"):
        results = train.main(["--workdir", str(workdir), "--variant", "dcn", "--seeds", "2", *FAST])
    data = input_hashes(workdir, ["impressions", "purchases"])
    assert data != {rel: first["inputs"][rel] for rel in data}
    assert "skipping" not in caplog.text  # both dcn seeds retrained on the new data
    assert "dropping dcn_pq" in caplog.text and "data/impressions.parquet" in caplog.text
    assert set(results) == {"inputs", "dcn"} and results["inputs"] == data
    assert read_json(workdir / layout.RESULTS_JSON_REL) == results
    assert "| dcn_pq |" not in (workdir / layout.RESULTS_MD_REL).read_text()
    seed0 = trained_set(workdir, "dcn", 0)
    assert seed0.manifest()["made_from"]["inputs"] == data
    assert seed0.path(seed0.files[1]).read_bytes() != old_metrics
    assert train.results_set(workdir).verify()  # json and md published together


def test_non_finite_training_publishes_nothing_and_keeps_the_last_good_run(tiny_workdir_copy: Path, capsys):
    workdir = tiny_workdir_copy
    argv = ["--workdir", str(workdir), "--variant", "dcn", "--seeds", "1", *FAST]
    train.main(argv)
    good = _files(workdir)

    line = _error_line([*argv, "--lr", "1e30"], capsys)  # diverges: the training loss becomes NaN
    assert line.startswith("error: ranking dcn seed 0: train loss nan") and "not finite" in line
    assert _files(workdir) == good

    # hand-placed impressions whose evaluation-week prices overflow float32 inside the model
    path = table_path(workdir, "impressions")
    table = pq.read_table(path)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    price = np.where(ts >= ts.max() - EVAL_DAYS * DAY_S, np.float32(3e38), table.column("dense_price").to_numpy())
    pq.write_table(table.set_column(table.column_names.index("dense_price"), "dense_price",
                                    pa.array(price, pa.float32())), path)
    (workdir / MANIFEST).unlink()
    line = _error_line(argv, capsys)
    assert line.startswith("error: ranking dcn seed 0: click probability of") and "not finite" in line
    assert _files(workdir) == good
    assert trained_set(workdir, "dcn", 0).verify()


def test_forced_retrain_writes_the_same_bytes_so_importance_skips(tiny_workdir_copy: Path, caplog):
    workdir = tiny_workdir_copy
    argv = ["--workdir", str(workdir), "--variant", "dcn", "--seeds", "1", *FAST]
    train.main(argv)
    explain = ["--workdir", str(workdir), "--variant", "dcn", "--repeats", "1", "--max-rows", "200", "--threads", "1"]
    importance.main(explain)
    before = _files(workdir)
    report = workdir / "importance" / "importance.json"
    stamp = report.stat().st_mtime_ns

    train.main([*argv, "--force"])
    assert _files(workdir) == before  # model.pt, metrics.json, results and manifests: the same bytes
    caplog.clear()
    with caplog.at_level("INFO"):
        importance.main(explain)
    assert "skipping" in caplog.text and report.stat().st_mtime_ns == stamp


def test_a_killed_cache_build_leaves_nothing_behind(tiny_workdir_copy: Path):
    workdir = tiny_workdir_copy
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import numpy as np
        from ranking.features import ImpressionCache
        np.save = lambda *args, **kwargs: os._exit(9)  # die like kill -9 near the end of the build
        ImpressionCache.open({str(workdir)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == 9
    cache = workdir / layout.CACHE_REL
    leftovers = [p for p in cache.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].is_dir() and any(leftovers[0].iterdir())
    opened = ImpressionCache.open(workdir)
    assert sorted(p.name for p in cache.iterdir()) == [opened.meta.key]


@pytest.mark.slow
def test_killed_main_process_takes_its_workers_along(tiny_workdir_copy: Path, tmp_path: Path):
    workdir = tiny_workdir_copy
    log_path = tmp_path / "train.log"
    argv = [sys.executable, "-m", "ranking.train", "--workdir", str(workdir), "--variant", "dcn", "--seeds", "2",
            "--workers", "2", "--threads", "1", "--epochs", "1000", "--no-early-stopping", "--batch-size", "64"]
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while len(set(re.findall(r"dcn seed (\d) epoch 1:", log_path.read_text()))) < 2:  # both workers train
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in children if "--multiprocessing-fork" in p.cmdline()]
        assert len(workers) == 2, [p.cmdline() for p in children]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:
            if p.is_running():
                p.kill()
    time.sleep(1.0)  # nothing is published after the workers are gone
    for seed in (0, 1):
        out = trained_set(workdir, "dcn", seed)
        assert out.manifest() is None and not any(out.path(rel).exists() for rel in out.files)
