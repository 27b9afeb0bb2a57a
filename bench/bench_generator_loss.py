"""generator_loss forward+backward: eager PyTorch, torch.compile of it, and dmmd_ops."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import DTYPE_NAMES, DTYPES, IMPLS, ROW_SIZES, make_logits, run

_compiled = torch.compile(baselines.generator_loss, dynamic=False)
GENERATOR = {
    "eager": baselines.generator_loss,
    "compile": _compiled,
    "dmmd": lambda u, a, b, temperature, top_p, delta: dmmd_ops.generator_loss(
        u, a, b, temperature=temperature, top_p=top_p, delta=delta),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("n,v", ROW_SIZES, ids=lambda x: str(x))
def test_generator_loss_fwd_bwd(benchmark, n, v, dtype, top_p, impl):
    benchmark.group = f"generator_loss fwd+bwd N={n} V={v} {DTYPE_NAMES[dtype]} top_p={top_p}"
    u, a, b = make_logits(n, v, dtype, 3)
    u.requires_grad_(True)
    fn = GENERATOR[impl]

    def step():
        u.grad = None
        fn(u, a, b, temperature=1.0, top_p=top_p, delta=2.0).backward()

    run(benchmark, step, impl)
    assert u.grad is not None and torch.isfinite(u.grad.float()).all()
