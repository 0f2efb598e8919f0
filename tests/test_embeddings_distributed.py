"""DashCLIP training under torchrun: DDP over 2 gloo ranks on CPU against one process.

The 2-rank runs are real ``torchrun --standalone --nproc_per_node 2`` launches of this file, which
runs ``embeddings.train`` with the tiny backbone's dropout off (dropout masks are drawn per rank,
so with dropout a step cannot equal the single-process step); the single-process references run
in the test process with the same change.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a rank script
    sys.path.insert(0, str(REPO))

from common.cli import UserError  # noqa: E402
from common.io import read_json  # noqa: E402
from embeddings import models, runtime, train  # noqa: E402
from embeddings.distributed import global_batch_size, scale_grad  # noqa: E402

# 3 steps per stage, an evaluation after every step (the stage-1 eval picks the kept weights)
FLAGS = ["--backbone", "tiny", "--image-size", "32", "--stage1-batch-size", "8", "--stage1-max-steps", "3",
         "--eval-every", "1", "--stage1-eval-max", "16", "--stage2-batch-size", "8", "--stage2-max-steps", "3",
         "--pqc-negatives", "2", "--stage2-eval-every", "1", "--stage2-eval-max", "16", "--checkpoint-every", "1",
         "--threads", "1", "--pg-timeout-s", "60",
         "--autocast", "fp32"]  # float32: bf16 products round differently when the batch is split over ranks
NO_DROPOUT_TEXT = dataclasses.replace(models.TINY_TEXT, hidden_dropout=0.0, attention_dropout=0.0)
TOLERANCE = 1e-5
# Attention key biases get a zero gradient in exact arithmetic (the softmax ignores a shift shared by
# all keys): Adam turns the float noise of either run into steps of up to the learning rate.
KEY_BIAS_TOLERANCE = 5e-4


def key_bias(name: str, value: torch.Tensor) -> slice:
    """The attention key bias inside parameter ``name`` (the middle third of a fused qkv bias)."""
    if name.endswith("key.bias"):
        return slice(None)
    if name.endswith("qkv.bias"):
        return slice(len(value) // 3, 2 * len(value) // 3)
    return slice(0, 0)


def torchrun(workdir: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """2 ranks of ``embeddings.train`` (dropout off) on ``workdir``; fails the test if a rank fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--workdir", str(workdir), *FLAGS, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def one_process(workdir: Path, *extra: str) -> dict:
    """``embeddings.train`` in this process (dropout off); returns the training log."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "TINY_TEXT", NO_DROPOUT_TEXT)
        return train.main(["--workdir", str(workdir), *FLAGS, *extra])


def checkpoint(workdir: Path, name: str) -> dict:
    return torch.load(workdir / "embeddings" / "checkpoints" / name, weights_only=True)


def assert_same_run(got: Path, expected: Path) -> None:
    """Same training log (per-step losses, evaluations, kept step) and the same weights, to float tolerance."""
    log, ref = (read_json(w / "embeddings" / "train_log.json") for w in (got, expected))
    for stage in ("stage1", "stage2"):
        assert [s["step"] for s in log[stage]["steps"]] == [s["step"] for s in ref[stage]["steps"]] == [1, 2, 3]
        for row, ref_row in zip(log[stage]["steps"] + log[stage]["evals"], ref[stage]["steps"] + ref[stage]["evals"]):
            assert row.keys() == ref_row.keys()
            for key in row:
                assert row[key] == pytest.approx(ref_row[key], rel=TOLERANCE, abs=TOLERANCE), (stage, row["step"], key)
    assert log["stage1"]["best_step"] == ref["stage1"]["best_step"]
    for stage, name in ((1, "stage1.pt"), (2, "model.pt")):
        made_from = [runtime.stage_set(w, stage).manifest()["made_from"] for w in (got, expected)]
        for record in made_from:  # stage1.pt differs within float tolerance: same data and settings otherwise
            record["inputs"].pop(runtime.STAGE1_CHECKPOINT, None)
        assert made_from[0] == made_from[1]
        state, ref_state = checkpoint(got, name), checkpoint(expected, name)
        assert state.keys() == ref_state.keys()
        assert state["model"].keys() == ref_state["model"].keys()
        for key, value in ref_state["model"].items():
            assert state["model"][key].dtype == value.dtype and state["model"][key].shape == value.shape, key
            tolerance = torch.full_like(value, TOLERANCE)
            tolerance[key_bias(key, value)] = KEY_BIAS_TOLERANCE
            off = (state["model"][key] - value).abs() > tolerance
            # elsewhere the same Adam effect: a weight whose gradient is zero but for float noise
            # (an input feature near zero on every row) may step by up to the learning rate (seen:
            # one weight of multimodal_proj off by 2.1e-4); at most 0.1% of a tensor, within the
            # key-bias tolerance
            assert int(off.sum()) <= max(1, value.numel() // 1000), (name, key, int(off.sum()))
            assert ((state["model"][key] - value).abs() <= KEY_BIAS_TOLERANCE).all(), (name, key)


@pytest.fixture(scope="module")
def reference(tiny_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run of FLAGS (dropout off)."""
    workdir = tmp_path_factory.mktemp("one_process")
    shutil.copytree(tiny_workdir / "data", workdir / "data")
    one_process(workdir)
    return workdir


