"""One D-MMD distillation step at a language model's vocabulary: time (pytest-benchmark) and the
peak resident memory the step adds above its inputs (``extra_info``, measured in a fresh
subprocess per case, as bench_linear_losses does), for a generator step and an auxiliary step
of the masked defaults (fused linear losses, soft targets, noise), unfused and fused.

What it watches: the fused losses promise never to make the ``[rows, V]`` logits at once, so
the peak of a fused step must stay well under one ``[rows, V]`` float32 tensor (reported as
``rows_by_v_bytes`` beside it), while the unfused step makes several.

Sizes: a masked teacher with V = 50257, batch 16, width 64, L = 64 and 256 (rows = 1024 and
4096: the peak of a fused step must not grow with the rows); DMMD_BENCH_QUICK=1 uses V = 8192,
L = 16.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.conftest import QUICK, run
from bench.memory import in_subprocess, peak_bytes

V, BATCH, WIDTH = (8192, 16, 32) if QUICK else (50257, 16, 64)
LENGTHS = (16,) if QUICK else (64, 256)


def make_distiller(fused: bool, length: int):
    """A masked teacher (random head: a spread output, not the zero-initialised one) and its
    Distiller with the masked defaults, fused or unfused."""
    from dmmd.diffusion.processes import DiffusionProcess
    from dmmd.models.denoiser import Denoiser, DenoiserConfig
    from dmmd.training.distill import DistillConfig, Distiller

    torch.manual_seed(0)
    teacher = Denoiser(DenoiserConfig(num_classes=V, length=length, width=WIDTH, depth=1, heads=2))
    with torch.no_grad():
        teacher.head.weight.normal_(0, 0.5)
    process = DiffusionProcess("masked", V, "linear")
    cfg = DistillConfig.from_dict({"batch_size": BATCH, "fused_losses": fused, "student_steps": 4})
    return Distiller(teacher, process, cfg)


class _Data:
    def __init__(self, length: int):
        self.length = length

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, V - 1, (batch, self.length), generator=generator)


def one_step(d, loss: str, batch) -> None:
    for model in (d.generator, d.aux):
        model.zero_grad(set_to_none=True)
    value, _ = d.generator_loss(batch, 0) if loss == "generator" else d.aux_loss(batch, 1)
    value.backward()


def make_batch(d):
    from dmmd.training.distill import draw_batch

    return draw_batch(_Data(d.teacher.config.length), d.process, d.cfg, d.noise, 0)


def peak_step_bytes(loss: str, fused: bool, length: int) -> int:
    """In this process: the peak resident memory one step adds above its models and batch."""
    d = make_distiller(fused, length)
    batch = make_batch(d)
    one_step(d, loss, batch)  # once first: gradients allocated, caches warm
    return peak_bytes(lambda: one_step(d, loss, batch))


def measure_in_subprocess(loss: str, fused: bool, length: int) -> int:
    return in_subprocess("bench.bench_distill_step", f"peak_step_bytes({loss!r}, {fused!r}, {length})")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("impl", ["unfused", "fused"])
@pytest.mark.parametrize("loss", ["generator", "aux"])
def test_distill_step(benchmark, loss, impl, length):
    benchmark.group = f"distill step ({loss}) masked defaults V={V} L={length} batch={BATCH} width={WIDTH} fp32"
    d = make_distiller(impl == "fused", length)
    assert d.fused == (impl == "fused")
    batch = make_batch(d)
    run(benchmark, lambda: one_step(d, loss, batch), impl)
    if not QUICK and not os.environ.get("DMMD_BENCH_NO_MEMORY"):  # (the smoke run: the step only)
        benchmark.extra_info["peak_step_bytes"] = measure_in_subprocess(loss, impl == "fused", length)
        benchmark.extra_info["rows_by_v_bytes"] = BATCH * length * V * 4
