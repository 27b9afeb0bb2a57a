"""The compiled kernels against the float64 reference: values and gradients per device (CPU;
CUDA when a GPU is present) and dtype (float32 / bfloat16 / float16, tolerances from
dmmd_ops.testing) at aligned and awkward shapes (one row, V = 50257, 3-D inputs, rows with a
stride, a non-unit last stride); the nucleus rule at ties; -inf classes; bad rows named; draws
identical to the reference's Philox stream and independent of the thread count."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from dmmd_ops import reference
from dmmd_ops.testing import CASES, DTYPES, VALUE_TOL, grad_tol, make_logits, on_device

pytestmark = pytest.mark.skipif(not dmmd_ops.has_kernel("generator_loss_forward", "cpu"),
                                reason="the extension has no CPU kernels")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _kernels_on(device: str) -> None:
    if not dmmd_ops.has_kernel("generator_loss_forward", device):
        pytest.fail(f"the extension has no {device} kernels; build it for {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.3)])
def test_generator_loss_and_grad_match_reference(device, shape, layout, dtype, temperature, top_p, gen):
    """Against the float64 reference; on CUDA also against the CPU kernel."""
    _kernels_on(device)
    u, a, b = (make_logits(shape, dtype, gen, layout) for _ in range(3))
    w = torch.rand(shape[:-1], generator=gen)
    kw = dict(temperature=temperature, top_p=top_p, delta=1.5, reduction="none")
    uk = on_device(u, device).requires_grad_()
    got = dmmd_ops.generator_loss(uk, on_device(a, device), on_device(b, device), weight=w.to(device), **kw)
    u64 = u.detach().double().requires_grad_()
    want = reference.generator_loss(u64, a, b, weight=w, **kw)
    assert got.dtype == torch.float32 and got.shape == shape[:-1]
    rtol, atol = VALUE_TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=atol)
    gl = torch.randn(shape[:-1], generator=gen)
    (got * gl.to(device)).sum().backward()
    (want * gl).sum().backward()
    assert uk.grad.dtype == dtype and uk.grad.shape == shape
    torch.testing.assert_close(uk.grad.double().cpu(), u64.grad, **grad_tol(dtype, u64.grad))
    if device != "cpu":
        ucpu = u.clone().requires_grad_()
        cpu = dmmd_ops.generator_loss(ucpu, a, b, weight=w, **kw)
        (cpu * gl).sum().backward()
        torch.testing.assert_close(got.cpu(), cpu.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(uk.grad.double().cpu(), ucpu.grad.double(), **grad_tol(dtype, u64.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
@pytest.mark.parametrize("teacher,top_p", [(False, 1.0), (True, 1.0), (True, 0.8)])
def test_aux_loss_and_grad_match_reference(device, shape, layout, dtype, target_kind, teacher, top_p, gen):
    """Against the float64 reference; on CUDA also against the CPU kernel."""
    _kernels_on(device)
    b = make_logits(shape, dtype, gen, layout)
    a = make_logits(shape, dtype, gen, layout) if teacher else None
    v = shape[-1]
    if target_kind == "hard":
        target = torch.randint(0, v, shape[:-1], generator=gen)
    else:  # sparse soft targets: exact zeros must add exactly nothing
        target = torch.softmax(torch.randn(shape, generator=gen) * 2, -1)
        target = target * (torch.rand(shape, generator=gen) < 0.5)
    kw = dict(temperature=0.8, top_p=top_p, delta=2.0, reduction="none")
    bk = on_device(b, device).requires_grad_()
    got = dmmd_ops.aux_loss(bk, target.to(device), on_device(a, device), **kw)
    b64 = b.detach().double().requires_grad_()
    want = reference.aux_loss(b64, target, a, **kw)
    rtol, atol = VALUE_TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.detach().double(), rtol=rtol, atol=atol)
    gl = torch.randn(shape[:-1], generator=gen)
    (got * gl.to(device)).sum().backward()
    (want * gl).sum().backward()
    assert bk.grad.dtype == dtype
    torch.testing.assert_close(bk.grad.double().cpu(), b64.grad, **grad_tol(dtype, b64.grad))
    if device != "cpu":
        bcpu = b.clone().requires_grad_()
        cpu = dmmd_ops.aux_loss(bcpu, target, a, **kw)
        (cpu * gl).sum().backward()
        torch.testing.assert_close(got.cpu(), cpu.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bk.grad.double().cpu(), bcpu.grad.double(), **grad_tol(dtype, b64.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9), (1.5, 0.5)])
def test_teacher_logprobs_and_grad_match_reference(device, shape, layout, dtype, temperature, top_p, gen):
    """Against the float64 reference; on CUDA also against the CPU kernel."""
    _kernels_on(device)
    a = make_logits(shape, dtype, gen, layout)
    kw = dict(temperature=temperature, top_p=top_p, delta=2.0)
    ak = on_device(a, device).requires_grad_()
    got = dmmd_ops.teacher_logprobs(ak, **kw)
    a64 = a.detach().double().requires_grad_()
    want = reference.teacher_logprobs(a64, **kw)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=5e-5)
    g = torch.randn(shape, generator=gen)
    (got * g.to(device)).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(ak.grad.double().cpu(), a64.grad, **grad_tol(dtype, a64.grad))
    if device != "cpu":
        torch.testing.assert_close(got.cpu(), dmmd_ops.teacher_logprobs(a, **kw), rtol=1e-5, atol=5e-5)


def test_nucleus_ties_go_to_the_lower_index():
    """Equal logits straddling the top-p boundary: the lower indices are kept first, exactly
    as many as the rule allows. With 10 equal classes of mass 0.1, top_p = 0.35 keeps 4."""
    a = torch.zeros(3, 10)
    a[1] = a[1].flip(0)  # same values, the rule depends on the index only
    a[2, 5:] = float("-inf")  # 5 equal classes of mass 0.2: top_p 0.35 keeps 2
    out = dmmd_ops.teacher_logprobs(a, top_p=0.35, delta=3.0)
    kept = out > out.amax(-1, keepdim=True) - 1.0
    assert kept[0].tolist() == [True] * 4 + [False] * 6
    assert kept[1].tolist() == [True] * 4 + [False] * 6
    assert kept[2].tolist() == [True] * 2 + [False] * 8
    torch.testing.assert_close(out, reference.teacher_logprobs(a, top_p=0.35, delta=3.0))


def test_nucleus_with_many_bf16_ties_matches_reference(gen):
    """bfloat16 logits repeat values thousands of times per row: the crossing bin is one big tie."""
    a = (torch.randn(16, 50257, generator=gen) * 2).round().to(torch.bfloat16)
    for top_p in (0.05, 0.5, 0.95):
        got = dmmd_ops.teacher_logprobs(a, top_p=top_p, delta=2.0)
        torch.testing.assert_close(got, reference.teacher_logprobs(a, top_p=top_p, delta=2.0),
                                   rtol=1e-5, atol=5e-5)


def test_minus_inf_classes_contribute_zero(gen):
    """-inf in the student (p = 0), the aux model where p = 0, the teacher, and a zero soft target."""
    v = 300
    u, a, b = (torch.randn(5, v, generator=gen) for _ in range(3))
    u[:, :10] = float("-inf")
    # -inf teacher / aux logits only where p = 0: elsewhere the loss is legitimately infinite
    b[:, :10] = float("-inf")
    a[:, 3:10] = float("-inf")
    for top_p in (1.0, 0.7):
        uk = u.clone().requires_grad_()
        loss = dmmd_ops.generator_loss(uk, a, b, top_p=top_p, reduction="none")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(uk.grad).all()
        assert (uk.grad[:, :10] == 0).all()
        torch.testing.assert_close(loss, reference.generator_loss(u, a, b, top_p=top_p, reduction="none"),
                                   rtol=1e-5, atol=1e-5)
    x = torch.softmax(torch.randn(5, v, generator=gen), -1)
    x[:, :10] = 0.0
    bk = b.clone().requires_grad_()
    aux = dmmd_ops.aux_loss(bk, x, reduction="none")
    aux.sum().backward()
    assert torch.isfinite(aux).all() and torch.isfinite(bk.grad).all()
    torch.testing.assert_close(aux, reference.aux_loss(b, x, reduction="none"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arg", ["student_logits", "teacher_logits", "aux_logits"])
@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
def test_generator_loss_kernel_rejects_bad_logits(arg, bad, gen):
    t = {n: torch.randn(4, 70, generator=gen) for n in ("student_logits", "teacher_logits", "aux_logits")}
    if bad == "nan":
        t[arg][2, 33] = float("nan")
    elif bad == "+inf":
        t[arg][1, 7] = float("inf")
    else:
        t[arg][3] = float("-inf")
    with pytest.raises(ValueError, match=arg):
        dmmd_ops.generator_loss(t["student_logits"], t["teacher_logits"], t["aux_logits"])


def test_aux_loss_kernel_rejects_bad_soft_targets(gen):
    b = torch.randn(3, 40, generator=gen)
    for bad in (float("nan"), -0.1, float("inf")):
        x = torch.softmax(torch.randn(3, 40, generator=gen), -1)
        x[1, 3] = bad
        with pytest.raises(ValueError, match="target"):
            dmmd_ops.aux_loss(b, x)


def test_sampler_kernels_reject_nan_logits(gen):
    x = torch.randn(5, 30, generator=gen)
    x[4, 0] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        dmmd_ops.sample_categorical(x, seed=0)
    with pytest.raises(ValueError, match="logits"):
        dmmd_ops.denoise_step(x, torch.zeros(5, dtype=torch.long), 1.0, 0.0, process="uniform", seed=0)


def test_mixed_logit_dtypes_meet_in_float32(gen):
    u = torch.randn(6, 90, generator=gen)
    a, b = u.to(torch.bfloat16), torch.randn(6, 90, generator=gen).half()
    got = dmmd_ops.generator_loss(u, a, b, reduction="none")
    torch.testing.assert_close(got, reference.generator_loss(u, a, b, reduction="none"), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- samplers


def _agree(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x == y).double().mean())


@pytest.mark.parametrize("shape,layout", CASES[:-1])  # all but V = 1
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.4)])
def test_sample_categorical_follows_the_reference_draws(shape, layout, dtype, temperature, top_p, gen):
    """The kernel inverts the same Philox uniforms through float32 weights with float64 sums: it
    agrees with the float64 reference draw for draw except within ~1e-6 of a CDF step."""
    x = make_logits(shape, dtype, gen, layout, scale=2.0)
    kw = dict(temperature=temperature, top_p=top_p, seed=123, offset=2**40 + 5)  # a 64-bit offset
    got = dmmd_ops.sample_categorical(x, **kw)
    want = reference.sample_categorical(x, **kw)
    assert got.shape == shape[:-1] and got.dtype == torch.int64
    assert _agree(got, want) >= 0.999


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_denoise_step_follows_the_reference_draws(process, dtype, top_p, gen):
    rows, v = 3000, 257
    logits = make_logits((rows, v), dtype, gen, "row_stride", scale=2.0)
    mask_id = v - 1 if process == "masked" else None
    if process == "masked":
        logits[:, mask_id] = 10.0  # a large mask logit must still never be drawn
    z = torch.randint(0, v, (rows,), generator=gen)
    if process == "masked":
        z[: rows // 2] = mask_id
    a_s = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    a_t = a_s * torch.rand(rows, generator=gen, dtype=torch.float64)
    kw = dict(process=process, mask_id=mask_id, temperature=0.9, top_p=top_p, seed=9, offset=3)
    got = dmmd_ops.denoise_step(logits, z, a_s, a_t, **kw)
    want = reference.denoise_step(logits, z, a_s, a_t, **kw)
    assert _agree(got, want) >= 0.999
    if process == "masked":
        revealed = (z == mask_id) & (got != mask_id)
        assert revealed.sum() > 100 and (got[z != mask_id] == z[z != mask_id]).all()


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("x_kind", ["hard", "soft"])
def test_posterior_sample_follows_the_reference_draws(process, x_kind, gen):
    rows, v = 4000, 61
    mask_id = 0 if process == "masked" else None
    z = torch.randint(0, v, (2, rows // 2), generator=gen)
    if process == "masked":
        z[0] = mask_id
    if x_kind == "hard":
        x = torch.randint(1, v, z.shape, generator=gen)
    else:
        x = torch.softmax(torch.randn((*z.shape, v), generator=gen) * 2, -1)
    a_s, a_t = torch.tensor([[0.7], [0.9]], dtype=torch.float64), 0.2  # broadcast per token
    kw = dict(process=process, mask_id=mask_id, num_classes=v, seed=77, offset=2**33)
    got = dmmd_ops.posterior_sample(z, x, a_s, a_t, **kw)
    want = reference.posterior_sample(z, x, a_s, a_t, **kw)
    assert got.shape == z.shape
    assert _agree(got, want) >= 0.999


def test_draws_do_not_depend_on_the_thread_count(gen):
    logits = torch.randn(301, 4099, generator=gen).to(torch.bfloat16)
    z = torch.randint(0, 4099, (301,), generator=gen)
    u, a, b = (torch.randn(301, 2049, generator=gen) for _ in range(3))
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((
                dmmd_ops.sample_categorical(logits, top_p=0.9, seed=4),
                dmmd_ops.denoise_step(logits, z, 0.8, 0.3, process="uniform", top_p=0.7, seed=4),
                dmmd_ops.generator_loss(u, a, b, top_p=0.9, reduction="none"),
            ))
    finally:
        torch.set_num_threads(old)
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y)


def test_grad_gram_kernel_both_paths(gen):
    """The Gram trick (2 T^2 < d_in d_out) and materialised gradients agree with the reference."""
    for t, d_in, d_out in ((3, 20, 30), (40, 6, 5)):
        a = torch.randn(7, t, d_in, generator=gen)
        g = torch.randn(7, t, d_out, generator=gen).to(torch.bfloat16)
        got = dmmd_ops.grad_gram(a, g)
        want = reference.grad_gram(a, g)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert torch.equal(got, got.T)
