"""The fused linear losses equal the ops on ``h @ w.T + b`` (loss and the gradient of every
trainable input) computed in float64 from the logits each head makes in its dtype, element by
element, at awkward shapes (V = 50257, V = 131 padded to 192 with -inf biases, one row, chunks
that do not divide the rows, non-contiguous rows), with top-p ties, in fp32, bf16 and fp16, for
every reduction; under torch.compile; and keep one chunk of logits alive."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmmd_ops
from dmmd_ops.linear import chunk_rows_for


def _model(rows, d, v, dtype, gen, *, padded_to=None, lead=None, bias=True, scale=1.0):
    """Random ``h [lead or rows, d]``, ``w [V', d]`` and ``b [V']``; with ``padded_to`` the classes
    past ``v`` are padding: zero weights and a ``-inf`` bias (they can never occur)."""
    total = padded_to or v
    h = torch.randn(*(lead or (rows,)), d, generator=gen) * scale
    w = torch.randn(total, d, generator=gen) / d ** 0.5 * 2
    b = torch.randn(total, generator=gen) * 0.5 if bias else None
    if padded_to:
        w[v:] = 0
        if b is not None:
            b[v:] = -torch.inf
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def _trainable(model):
    return tuple(None if x is None else x.detach().clone().requires_grad_(True) for x in model)


# dtype -> per-element tolerance against the float64 truth: |got - want| <= tol * (rms(want) + |want|).
# Measured largest ratios: bf16 0.014, fp16 0.0018, fp32 1e-5 (the gradients' own rounding).
TRUTH_TOL = {torch.float32: 5e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}


def _truth_logits(model, dtype, *, trainable=False):
    """The logits the head ``(h, w, b)`` makes in ``dtype``, as float64; with ``trainable`` also
    the float64 leaves ``(h, w, b)`` they depend on (the dtype's rounding passed straight through)."""
    leaves = tuple(None if x is None else x.detach().double().requires_grad_(trainable) for x in model)
    u = F.linear(*leaves)
    rounded = u.detach().to(dtype).double()
    u = torch.where(torch.isfinite(u), u + (rounded - u.detach()), u) if trainable else rounded
    return u, leaves


def _check_truth(got, want, dtype, name=""):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape and torch.isfinite(got).all(), name
    bound = TRUTH_TOL[dtype] * (float(want.square().mean().sqrt()) + want.abs())
    worst = float(((got - want).abs() - bound).max())
    assert worst <= 0, f"{name}: {float((got - want).abs().max()):.3g} off, beyond the tolerance by {worst:.3g}"


CASES = [  # rows, d, V, padded_to, chunk
    (37, 24, 131, 192, 5),
    (1, 16, 131, 192, None),
    (6, 8, 50257, None, 4),
    (64, 32, 300, None, 64),
]


@pytest.mark.parametrize("dtype", list(TRUTH_TOL), ids=str)
@pytest.mark.parametrize("rows,d,v,padded_to,chunk", CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_linear_generator_loss_equals_float64_truth(rows, d, v, padded_to, chunk, dtype, reduction):
    gen = torch.Generator().manual_seed(rows * 7 + v)
    student = _trainable(_model(rows, d, v, dtype, gen, padded_to=padded_to))
    teacher = _model(rows, d + 3, v, dtype, gen, padded_to=padded_to)  # each model its own width
    aux = _model(rows, d, v, dtype, gen, padded_to=padded_to)
    weight = torch.rand(rows, generator=gen)
    kw = dict(weight=weight, temperature=0.8, top_p=0.9, delta=2.0, reduction=reduction)
    got = dmmd_ops.linear_generator_loss(student[0], student[1], teacher[0], teacher[1], aux[0], aux[1],
                                         b_student=student[2], b_teacher=teacher[2], b_aux=aux[2], chunk_rows=chunk,
                                         **kw)
    u, leaves = _truth_logits(student, dtype, trainable=True)
    want = dmmd_ops.generator_loss(u, _truth_logits(teacher, dtype)[0], _truth_logits(aux, dtype)[0], **kw)
    _check_truth(got, want, dtype, "loss")
    probe = torch.randn(want.shape, generator=gen, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    (got * probe.to(got.dtype)).sum().backward()
    (want * probe.double()).sum().backward()
    for name, g, r, x in zip(("h", "w", "b"), _grads(student), _grads(leaves), student, strict=True):
        assert g is not None and g.dtype == x.dtype and g.shape == x.shape, name
        assert torch.isfinite(g.float()).all(), name  # -inf biases give zero gradients, not NaN
        _check_truth(g, r, dtype, name)


@pytest.mark.parametrize("dtype", list(TRUTH_TOL), ids=str)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_aux_loss_equals_float64_truth(dtype, soft, with_teacher, reduction):
    rows, d, v, padded_to = 29, 16, 131, 192
    gen = torch.Generator().manual_seed(3)
    aux = _trainable(_model(rows, d, v, dtype, gen, padded_to=padded_to))
    teacher = _model(rows, d, v, dtype, gen, padded_to=padded_to)
    if soft:
        target = torch.softmax(torch.randn(rows, v, generator=gen), -1)
        target = torch.cat([target, torch.zeros(rows, padded_to - v)], -1).to(dtype)
    else:
        target = torch.randint(0, v, (rows,), generator=gen)
    weight = torch.rand(rows, generator=gen)
    kw = dict(weight=weight, temperature=1.2, top_p=0.8, delta=3.0, reduction=reduction)
    t_args = (teacher[0], teacher[1]) if with_teacher else (None, None)
    got = dmmd_ops.linear_aux_loss(aux[0], aux[1], target, *t_args, b_aux=aux[2],
                                   b_teacher=teacher[2] if with_teacher else None, chunk_rows=6, **kw)
    u, leaves = _truth_logits(aux, dtype, trainable=True)
    t_logits = _truth_logits(teacher, dtype)[0] if with_teacher else None
    want = dmmd_ops.aux_loss(u, target.double() if soft else target, t_logits, **kw)
    _check_truth(got, want, dtype, "loss")
    # reduction none: the per-row gradients arrive in the backward, which recomputes the chunks
    probe = torch.randn(want.shape, generator=gen, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    (got * probe.to(got.dtype)).sum().backward()
    (want * probe.double()).sum().backward()
    for name, g, r in zip(("h", "w", "b"), _grads(aux), _grads(leaves), strict=True):
        _check_truth(g, r, dtype, name)


def test_top_p_ties_and_non_contiguous_rows():
    """Teacher classes with identical weights tie exactly at the nucleus boundary; the hidden
    states are every other row of a larger tensor."""
    gen = torch.Generator().manual_seed(5)
    rows, d, v = 11, 12, 40
    h_big = torch.randn(2 * rows, d, generator=gen)
    w = torch.randn(v, d, generator=gen)
    w_t = torch.randn(v, d, generator=gen)
    w_t[1::2] = w_t[0::2]  # every class has a twin with the same logit
    assert not h_big[::2].is_contiguous()
    h_t, h_a = torch.randn(rows, d, generator=gen), torch.randn(rows, d, generator=gen)
    for top_p in (0.3, 0.5, 0.77):
        hb, ws = h_big.clone().requires_grad_(True), w.clone().requires_grad_(True)
        got = dmmd_ops.linear_generator_loss(hb[::2], ws, h_t, w_t, h_a, w, top_p=top_p, chunk_rows=3)
        hb2, ws2 = h_big.clone().requires_grad_(True), w.clone().requires_grad_(True)
        want = dmmd_ops.generator_loss(hb2[::2] @ ws2.T, h_t @ w_t.T, h_a @ w.T, top_p=top_p)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.backward()
        want.backward()
        torch.testing.assert_close(hb.grad, hb2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ws.grad, ws2.grad, rtol=1e-5, atol=1e-5)
    h_s = h_big[::2]
    out = dmmd_ops.linear_generator_loss(h_s, w, h_t, w_t, h_a, w)  # a non-contiguous view as it is
    torch.testing.assert_close(out, dmmd_ops.generator_loss(h_s @ w.T, h_t @ w_t.T, h_a @ w.T))


def test_leading_dims_and_frozen_inputs():
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(30, 8, generator=gen)  # frozen head: no gradient asked, none made
    ht, wt = torch.randn(2, 5, 8, generator=gen), torch.randn(30, 8, generator=gen)
    loss = dmmd_ops.linear_generator_loss(h, w, ht, wt, ht, w, reduction="none", chunk_rows=3)
    assert loss.shape == (2, 5)
    loss.sum().backward()
    assert h.grad.shape == h.shape and w.grad is None


def test_under_torch_compile():
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = torch.randn(50, 8, generator=gen, requires_grad=True)
    ht, wt = torch.randn(10, 8, generator=gen), torch.randn(50, 8, generator=gen)

    def step(h, w):
        return dmmd_ops.linear_generator_loss(torch.tanh(h), w, ht, wt, ht, w.detach(), top_p=0.9, chunk_rows=4)

    eager = step(h, w)
    eager.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    compiled = torch.compile(step, backend="aot_eager")(h, w)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(h.grad, grads[0])
    torch.testing.assert_close(w.grad, grads[1])


def test_chunk_size_follows_the_memory_budget():
    assert chunk_rows_for(50257, 3, 256 * 2**20) == 256 * 2**20 // (4 * 50257 * 4)
    assert chunk_rows_for(10**9, 3, 1) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_rows=0), "chunk_rows must be >= 1"),
    (dict(reduction="max"), "reduction must be one of"),
    (dict(weight=torch.ones(3)), r"weight must have shape \(4,\)"),
    (dict(b_student=torch.zeros(7)), r"b_student must be \[V\] = \[9\]"),
])
def test_bad_arguments_are_named(kwargs, match):
    h, w = torch.randn(4, 5), torch.randn(9, 5)
    with pytest.raises(ValueError, match=match):
        dmmd_ops.linear_generator_loss(h, w, h, w, h, w, **kwargs)
    with pytest.raises(ValueError, match=r"h_teacher \[..., d\] must end in w_teacher's d = 5"):
        dmmd_ops.linear_generator_loss(h, w, torch.randn(4, 6), w, h, w)
    with pytest.raises(ValueError, match=r"w_aux must have w_student's V = 9"):
        dmmd_ops.linear_generator_loss(h, w, h, w, h, torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        dmmd_ops.linear_aux_loss(h, w, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_never_more_than_a_chunk_of_logits(monkeypatch, reduction):
    """Every matmul to the classes, forward and backward, makes at most ``chunk_rows`` rows."""
    import dmmd_ops.linear as linear

    made = []
    real = linear._logits

    def counting(h, w, b, rows):
        out = real(h, w, b, rows)
        made.append(out.shape[0])
        return out

    monkeypatch.setattr(linear, "_logits", counting)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(23, 8, generator=gen, requires_grad=True)
    w = torch.randn(40, 8, generator=gen, requires_grad=True)
    loss = dmmd_ops.linear_generator_loss(h, w, h.detach(), w.detach(), h.detach(), w.detach(), chunk_rows=5,
                                          reduction=reduction)
    loss.sum().backward()
    assert made and max(made) == 5 and sum(made) == 3 * 23 * (2 if reduction == "none" else 1)


def test_under_no_grad_only_the_loss_is_made(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(9, 8, generator=gen, requires_grad=True)
    w = torch.randn(30, 8, generator=gen, requires_grad=True)
    made = []  # every gradient the fused pass makes goes through torch.autograd.grad
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: made.append(1) or real(*a, **k))
    with torch.no_grad():
        evaluated = dmmd_ops.linear_generator_loss(h, w, h, w * 0.5, h, w * 2, chunk_rows=4)
    assert not evaluated.requires_grad and made == []
    trained = dmmd_ops.linear_generator_loss(h, w, h, w * 0.5, h, w * 2, chunk_rows=4)
    assert len(made) == 3  # with gradients on, one per chunk of rows, made in the forward
    torch.testing.assert_close(evaluated, trained.detach())
