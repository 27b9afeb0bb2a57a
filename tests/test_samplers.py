"""The samplers (compiled kernels and the float64 reference, via the `ops` fixture) held to the
exact distributions: chi-square against softmax with temperature and top-p, against eq. 4
written out by brute force (masked and uniform, hard and soft x), the fused denoise step
against its composition, and the far tail."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dmmd_ops import reference
from tests.conftest import bincount, chi2_pvalue

P_MIN = 1e-4  # fixed seeds: these pass deterministically unless the sampler is wrong


def exact_sampling_probs(a: torch.Tensor, temperature: float, top_p: float, exclude=None) -> np.ndarray:
    """softmax(a / T) truncated to the nucleus, by the brute-force keep rule."""
    from tests.test_losses import brute_keep

    a = a.double().clone()
    if exclude is not None:
        a[exclude] = float("-inf")
    s = a / temperature
    p = torch.softmax(s, -1).numpy()
    if top_p < 1:
        finite = [float(x) if np.isfinite(float(x)) else -1e300 for x in s]
        keep = np.array(brute_keep(finite, top_p)) & (p > 0)
        p = p * keep
    return p / p.sum()


def eq4(z: int, x: np.ndarray, alpha_s: float, alpha_t: float, pi: np.ndarray) -> np.ndarray:
    """q(z_s | z_t = z, x) of paper eq. 4, literally: [a_ts z + (1 - a_ts) pi_z 1] * [a_s x + (1 - a_s) pi]."""
    v = len(pi)
    onehot = np.eye(v)[z]
    a_ts = alpha_t / alpha_s
    w = (a_ts * onehot + (1 - a_ts) * pi[z] * np.ones(v)) * (alpha_s * x + (1 - alpha_s) * pi)
    return w / w.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.7, 1.0), (1.0, 0.7), (0.8, 0.35)])
def test_sample_categorical_chi_square(ops, temperature, top_p, gen):
    v, n = 17, 200_000
    a = torch.randn(v, generator=gen) * 1.5
    a[4] = a[9]  # a tie, broken by index inside the nucleus
    draws = ops.sample_categorical(a.expand(n, v), temperature=temperature, top_p=top_p, seed=11)
    assert draws.dtype == torch.int64 and draws.shape == (n,)
    assert chi2_pvalue(bincount(draws, v), exact_sampling_probs(a, temperature, top_p)) > P_MIN


def test_sample_categorical_tail(ops):
    """A class of total mass 1/9 spread over 4096 rare classes is drawn at its rate (5 sigma).

    Float32 Gumbel noise would truncate this tail; the float64 inverse CDF must not.
    """
    rare, v = 4096, 4097
    a = torch.full((v,), float(np.log((1 / 9) / rare)), dtype=torch.float32)
    a[0] = float(np.log(8 / 9))
    # 200,000 draws (a 5-sigma band of 3.2% of the tail's 22,222 hits); the float64 reference
    # draws 50,000 (6.3% of 5,556), 18 s instead of over a minute on 2 cores
    chunk, chunks = 10_000, (5 if ops is reference else 20)
    hits = 0
    for k in range(chunks):
        draws = ops.sample_categorical(a.expand(chunk, v), seed=5, offset=k)
        hits += int((draws != 0).sum())
    n = chunk * chunks
    p = 1 / 9
    assert abs(hits - n * p) < 5 * np.sqrt(n * p * (1 - p)), (hits, n * p)


def test_sample_categorical_reproducible_and_row_local(ops, gen):
    a = torch.randn(64, 33, generator=gen)
    d1 = ops.sample_categorical(a, seed=3, offset=9)
    assert torch.equal(d1, ops.sample_categorical(a, seed=3, offset=9))
    assert not torch.equal(d1, ops.sample_categorical(a, seed=3, offset=10))
    assert not torch.equal(d1, ops.sample_categorical(a, seed=4, offset=9))
    # Row i depends only on (seed, offset, i) and its own logits: a prefix batch agrees.
    assert torch.equal(d1[:10], ops.sample_categorical(a[:10], seed=3, offset=9))
    # Leading dims are flattened row-major.
    assert torch.equal(d1.reshape(8, 8), ops.sample_categorical(a.reshape(8, 8, 33), seed=3, offset=9))


def test_sample_categorical_never_draws_impossible_classes(ops, gen):
    a = torch.randn(50_000, 6, generator=gen)
    a[:, 2] = float("-inf")
    draws = ops.sample_categorical(a, seed=1, top_p=0.9)
    assert not bool((draws == 2).any())


CASES = [  # (process, z_t, hard x or None, alpha_s, alpha_t)
    ("masked", 5, 2, 0.6, 0.2),
    ("masked", 5, None, 0.9, 0.1),
    ("masked", 5, None, 1.0, 0.0),
    ("masked", 3, 3, 0.6, 0.2),       # unmasked z_t stays
    ("uniform", 1, 4, 0.7, 0.3),      # z_t != x
    ("uniform", 4, 4, 0.7, 0.3),      # z_t == x
    ("uniform", 0, 2, 0.95, 0.05),
    ("uniform", 1, None, 0.7, 0.3),   # soft x
    ("uniform", 2, None, 0.3, 0.0),   # alpha_t = 0 (t = 1)
]


@pytest.mark.parametrize("process,z,xh,alpha_s,alpha_t", CASES)
def test_posterior_matches_eq4(ops, process, z, xh, alpha_s, alpha_t, gen):
    v, n, mask_id = 6, 200_000, 5
    if process == "masked":
        pi = np.eye(v)[mask_id]
    else:
        pi = np.full(v, 1.0 / v)
    if xh is None:
        xs = torch.softmax(torch.randn(v, generator=gen, dtype=torch.float64), -1)
        if process == "masked":
            xs[mask_id] = 0
            xs = xs / xs.sum()
        x_vec = xs.numpy()
        x_arg = xs.float().expand(n, v)
    else:
        x_vec = np.eye(v)[xh]
        x_arg = torch.full((n,), xh, dtype=torch.int64)
    want = eq4(z, x_vec, alpha_s, alpha_t, pi)
    zt = torch.full((n,), z, dtype=torch.int64)
    kwargs = {"mask_id": mask_id} if process == "masked" else {"num_classes": v if xh is not None else None}
    got = ops.posterior_sample(zt, x_arg, alpha_s, alpha_t, process=process, seed=21, **kwargs)
    assert got.shape == (n,) and got.dtype == torch.int64
    assert chi2_pvalue(bincount(got, v), want) > P_MIN


def test_uniform_posterior_hard_equals_soft_one_hot_in_distribution(ops, gen):
    v, n = 9, 100_000
    zt = torch.randint(0, v, (n,), generator=gen)
    x = torch.randint(0, v, (n,), generator=gen)
    hard = ops.posterior_sample(zt, x, 0.5, 0.25, process="uniform", num_classes=v, seed=1)
    soft = ops.posterior_sample(zt, torch.nn.functional.one_hot(x, v).float(), 0.5, 0.25,
                                     process="uniform", seed=2)
    # Joint (z_t, x) -> z_s tables agree.
    key = lambda s: (zt * v + x) * v + s  # noqa: E731
    c1, c2 = bincount(key(hard), v**3), bincount(key(soft), v**3)
    assert chi2_pvalue(c1, (c1 + c2) / (c1 + c2).sum()) > P_MIN


def test_masked_posterior_rules(ops, gen):
    v, mask_id, n = 8, 0, 50_000
    zt = torch.randint(0, v, (n,), generator=gen)
    soft = torch.rand(n, v, generator=gen)  # deliberately puts mass on the mask column
    out = ops.posterior_sample(zt, soft, 0.8, 0.1, process="masked", mask_id=mask_id, seed=0)
    unmasked = zt != mask_id
    assert torch.equal(out[unmasked], zt[unmasked])            # an unmasked z_t stays
    revealed = (zt == mask_id) & (out != mask_id)
    assert not bool((out[zt == mask_id] == mask_id).all())       # some are revealed ...
    assert bool((out[revealed] != mask_id).all())                # ... never as the mask class
    # alpha_s == alpha_t: nothing moves; alpha_s = 1: everything is revealed.
    assert torch.equal(ops.posterior_sample(zt, soft, 0.4, 0.4, process="masked", mask_id=0, seed=1), zt)
    full = ops.posterior_sample(zt, soft, 1.0, 0.3, process="masked", mask_id=0, seed=1)
    assert not bool((full == mask_id).any())


def test_posterior_tensor_alphas_per_token(ops, gen):
    n = 100_000
    zt = torch.full((n, 2), 4, dtype=torch.int64)
    x = torch.full((n, 2), 1, dtype=torch.int64)
    a_s = torch.tensor([0.9, 0.3])
    a_t = torch.tensor([0.0, 0.2])
    out = ops.posterior_sample(zt, x, a_s, a_t, process="masked", mask_id=4, seed=8)
    rate = (out == 1).double().mean(0)
    np.testing.assert_allclose(rate.numpy(), [0.9, 0.1 / 0.8], atol=0.005)


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_denoise_step_matches_composition(ops, process, temperature, top_p, gen):
    """Fused step == sum_x p(x) q(z_s | z_t, x), with p the truncated softmax (mask excluded)."""
    v, n, mask_id = 7, 200_000, 6
    a = torch.randn(v, generator=gen) * 1.5
    z = mask_id if process == "masked" else 2
    alpha_s, alpha_t = 0.55, 0.25
    pi = np.eye(v)[mask_id] if process == "masked" else np.full(v, 1.0 / v)
    px = exact_sampling_probs(a, temperature, top_p, exclude=mask_id if process == "masked" else None)
    want = sum(px[k] * eq4(z, np.eye(v)[k], alpha_s, alpha_t, pi) for k in range(v) if px[k] > 0)
    zt = torch.full((n,), z, dtype=torch.int64)
    got = ops.denoise_step(a.expand(n, v), zt, alpha_s, alpha_t, process=process,
                                mask_id=mask_id if process == "masked" else None,
                                temperature=temperature, top_p=top_p, seed=77)
    assert chi2_pvalue(bincount(got, v), want) > P_MIN


def test_denoise_step_masked_never_draws_mask(ops, gen):
    v, n = 10, 20_000
    a = torch.randn(n, v, generator=gen)
    a[:, 9] = 30.0  # the mask logit dominates: it must still never be drawn
    zt = torch.full((n,), 9, dtype=torch.int64)
    out = ops.denoise_step(a, zt, 1.0, 0.0, process="masked", mask_id=9, seed=4)
    assert not bool((out == 9).any())


def test_reference_draws_follow_the_philox_stream(ops, gen):
    """sample_categorical row i = inverse CDF at u0 of Philox element i (the kernels' contract)."""
    a = torch.randn(16, 11, generator=gen)
    u0, _ = reference.element_uniforms(9, 2, 16)
    p = torch.softmax(a.double(), -1)
    cum = torch.cumsum(p, -1)
    want = (cum <= (u0 * cum[:, -1]).unsqueeze(-1)).sum(-1)
    assert torch.equal(ops.sample_categorical(a, seed=9, offset=2), want)
