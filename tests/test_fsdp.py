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


def test_a_run_resumes_at_another_world_size_as_the_run_it_continues(teacher, tmp_path):
    """2 -> 1: a sharded checkpoint resumed by one process; 1 -> 2: an ordinary one resumed by
    two FSDP ranks; both end as one process's uninterrupted run of four steps."""
    whole = tmp_path / "whole"
    _distill(teacher, whole, 4, 1)
    for first, then in ((2, 1), (1, 2)):
        resumed = tmp_path / f"resumed_{first}_{then}"
        _distill(teacher, resumed, 2, first, "--parallel", "fsdp")
        assert is_sharded_checkpoint(str(resumed / "checkpoint")) == (first == 2)
        _distill(teacher, resumed, 4, then, "--parallel", "fsdp")
        assert is_sharded_checkpoint(str(resumed / "checkpoint")) == (then == 2)
        _same_run(whole, resumed)


def test_fsdp_runs_without_the_fused_losses(teacher, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dmmd", "distill", "--teacher", teacher, "--out", str(tmp_path / "x"), "--steps",
                           "2", *ARGS, "--parallel", "fsdp", "--fused-losses", "true"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "fused_losses: the fused linear losses read the output layers' weights" in \
        done.stderr


# ---------------------------------------------------------------- the memory plan


def test_the_memory_plan_counts_forty_bytes_per_parameter_sharded_by_fsdp():
    from dmmd.training.memory_plan import REFERENCE_SHAPES, memory_plan

    shape = REFERENCE_SHAPES["8B"]
    ddp = memory_plan(shape, world=8, parallel="ddp", batch_per_rank=1, length=2048)
    fsdp = memory_plan(shape, world=8, parallel="fsdp", batch_per_rank=1, length=2048)
    models = ("teacher", "generator", "auxiliary", "optimizers", "ema")
    assert sum(ddp[k] for k in models) == 40 * shape.params
    assert sum(fsdp[k] for k in models) == pytest.approx(40 * shape.params / 8)
    assert fsdp["gathered units"] == pytest.approx(8 * shape.params / shape.layers) and ddp["gathered units"] == 0
    saved = memory_plan(shape, world=8, parallel="fsdp", batch_per_rank=1, length=2048, checkpoint_activations=True)
    assert saved["activations"] < fsdp["activations"] / 10
    assert fsdp["total"] == pytest.approx(sum(v for k, v in fsdp.items() if k != "total"))


def test_a_dry_run_prints_the_plan_and_writes_nothing_and_a_budget_refuses(teacher, tmp_path, capsys):
    from dmmd.apps.cli import main

    out = tmp_path / "dry"
    args = ["distill", "--teacher", teacher, "--out", str(out), "--steps", "2", *ARGS]
    assert main([*args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)["memory_plan"]
    assert plan["total"] > plan["optimizers"] > 0 and "distill: memory plan (ddp, 1 rank(s))" in captured.err
    assert not out.exists()
    assert main([*args, "--max-memory-per-rank", "0.0001"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_memory_per_rank: the run needs" in err and "0.0001 GiB" in err
    assert not out.exists()


def test_activation_checkpointing_makes_the_same_steps(teacher, tmp_path):
    """Recomputing the blocks' forward in the backward pass changes memory, not the run: one
    process with and without it, and two FSDP ranks with it, log the same gradients."""
    plain, saved, sharded = tmp_path / "plain", tmp_path / "saved", tmp_path / "sharded"
    _distill(teacher, plain, 3, 1)
    _distill(teacher, saved, 3, 1, "--checkpoint-activations")
    _distill(teacher, sharded, 3, 2, "--checkpoint-activations", "--parallel", "fsdp")
    _same_run(plain, saved)
    _same_run(plain, sharded)


def test_the_plan_is_within_a_fifth_of_the_measured_peak_on_the_cpu():
    """bench/memory_plan.py's smallest case (12 M parameters, 8 blocks; the README has more)."""
    from bench.memory_plan import in_subprocess

    r = in_subprocess(width=256, depth=8, vocab=4096, length=128, batch=8)
    assert 0.8 < r["plan"] / r["measured"] < 1.25, r


def test_checkpointing_wraps_each_block():
    from dmmd.models.denoiser import Denoiser, DenoiserConfig
    from dmmd.training.sharding import checkpoint_units

    model = Denoiser(DenoiserConfig(num_classes=5, length=6, width=16, depth=3, heads=2))
    assert checkpoint_units(model) == 3
    with pytest.raises(ValueError, match="shard_modules: the model has no module of the classes"):
        checkpoint_units(model, "NoSuchBlock")


def test_a_sigkill_during_sharded_saves_loses_no_checkpoint(tmp_path):
    """Two FSDP ranks saving every step, killed (the whole torchrun group) at random moments:
    a complete checkpoint is always there, and the resumed run ends as an uninterrupted one."""
    import random
    import signal
    import time

    from dmmd.training.checkpoint import checkpoint_exists, read_state

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)

    def command(out):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dmmd",
                "train-teacher", "--out", str(out), "--parallel", "fsdp", "--data", "markov", "--vocab-size", "4",
                "--length", "6", "--width", "32", "--depth", "2", "--heads", "2", "--batch-size", "8", "--steps",
                "20", "--warmup", "2", "--eval-every", "0", "--save-every", "1", "--seed", "4", "--no-progress"]

    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(command(full), check=True, env=env, cwd=ROOT, capture_output=True)
    rng, kills, ckpt = random.Random(0), 0, cut / "checkpoint"
    for _ in range(6):
        if kills == 2:
            break
        proc = subprocess.Popen(command(cut), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        before = _step(ckpt) or 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if (_step(ckpt) or 0) > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:  # torchrun and its ranks (each in a session of its own) at once
            family = _descendants(proc.pid)
            for pid in (proc.pid, *family):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kills += 1
            for pid in family:  # gone (a rank holds the output directory's lock until it is)
                while os.path.exists(f"/proc/{pid}") and _state(pid) not in ("Z", "X"):
                    time.sleep(0.01)
        proc.wait()
        assert checkpoint_exists(str(ckpt)), "a kill left no checkpoint"
    assert kills == 2, f"only {kills} runs were still going when killed"
    done = subprocess.run(command(cut), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_state(str(ckpt))["step"] == 20 and is_sharded_checkpoint(str(ckpt))
    for name in ("model", "ema"):
        a, b = load_tensors(str(full / "checkpoint"), name), load_tensors(str(ckpt), name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def _step(ckpt) -> int | None:
    """The step of the checkpoint at ``ckpt`` (``None`` while none is there or a save is
    swapping it in under our feet)."""
    from dmmd.training.checkpoint import CheckpointError, checkpoint_exists, read_state

    try:
        return read_state(str(ckpt))["step"] if checkpoint_exists(str(ckpt)) else None
    except (CheckpointError, OSError):
        return None


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"
