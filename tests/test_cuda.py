"""The CUDA kernels (skipped without a GPU; failing if a GPU is present but the extension has no
CUDA kernels) beyond tests/test_kernels.py (whose device parameter runs the loss ops' value and
gradient checks on CUDA too): the remaining ops against the float64 reference and the CPU
kernel per dtype at awkward shapes; draws identical to the CPU kernels for the same (seed, offset);
bad rows named like the CPU kernels name them; opcheck; torch.compile(fullgraph=True) and CUDA
graph capture of a training step; correct rows at 32768 x 131072 (2^32 elements). The samplers'
chi-square and tail tests run on CUDA through the `ops` fixture (tests/test_samplers.py)."""
from __future__ import annotations

import pytest
import torch

import dmmd_ops
from dmmd_ops import reference
from dmmd_ops.testing import CASES, DTYPES, grad_tol, make_logits, on_device

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _cuda_kernels():
    if not dmmd_ops.has_kernel("generator_loss_forward", "cuda"):
        pytest.fail("a GPU is present but the extension has no CUDA kernels; build it with CUDA")


def _on_cuda(t):
    return on_device(t, "cuda")


# ----------------------------------------------------------------------------- losses
# (values and gradients of every loss op per dtype and shape: tests/test_kernels.py's device
# parameter runs them on CUDA too, against the reference and the CPU kernel)


def test_nucleus_ties_and_minus_inf_match_cpu(gen):
    """bf16 rows full of ties (the threshold inside a run of equal logits), -inf classes and signed
    zeros: the CUDA nucleus (radix selection) keeps exactly the CPU kernel's classes."""
    a = (torch.randint(-6, 3, (64, 777), generator=gen).float() * 0.5)
    a[torch.rand(a.shape, generator=gen) < 0.2] = float("-inf")
    a[:, ::7] = -0.0
    a = a.to(torch.bfloat16)
    u = torch.zeros_like(a)
    for top_p in (0.2, 0.6, 0.95):
        _, s_cuda = torch.ops.dmmd.generator_loss_forward(u.cuda(), a.cuda(), u.cuda(), 0.9, top_p, 2.0)
        _, s_cpu = torch.ops.dmmd.generator_loss_forward(u, a, u, 0.9, top_p, 2.0)
        torch.testing.assert_close(s_cuda[:, 6:8].cpu(), s_cpu[:, 6:8], rtol=0, atol=0)
        torch.testing.assert_close(s_cuda.cpu(), s_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_streams_with_different_alignment(dtype, gen):
    """u, a and b whose rows start at different offsets modulo 16 bytes (the kernels then read
    the row with scalar loads) give the same losses and gradients as aligned copies."""
    v = 50
    u = make_logits((37, v), dtype, gen)
    a = make_logits((37, v + 1), dtype, gen)[:, 1:]  # rows of stride 51: another misalignment per row
    b = make_logits((37, v + 3), dtype, gen)[:, :v]
    kw = dict(temperature=0.9, top_p=0.8, reduction="none")
    uc = _on_cuda(u).requires_grad_()
    got = dmmd_ops.generator_loss(uc, _on_cuda(a), _on_cuda(b), **kw)
    ucpu = u.clone().requires_grad_()
    want = dmmd_ops.generator_loss(ucpu, a.contiguous(), b.contiguous(), **kw)
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(uc.grad.cpu().double(), ucpu.grad.double(), **grad_tol(dtype, ucpu.grad.double()))


def test_bad_rows_are_named(gen):
    """Kernels cannot raise: the wrapper names the argument and the row, as the CPU kernels do."""
    u, a, b = (torch.randn(5, 300, generator=gen, device="cpu").cuda() for _ in range(3))
    bad = a.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits contains NaN \(row 3\)"):
        dmmd_ops.generator_loss(u, bad, b)
    bad = b.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"aux_logits contains \+inf \(row 2\)"):
        dmmd_ops.aux_loss(bad, torch.zeros(5, dtype=torch.long, device="cuda"))
    bad = u.clone()
    bad[4] = float("-inf")
    with pytest.raises(ValueError, match=r"every logit is -inf \(row 4\)"):
        dmmd_ops.sample_categorical(bad, seed=0)
    with pytest.raises(ValueError, match=r"every logit is -inf \(row 4\)"):
        dmmd_ops.teacher_logprobs(bad, top_p=0.9)
    soft = torch.softmax(u, -1)
    soft[1, 5] = -0.1
    with pytest.raises(ValueError, match="target"):
        dmmd_ops.aux_loss(b, soft, reduction="none")


