"""embeddings.encode on the command line: an existing ``--out`` file is never overwritten without ``--force``.

The check runs before any model is loaded, so these tests need no trained DashCLIP run; the
end-to-end test in test_embeddings_train.py overwrites with ``--force``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import UserError
from embeddings import encode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def queries(tmp_path: Path) -> Path:
    path = tmp_path / "queries.txt"
    path.write_text("oat milk\n")
    return path


def test_an_existing_out_file_is_refused_with_one_error_line_and_left_untouched(tmp_path: Path, queries: Path):
    out = tmp_path / "vectors.parquet"
    out.write_bytes(b"precious")
    proc = subprocess.run([sys.executable, "-m", "embeddings.encode", "--workdir", str(tmp_path), "--kind", "query",
                           "--input", str(queries), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--force" in lines[0] and str(out) in lines[0], lines
    assert out.read_bytes() == b"precious"


def test_force_passes_the_out_check_and_a_directory_is_never_an_out_file(tmp_path: Path, queries: Path):
    out = tmp_path / "vectors.parquet"
    out.write_bytes(b"precious")
    argv = ["--workdir", str(tmp_path), "--kind", "query", "--input", str(queries), "--out", str(out)]
    with pytest.raises(UserError, match="no trained DashCLIP model"):  # past the --out check: the model is next
        encode.main([*argv, "--force"])
    assert out.read_bytes() == b"precious"
    with pytest.raises(UserError, match="is a directory"):
        encode.main([*argv[:-1], str(tmp_path), "--force"])
