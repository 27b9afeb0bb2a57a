"""FSDP2 runs (``--parallel fsdp`` under torchrun, gloo on the CPU): sharded checkpoints that
resume at another world size, sharded or not, as the run they continue."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dmmd.training.checkpoint import load_tensors
from dmmd.training.sharding import is_sharded_checkpoint
from dmmd.training.teacher import TeacherConfig, train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--student-steps", "2", "--batch-size", "8", "--draw-block", "4", "--warmup", "1", "--save-every", "2",
        "--seed", "2", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_teacher")
    train_teacher(TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, width=32, depth=2, heads=2,
                                               batch_size=16, steps=20, warmup=2, eval_every=0, save_every=20,
                                               out=str(out), seed=1)), progress=False)
    return str(out / "checkpoint")


def _distill(teacher: str, out, steps: int, ranks: int, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    done = subprocess.run([*launch, "-m", "dmmd", "distill", "--teacher", teacher, "--out", str(out), "--steps",
                           str(steps), *ARGS, *extra], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _same_run(a, b) -> None:
    """Runs ``a`` and ``b`` logged the same gradient norms and hold the same weights."""
    logs = [[json.loads(line) for line in open(d / "log.jsonl")] for d in (a, b)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    for r1, r2 in zip(*logs, strict=True):
        for key in ("gen_grad_norm", "aux_grad_norm"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4), (r1["step"], key)
    for name in ("generator", "aux", "ema"):
        x, y = load_tensors(str(a / "checkpoint"), name), load_tensors(str(b / "checkpoint"), name)
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_run_resumes_at_another_world_size_as_the_run_it_continues(teacher, tmp_path, first, then):
    """2 -> 1: a sharded checkpoint resumed by one process; 1 -> 2: an ordinary one resumed by
    two FSDP ranks; both end as one process's uninterrupted run of four steps."""
    whole = tmp_path / "whole"
    _distill(teacher, whole, 4, 1)
    resumed = tmp_path / "resumed"
    _distill(teacher, resumed, 2, first, "--parallel", "fsdp")
    assert is_sharded_checkpoint(str(resumed / "checkpoint")) == (first == 2)
    _distill(teacher, resumed, 4, then, "--parallel", "fsdp")
    assert is_sharded_checkpoint(str(resumed / "checkpoint")) == (then == 2)
    _same_run(whole, resumed)


def test_fsdp_refuses_what_it_cannot_shard(teacher, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dmmd", "distill", "--teacher", teacher, "--out", str(tmp_path / "x"), "--steps",
                           "2", *ARGS, "--parallel", "fsdp", "--shard-modules", "NoSuchBlock"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "shard_modules: the model has no module of the classes ['NoSuchBlock']" in \
        done.stderr


def test_fsdp_runs_without_the_fused_losses(teacher, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dmmd", "distill", "--teacher", teacher, "--out", str(tmp_path / "x"), "--steps",
                           "2", *ARGS, "--parallel", "fsdp", "--fused-losses", "true"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "fused_losses: the fused linear losses read the output layers' weights" in \
        done.stderr
