"""denoise_step: eager PyTorch doing the op's work (masked: the reveal coin, then sort-based
top-p and torch.multinomial for the revealed rows only; uniform: every row, then the O(1)
hard-x posterior), torch.compile of it, and dmmd_ops."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import DTYPE_NAMES, DTYPES, IMPLS, ROW_SIZES, make_logits, run

# the masked baseline selects the revealed rows (a data-dependent shape): dynamic shapes
_compiled_denoise = torch.compile(baselines.denoise_step, dynamic=True)
ALPHA_S, ALPHA_T = 0.55, 0.5  # one step of a 16-step sampler late in the chain: ~10% of masks reveal


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("n,v", ROW_SIZES, ids=lambda x: str(x))
def test_denoise_step(benchmark, n, v, dtype, top_p, process, impl):
    benchmark.group = f"denoise_step N={n} V={v} {DTYPE_NAMES[dtype]} {process} top_p={top_p}"
    (x,) = make_logits(n, v, dtype, 1)
    mask_id = v - 1 if process == "masked" else None
    z = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2))
    if process == "masked":
        z[: n // 2] = mask_id
    fn = {
        "eager": lambda: baselines.denoise_step(x, z, ALPHA_S, ALPHA_T, process, mask_id, 1.0, top_p),
        "compile": lambda: _compiled_denoise(x, z, ALPHA_S, ALPHA_T, process, mask_id, 1.0, top_p),
        "dmmd": lambda: dmmd_ops.denoise_step(x, z, ALPHA_S, ALPHA_T, process=process, mask_id=mask_id,
                                              top_p=top_p, seed=0),
    }[impl]
    run(benchmark, fn, impl)
