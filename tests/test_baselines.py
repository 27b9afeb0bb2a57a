"""The eager baselines the benchmarks race (bench/baselines.py) compute what the ops compute:
held to the float64 reference (values and gradients) and, for the samplers, to the exact
distributions by chi-square. A benchmark whose baseline did other work would compare nothing."""
from __future__ import annotations

import pytest
import torch

from bench import baselines
from dmmd_ops import reference
from tests.conftest import bincount, chi2_pvalue

V_ODD = 131


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_teacher_logprobs(gen, top_p):
    a = torch.randn(5, V_ODD, generator=gen) * 2
    torch.testing.assert_close(baselines.teacher_logprobs(a, 0.8, top_p, 2.0).double(),
                               reference.teacher_logprobs(a.double(), temperature=0.8, top_p=top_p), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_generator_loss_value_and_gradient(gen, top_p):
    u, a, b = (torch.randn(5, V_ODD, generator=gen) * 2 for _ in range(3))
    u32, u64 = u.clone().requires_grad_(), u.double().requires_grad_()
    got = baselines.generator_loss(u32, a, b, 0.8, top_p, 2.0)
    want = reference.generator_loss(u64, a.double(), b.double(), temperature=0.8, top_p=top_p)
    got.backward()
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u32.grad.double(), u64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["hard", "soft", "hard+teacher"])
def test_aux_loss_value_and_gradient(gen, target):
    b, a = (torch.randn(5, V_ODD, generator=gen) * 2 for _ in range(2))
    x = torch.randint(0, V_ODD, (5,), generator=gen) if target != "soft" else \
        torch.softmax(torch.randn(5, V_ODD, generator=gen), -1)
    teacher = a if target == "hard+teacher" else None
    b32, b64 = b.clone().requires_grad_(), b.double().requires_grad_()
    got = baselines.aux_loss(b32, x, teacher, 0.8, 0.7, 2.0)
    want = reference.aux_loss(b64, x if x.dtype == torch.int64 else x.double(),
                              None if teacher is None else teacher.double(), temperature=0.8, top_p=0.7)
    got.backward()
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b32.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)


def _nucleus_probs(logits: torch.Tensor, top_p: float, exclude: int | None = None) -> torch.Tensor:
    w = reference.sampling_weights(logits.double().unsqueeze(0), 1.0, top_p, exclude)[0]
    return w / w.sum()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sample_categorical_distribution(gen, top_p):
    row = torch.randn(9, generator=gen) * 1.5
    torch.manual_seed(0)
    draws = baselines.sample_categorical(row.expand(40_000, 9), 1.0, top_p)
    assert chi2_pvalue(bincount(draws, 9), _nucleus_probs(row, top_p).numpy()) > 1e-4


def _dense_uniform_posterior(z: int, x: int, alpha_s: float, alpha_t: float, v: int) -> torch.Tensor:
    """eq. 4 written out densely in float64."""
    a_ts = alpha_t / alpha_s
    zo = torch.nn.functional.one_hot(torch.tensor(z), v).double()
    xo = torch.nn.functional.one_hot(torch.tensor(x), v).double()
    w = (a_ts * zo + (1 - a_ts) / v) * (alpha_s * xo + (1 - alpha_s) / v)
    return w / w.sum()


@pytest.mark.parametrize("z,x", [(2, 5), (5, 2), (3, 3), (0, 6), (6, 0)])
def test_uniform_posterior_is_eq_4(z, x):
    v, n = 7, 40_000
    torch.manual_seed(1)
    draws = baselines.uniform_posterior(torch.full((n,), z), torch.full((n,), x), 0.55, 0.5, v)
    assert chi2_pvalue(bincount(draws, v), _dense_uniform_posterior(z, x, 0.55, 0.5, v).numpy()) > 1e-4


def test_masked_denoise_step_reveals_at_the_posterior_rate_from_the_nucleus(gen):
    v, n, mask = 8, 60_000, 7
    row = torch.randn(v, generator=gen) * 1.5
    z = torch.full((n,), mask)
    z[: n // 4] = 3  # unmasked rows keep their token
    torch.manual_seed(2)
    out = baselines.denoise_step(row.expand(n, v), z, 0.55, 0.5, "masked", mask, 1.0, 0.8)
    assert torch.equal(out[: n // 4], z[: n // 4])
    masked = out[n // 4:]
    revealed = masked[masked != mask]
    p_reveal = (0.55 - 0.5) / (1 - 0.5)
    se = (p_reveal * (1 - p_reveal) / masked.numel()) ** 0.5
    assert abs(revealed.numel() / masked.numel() - p_reveal) < 4 * se
    assert chi2_pvalue(bincount(revealed, v), _nucleus_probs(row, 0.8, exclude=mask).numpy()) > 1e-4


def test_uniform_denoise_step_is_x_then_the_posterior(gen):
    v, n, z0 = 6, 60_000, 4
    row = torch.randn(v, generator=gen)
    torch.manual_seed(3)
    out = baselines.denoise_step(row.expand(n, v), torch.full((n,), z0), 0.55, 0.5, "uniform", None, 1.0, 1.0)
    px = _nucleus_probs(row, 1.0)
    want = sum(px[x] * _dense_uniform_posterior(z0, x, 0.55, 0.5, v) for x in range(v))
    assert chi2_pvalue(bincount(out, v), want.numpy()) > 1e-4


def test_grad_gram(gen):
    a, g = torch.randn(5, 7, 11, generator=gen), torch.randn(5, 7, 3, generator=gen)
    torch.testing.assert_close(baselines.grad_gram(a, g).double(), reference.grad_gram(a.double(), g.double()),
                               rtol=1e-5, atol=1e-4)
