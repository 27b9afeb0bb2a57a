"""The Frechet distance (FID with a classifier's features) against scipy's sqrtm, a closed form
for Gaussians, its small-sample bias and its bootstrap standard error."""
from __future__ import annotations

import math

import pytest
import torch

from dmmd.metrics.fid import feature_stats, fid, frechet_distance

scipy_linalg = pytest.importorskip("scipy.linalg")


def _random_cov(d: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / d


@pytest.mark.parametrize("d,rank", [(1, None), (7, None), (33, None), (12, 5)])
def test_frechet_distance_equals_the_brute_force_formula(d, rank):
    g = torch.Generator().manual_seed(d)
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    cov_a, cov_b = _random_cov(d, g, rank), _random_cov(d, g)
    covmean = scipy_linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())
    brute = float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b)
                  - 2 * float(covmean.real.trace()))
    assert frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(brute, rel=1e-7, abs=1e-9)
    # at itself: zero up to the round-off of square roots of (near-)zero eigenvalues
    scale = float(torch.trace(cov_a))
    assert frechet_distance(mu_a, cov_a, mu_a, cov_a) == pytest.approx(0.0, abs=1e-6 * scale)


def test_fid_of_gaussian_features_approaches_the_closed_form():
    # N(0, I) against N(m, s^2 I) in d dims: |m|^2 + d (1 - s)^2
    g = torch.Generator().manual_seed(1)
    d, n = 6, 40_000
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = 0.5 + 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    exact = d * 0.25 + d * (1 - 2.0) ** 2
    got = fid(a, b, bootstrap=0)
    assert got.value == pytest.approx(exact, rel=0.02) and math.isnan(got.stderr)


def test_data_against_held_out_data_is_near_zero_and_its_bias_shrinks_with_n():
    g = torch.Generator().manual_seed(2)
    d = 8
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)

    def draw(n):
        return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix

    shifted = fid(draw(2000), draw(2000) + 2.0, bootstrap=0).value  # about d * 4 = 32
    small, large = fid(draw(500), draw(500), bootstrap=0).value, fid(draw(8000), draw(8000), bootstrap=0).value
    assert 0 < large < small < 0.1 * shifted
    assert large < 0.25 * small  # the bias falls like 1/n


def test_bootstrap_stderr_matches_the_spread_of_independent_replicates():
    g = torch.Generator().manual_seed(3)
    d, n = 4, 1000
    reps = [fid(torch.randn(n, d, generator=g), 0.3 + torch.randn(n, d, generator=g), bootstrap=0).value
            for _ in range(30)]
    spread = float(torch.tensor(reps).std())
    se = fid(torch.randn(n, d, generator=g), 0.3 + torch.randn(n, d, generator=g), bootstrap=40, seed=4).stderr
    assert 0.5 * spread < se < 2.0 * spread


def test_features_are_applied_in_batches_and_bad_input_is_named():
    calls = []

    def features(x):
        calls.append(x.shape[0])
        return x.flatten(1).float()

    g = torch.Generator().manual_seed(5)
    imgs_a, imgs_b = torch.rand(23, 2, 3, generator=g), torch.rand(17, 2, 3, generator=g)
    got = fid(imgs_a, imgs_b, features, batch_size=10, bootstrap=0)
    assert calls == [10, 10, 3, 10, 7]
    direct = frechet_distance(*feature_stats(imgs_a.flatten(1)), *feature_stats(imgs_b.flatten(1)))
    assert got.value == pytest.approx(direct, rel=1e-9) and got.samples == 23
    with pytest.raises(ValueError, match="samples"):
        fid(imgs_a[:1], imgs_b, features)
    with pytest.raises(ValueError, match="different sizes"):
        fid(torch.rand(5, 3), torch.rand(5, 4))
    with pytest.raises(ValueError, match=r"features must be \[n, d\]"):
        fid(imgs_a, imgs_b, lambda x: x)
