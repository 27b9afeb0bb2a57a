"""The Gradient Moment (paper section 5, eq. 13-14) with a standard error, two ways.

``GM = || E_g grad l(x) - E_q grad l(x) ||^2`` with ``l`` a sequence's mean token NLL under a
reference causal LM: an MMD^2 with the kernel ``<grad l(x), grad l(y)>``.

- ``"ustat"``: the unbiased all-pairs U-statistic from the Gram matrix of per-example
  gradients over samples and data (:func:`dmmd.metrics.per_example_gram`), with a jackknife
  standard error. Every pair of examples counts.
- ``"pairs"``: the paper's estimator: batch-mean gradient differences ``D_b = mean_g - mean_q``
  of independent batches, the inner product ``<D_2p, D_2p+1>`` of each disjoint pair of
  batches (unbiased), averaged over pairs; the standard error is that of the mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dmmd.metrics.gram import _model_inputs, _token_losses, per_example_gram

ESTIMATORS = ("ustat", "pairs")


@dataclass
class GradientMoment:
    value: float
    stderr: float
    estimator: str
    samples: int
    data: int
    sequences_backpropagated: int  # reference-model backward work, in sequences

    def __str__(self) -> str:
        return f"{self.value:.4g} +- {self.stderr:.2g} ({self.estimator})"


def mmd2_ustat(k: torch.Tensor, m: int) -> tuple[float, float]:
    """The unbiased MMD^2 and its jackknife standard error from a Gram matrix over ``m``
    samples followed by ``n`` data points (``m, n >= 3``)."""
    k = k.double()
    n = k.shape[0] - m
    if m < 3 or n < 3:
        raise ValueError(f"need at least 3 samples and 3 data points, got {m} and {n}")
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    rx = kxx.sum(1) - kxx.diagonal()   # off-diagonal row sums
    ry = kyy.sum(1) - kyy.diagonal()
    sxx, syy, sxy = rx.sum(), ry.sum(), kxy.sum()

    def u(sxx, syy, sxy, m, n):
        return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)

    value = float(u(sxx, syy, sxy, m, n))
    drop_x = u(sxx - 2 * rx, syy, sxy - kxy.sum(1), m - 1, n)   # leave sample i out
    drop_y = u(sxx, syy - 2 * ry, sxy - kxy.sum(0), m, n - 1)   # leave data point j out
    var = (m - 1) / m * float(((drop_x - drop_x.mean()) ** 2).sum()) + \
        (n - 1) / n * float(((drop_y - drop_y.mean()) ** 2).sum())
    return value, math.sqrt(var)


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


def _gram_blocks(model, seqs: torch.Tensor, batch_size: int, prompt_length: int) -> tuple[torch.Tensor, int]:
    """The full Gram over ``seqs``, by blocks of ``batch_size`` (each off-diagonal block from one
    call on the two blocks together); returns ``(K, sequences backpropagated)``."""
    chunks = _batches(seqs, batch_size)
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + c.shape[0])
    k = torch.zeros(seqs.shape[0], seqs.shape[0], dtype=torch.float64, device=seqs.device)
    work = 0
    for a, ca in enumerate(chunks):
        for b in range(a, len(chunks)):
            both = ca if a == b else torch.cat([ca, chunks[b]])
            kb = per_example_gram(model, both, prompt_length=prompt_length)
            work += both.shape[0]
            sa, sb, na = starts[a], starts[b], ca.shape[0]
            if a == b:
                k[sa:sa + na, sa:sa + na] = kb
            else:
                nb = chunks[b].shape[0]
                k[sa:sa + na, sb:sb + nb] = kb[:na, na:]
                k[sb:sb + nb, sa:sa + na] = kb[na:, :na]
    return k, work


def _mean_gradient(model: nn.Module, seqs: torch.Tensor, prompt_length: int) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = model(**_model_inputs(model, seqs, None))
        logits = out.logits if hasattr(out, "logits") else out
        loss = _token_losses(logits, seqs, None, prompt_length).mean()
        return [g.double() for g in torch.autograd.grad(loss, params)]


def gradient_moment(model: nn.Module, samples: torch.Tensor, data: torch.Tensor, *, estimator: str = "ustat",
                    batch_size: int = 16, prompt_length: int = 0) -> GradientMoment:
    """The Gradient Moment of ``samples`` against ``data`` (both int64 ``[N, T]``) under the
    reference causal LM ``model``.

    ``"ustat"`` uses every sample and data sequence (Gram blocks of ``batch_size``);
    ``"pairs"`` uses ``2 P`` batches of ``batch_size`` from each (``P = N // (2 batch_size)``
    pairs, at least 2).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if samples.dim() != 2 or data.dim() != 2 or samples.shape[1] != data.shape[1]:
        raise ValueError(f"samples {tuple(samples.shape)} and data {tuple(data.shape)} must be [N, T] alike")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        if estimator == "ustat":
            k, work = _gram_blocks(model, torch.cat([samples, data]), batch_size, prompt_length)
            value, stderr = mmd2_ustat(k, samples.shape[0])
            return GradientMoment(value, stderr, estimator, samples.shape[0], data.shape[0], work)
        pairs = min(samples.shape[0], data.shape[0]) // (2 * batch_size)
        if pairs < 2:
            raise ValueError(f"'pairs' needs at least 4 batches of {batch_size} from each set for a "
                             f"standard error; got {samples.shape[0]} samples and {data.shape[0]} data")
        values = []
        for p in range(pairs):
            diffs = []
            for b in (2 * p, 2 * p + 1):
                rows = slice(b * batch_size, (b + 1) * batch_size)
                gs = _mean_gradient(model, samples[rows], prompt_length)
                gq = _mean_gradient(model, data[rows], prompt_length)
                diffs.append([x - y for x, y in zip(gs, gq, strict=True)])
            values.append(sum(float((x * y).sum()) for x, y in zip(*diffs, strict=True)))
        v = torch.tensor(values, dtype=torch.float64)
        work = 4 * pairs * batch_size
        return GradientMoment(float(v.mean()), float(v.std()) / math.sqrt(pairs), estimator, 2 * pairs * batch_size,
                              2 * pairs * batch_size, work)
    finally:
        model.train(was_training)
