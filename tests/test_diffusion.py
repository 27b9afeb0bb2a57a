"""The diffusion core: schedules, the forward process, the posterior against eq. 4 by brute
force, the teacher loss, the ELBO bound, and the denoiser's structural guarantees."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.schedules import get_schedule
from dmmd.models.denoiser import Denoiser, DenoiserConfig, block_causal_mask


@pytest.mark.parametrize("name", ["linear", "cosine", "loglinear"])
def test_schedules_start_clean_decrease_and_differentiate(name):
    s = get_schedule(name)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a = s.alpha(t)
    assert float(a[0]) == 1.0 and float(a[-1]) < 1e-2
    assert (a[1:] < a[:-1]).all()
    h = 1e-6
    tt = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    fd = (s.alpha(tt + h) - s.alpha(tt - h)) / (2 * h)
    torch.testing.assert_close(s.dalpha(tt), fd, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="schedule"):
        get_schedule("quadratic")


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_diffuse_marginals(kind, gen):
    v, n = 11, 200_000
    proc = DiffusionProcess(kind, v, "cosine")
    x = torch.randint(0, proc.data_classes, (n,), generator=gen)
    t = 0.6
    z = proc.diffuse(x, t, gen)
    a = float(proc.alpha(t))
    if kind == "masked":
        p_keep = a
        assert ((z == x) | (z == proc.mask_id)).all()
    else:
        p_keep = a + (1 - a) / v
    k = float((z == x).sum())
    assert abs(k - n * p_keep) < 5 * math.sqrt(n * p_keep * (1 - p_keep))


def eq4_brute(z: int, x: np.ndarray, a_s: float, a_t: float, pi: np.ndarray) -> np.ndarray:
    onehot = np.eye(len(pi))[z]
    a_ts = a_t / a_s
    w = (a_ts * onehot + (1 - a_ts) * pi[z]) * (a_s * x + (1 - a_s) * pi)
    return w / w.sum()


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_posterior_probs_match_eq4_and_mix_over_soft_x(kind, gen):
    v = 6
    proc = DiffusionProcess(kind, v, "linear")
    s, t = 0.3, 0.7
    a_s, a_t = 0.7, 0.3
    pi = np.eye(v)[proc.mask_id] if kind == "masked" else np.full(v, 1 / v)
    data = list(range(proc.data_classes))
    for z in range(v):
        for x in data:
            if kind == "masked" and z != proc.mask_id and z != x:
                continue  # impossible: an unmasked z_t is x itself
            got = proc.posterior_probs(torch.tensor([z]), torch.eye(v, dtype=torch.float64)[x][None], s, t)[0]
            np.testing.assert_allclose(got.numpy(), eq4_brute(z, np.eye(v)[x], a_s, a_t, pi), atol=1e-12)
        # the model's step: sum_x x_hat(x) q(z_s | z_t, x) over the x consistent with z_t
        xh = torch.rand(v, generator=gen, dtype=torch.float64)
        if kind == "masked":
            xh[proc.mask_id] = 0
            if z != proc.mask_id:
                continue
        xh /= xh.sum()
        # Bayes: x_hat is E[x | z_t]; q(z_s | z_t) = sum_x x_hat(x) q(z_s | z_t, x)
        want = sum(float(xh[x]) * eq4_brute(z, np.eye(v)[x], a_s, a_t, pi) for x in data)
        got = proc.posterior_probs(torch.tensor([z]), xh[None], s, t)[0]
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_teacher_loss_weights(gen):
    v, b, n = 5, 3, 7
    proc = DiffusionProcess("masked", v, "linear")
    logits = torch.randn(b, n, v, generator=gen)
    x = torch.randint(0, v - 1, (b, n), generator=gen)
    z = torch.where(torch.rand(b, n, generator=gen) < 0.5, x, torch.full_like(x, proc.mask_id))
    t = torch.tensor([0.2, 0.5, 0.9])
    ce = -torch.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
    w = (1 / t).unsqueeze(-1)  # linear: -alpha' / (1 - alpha) = 1 / t
    want = (ce * w * (z == proc.mask_id)).mean()
    torch.testing.assert_close(proc.teacher_loss(logits, x, z, t), want.float())
    uni = DiffusionProcess("uniform", v, "linear")
    torch.testing.assert_close(uni.teacher_loss(logits, x, z, t), ce.mean())


@pytest.mark.parametrize("steps", [1, 8])
def test_nll_bound_is_the_entropy_for_one_token_with_the_exact_denoiser(steps, gen):
    """L = 1, masked: with x_hat = the data distribution at masked positions the bound is exactly
    -log2 p(x) in expectation (the token is revealed exactly once), so its mean is the data
    entropy; with one step the estimate is exact per sample."""
    v = 5
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    proc = DiffusionProcess("masked", v, "linear")
    x = torch.multinomial(p, 40_000, replacement=True, generator=gen).unsqueeze(-1)

    def x_hat(z, t):
        out = torch.zeros((*z.shape, v), dtype=torch.float64)
        out[..., :4] = p
        carried = torch.nn.functional.one_hot(z, v).to(torch.float64)
        return torch.where((z == proc.mask_id).unsqueeze(-1), out, carried)

    bits = proc.nll_bound_bits(x_hat, x, steps=steps, generator=gen)
    exact = -torch.log2(p[x.squeeze(-1)])
    if steps == 1:
        torch.testing.assert_close(bits, exact)
    entropy = float(-(p * p.log2()).sum())
    assert abs(float(bits.mean()) - entropy) < 5 * float(bits.std()) / math.sqrt(len(bits))


def _tiny(process="masked", **kw):
    torch.manual_seed(0)
    cfg = DenoiserConfig(num_classes=7, length=12, process=process, width=32, depth=2, heads=4, **kw)
    model = Denoiser(cfg)
    for p in model.parameters():  # zero-initialised heads would hide bugs: randomise everything
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_denoiser_carry_over_and_never_the_mask(gen):
    model = _tiny()
    z = torch.randint(0, 7, (3, 12), generator=gen)
    logits = model(z, torch.rand(3, generator=gen))
    assert logits.shape == (3, 12, 7) and logits.dtype == torch.float32
    assert torch.isneginf(logits[..., 6]).all()
    unmasked = z != 6
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(probs[unmasked], torch.nn.functional.one_hot(z[unmasked], 7).float())
    assert torch.isfinite(logits[~unmasked][:, :6]).all()


def test_denoiser_noise_input_and_block_causal_attention(gen):
    model = _tiny(noise_dim=3, block_size=4)
    z = torch.full((2, 12), 6)
    t = torch.rand(2, generator=gen)
    eps = torch.randn(2, 12, 3, generator=gen)
    zero = torch.zeros_like(eps)
    assert not torch.allclose(model(z, t, eps), model(z, t, zero))
    fresh = Denoiser(model.config)  # zero-initialised noise projection: the noise is ignored at init
    torch.testing.assert_close(fresh(z, t, eps), fresh(z, t, zero))
    z2 = z.clone()
    z2[:, 8:] = 2  # change the last block only
    torch.testing.assert_close(model(z2, t, eps)[:, :8], model(z, t, eps)[:, :8])
    assert not torch.allclose(model(z2, t, eps)[:, 8:], model(z, t, eps)[:, 8:])
    assert block_causal_mask(4, 2).tolist() == [[True, True, False, False], [True, True, False, False],
                                                 [True, True, True, True], [True, True, True, True]]


def test_uniform_denoiser_has_no_carry_over(gen):
    model = _tiny("uniform")
    z = torch.randint(0, 7, (2, 12), generator=gen)
    assert torch.isfinite(model(z, torch.rand(2, generator=gen))).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 2, 5)])
def test_masked_output_rule_is_never_the_mask_and_carries_revealed_tokens(shape):
    # against the rule written out token by token, for the values and the gradient
    from dmmd.diffusion.processes import masked_output_rule

    V, mask = 9, 4
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(*shape, V, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randint(0, V, shape, generator=g)
    z.view(-1)[0] = mask  # at least one masked position
    out = masked_output_rule(logits, z, mask)
    want = logits.detach().clone()
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in shape)).reshape(-1, len(shape)):
        row = tuple(idx.tolist())
        want[row][mask] = -math.inf
        if z[row] != mask:
            want[row][:] = -math.inf
            want[row][z[row]] = 0.0
    assert torch.equal(out.detach(), want)
    out.where(torch.isfinite(out), 0.0).sum().backward()
    assert torch.equal(logits.grad, ((z == mask).unsqueeze(-1) & (torch.arange(V) != mask)).double())
    proc = DiffusionProcess("masked", V, mask_id=mask)
    assert torch.equal(proc.output_rule(logits, z), out) and torch.equal(proc.undecided(z), z == mask)
    uniform = DiffusionProcess("uniform", V)
    assert uniform.output_rule(logits, z) is logits and bool(uniform.undecided(z).all())
