"""The losses (compiled kernels and the float64 reference, via the `ops` fixture) held to the
math: brute-force formulas, the analytic gradients of eq. 11 and eq. 12, and float64 finite
differences (gradcheck)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmmd_ops import reference


def brute_keep(logits: list[float], top_p: float) -> list[bool]:
    """The keep rule of docs/design.md §4 written out: sort by probability (ties: lower index first), keep a
    class while the mass strictly before it is < top_p."""
    m = max(logits)
    w = [math.exp(a - m) for a in logits]
    z = math.fsum(w)
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    keep = [False] * len(logits)
    before = []
    for i in order:
        keep[i] = math.fsum(before) < top_p
        before.append(w[i] / z)
    return keep


def brute_teacher_logprobs(a: np.ndarray, temperature: float, top_p: float, delta: float) -> np.ndarray:
    out = np.empty_like(a, dtype=np.float64)
    for r, row in enumerate(a.astype(np.float64)):
        s = row / temperature
        if top_p < 1:
            keep = np.array(brute_keep(list(s), top_p))
            s = s - delta * (~keep)
        m = s.max()
        out[r] = s - (m + math.log(math.fsum(np.exp(s - m))))
    return out


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_nucleus_mask_matches_brute_force(top_p, gen):
    for trial in range(20):
        v = int(torch.randint(1, 40, (1,), generator=gen))
        a = torch.randn(3, v, generator=gen, dtype=torch.float64) * 3
        if trial % 2:  # many exact ties
            a = torch.round(a)
        keep = reference.nucleus_mask(a, torch.softmax(a, -1), top_p)
        for r in range(3):
            assert keep[r].tolist() == brute_keep(a[r].tolist(), top_p)


def test_nucleus_tie_breaks_to_lower_index():
    # Three equal classes of mass 1/3 each: top_p = 0.5 keeps the first two by index.
    a = torch.zeros(1, 3, dtype=torch.float64)
    keep = reference.nucleus_mask(a, torch.softmax(a, -1), 0.5)
    assert keep.tolist() == [[True, True, False]]
    # The class that crosses top_p is kept; the one after it is not.
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    assert reference.nucleus_mask(p.log(), p, 0.6).tolist() == [[True, True, False]]
    assert reference.nucleus_mask(p.log(), p, 0.5).tolist() == [[True, False, False]]
    # The highest class is always kept.
    assert reference.nucleus_mask(p.log(), p, 1e-9).tolist() == [[True, False, False]]


@pytest.mark.parametrize("temperature,top_p,delta", [(1.0, 1.0, 2.0), (0.7, 1.0, 2.0), (1.3, 0.8, 2.0),
                                                    (1.0, 0.5, 5.0), (0.5, 0.95, 0.0)])
def test_teacher_logprobs_matches_formula(ops, temperature, top_p, delta, gen):
    a = torch.randn(7, 23, generator=gen) * 2
    got = ops.teacher_logprobs(a, temperature=temperature, top_p=top_p, delta=delta)
    assert got.dtype == torch.float32 and got.shape == a.shape
    want = brute_teacher_logprobs(a.numpy(), temperature, top_p, delta)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_teacher_logprobs_soft_mask_never_infinite(ops, gen):
    """Outside the nucleus the log-probs drop by exactly delta relative to inside, never to -inf."""
    a = torch.randn(4, 50, generator=gen) * 4
    out = ops.teacher_logprobs(a, top_p=0.1, delta=2.0)
    assert torch.isfinite(out).all()
    keep = reference.nucleus_mask(a.double(), torch.softmax(a.double(), -1), 0.1)
    shift = (out - a).double()  # = -lse - delta * (1 - keep) per row
    for r in range(4):
        assert (~keep[r]).any()
        inside, outside = shift[r][keep[r]], shift[r][~keep[r]]
        np.testing.assert_allclose(outside.numpy(), float(inside[0]) - 2.0, atol=1e-5)
        np.testing.assert_allclose(inside.numpy(), float(inside[0]), atol=1e-5)


def brute_generator_loss_rows(u, a, b, temperature, top_p, delta, pull=lambda log_r: log_r):
    """``-sum_c p_c pull(log r_c)``, ``log r = teacher_logprobs - log_softmax(b)`` (eq. 11: ``pull`` = identity)."""
    u, b = u.astype(np.float64), b.astype(np.float64)
    tlp = brute_teacher_logprobs(a, temperature, top_p, delta)
    rows = []
    for r in range(u.shape[0]):
        p = np.exp(u[r] - u[r].max())
        p /= p.sum()
        alp = b[r] - (b[r].max() + math.log(np.exp(b[r] - b[r].max()).sum()))
        rows.append(-math.fsum(p[c] * pull(tlp[r, c] - alp[c]) for c in range(u.shape[1]) if p[c] > 0))
    return np.array(rows)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_generator_loss_value(ops, top_p, dtype, gen):
    u, a, b = (torch.randn(2, 5, 31, generator=gen).to(dtype) for _ in range(3))
    got = ops.generator_loss(u, a, b, temperature=0.9, top_p=top_p, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    want = brute_generator_loss_rows(u.float().reshape(10, 31).numpy(), a.float().reshape(10, 31).numpy(),
                                     b.float().reshape(10, 31).numpy(), 0.9, top_p, 2.0)
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, rtol=1e-5, atol=1e-5)


def test_generator_loss_weights_and_reductions(ops, gen):
    u, a, b = (torch.randn(6, 17, generator=gen) for _ in range(3))
    w = torch.rand(6, generator=gen)
    rows = ops.generator_loss(u, a, b, reduction="none")
    torch.testing.assert_close(ops.generator_loss(u, a, b, weight=w, reduction="none"), rows * w)
    torch.testing.assert_close(ops.generator_loss(u, a, b, weight=w), (rows * w).sum())
    torch.testing.assert_close(ops.generator_loss(u, a, b, weight=w, reduction="mean"), (rows * w).sum() / 6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jeffreys"])
def test_generator_loss_fixed_point_is_zero(ops, divergence, gen):
    """Teacher == auxiliary model: the loss and its gradient vanish (the D-MMD fixed point)."""
    u = torch.randn(5, 40, generator=gen, requires_grad=True)
    a = torch.randn(5, 40, generator=gen)
    loss = ops.generator_loss(u, a, a.clone(), divergence=divergence)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and float(u.grad.abs().max()) < 1e-6


@pytest.mark.parametrize("divergence,pull", [
    ("reverse_kl", lambda log_r: log_r),
    ("jeffreys", lambda log_r: 0.5 * (log_r + log_r.exp().clamp(max=20.0) - 1.0))])  # the cap: ratio_max
def test_generator_loss_analytic_gradient(divergence, pull, gen):
    """d/du_j of -sum_c p_c d_c is -p_j (d_j - sum_c p_c d_c), times the row's weight, with d the
    pull of ``log r`` (eq. 11: ``log r`` itself; one class far below the teacher in the aux: capped)."""
    u = torch.randn(4, 3, 29, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 3, 29, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 3, 29, generator=gen, dtype=torch.float64)
    b[0, 0, 2] = -15.0
    w = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    loss = reference.generator_loss(u, a, b, weight=w, temperature=0.8, top_p=0.7, delta=2.0, divergence=divergence)
    loss.backward()
    p = torch.softmax(u.detach(), -1)
    d = pull(reference.teacher_logprobs(a, temperature=0.8, top_p=0.7) - torch.log_softmax(b, -1))
    want = -p * (d - (p * d).sum(-1, keepdim=True)) * w.unsqueeze(-1)
    torch.testing.assert_close(u.grad, want, rtol=1e-10, atol=1e-12)


def test_generator_loss_gradcheck(gen):
    u = torch.randn(3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    w = torch.rand(3, generator=gen, dtype=torch.float64)
    for top_p in (1.0, 0.6):
        assert torch.autograd.gradcheck(
            lambda x, tp=top_p: reference.generator_loss(x, a, b, weight=w, top_p=tp, temperature=1.3,
                                                         reduction="none"), (u,))


def test_generator_loss_gradient_only_to_student(ops, gen):
    u, a, b = (torch.randn(3, 9, generator=gen, requires_grad=True) for _ in range(3))
    ops.generator_loss(u, a, b).backward()
    assert u.grad is not None and a.grad is None and b.grad is None


@pytest.mark.parametrize("divergence", ["reverse_kl", "jeffreys"])
def test_generator_loss_minus_inf_classes(ops, divergence, gen):
    """A class no model can produce (-inf everywhere, e.g. the mask) contributes exactly 0 (its
    ``log r`` is undefined)."""
    u, a, b = (torch.randn(4, 12, generator=gen) for _ in range(3))
    for t in (u, a, b):
        t[:, 3] = float("-inf")
    u.requires_grad_(True)
    loss = ops.generator_loss(u, a, b, top_p=0.7, divergence=divergence)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(u.grad).all()
    keep = [c for c in range(12) if c != 3]
    u2, a2, b2 = (t.detach()[:, keep] for t in (u, a, b))
    torch.testing.assert_close(loss, ops.generator_loss(u2, a2, b2, top_p=0.7, divergence=divergence))
    assert float(u.grad[:, 3].abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio_max", [20.0, 3.0])
def test_generator_loss_jeffreys_value(ops, dtype, ratio_max, gen):
    """The symmetric pull, against the formula, with rows where the auxiliary model gives a class
    almost nothing (the cap at work) and one where it is off by little (the cap idle)."""
    u, a, b = (torch.randn(3, 7, 29, generator=gen).to(dtype) for _ in range(3))
    b[0, :, 5] = -12.0  # r ~ e^12 at class 5: capped
    b[1] = a[1] + (0.05 * torch.randn(7, 29, generator=gen)).to(dtype)  # r ~ 1: no cap
    got = ops.generator_loss(u, a, b, top_p=0.8, reduction="none", divergence="jeffreys", ratio_max=ratio_max)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    flat = [t.float().reshape(21, 29).numpy() for t in (u, a, b)]
    want = brute_generator_loss_rows(*flat, 1.0, 0.8, 2.0,
                                     pull=lambda log_r: 0.5 * (log_r + min(math.exp(log_r), ratio_max) - 1.0))
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, rtol=1e-5, atol=1e-5)
    paper = ops.generator_loss(u, a, b, top_p=0.8, reduction="none")
    assert not torch.allclose(got, paper, atol=1e-3)  # it is not eq. 11 under another name


def test_generator_loss_jeffreys_gradcheck_and_near_the_fixed_point(gen):
    """float64 finite differences agree with the symmetric pull's gradient (the cap at work in one
    class); near the fixed point it is eq. 11's gradient."""
    u = torch.randn(4, 3, 29, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 3, 29, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 3, 29, generator=gen, dtype=torch.float64)
    b[0, 0, 2] = -15.0
    x = u.detach()[:2, 0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: reference.generator_loss(
        v, a[:2, 0], b[:2, 0], top_p=0.7, divergence="jeffreys", reduction="none"), (x,))
    near = a + 1e-3 * torch.randn(a.shape, generator=gen, dtype=torch.float64)
    g = [torch.autograd.grad(reference.generator_loss(u, a, near, divergence=div), u)[0]
         for div in ("reverse_kl", "jeffreys")]
    torch.testing.assert_close(g[1], g[0], rtol=0, atol=1e-3 * float(g[0].abs().max()))


