"""generator_loss and aux_loss forward+backward, teacher_logprobs forward: eager PyTorch,
torch.compile of it, and dmmd_ops."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import DTYPE_NAMES, DTYPES, IMPLS, ROW_SIZES, make_logits, run

_compiled_gen = torch.compile(baselines.generator_loss, dynamic=False)
_compiled_aux = torch.compile(baselines.aux_loss, dynamic=False)
_compiled_teacher = torch.compile(baselines.teacher_logprobs, dynamic=False)

GENERATOR = {
    "eager": baselines.generator_loss,
    "compile": _compiled_gen,
    "dmmd": lambda u, a, b, temperature, top_p, delta: dmmd_ops.generator_loss(
        u, a, b, temperature=temperature, top_p=top_p, delta=delta),
}
AUX = {
    "eager": baselines.aux_loss,
    "compile": _compiled_aux,
    "dmmd": lambda b, x, a, temperature, top_p, delta: dmmd_ops.aux_loss(
        b, x, a, temperature=temperature, top_p=top_p, delta=delta),
}
TEACHER = {
    "eager": baselines.teacher_logprobs,
    "compile": _compiled_teacher,
    "dmmd": lambda a, temperature, top_p, delta: dmmd_ops.teacher_logprobs(
        a, temperature=temperature, top_p=top_p, delta=delta),
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("n,v", ROW_SIZES[:1], ids=lambda x: str(x))
def test_teacher_logprobs(benchmark, n, v, dtype, top_p, impl):
    benchmark.group = f"teacher_logprobs N={n} V={v} {DTYPE_NAMES[dtype]} top_p={top_p}"
    (a,) = make_logits(n, v, dtype, 1)
    fn = TEACHER[impl]
    run(benchmark, lambda: fn(a, temperature=1.0, top_p=top_p, delta=2.0), impl)
