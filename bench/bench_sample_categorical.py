"""sample_categorical: eager PyTorch (sort-based top-p, torch.multinomial), torch.compile of
it, and dmmd_ops."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import DTYPE_NAMES, DTYPES, IMPLS, ROW_SIZES, make_logits, run

_compiled_sample = torch.compile(baselines.sample_categorical, dynamic=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("n,v", ROW_SIZES[:1], ids=lambda x: str(x))
def test_sample_categorical(benchmark, n, v, dtype, top_p, impl):
    benchmark.group = f"sample_categorical N={n} V={v} {DTYPE_NAMES[dtype]} top_p={top_p}"
    (x,) = make_logits(n, v, dtype, 1)
    fn = {
        "eager": lambda: baselines.sample_categorical(x, 1.0, top_p),
        "compile": lambda: _compiled_sample(x, 1.0, top_p),
        "dmmd": lambda: dmmd_ops.sample_categorical(x, top_p=top_p, seed=0),
    }[impl]
    run(benchmark, fn, impl)
