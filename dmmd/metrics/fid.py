"""Frechet distance between feature statistics (FID when the features are an image
classifier's): ``||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``,
in float64.

The matrix square root is taken on the symmetric form ``C_a^1/2 C_b C_a^1/2`` (eigenvalues of a
positive semi-definite matrix), which equals ``tr sqrtm(C_a C_b)`` without the complex round-off
of a general ``sqrtm``. From finite samples the estimate is biased upward (by about
``tr(C_a) d / n``-sized terms for ``d`` features and ``n`` samples), so two samples of the same
distribution do not give zero; compare FIDs at equal sample sizes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from dmmd.metrics.exact import Distance

Features = Callable[[torch.Tensor], torch.Tensor]


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and covariance ``[d, d]`` (unbiased) of features ``[n, d]``, in float64."""
    f = feats.detach().to(torch.float64)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """The Frechet distance between Gaussians with these means and covariances (float64)."""
    mu_a, cov_a, mu_b, cov_b = (t.to(torch.float64) for t in (mu_a, cov_a, mu_b, cov_b))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2
    tr_sqrt = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt)


def extract(x: torch.Tensor, features: Features | None, batch_size: int) -> torch.Tensor:
    """Features ``[n, d]`` of ``x`` (``features`` applied in batches under ``no_grad``; ``None``:
    ``x`` already holds features)."""
    if features is None:
        out = x
    else:
        with torch.no_grad():
            out = torch.cat([features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    if out.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(out.shape)}")
    return out.to(torch.float64)


def fid(samples: torch.Tensor, data: torch.Tensor, features: Features | None = None, *, bootstrap: int = 20,
        batch_size: int = 500, seed: int = 0) -> Distance:
    """Frechet distance between the feature statistics of ``samples`` and ``data``.

    ``features`` maps a batch of inputs to ``[batch, d]`` features (a classifier's penultimate
    layer, an Inception network, ...); ``None`` takes the inputs as features. ``stderr`` is a
    bootstrap standard error over ``bootstrap`` resamplings of both sets (0: none, NaN).
    """
    for name, x in (("samples", samples), ("data", data)):
        if x.shape[0] < 2:
            raise ValueError(f"{name} must hold at least 2 items, got {x.shape[0]}")
    fa, fb = extract(samples, features, batch_size), extract(data, features, batch_size)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"samples and data give features of different sizes: {fa.shape[1]} and {fb.shape[1]}")
    value = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    stderr = float("nan")
    if bootstrap > 1:
        g = torch.Generator().manual_seed(seed)
        reps = []
        for _ in range(bootstrap):
            ia = torch.randint(0, fa.shape[0], (fa.shape[0],), generator=g)
            ib = torch.randint(0, fb.shape[0], (fb.shape[0],), generator=g)
            reps.append(frechet_distance(*feature_stats(fa[ia]), *feature_stats(fb[ib])))
        stderr = float(torch.tensor(reps, dtype=torch.float64).std())
    return Distance(value, stderr, fa.shape[0])
