"""common.provenance: reuse only for the same inputs and settings; sets published as one unit."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.cli import UserError
from common.io import prepare_workdir, temp_sibling
from common.provenance import MadeFrom, OutputSet

FILES = ("out/a.txt", "out/b.txt")


def _publish(root: Path, text: str, made_from: MadeFrom, keep_same: bool = False) -> OutputSet:
    out = OutputSet(root, "out/manifest.json", FILES, what="the test stage")
    with out.publish(made_from, {"note": text}, keep_same=keep_same) as staged:
        for rel, tmp in staged.items():
            tmp.write_text(f"{text}:{rel}")
    return out


def _contents(root: Path) -> list[str]:
    return [(root / rel).read_text() for rel in FILES]


def test_current_only_for_same_inputs_and_settings(tmp_path: Path):
    (tmp_path / "in.txt").write_text("one")
    made_from = MadeFrom.of(tmp_path, ["in.txt"], {"lr": 0.1})
    out = _publish(tmp_path, "v1", made_from)
    assert out.current(MadeFrom.of(tmp_path, ["in.txt"], {"lr": 0.1}))
    assert not out.current(MadeFrom.of(tmp_path, ["in.txt"], {"lr": 0.2}))
    (tmp_path / "in.txt").write_text("two")  # same settings, other input bytes
    assert not out.current(MadeFrom.of(tmp_path, ["in.txt"], {"lr": 0.1}))
    assert out.manifest()["note"] == "v1"


def test_publishing_the_same_set_with_keep_same_leaves_its_files_untouched(tmp_path: Path):
    made_from = MadeFrom({}, {"lr": 0.1})
    out = _publish(tmp_path, "v1", made_from)
    paths = [tmp_path / rel for rel in (*FILES, "out/manifest.json")]
    written = [path.stat().st_ino for path in paths]
    _publish(tmp_path, "v1", made_from, keep_same=True)  # the same bytes, inputs, settings and manifest fields
    assert [path.stat().st_ino for path in paths] == written and out.current(made_from)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt", "manifest.json"]  # no temps
    _publish(tmp_path, "v1", made_from)  # without keep_same the set is written again
    assert [path.stat().st_ino for path in paths] != written and out.current(made_from)
    _publish(tmp_path, "v2", made_from, keep_same=True)  # other bytes: published
    assert _contents(tmp_path) == ["v2:out/a.txt", "v2:out/b.txt"] and out.manifest()["note"] == "v2"


def test_verify_names_a_file_from_another_publication(tmp_path: Path):
    out = _publish(tmp_path, "v1", MadeFrom())
    hashes = out.verify()
    assert set(hashes) == set(FILES)
    (tmp_path / "out/b.txt").write_text("written by someone else")
    with pytest.raises(UserError, match=r"b\.txt.*run the test stage again"):
        out.verify()
    assert not out.current(MadeFrom())


def test_failed_rename_keeps_the_old_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = _publish(tmp_path, "old", MadeFrom(settings={"v": 1}))
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the journal and the first file of the new set are in place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        _publish(tmp_path, "new", MadeFrom(settings={"v": 2}))
    monkeypatch.undo()
    assert _contents(tmp_path) == ["old:out/a.txt", "old:out/b.txt"]
    assert out.current(MadeFrom(settings={"v": 1}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt", "manifest.json"]


def test_killed_publication_is_rolled_back_by_the_next_reader(tmp_path: Path):
    _publish(tmp_path, "old", MadeFrom(settings={"v": 1}))
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pathlib import Path
        from common.provenance import MadeFrom, OutputSet
        real, calls = os.replace, []
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 3:  # journal and first file renamed: die like kill -9
                os._exit(9)
            real(src, dst)
        os.replace = replace
        out = OutputSet(Path({str(tmp_path)!r}), "out/manifest.json", {list(FILES)!r})
        with out.publish(MadeFrom(settings={{"v": 2}})) as staged:
            for rel, tmp in staged.items():
                tmp.write_text("new:" + rel)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert _contents(tmp_path) == ["new:out/a.txt", "old:out/b.txt"]  # the mix a reader must not trust
    out = OutputSet(tmp_path, "out/manifest.json", FILES)
    assert out.verify()  # rolls back first
    assert _contents(tmp_path) == ["old:out/a.txt", "old:out/b.txt"]
    assert out.current(MadeFrom(settings={"v": 1}))
    assert not list((tmp_path / "out").glob(".*"))


def test_prepare_workdir_removes_temp_leftovers_of_dead_processes(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "data").mkdir()
    leftover = tmp_path / "data" / f".catalog.parquet.{pid}.0123abcd.tmp"
    leftover.write_bytes(b"half a table")
    leftover_dir = tmp_path / "data" / f".cache.{pid}.0123abcd.tmp"
    leftover_dir.mkdir()
    mine = temp_sibling(tmp_path / "data" / "x.parquet")
    mine.write_bytes(b"being written")
    prepare_workdir(tmp_path, "data")
    assert not leftover.exists() and not leftover_dir.exists()
    assert mine.exists()  # this process is alive
