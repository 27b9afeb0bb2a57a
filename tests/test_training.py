"""Teacher training: checkpoints round-trip atomically, a resumed run ends bit-identical to an
uninterrupted one, 2-process DDP (torchrun, gloo) equals one process on the same global
batch, a trained teacher beats an untrained one on the exact likelihood of its samples and
improves with more sampling steps, and the command line works end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dmmd.data import DataConfig, MarkovSource, TokenFile, make_source
from dmmd.diffusion.sampling import sample
from dmmd.training.checkpoint import load_tensors, read_state, save_checkpoint
from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(out, **kw) -> TeacherConfig:
    base = dict(data="markov", vocab_size=4, length=6, width=32, depth=1, heads=2, batch_size=8, steps=6,
                warmup=2, eval_every=3, eval_batches=1, eval_steps=8, save_every=3, out=str(out), seed=5)
    base.update(kw)
    return TeacherConfig.from_dict(dict(**base))


def _all_tensors(path):
    return {n: load_tensors(path, n) for n in ("model", "ema", "opt")}


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    path = str(tmp_path / "ckpt")
    m = torch.nn.Linear(3, 2)
    save_checkpoint(path, models={"model": m}, state={"step": 1})
    save_checkpoint(path, models={"model": m}, state={"step": 2})  # replaces the old one
    assert read_state(path) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directories left behind
    torch.testing.assert_close(load_tensors(path, "model")["weight"], m.weight.detach())


def test_resumed_run_is_bit_identical(tmp_path):
    full = train_teacher(_tiny(tmp_path / "full"), progress=False)
    part = train_teacher(_tiny(tmp_path / "cut"), progress=False, stop_at=3)
    assert part["step"] == 3
    rest = train_teacher(_tiny(tmp_path / "cut"), progress=False)
    assert full["step"] == rest["step"] == 6
    a, b = _all_tensors(full["checkpoint"]), _all_tensors(rest["checkpoint"])
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_ddp_equals_one_process(tmp_path, parallel):
    """DDP, and FSDP2 (the teacher and its EMA sharded per block), make one process's steps."""
    args = ["--parallel", parallel, "--data", "markov", "--vocab-size", "4", "--length", "6", "--width", "32",
            "--depth", "1",
            "--heads", "2", "--batch-size", "8", "--steps", "3", "--warmup", "1", "--eval-every", "0",
            "--save-every", "3", "--seed", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "dmmd", "train-teacher", "--out", str(one), *args], check=True,
                   env=env, cwd=ROOT, capture_output=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dmmd", "train-teacher", "--out", str(two), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Gradients, not only weights (Adam's first steps are sign-like and would hide a wrong
    # gradient scale): the logged norm of the gradient rank 0 steps with, after DDP's mean.
    logs = [[json.loads(line) for line in open(d / "log.jsonl")] for d in (one, two)]
    assert len(logs[0]) == len(logs[1]) == 3
    for r1, r2 in zip(*logs, strict=True):
        assert r1["grad_norm"] > 0 and r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
    a, b = load_tensors(str(one / "checkpoint"), "model"), load_tensors(str(two / "checkpoint"), "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    init = load_tensors(str(one / "checkpoint"), "ema")
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the runs did train


def _mean_loglik(model, process, source, steps, n=400, seed=0):
    x = sample(lambda z, t: model(z, t), process, n, source.length, steps, seed=seed)
    return float(source.log_prob(x).clamp_min(-50).mean())


def test_trained_teacher_beats_untrained_and_improves_with_steps(tmp_path):
    cfg = _tiny(tmp_path / "t", vocab_size=6, length=8, width=64, depth=2, heads=4, batch_size=64, steps=300,
                warmup=20, lr=3e-3, eval_every=0, save_every=300, ema=0.98)
    train_teacher(cfg, progress=False)
    model, process, _ = load_teacher(str(tmp_path / "t" / "checkpoint"))
    source = make_source(cfg.source)
    untrained, _, _ = load_teacher(str(tmp_path / "t" / "checkpoint"))
    for p in untrained.parameters():
        torch.nn.init.normal_(p, std=0.02)
    trained_64 = _mean_loglik(model, process, source, 64)
    trained_1 = _mean_loglik(model, process, source, 1)
    assert trained_64 > _mean_loglik(untrained, process, source, 64) + 5.0
    assert trained_64 > trained_1 + 1.0  # few-step factorization error


def test_command_line_help_train_and_sample(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "dmmd", *a], check=True, env=env, cwd=ROOT,
                                    capture_output=True, text=True).stdout
    helptext = run("train-teacher", "--help")
    for flag in ("--data", "--process", "--schedule", "--block-size", "--time-limit-min", "--config"):
        assert flag in helptext
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"data": "text", "length": 16, "width": 32, "depth": 1, "heads": 2,
                               "batch_size": 4, "steps": 2, "eval_every": 0, "save_every": 2}))
    out = tmp_path / "text"
    result = json.loads(run("train-teacher", "--config", str(cfg), "--out", str(out), "--no-progress").strip())
    assert result["step"] == 2
    samples = tmp_path / "samples.json"
    text = run("sample", "--checkpoint", str(out / "checkpoint"), "--steps", "4", "--num", "2",
               "--out", str(samples))
    got = json.loads(samples.read_text())
    assert len(got["tokens"]) == 2 and len(got["tokens"][0]) == 16 and len(got["text"]) == 2
    assert "--- sample 1" in text


