"""posterior_sample, uniform diffusion with hard x: the O(1)-per-token draw (three distinct
masses: z_t, x, any other class) in eager PyTorch, torch.compile of it, and dmmd_ops."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import IMPLS, ROW_SIZES, run

_compiled_uniform = torch.compile(baselines.uniform_posterior, dynamic=False)
ALPHA_S, ALPHA_T = 0.55, 0.5  # one step of a 16-step sampler late in the chain


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,v", ROW_SIZES[:1], ids=lambda x: str(x))
def test_posterior_sample_uniform_hard(benchmark, n, v, impl):
    benchmark.group = f"posterior_sample uniform hard x N={n} V={v}"
    gen = torch.Generator().manual_seed(3)
    z, x = torch.randint(0, v, (n,), generator=gen), torch.randint(0, v, (n,), generator=gen)
    fn = {
        "eager": lambda: baselines.uniform_posterior(z, x, ALPHA_S, ALPHA_T, v),
        "compile": lambda: _compiled_uniform(z, x, ALPHA_S, ALPHA_T, v),
        "dmmd": lambda: dmmd_ops.posterior_sample(z, x, ALPHA_S, ALPHA_T, process="uniform", num_classes=v,
                                                  seed=0),
    }[impl]
    run(benchmark, fn, impl)
