"""Fused linear + D-MMD losses (eq. 11 for the generator, eq. 12 with hard targets for the
auxiliary model) against the unfused path (full logits by F.linear, then the same ops), forward +
backward, side by side in one run: time (pytest-benchmark) and peak memory
(``extra_info``: the peak resident memory a fresh process adds for one step, above what its
inputs take; measured in a subprocess per path so neither inherits the other's freed pages).

Sizes: rows = 8192, d = 512, V = 50257, fp32 (the issue's CPU shape); DMMD_BENCH_QUICK=1 uses
rows = 512, d = 64, V = 8192.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import dmmd_ops
from bench.conftest import QUICK, run
from bench.memory import in_subprocess, peak_bytes

ROWS, D, V = (512, 64, 8192) if QUICK else (8192, 512, 50257)


def make_inputs(rows: int, d: int, v: int, seed: int = 0):
    """Hidden states and heads of student, teacher and auxiliary model (the student's trainable)."""
    g = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(3):
        h = torch.randn(rows, d, generator=g)
        w = torch.randn(v, d, generator=g) / d ** 0.5 * 2
        b = torch.randn(v, generator=g) * 0.1
        models.append((h, w, b))
    (hs, ws, bs) = models[0]
    for t in (hs, ws, bs):
        t.requires_grad_(True)
    return models


def unfused_step(models, top_p: float = 0.9):
    """What a competent PyTorch user writes: full logits, the unfused op, backward."""
    (hs, ws, bs), (ht, wt, bt), (ha, wa, ba) = models
    u = F.linear(hs, ws, bs)
    with torch.no_grad():
        a, b = F.linear(ht, wt, bt), F.linear(ha, wa, ba)
    dmmd_ops.generator_loss(u, a, b, top_p=top_p).backward()


def fused_step(models, top_p: float = 0.9):
    (hs, ws, bs), (ht, wt, bt), (ha, wa, ba) = models
    dmmd_ops.linear_generator_loss(hs, ws, ht, wt, ha, wa, b_student=bs, b_teacher=bt, b_aux=ba,
                                   top_p=top_p).backward()


def unfused_aux_step(models, top_p: float = 0.9):
    """The auxiliary model's eq. 12 on hard targets, unfused (the auxiliary model is trained)."""
    (ha, wa, ba), (ht, wt, bt), _ = models
    with torch.no_grad():
        a = F.linear(ht, wt, bt)
    dmmd_ops.aux_loss(F.linear(ha, wa, ba), _targets(ha), a, top_p=top_p).backward()


def fused_aux_step(models, top_p: float = 0.9):
    (ha, wa, ba), (ht, wt, bt), _ = models
    dmmd_ops.linear_aux_loss(ha, wa, _targets(ha), ht, wt, b_aux=ba, b_teacher=bt, top_p=top_p).backward()


def _targets(h: torch.Tensor) -> torch.Tensor:
    return torch.arange(h.shape[0]) * 7919 % V  # fixed hard targets spread over the classes


STEPS = {"unfused": unfused_step, "fused": fused_step}
AUX_STEPS = {"unfused": unfused_aux_step, "fused": fused_aux_step}


def peak_step_bytes(loss: str, impl: str, rows: int, d: int, v: int) -> int:
    """In this process: the peak resident memory one step adds above its inputs."""
    models = make_inputs(rows, d, v)
    return peak_bytes(lambda: LOSSES[loss][impl](models))


def measure_in_subprocess(loss: str, impl: str) -> int:
    return in_subprocess("bench.bench_linear_losses", f"peak_step_bytes({loss!r}, {impl!r}, {ROWS}, {D}, {V})")


LOSSES = {"generator": STEPS, "aux": AUX_STEPS}


@pytest.mark.parametrize("impl", list(STEPS))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_linear_loss_fwd_bwd(benchmark, loss, impl):
    benchmark.group = f"linear_{loss}_loss fwd+bwd rows={ROWS} d={D} V={V} fp32 top_p=0.9"
    models = make_inputs(ROWS, D, V)

    def step():
        for t in models[0]:
            t.grad = None
        LOSSES[loss][impl](models)

    run(benchmark, step, impl)
    assert all(t.grad is not None for t in models[0])
    if not os.environ.get("DMMD_BENCH_NO_MEMORY"):
        benchmark.extra_info["peak_step_bytes"] = measure_in_subprocess(loss, impl)