@pytest.mark.parametrize("data", ["text", "grids"])
def test_sources_give_windows(data):
    cfg = TeacherConfig.from_dict(dict(data=data, length=64 if data == "grids" else 32))
    src = make_source(cfg.source)
    x = src.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, cfg.source.length) and x.dtype == torch.long
    assert 0 <= int(x.min()) and int(x.max()) < src.vocab_size


def test_token_file_windows_are_memory_mapped_slices(tmp_path):
    ids = (np.arange(5000) * 7 % 50257).astype(np.uint16)
    path = tmp_path / "train.bin"
    ids.tofile(path)
    src = TokenFile(str(path), 50257, 16)
    x = src.sample(4, torch.Generator().manual_seed(1))
    for row in x:  # every window is a contiguous slice of the file, in the train split
        start = int(np.nonzero(ids == int(row[0]))[0][0])
        assert row.tolist() == ids[start:start + 16].astype(np.int64).tolist() and start + 16 <= src.split
    v = src.sample(4, torch.Generator().manual_seed(1), split="val")
    assert all(int(np.nonzero(ids == int(r[0]))[0][0]) >= src.split for r in v)


def test_markov_source_probabilities_are_exact():
    src = MarkovSource(3, 4, fanout=2, seed=3)
    seqs, p = src.all_sequences()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    x = src.sample(20000, torch.Generator().manual_seed(0))
    assert torch.isfinite(src.log_prob(x)).all()  # samples only ever take allowed transitions
    idx = (x * torch.tensor([27, 9, 3, 1])).sum(-1)
    freq = torch.bincount(idx, minlength=81).double() / len(x)
    assert float((freq - p).abs().max()) < 0.02


def test_markov_source_without_self_loops_and_as_words():
    src = MarkovSource(32, 16, fanout=3, seed=0, self_loops=False)
    t = src.transition
    assert (t.diagonal() == 0).all() and ((t > 0).sum(1) == 3).all()
    torch.testing.assert_close(t.sum(1), torch.ones(32, dtype=torch.float64))
    assert torch.equal(MarkovSource(32, 16, fanout=3, seed=0, self_loops=False).transition, t)  # deterministic
    assert not torch.equal(MarkovSource(32, 16, fanout=3, seed=0).transition, t)
    x = src.sample(500, torch.Generator().manual_seed(0))
    assert (x[:, 1:] != x[:, :-1]).all() and torch.isfinite(src.log_prob(x)).all()
    lines = src.to_words(torch.cat([x[:2], torch.full((1, 16), 32)]))
    assert len(lines) == 3 and len(lines[0].split()) == 16 and lines[2] == " ".join(["_"] * 16)
    with pytest.raises(ValueError, match="at most 64"):
        MarkovSource(65, 4).to_words(x[:1])
    cfg = DataConfig(data="markov", vocab_size=32, length=16, markov_self_loops=False)
    assert torch.equal(make_source(cfg).transition, t)
