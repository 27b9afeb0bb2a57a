"""The ops as torch custom ops: torch.library.opcheck (schema, fake tensors, autograd
registration, AOT dispatch) for every op with and without requires_grad inputs, and
torch.compile(fullgraph=True) over a training-step-like function that calls them."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from dmmd_ops import reference

pytestmark = pytest.mark.skipif(not dmmd_ops.has_kernel("generator_loss_forward", "cpu"),
                                reason="the extension has no CPU kernels")
ops = torch.ops.dmmd


def _logits(rows, v, gen, grad=False, dtype=torch.float32):
    return (torch.randn(rows, v, generator=gen) * 2).to(dtype).requires_grad_(grad)


def _loss_cases(gen, grad):
    u, a, b = _logits(5, 33, gen, grad), _logits(5, 33, gen), _logits(5, 33, gen)
    hard = torch.randint(0, 33, (5,), generator=gen)
    soft = torch.softmax(torch.randn(5, 33, generator=gen), -1)
    _, stats = ops.generator_loss_forward(u.detach(), a, b, 1.0, 0.9, 2.0)
    _, aux_stats = ops.aux_loss_forward(b, soft, a, 0.8, 0.7, 2.0)
    return [
        (ops.teacher_logprobs, (_logits(4, 17, gen, grad), 0.7, 0.8, 2.0)),
        (ops.generator_loss_forward, (u, a, b, 1.0, 1.0, 2.0)),
        (ops.generator_loss_forward, (u, a, b, 0.8, 0.9, 1.0)),
        (ops.generator_loss_backward, (torch.ones(5), u.detach(), a, b, stats, 1.0, 0.9, 2.0)),
        (ops.aux_loss_forward, (b.detach().requires_grad_(grad), hard, None, 1.0, 1.0, 2.0)),
        (ops.aux_loss_forward, (b.detach().requires_grad_(grad), soft, a, 0.8, 0.7, 2.0)),
        (ops.aux_loss_backward, (torch.ones(5), b, soft, a, aux_stats, 0.8, 0.7, 2.0)),
    ]


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_loss_ops(grad, gen):
    for op, args in _loss_cases(gen, grad):
        torch.library.opcheck(op, args)


def test_opcheck_sampler_ops(gen):
    logits = _logits(6, 40, gen).to(torch.bfloat16)
    z = torch.randint(0, 40, (6,), generator=gen)
    a_s = torch.full((6,), 0.7, dtype=torch.float64)
    a_t = torch.full((6,), 0.2, dtype=torch.float64)
    soft = torch.softmax(torch.randn(6, 40, generator=gen), -1)
    cases = [
        (ops.philox4x32, (torch.randint(0, 2**32, (5, 4), generator=gen),
                          torch.randint(0, 2**32, (5, 2), generator=gen))),
        (ops.sample_categorical, (logits, 1.0, 0.9, 3, 2**40)),
        (ops.denoise_step, (logits, z, a_s, a_t, "masked", 0, 1.0, 0.9, 3, 1)),
        (ops.denoise_step, (logits, z, a_s, a_t, "uniform", -1, 0.7, 1.0, 3, 1)),
        (ops.posterior_sample, (z, z.flip(0), a_s, a_t, "uniform", -1, 40, 3, 1)),
        (ops.posterior_sample, (z, soft, a_s, a_t, "masked", 0, -1, 3, 1)),
        (ops.grad_gram, (torch.randn(4, 3, 8, generator=gen), torch.randn(4, 3, 9, generator=gen))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_over_the_public_ops(gen):
    """A D-MMD-step-like function: both losses with gradients and a sampler step, one graph."""
    rows, v = (2, 3), 64

    def step(u, a, b, x, z):
        gen_loss = dmmd_ops.generator_loss(u, a, b, top_p=0.9, temperature=0.8, reduction="mean")
        aux = dmmd_ops.aux_loss(b, x, a, top_p=0.9, temperature=0.8)
        logq = dmmd_ops.teacher_logprobs(a, top_p=0.9)
        zs = dmmd_ops.denoise_step(u.detach(), z, 0.7, 0.3, process="masked", mask_id=0, top_p=0.9, seed=1)
        return gen_loss, aux, logq, zs

    u = torch.randn(*rows, v, generator=gen).requires_grad_()
    b = torch.randn(*rows, v, generator=gen).requires_grad_()
    a = torch.randn(*rows, v, generator=gen)
    x = torch.randint(1, v, rows, generator=gen)
    z = torch.zeros(rows, dtype=torch.long)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(u, a, b, x, z)
    want = step(u, a, b, x, z)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    gu, gb = torch.autograd.grad(got[0] + got[1], (u, b))
    wu, wb = torch.autograd.grad(want[0] + want[1], (u, b))
    torch.testing.assert_close(gu, wu)
    torch.testing.assert_close(gb, wb)
    u64 = u.detach().double().requires_grad_()
    torch.testing.assert_close(
        got[0].double(), reference.generator_loss(u64, a, b, top_p=0.9, temperature=0.8, reduction="mean"),
        rtol=1e-5, atol=1e-5)


def test_float64_gradcheck_of_the_reference_losses(gen):
    """The math: float64 inputs run the float64 reference, and gradcheck holds its gradients to
    finite differences. (The kernels compute in float32; the next test checks them.)"""
    u = torch.randn(3, 11, dtype=torch.float64, generator=gen).requires_grad_()
    a, b = (torch.randn(3, 11, dtype=torch.float64, generator=gen) for _ in range(2))
    w = torch.rand(3, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(
        lambda u: dmmd_ops.generator_loss(u, a, b, weight=w, top_p=0.8, reduction="none"), (u,))
    assert torch.autograd.gradcheck(lambda b: dmmd_ops.aux_loss(b, torch.tensor([1, 5, 9]), a, top_p=0.8), (u,))
    assert torch.autograd.gradcheck(lambda a: dmmd_ops.teacher_logprobs(a, temperature=0.7, top_p=0.6), (u,))


def _finite_difference_grad(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the scalar ``f`` at float64 ``x``, element by element."""
    grad = torch.zeros_like(x)
    flat, g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.numel()):
        keep = float(flat[i])
        flat[i] = keep + eps
        hi = float(f(x))
        flat[i] = keep - eps
        lo = float(f(x))
        flat[i] = keep
        g[i] = (hi - lo) / (2 * eps)
    return grad


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_registered_backward_kernels_match_finite_differences(gen, top_p):
    """The backward kernels the autograd registration calls (float32 inputs), held to float64
    central differences of the reference forward at the same (float32-representable) point."""
    assert dmmd_ops.has_kernel("generator_loss_backward", "cpu") and dmmd_ops.has_kernel("aux_loss_backward", "cpu")
    u, a, b = (torch.randn(4, 13, generator=gen) * 2 for _ in range(3))
    w = torch.rand(4, generator=gen)
    target = torch.softmax(torch.randn(4, 13, generator=gen), -1)
    u32 = u.clone().requires_grad_()
    dmmd_ops.generator_loss(u32, a, b, weight=w, top_p=top_p, temperature=0.8).backward()
    want = _finite_difference_grad(
        lambda x: reference.generator_loss(x, a.double(), b.double(), weight=w.double(), top_p=top_p,
                                           temperature=0.8), u.double())
    torch.testing.assert_close(u32.grad.double(), want, rtol=1e-4, atol=1e-6)
    b32 = b.clone().requires_grad_()
    dmmd_ops.aux_loss(b32, target, a, weight=w, top_p=top_p, temperature=0.8).backward()
    want = _finite_difference_grad(
        lambda x: reference.aux_loss(x, target.double(), a.double(), weight=w.double(), top_p=top_p,
                                     temperature=0.8), b.double())
    torch.testing.assert_close(b32.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_a_build_for_another_torch_is_refused_with_one_clear_reason():
    """An extension compiled against another torch is not loaded (that can crash); the reason
    names both versions and how to rebuild. The installed build matches this torch."""
    from dmmd_ops._ext import EXTENSION_LOADED, build_mismatch

    assert EXTENSION_LOADED
    assert build_mismatch({"torch_version": torch.__version__}, torch.__version__) is None
    assert build_mismatch({}, torch.__version__) is None
    why = build_mismatch({"torch_version": "2.6.0+cu124"}, "2.13.0+cpu")
    assert "built against torch 2.6.0+cu124" in why and "this is torch 2.13.0+cpu" in why
    assert "pip install --no-build-isolation" in why
