"""Faults (docs/design.md §10): a run killed with SIGKILL at any moment, checkpoint writes
included, resumes and ends bit-identical to an uninterrupted run; a kill between the two
renames of a save loses nothing; a second run on a locked output directory is refused; a
truncated or corrupt checkpoint or token file is an error naming the file."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dmmd.data import TokenFile
from dmmd.training.checkpoint import (
    CheckpointError,
    checkpoint_exists,
    load_tensors,
    read_state,
    save_checkpoint,
)
from dmmd.training.loop import OutputLock
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "markov", "--vocab-size", "4", "--length", "6", "--width", "32", "--depth", "1", "--heads", "2",
        "--batch-size", "8", "--steps", "300", "--warmup", "2", "--eval-every", "0", "--save-every", "1", "--seed",
        "4", "--no-progress"]


def _teacher_cmd(out) -> list[str]:
    return [sys.executable, "-m", "dmmd", "train-teacher", "--out", str(out), *TINY]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _tensors(path):
    return {n: load_tensors(path, n) for n in ("model", "ema", "opt")}


def test_sigkill_at_random_moments_resumes_bit_identical(tmp_path):
    """Kill a real run (a checkpoint every step, so most kills land in or near a save) several
    times, resume each time, and finish: the result equals an uninterrupted run exactly."""
    full = tmp_path / "full"
    subprocess.run(_teacher_cmd(full), check=True, env=_env(), cwd=ROOT, capture_output=True)
    cut = tmp_path / "cut"
    rng = random.Random(0)
    kills, steps_seen = 0, []
    for _ in range(12):
        if kills == 4:
            break
        proc = subprocess.Popen(_teacher_cmd(cut), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ckpt = cut / "checkpoint"
        # wait until this run has saved past where it started, then kill it at a random moment
        before = read_state(str(ckpt))["step"] if checkpoint_exists(str(ckpt)) else 0
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            if checkpoint_exists(str(ckpt)) and read_state(str(ckpt))["step"] > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert checkpoint_exists(str(ckpt)), "a kill left no checkpoint"
        steps_seen.append(read_state(str(ckpt))["step"])
    assert kills == 4, f"only {kills} runs were still going when killed"
    assert steps_seen == sorted(steps_seen) and steps_seen[0] > 0
    subprocess.run(_teacher_cmd(cut), check=True, env=_env(), cwd=ROOT, capture_output=True)
    a, b = _tensors(str(full / "checkpoint")), _tensors(str(cut / "checkpoint"))
    assert read_state(str(cut / "checkpoint"))["step"] == 300
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert not [e for e in os.listdir(cut) if e.startswith((".tmp-ckpt-", ".checkpoint.old"))]


def test_kill_between_the_renames_of_a_save_loses_nothing(tmp_path):
    """The state a kill between 'old checkpoint moved aside' and 'new one moved in' leaves:
    readers fall back to the old one, a resuming run moves it back, a half-written temporary
    directory is removed."""
    path = str(tmp_path / "checkpoint")
    m = torch.nn.Linear(3, 2)
    save_checkpoint(path, models={"model": m}, state={"step": 7})
    os.replace(path, str(tmp_path / ".checkpoint.old"))
    os.makedirs(tmp_path / ".tmp-ckpt-abc")
    (tmp_path / ".tmp-ckpt-abc" / "weights.safetensors").write_bytes(b"partial")
    assert not os.path.exists(path)
    assert read_state(path) == {"step": 7}  # a reader falls back
    assert checkpoint_exists(path, repair=True)
    assert read_state(path) == {"step": 7} and sorted(os.listdir(tmp_path)) == ["checkpoint"]
    torch.testing.assert_close(load_tensors(path, "model")["weight"], m.weight.detach())


def test_a_second_run_on_a_locked_output_directory_is_refused(tmp_path):
    cfg = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, width=16, depth=1, heads=2,
                                       batch_size=4, steps=2, eval_every=0, out=str(tmp_path / "t")))
    with OutputLock(str(tmp_path / "t")):
        with pytest.raises(RuntimeError, match=r"output directory .*t is in use by another run \(pid \d+\)"):
            train_teacher(cfg, progress=False)
    assert train_teacher(cfg, progress=False)["step"] == 2  # free again once the holder is gone


def test_a_killed_holder_frees_the_lock(tmp_path):
    out = tmp_path / "t"
    code = (f"from dmmd.training.loop import OutputLock; import time; lock = OutputLock({str(out)!r}); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match="in use"):
        OutputLock(str(out))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    OutputLock(str(out)).release()


@pytest.fixture()
def teacher_checkpoint(tmp_path):
    cfg = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, width=16, depth=1, heads=2,
                                       batch_size=4, steps=2, eval_every=0, out=str(tmp_path / "t")))
    return train_teacher(cfg, progress=False)["checkpoint"]


@pytest.mark.parametrize("damage", ["truncated weights", "garbage weights", "missing weights", "corrupt state",
                                    "missing state"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(teacher_checkpoint, damage):
    weights = os.path.join(teacher_checkpoint, "weights.safetensors")
    state = os.path.join(teacher_checkpoint, "state.json")
    if damage == "truncated weights":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif damage == "garbage weights":
        with open(weights, "wb") as f:
            f.write(b"\x07" * 100)
    elif damage == "missing weights":
        os.remove(weights)
    elif damage == "corrupt state":
        with open(state, "w") as f:
            f.write('{"state": {"step": 2, ')
    else:
        os.remove(state)
    named = weights if "weights" in damage else state
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_teacher(teacher_checkpoint)


def test_a_truncated_or_corrupt_token_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1001, dtype=np.uint16).tofile(path)
    with open(path, "r+b") as f:
        f.truncate(2001)  # half an id at the end
    with pytest.raises(ValueError, match=re.escape(f"token file {path}: 2001 bytes is not a whole number")):
        TokenFile(str(path), 2000, 16)
    np.full(1000, 60000, dtype=np.uint16).tofile(path)  # ids beyond the vocabulary
    src = TokenFile(str(path), 50257, 16)
    with pytest.raises(ValueError, match=re.escape(f"token file {path}: id 60000 >= vocab_size 50257")):
        src.sample(2, torch.Generator().manual_seed(0))
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=re.escape(f"token file {path}: 10 ids, too few")):
        TokenFile(str(path), 50257, 16)
