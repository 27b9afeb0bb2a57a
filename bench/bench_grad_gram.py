"""grad_gram: per-example gradients materialised in eager PyTorch, torch.compile of it, and
dmmd_ops (the Gram trick when 2 T^2 < d_in d_out, else chunked materialisation)."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import IMPLS, QUICK, run

_compiled = torch.compile(baselines.grad_gram, dynamic=False)
# (n, T, d_in, d_out): a GPT-2-small MLP layer with many short sequences (the Gram trick wins),
# with fewer, longer ones (materialising wins narrowly), and a small layer with long sequences.
SHAPES = [(16, 32, 256, 1024), (16, 256, 64, 64)] if QUICK else \
    [(256, 16, 768, 3072), (64, 64, 768, 3072), (64, 1024, 128, 128)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grad_gram(benchmark, shape, impl):
    n, t, d_in, d_out = shape
    benchmark.group = f"grad_gram n={n} T={t} d_in={d_in} d_out={d_out} fp32"
    gen = torch.Generator().manual_seed(4)
    a, g = torch.randn(n, t, d_in, generator=gen), torch.randn(n, t, d_out, generator=gen)
    fn = {"eager": baselines.grad_gram, "compile": _compiled, "dmmd": dmmd_ops.grad_gram}[impl]
    run(benchmark, lambda: fn(a, g), impl)
