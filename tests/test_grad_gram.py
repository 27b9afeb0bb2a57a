"""grad_gram against per-example gradients obtained from autograd one example at a time."""
from __future__ import annotations

import pytest
import torch


def brute_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients of y = a W^T, each from its own backward pass."""
    n, _, d_in = a.shape
    d_out = g.shape[-1]
    grads = []
    for i in range(n):
        w = torch.zeros(d_out, d_in, dtype=torch.float64, requires_grad=True)
        y = a[i].double() @ w.T
        (y * g[i].double()).sum().backward()  # dL/dy = g_i
        grads.append(w.grad.reshape(-1))
    flat = torch.stack(grads)
    return flat @ flat.T


@pytest.mark.parametrize("n,t,d_in,d_out", [(1, 1, 1, 1), (5, 3, 7, 4), (4, 16, 2, 3), (3, 2, 33, 65)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_grad_gram_matches_autograd(ops, n, t, d_in, d_out, dtype, tol, gen):
    """float32 inputs run the kernel under test (float64 inputs run the float64 reference
    whatever ``ops`` is), both held to per-example autograd in float64."""
    a = torch.randn(n, t, d_in, generator=gen, dtype=dtype)
    g = torch.randn(n, t, d_out, generator=gen, dtype=dtype)
    got = ops.grad_gram(a, g)
    assert got.shape == (n, n) and got.dtype == dtype
    torch.testing.assert_close(got.double(), brute_gram(a, g), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_gram_low_precision_inputs(ops, dtype, gen):
    a = torch.randn(4, 5, 6, generator=gen).to(dtype)
    g = torch.randn(4, 5, 3, generator=gen).to(dtype)
    got = ops.grad_gram(a, g)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), brute_gram(a.double(), g.double()), rtol=1e-5, atol=1e-5)


def test_grad_gram_is_symmetric_psd(ops, gen):
    k = ops.grad_gram(torch.randn(6, 4, 5, generator=gen), torch.randn(6, 4, 2, generator=gen)).double()
    torch.testing.assert_close(k, k.T)
    assert float(torch.linalg.eigvalsh(k).min()) > -1e-4