def brute_aux_loss_rows(b, x, a, temperature, top_p, delta):
    b = b.astype(np.float64)
    q = np.exp(brute_teacher_logprobs(a, temperature, top_p, delta)) if a is not None else np.zeros_like(b)
    rows = []
    for r in range(b.shape[0]):
        alp = b[r] - (b[r].max() + math.log(np.exp(b[r] - b[r].max()).sum()))
        t = x[r] + q[r]
        rows.append(-math.fsum(t[c] * alp[c] for c in range(b.shape[1]) if t[c] > 0))
    return np.array(rows)


@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("soft", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aux_loss_value(ops, with_teacher, soft, dtype, gen):
    b = torch.randn(8, 19, generator=gen).to(dtype)
    a = torch.randn(8, 19, generator=gen).to(dtype) if with_teacher else None
    hard = torch.randint(0, 19, (8,), generator=gen)
    x = torch.softmax(torch.randn(8, 19, generator=gen), -1) if soft else \
        torch.nn.functional.one_hot(hard, 19).double()
    target = x.float() if soft else hard
    got = ops.aux_loss(b, target, a, temperature=1.2, top_p=0.85, reduction="none")
    want = brute_aux_loss_rows(b.float().numpy(), x.float().double().numpy(),
                               None if a is None else a.float().numpy(), 1.2, 0.85, 2.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_aux_loss_analytic_gradient_and_gradcheck(gen):
    """d/db_j of -sum_c t_c log_softmax(b)_c is (sum_c t_c) softmax(b)_j - t_j."""
    b = torch.randn(5, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, 13, generator=gen, dtype=torch.float64)
    x = torch.softmax(torch.randn(5, 13, generator=gen, dtype=torch.float64), -1) * 0.7  # need not sum to 1
    w = torch.rand(5, generator=gen, dtype=torch.float64)
    reference.aux_loss(b, x, a, weight=w, top_p=0.9).backward()
    t = x + reference.teacher_logprobs(a, top_p=0.9).exp()
    want = (t.sum(-1, keepdim=True) * torch.softmax(b.detach(), -1) - t) * w.unsqueeze(-1)
    torch.testing.assert_close(b.grad, want, rtol=1e-10, atol=1e-12)
    hard = torch.randint(0, 13, (5,), generator=gen)
    b2 = b.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: reference.aux_loss(z, hard, a, reduction="none"), (b2,))
    assert torch.autograd.gradcheck(lambda z: reference.aux_loss(z, x, None, reduction="mean"), (b2,))


def test_aux_loss_hard_equals_one_hot(ops, gen):
    b = torch.randn(6, 10, generator=gen)
    a = torch.randn(6, 10, generator=gen)
    hard = torch.randint(0, 10, (6,), generator=gen)
    soft = torch.nn.functional.one_hot(hard, 10).float()
    torch.testing.assert_close(ops.aux_loss(b, hard, a), ops.aux_loss(b, soft, a))


def test_aux_loss_zero_target_on_minus_inf_logit(ops, gen):
    b = torch.randn(3, 8, generator=gen)
    b[:, 0] = float("-inf")
    x = torch.softmax(torch.randn(3, 8, generator=gen), -1)
    x[:, 0] = 0.0
    b.requires_grad_(True)
    loss = ops.aux_loss(b, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(b.grad).all()
    a = b.detach().clone()
    a[:, 0] = float("-inf")
    assert torch.isfinite(ops.aux_loss(b.detach(), x, a))
