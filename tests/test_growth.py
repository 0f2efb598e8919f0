"""experiments.growth: the cost table of scale runs and its line to an unmeasured fraction."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.cli import UserError
from experiments import growth

REPO = Path(__file__).resolve().parents[1]


def scale_run(root: Path, name: str, scale: float | None, costs: dict[str, tuple[float, int]],
              source: str = "synth:paper") -> None:
    directory = root / name
    (directory / "data").mkdir(parents=True)
    pq.write_table(pa.table({"product_id": list(range(int(100 * (scale or 1.0))))}), directory / "data" / "catalog.parquet")
    # data.synth as reproduce.json records it now (its disk: 10 MB + 1 GB F written, the workdir 10 MB more);
    # ranking.train as a record made before peak_memory_bytes and the disk fields
    written = int(10e6 + 1e9 * (scale or 1.0))
    commands = {"data": [{"command": "python -m data.synth --profile paper", "seconds": costs["data.synth"][0],
                          "peak_memory_bytes": costs["data.synth"][1], "peak_rss_bytes": 3 * costs["data.synth"][1],
                          "written_bytes": written, "workdir_bytes": written + int(10e6)}],
                "ranking": [{"command": "python -m ranking.train --variant all", "seconds": costs["ranking.train"][0],
                             "peak_rss_bytes": costs["ranking.train"][1]}]}
    (directory / "reproduce.json").write_text(json.dumps({"config": {"source": source, "scale": scale},
                                                          "command_costs": commands}))


def test_line_through_the_measured_runs_reaches_the_target(tmp_path):
    # time 10 + 100 F s; memory 1 GB + 20 GB F (over a 12 GB limit at F = 1) and 0.5 GB flat
    for name, f in (("a", 0.01), ("b", 0.1), ("c", 0.2)):
        scale_run(tmp_path, name, f, {"data.synth": (10 + 100 * f, int(1e9 + 20e9 * f)),
                                      "ranking.train": (5.0, int(0.5e9))})
    result = growth.main(["--workdir", str(tmp_path)])
    assert [r["fraction"] for r in result["runs"]] == [0.01, 0.1, 0.2] and result["runs"][0]["rows"] == {"catalog": 1}
    synth = result["commands"]["data.synth"]["line"]
    assert synth["seconds"] == pytest.approx(110.0) and synth["peak_memory_bytes"] == pytest.approx(21e9)
    assert synth["over_memory_limit"] and synth["seconds_miss"] < 1e-9
    flat = result["commands"]["ranking.train"]["line"]
    assert flat["seconds"] == pytest.approx(5.0) and flat["peak_memory_bytes"] == pytest.approx(0.5e9)
    assert not flat["over_memory_limit"]
    table = (tmp_path / "growth.md").read_text()
    assert "| `data.synth` | 11.0 s / 1.20 GB | 20.0 s / 3.00 GB | 30.0 s / 5.00 GB | 1 min 50 s / 21.00 GB **over**" in table
    assert json.loads((tmp_path / "growth.json").read_text())["target"] == 1.0
    # disk: data.synth's line reaches 1.01 GB written and the workdir 1.02 GB; ranking.train's old records have none
    assert synth["written_bytes"] == pytest.approx(1.01e9) and flat["written_bytes"] is None
    assert result["workdir_line"]["bytes"] == pytest.approx(1.02e9)
    assert "| `data.synth` | 20 MB | 110 MB | 210 MB | 1.01 GB (0%) |" in table
    assert "| `ranking.train` | not recorded | not recorded | not recorded | no line |" in table
    assert "| **workdir** | 30 MB | 120 MB | 220 MB | 1.02 GB (0%) |" in table


def test_a_measured_target_gets_no_line_and_a_curve_shows_its_miss():
    runs = [growth.ScaleRun(str(f), f, {}, {"x": (100 * f * f, 1)}) for f in (0.1, 0.5, 1.0)]
    assert "line" not in growth.growth(runs, 1.0, 1e9)["commands"]["x"]
    line = growth.growth(runs[:2] + [growth.ScaleRun("c", 0.3, {}, {"x": (9.0, 1)})], 1.0, 1e9)["commands"]["x"]["line"]
    assert line["seconds_miss"] > 0.1  # 100 F^2 is no line


def test_bad_workdirs_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="no scale run"):
        growth.main(["--workdir", str(tmp_path)])
    scale_run(tmp_path, "a", 0.1, {"data.synth": (1.0, 1), "ranking.train": (1.0, 1)})
    scale_run(tmp_path, "b", 0.1, {"data.synth": (1.0, 1), "ranking.train": (1.0, 1)})
    with pytest.raises(UserError, match="same fraction"):
        growth.main(["--workdir", str(tmp_path)])
    scale_run(tmp_path / "other", "c", None, {"data.synth": (1.0, 1), "ranking.train": (1.0, 1)}, source="fashion")
    result = subprocess.run([sys.executable, "-m", "experiments.growth", "--workdir", str(tmp_path / "other")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:") and "fashion" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_incomplete_run_shows_what_it_lacks_and_rows_follow_the_pipeline(tmp_path):
    # records as reproduce.json writes them (keys sorted: importance before ranking) with the stage order
    # beside them; the smallest run lacks ranking.train, the middle one ranking.importance, and no run
    # got to serving.index
    planned = {"data": ["python -m data.synth --profile paper"],
               "ranking": ["python -m ranking.train --variant all"],
               "importance": ["python -m ranking.importance --variant dcn_pq_hist"],
               "serving": ["python -m serving.index"]}
    for name, f in (("a", 0.01), ("b", 0.1), ("c", 0.2)):
        scale_run(tmp_path, name, f, {"data.synth": (10 + 100 * f, int(1e9)), "ranking.train": (5.0, int(0.5e9))})
        path = tmp_path / name / "reproduce.json"
        record = json.loads(path.read_text())
        record["command_costs"]["importance"] = [{"command": planned["importance"][0] + " --force", "seconds": 2.0,
                                                  "peak_memory_bytes": int(0.2e9)}]
        record["command_costs"].pop({"a": "ranking", "b": "importance"}.get(name, ""), None)
        record.update(stages=["data", "ranking", "importance", "serving"], commands=planned)
        path.write_text(json.dumps(record, sort_keys=True))
    result = growth.main(["--workdir", str(tmp_path)])
    assert list(result["commands"]) == ["data.synth", "ranking.train", "ranking.importance", "serving.index"]
    assert [r["missing"] for r in result["runs"]] == [["ranking.train", "serving.index"],
                                                      ["ranking.importance", "serving.index"], ["serving.index"]]
    # the other runs' points still give a line; a command measured nowhere gets none
    assert result["commands"]["ranking.train"]["line"]["seconds"] == pytest.approx(5.0)
    assert result["commands"]["ranking.importance"]["line"]["peak_memory_bytes"] == pytest.approx(0.2e9)
    assert result["commands"]["serving.index"] == {"measured": [], "line": None}
    table = (tmp_path / "growth.md").read_text()
    assert "- F = 0.01 is incomplete: no record of `ranking.train`, `serving.index`" in table
    assert "| `ranking.train` | not run | 5.0 s / 500 MB | 5.0 s / 500 MB | 5.0 s / 500 MB (0%, 0%) |" in table
    assert "| `serving.index` | not run | not run | not run | not measured |" in table


def test_a_command_measured_once_gets_no_line_and_an_unplanned_one_a_dash():
    runs = [growth.ScaleRun("a", 0.01, {}, {"x": (1.0, 1)}), growth.ScaleRun("b", 0.1, {}, {"x": (2.0, 2), "y": (3.0, 3)})]
    result = growth.growth(runs, 1.0, 1e9)
    assert result["commands"]["y"]["line"] is None and result["commands"]["x"]["line"]["seconds"] == pytest.approx(12.0)
    assert "| `y` | — | 3.0 s / 3 B | one point: no line |" in growth.markdown(result)