@pytest.mark.slow
def test_two_ranks_train_like_one_process_on_the_global_batch(reference, tiny_workdir_copy):
    workdir = tiny_workdir_copy
    proc = torchrun(workdir)
    assert_same_run(workdir, reference)
    ref_log = read_json(reference / "embeddings" / "train_log.json")
    # the comparison means something: the kept stage-1 weights and the stage-2 weights are trained ones
    assert ref_log["stage1"]["best_step"] > 0
    query_proj = checkpoint(reference, "model.pt")["model"]["query_proj.weight"]
    assert (query_proj - checkpoint(reference, "stage1.pt")["model"]["text_proj.weight"]).abs().max() > 1e-4
    log = read_json(workdir / "embeddings" / "train_log.json")
    assert log["stage1"]["world_size"] == log["stage2"]["world_size"] == 2 and ref_log["stage1"]["world_size"] == 1
    assert read_json(workdir / "embeddings" / "config.json") == read_json(reference / "embeddings" / "config.json")
    assert sorted(p.name for p in (workdir / "embeddings" / "checkpoints").iterdir()) == ["model.pt", "stage1.pt"]
    # one rank reports
    assert proc.stderr.count("stage 1 done") == 1 and "DDP over 2 ranks" in proc.stderr


@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes(reference, tiny_workdir_copy):
    """2 ranks pause inside stage 1, one process takes over into stage 2, 2 ranks finish: the
    outcome is the uninterrupted single-process run."""
    workdir = tiny_workdir_copy
    torchrun(workdir, "--max-steps-this-run", "2")
    paused = read_json(workdir / "embeddings" / "train_log.json")
    assert paused["paused"] and paused["stage1"]["steps_done"] == 2
    resumable = checkpoint(workdir, "stage1_last.pt")
    assert resumable["step"] == 2 and resumable["model"].keys() == checkpoint(reference, "stage1.pt")["model"].keys()
    paused = one_process(workdir, "--max-steps-this-run", "2")
    assert paused["paused"] and paused["stage1"]["steps_done"] == 3 and paused["stage2"]["steps_done"] == 1
    proc = torchrun(workdir)
    assert "stage 2: resumed from" in proc.stderr and "at step 1 of 3" in proc.stderr
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_two_ranks_read_the_query_augmentations_of_the_global_batch(tiny_workdir, tmp_path):
    """``--pqc-query-typo-rate`` and ``--pqc-title-query-rate`` (with ``--pqc-title-query-context``):
    the typos and title spans of a step are drawn over the global batch, so 2 ranks train like one
    process with the same ones."""
    typos = ("--pqc-query-typo-rate", "0.5", "--pqc-title-query-rate", "0.5", "--pqc-title-query-context")
    runs = {name: tmp_path / name for name in ("one", "two")}
    for workdir in runs.values():
        shutil.copytree(tiny_workdir / "data", workdir / "data")
    one_process(runs["one"], *typos)
    torchrun(runs["two"], *typos)
    assert_same_run(runs["two"], runs["one"])


def test_global_batch_must_split_over_the_ranks(caplog):
    assert global_batch_size(32, 1000, 1, "--stage1-batch-size") == 32
    assert global_batch_size(32, 10, 1, "--stage1-batch-size") == 10
    assert global_batch_size(32, 1000, 4, "--stage1-batch-size") == 32
    assert global_batch_size(32, 10, 4, "--stage2-batch-size") == 8  # the data rounded down to a multiple of 4
    assert "only 10 items" in caplog.text
    with pytest.raises(UserError, match=r"--stage1-batch-size 30 .* multiple of the 4 ranks \(e.g. 28\)"):
        global_batch_size(30, 1000, 4, "--stage1-batch-size")
    with pytest.raises(UserError, match="3 items cannot give each of the 4 ranks"):
        global_batch_size(32, 3, 4, "--stage2-batch-size")


def test_scale_grad_scales_only_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_grad(x, 3.0)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.tile(3.0 * np.arange(4.0), (3, 1)))
    assert scale_grad(x, 1) is x


if __name__ == "__main__":  # one rank of `torchrun ... tests/test_embeddings_distributed.py ARGS`
    from common.cli import run_main

    models.TINY_TEXT = NO_DROPOUT_TEXT
    run_main(train.main)