# ----------------------------------------------------------------------------- samplers


def _agree(x, y) -> float:
    return float((x.cpu() == y.cpu()).double().mean())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.4)])
def test_sample_categorical_same_draws_as_cpu(dtype, temperature, top_p, gen):
    """The same (seed, offset) gives the same draws on CPU and CUDA: at least 99.99% of 10^6
    (the rest within float rounding of a CDF step)."""
    n, v = 1_000_000, 37
    x = (torch.randn(n, v, generator=gen) * 2).to(dtype)
    kw = dict(temperature=temperature, top_p=top_p, seed=2024, offset=2**40 + 3)
    assert _agree(dmmd_ops.sample_categorical(x.cuda(), **kw), dmmd_ops.sample_categorical(x, **kw)) >= 0.9999


@pytest.mark.parametrize("shape,layout", CASES[:-1])  # all but V = 1
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_categorical_awkward_shapes_follow_the_reference(shape, layout, dtype, gen):
    x = make_logits(shape, dtype, gen, layout, scale=2.0)
    kw = dict(temperature=0.8, top_p=0.7, seed=5, offset=9)
    got = dmmd_ops.sample_categorical(_on_cuda(x), **kw)
    assert got.shape == shape[:-1] and got.device.type == "cuda"
    assert _agree(got, reference.sample_categorical(x, **kw)) >= 0.999


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_denoise_step_same_draws_as_cpu(process, dtype, top_p, gen):
    rows, v = 200_000, 257
    logits = (torch.randn(rows, v, generator=gen) * 2).to(dtype)
    mask_id = v - 1 if process == "masked" else None
    if process == "masked":
        logits[:, mask_id] = 10.0  # never drawn
    z = torch.randint(0, v, (rows,), generator=gen)
    if process == "masked":
        z[: rows // 2] = mask_id
    a_s = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    a_t = a_s * torch.rand(rows, generator=gen, dtype=torch.float64)
    kw = dict(process=process, mask_id=mask_id, temperature=0.9, top_p=top_p, seed=9, offset=3)
    got = dmmd_ops.denoise_step(logits.cuda(), z.cuda(), a_s.cuda(), a_t.cuda(), **kw)
    assert _agree(got, dmmd_ops.denoise_step(logits, z, a_s, a_t, **kw)) >= 0.9999
    if process == "masked":
        assert not bool((got.cpu()[z == mask_id] == mask_id).all())
        assert bool((got.cpu()[z != mask_id] == z[z != mask_id]).all())


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("x_kind", ["hard", "soft"])
def test_posterior_sample_same_draws_as_cpu(process, x_kind, gen):
    rows, v = 100_000, 61
    mask_id = 0 if process == "masked" else None
    z = torch.randint(0, v, (rows,), generator=gen)
    if process == "masked":
        z[: rows // 2] = mask_id
    x = torch.randint(1, v, (rows,), generator=gen) if x_kind == "hard" else \
        torch.softmax(torch.randn(rows, v, generator=gen) * 2, -1)
    kw = dict(process=process, mask_id=mask_id, num_classes=v, seed=77, offset=2**33)
    got = dmmd_ops.posterior_sample(z.cuda(), x.cuda(), 0.8, 0.3, **kw)
    want = dmmd_ops.posterior_sample(z, x, 0.8, 0.3, **kw)
    assert _agree(got, want) >= (1.0 if x_kind == "hard" else 0.9999)


@pytest.mark.parametrize("v", [50257, 131072])  # staged (100 KB a bf16 row); too big for a block's shared memory
def test_staged_rows_give_the_unstaged_results(v, gen, monkeypatch):
    """The nucleus ops stage a row in shared memory when it fits (else, and under
    DMMD_ROW_STAGING=0, they read it from global memory pass after pass): the same draws,
    log-probs and losses, bit for bit."""
    a, b, u = (_on_cuda(make_logits((64, v), torch.bfloat16, gen)) for _ in range(3))
    z = torch.full((64,), v - 1, device="cuda")
    target = torch.randint(0, v, (64,), generator=gen).cuda()

    def run():
        return [dmmd_ops.sample_categorical(a, top_p=0.9, seed=3),
                dmmd_ops.sample_categorical(a, seed=3),
                dmmd_ops.denoise_step(a, z, 1.0, 0.0, process="masked", mask_id=v - 1, top_p=0.85, seed=3),
                dmmd_ops.teacher_logprobs(a, top_p=0.9),
                dmmd_ops.generator_loss(u, a, b, top_p=0.85, reduction="none"),
                dmmd_ops.aux_loss(b, target, a, top_p=0.85, reduction="none")]

    staged = run()
    monkeypatch.setenv("DMMD_ROW_STAGING", "0")
    for got, want in zip(run(), staged, strict=True):
        assert torch.equal(got, want)


def test_draws_are_deterministic(gen):
    x = torch.randn(3000, 50257, generator=gen).to(torch.bfloat16).cuda()
    first = dmmd_ops.sample_categorical(x, top_p=0.9, seed=1)
    for _ in range(3):
        assert torch.equal(dmmd_ops.sample_categorical(x, top_p=0.9, seed=1), first)


# ----------------------------------------------------------------------------- grad_gram


@pytest.mark.parametrize("t,d_in,d_out", [(3, 20, 30), (40, 6, 5), (17, 33, 65)])
def test_grad_gram_both_paths(t, d_in, d_out, gen):
    a = torch.randn(13, t, d_in, generator=gen)
    g = torch.randn(13, t, d_out, generator=gen).to(torch.bfloat16)
    got = dmmd_ops.grad_gram(a.cuda(), g.cuda())
    want = reference.grad_gram(a, g)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(got, got.T)


# ----------------------------------------------------------------------------- custom-op machinery


def test_opcheck_on_cuda(gen):
    ops = torch.ops.dmmd

    def logits(rows, v, grad=False, dtype=torch.float32):
        return (torch.randn(rows, v, generator=gen) * 2).to(dtype).cuda().requires_grad_(grad)

    u, a, b = logits(5, 33, True), logits(5, 33), logits(5, 33)
    hard = torch.randint(0, 33, (5,), generator=gen).cuda()
    soft = torch.softmax(torch.randn(5, 33, generator=gen), -1).cuda()
    _, stats = ops.generator_loss_forward(u.detach(), a, b, 1.0, 0.9, 2.0)
    _, aux_stats = ops.aux_loss_forward(b, soft, a, 0.8, 0.7, 2.0)
    x = logits(6, 40, dtype=torch.bfloat16)
    z = torch.randint(0, 40, (6,), generator=gen).cuda()
    a_s = torch.full((6,), 0.7, dtype=torch.float64, device="cuda")
    a_t = torch.full((6,), 0.2, dtype=torch.float64, device="cuda")
    cases = [
        (ops.teacher_logprobs, (logits(4, 17, True), 0.7, 0.8, 2.0)),
        (ops.generator_loss_forward, (u, a, b, 1.0, 1.0, 2.0)),
        (ops.generator_loss_forward, (u, a, b, 0.8, 0.9, 1.0)),
        (ops.generator_loss_backward, (torch.ones(5, device="cuda"), u.detach(), a, b, stats, 1.0, 0.9, 2.0)),
        (ops.aux_loss_forward, (b.detach().requires_grad_(), hard, None, 1.0, 1.0, 2.0)),
        (ops.aux_loss_forward, (b.detach().requires_grad_(), soft, a, 0.8, 0.7, 2.0)),
        (ops.aux_loss_backward, (torch.ones(5, device="cuda"), b, soft, a, aux_stats, 0.8, 0.7, 2.0)),
        (ops.philox4x32, (torch.randint(0, 2**32, (5, 4), generator=gen).cuda(),
                          torch.randint(0, 2**32, (5, 2), generator=gen).cuda())),
        (ops.sample_categorical, (x, 1.0, 0.9, 3, 2**40)),
        (ops.denoise_step, (x, z, a_s, a_t, "masked", 0, 1.0, 0.9, 3, 1)),
        (ops.denoise_step, (x, z, a_s, a_t, "uniform", -1, 0.7, 1.0, 3, 1)),
        (ops.posterior_sample, (z, z.flip(0), a_s, a_t, "uniform", -1, 40, 3, 1)),
        (ops.posterior_sample, (z, torch.softmax(x.float(), -1), a_s, a_t, "masked", 0, -1, 3, 1)),
        (ops.grad_gram, (torch.randn(4, 3, 8, generator=gen).cuda(), torch.randn(4, 3, 9, generator=gen).cuda())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _training_step(model_u, model_b, h, a, x):
    """A D-MMD-step-like computation: both losses through the ops, with their gradients."""
    u, b = model_u(h), model_b(h)
    gen_loss = dmmd_ops.generator_loss(u, a, b.detach(), top_p=0.9, temperature=0.8, reduction="mean")
    aux = dmmd_ops.aux_loss(b, x, a, top_p=0.9, temperature=0.8, reduction="mean")
    return gen_loss + aux


def _models(gen, v=1000, d=64):
    torch.manual_seed(0)
    model_u, model_b = torch.nn.Linear(d, v).cuda(), torch.nn.Linear(d, v).cuda()
    h = torch.randn(8, 16, d, generator=gen).cuda()
    a = (torch.randn(8, 16, v, generator=gen) * 2).cuda()
    x = torch.randint(0, v, (8, 16), generator=gen).cuda()
    return model_u, model_b, h, a, x


def test_compile_fullgraph_training_step(gen):
    model_u, model_b, h, a, x = _models(gen)
    compiled = torch.compile(_training_step, fullgraph=True)
    got = compiled(model_u, model_b, h, a, x)
    want = _training_step(model_u, model_b, h, a, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got, list(model_u.parameters()) + list(model_b.parameters()))
    g_want = torch.autograd.grad(want, list(model_u.parameters()) + list(model_b.parameters()))
    for p, q in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_cuda_graph_capture_of_a_training_step(gen):
    """Forward, backward and an SGD step captured once; three replays give the parameters of
    three eager steps from the same start."""
    model_u, model_b, h, a, x = _models(gen)
    params = list(model_u.parameters()) + list(model_b.parameters())
    opt = torch.optim.SGD(params, lr=0.1)

    def step():
        opt.zero_grad(set_to_none=False)
        _training_step(model_u, model_b, h, a, x).backward()
        opt.step()

    def restart(values):
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (allocations, lazy initialisation)
            step()
    torch.cuda.current_stream().wait_stream(side)
    start = [p.detach().clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    restart(start)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    replayed = [p.detach().clone() for p in params]
    restart(start)
    for _ in range(3):
        step()
    assert any(not torch.equal(p.detach(), s) for p, s in zip(params, start, strict=True))
    for p, q in zip(params, replayed, strict=True):
        torch.testing.assert_close(p.detach(), q)


# ----------------------------------------------------------------------------- 2^32 elements


def test_rows_past_2_to_the_32_elements(gen):
    """32768 x 131072 bf16 = 2^32 elements per tensor: rows at the start, the middle and the end
    (whose element offsets need 64 bits) match the CPU kernel, loss and gradient."""
    rows, v = 32768, 131072
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs a GPU with at least 60 GiB")
    torch.manual_seed(7)
    u, a, b = (torch.randn(rows, v, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(3))
    uc = u.requires_grad_()
    loss = dmmd_ops.generator_loss(uc, a, b, top_p=0.9, reduction="none")
    loss.sum().backward()
    pick = torch.tensor([0, 1, rows // 2, rows - 2, rows - 1])
    sub = [t.detach()[pick.cuda()].cpu() for t in (u, a, b)]
    us = sub[0].clone().requires_grad_()
    want = dmmd_ops.generator_loss(us, sub[1], sub[2], top_p=0.9, reduction="none")
    want.sum().backward()
    torch.testing.assert_close(loss.detach()[pick.cuda()].cpu(), want.detach(), rtol=1e-5, atol=1e-4)
    grad = uc.grad[pick.cuda()].cpu()
    torch.testing.assert_close(grad.double(), us.grad.double(), **grad_tol(torch.bfloat16, us.grad.double()))
    del u, b, uc, loss, grad
    lp = dmmd_ops.teacher_logprobs(a, top_p=0.9)
    torch.testing.assert_close(lp[pick.cuda()].cpu(), dmmd_ops.teacher_logprobs(sub[1], top_p=0.9),
                               rtol=1e-5, atol=5e-5)
