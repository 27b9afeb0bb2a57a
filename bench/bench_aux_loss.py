"""aux_loss forward+backward (hard target, with and without the teacher term): eager
PyTorch, torch.compile of it, and dmmd_ops."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import DTYPE_NAMES, DTYPES, IMPLS, ROW_SIZES, make_logits, run

_compiled = torch.compile(baselines.aux_loss, dynamic=False)
AUX = {
    "eager": baselines.aux_loss,
    "compile": _compiled,
    "dmmd": lambda b, x, a, temperature, top_p, delta: dmmd_ops.aux_loss(
        b, x, a, temperature=temperature, top_p=top_p, delta=delta),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("target", ["hard", "hard+teacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("n,v", ROW_SIZES, ids=lambda x: str(x))
def test_aux_loss_fwd_bwd(benchmark, n, v, dtype, target, impl):
    benchmark.group = f"aux_loss fwd+bwd N={n} V={v} {DTYPE_NAMES[dtype]} {target} top_p=1.0"
    b, a = make_logits(n, v, dtype, 2)
    b.requires_grad_(True)
    x = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    teacher = a if target == "hard+teacher" else None
    fn = AUX[impl]

    def step():
        b.grad = None
        fn(b, x, teacher, temperature=1.0, top_p=1.0, delta=2.0).backward()

    run(benchmark, step, impl)
    assert b.grad is not None
