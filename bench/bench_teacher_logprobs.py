"""teacher_logprobs: eager PyTorch (sort-based top-p), torch.compile of it, and dmmd_ops."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import DTYPE_NAMES, DTYPES, IMPLS, ROW_SIZES, make_logits, run

_compiled = torch.compile(baselines.teacher_logprobs, dynamic=False)
TEACHER = {
    "eager": baselines.teacher_logprobs,
    "compile": _compiled,
    "dmmd": lambda a, temperature, top_p, delta: dmmd_ops.teacher_logprobs(
        a, temperature=temperature, top_p=top_p, delta=delta),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("n,v", ROW_SIZES[:1], ids=lambda x: str(x))
def test_teacher_logprobs(benchmark, n, v, dtype, top_p, impl):
    benchmark.group = f"teacher_logprobs N={n} V={v} {DTYPE_NAMES[dtype]} top_p={top_p}"
    (a,) = make_logits(n, v, dtype, 1)
    fn = TEACHER[impl]
    run(benchmark, lambda: fn(a, temperature=1.0, top_p=top_p, delta=2.0), impl)
