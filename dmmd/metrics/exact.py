"""Exact distances on small synthetic spaces: with a source that knows ``log p(x)`` and can
enumerate its sequences (:class:`dmmd.data.sources.MarkovSource`), the total variation between a
sampler's empirical distribution and the data distribution and the share of it that impossible
samples make, the TV of the marginals of each position (or window of positions), the exact NLL
of samples, and what a reader of a Markov chain's samples sees
(:func:`chain_quality`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Distance:
    """An estimated distance with its standard error and sample count."""

    value: float
    stderr: float
    samples: int

    def __str__(self) -> str:
        return f"{self.value:.4f} +- {self.stderr:.4f}"


def _sequence_ids(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each row of ``x [N, L]`` (ids in ``[0, V)``) as one integer (base ``V``), for ``V^L < 2^63``."""
    length = x.shape[-1]
    if length * math.log2(vocab_size) >= 62:
        raise ValueError(f"V^L = {vocab_size}^{length} is too large to index sequences")
    powers = vocab_size ** torch.arange(length - 1, -1, -1, dtype=torch.long)
    return (x.long() * powers).sum(-1)


def _checked(samples: torch.Tensor, source) -> tuple[int, torch.Tensor]:
    """``samples [N, L]`` checked against ``source``: ``(N, valid)``, ``valid`` the rows whose
    ids are all in ``[0, V)``."""
    if samples.dim() != 2 or samples.shape[1] != source.length:
        raise ValueError(f"samples must have shape [N, {source.length}], got {tuple(samples.shape)}")
    n = samples.shape[0]
    if n == 0:
        raise ValueError("samples is empty")
    return n, ((samples >= 0) & (samples < source.vocab_size)).all(-1)


def _locate(samples: torch.Tensor, source):
    """``samples [N, L]`` checked and placed among every sequence of ``source``: ``(N, valid,
    pos, seqs, p)``, ``valid`` as in :func:`_checked`, ``pos`` the valid rows' indices into the
    enumeration ``seqs``, ``p`` its exact probabilities."""
    n, valid = _checked(samples, source)
    seqs, p = source.all_sequences()
    v = source.vocab_size
    all_ids = _sequence_ids(seqs, v)  # sorted: itertools.product order
    pos = torch.searchsorted(all_ids, _sequence_ids(samples[valid].cpu(), v))
    return n, valid.cpu(), pos, seqs, p


def total_variation_and_outside(samples: torch.Tensor, source) -> tuple[Distance, Distance]:
    """:func:`total_variation` and :func:`outside_support` of the same samples, from one
    enumeration of ``source`` (the part of either that costs: ``V^L`` sequences)."""
    n, valid, pos, _, p = _locate(samples, source)
    counts = torch.zeros(len(p), dtype=torch.float64)
    counts.index_add_(0, pos, torch.ones(len(pos), dtype=torch.float64))
    p_hat = counts / n
    diff = p_hat - p
    tv = 0.5 * (float(diff.abs().sum()) + float((~valid).sum()) / n)
    # TV = E[f(X)]/2 + const with f(x) = sign(p_hat(x) - p(x)) for sampled x: its variance / N.
    sign = torch.sign(diff)
    f = torch.cat([sign[pos], torch.ones(int((~valid).sum()), dtype=torch.float64)])
    stderr = 0.5 * float(f.std()) / math.sqrt(n) if n > 1 else float("nan")
    share = (int((~valid).sum()) + int((p[pos] == 0).sum())) / n
    return Distance(tv, stderr, n), Distance(share, math.sqrt(share * (1 - share) / n), n)


def total_variation(samples: torch.Tensor, source) -> Distance:
    """``TV(empirical(samples), p) = 1/2 sum_x |p_hat(x) - p(x)|`` over every sequence.

    ``source`` must provide ``vocab_size``, ``length`` and ``all_sequences()`` (sequences and
    their exact probabilities). Samples outside the data's support (a mask id left over, an
    impossible transition) count fully. The estimate is biased upward by sampling noise,
    roughly ``sum_x sqrt(p(x) / (2 pi N))``; ``stderr`` is a delta-method standard error.
    """
    return total_variation_and_outside(samples, source)[0]


def outside_support(samples: torch.Tensor, source) -> Distance:
    """The share of ``samples`` the data never produces (probability 0 under ``source``, or an
    id outside ``[0, V)``): the part of :func:`total_variation` that impossible samples make.
    ``TV >= outside`` always (the possible sequences miss exactly that mass), and ``TV - outside``
    is how wrongly the possible sequences are weighted, so the two say whether a sampler's error
    is inconsistency or misweighting. ``stderr`` is binomial."""
    return total_variation_and_outside(samples, source)[1]


def window_tv(samples: torch.Tensor, source, width: int = 1) -> torch.Tensor:
    """TV between the samples' and the data's marginal distributions of every window of
    ``width`` consecutive positions: float64 ``[L - width + 1]``, window ``j`` covering positions
    ``j .. j + width - 1`` (``width`` 1: each token's marginal; 2: adjacent pairs). Each is a TV
    between marginals of the two distributions, so at most :func:`total_variation` (equal to it
    at ``width = L``); where the whole-sequence TV goes beyond them, the error is in the joint.
    A sample holding an id outside ``[0, V)`` counts fully in every window (as in
    :func:`total_variation`)."""
    n, valid = _checked(samples, source)
    length, v = source.length, source.vocab_size
    if not 1 <= width <= length:
        raise ValueError(f"width must be in [1, {length}], got {width}")
    seqs, p = source.all_sequences()
    x = samples.cpu()[valid.cpu()]
    bad = float((~valid).sum()) / n
    out = torch.empty(length - width + 1, dtype=torch.float64)
    for j in range(length - width + 1):
        data = torch.zeros(v ** width, dtype=torch.float64)
        data.index_add_(0, _sequence_ids(seqs[:, j:j + width], v), p.double())
        seen = torch.zeros(v ** width, dtype=torch.float64)
        seen.index_add_(0, _sequence_ids(x[:, j:j + width], v), torch.ones(len(x), dtype=torch.float64))
        out[j] = 0.5 * (float((seen / n - data).abs().sum()) + bad)
    return out


def exact_nll(samples: torch.Tensor, source) -> Distance:
    """Mean exact ``-log p(x)`` (nats per sequence) of samples under the data distribution
    (``inf`` when any sample is impossible); ``source`` provides ``log_prob``."""
    lp = source.log_prob(samples.cpu())
    nll = -lp
    n = len(nll)
    if torch.isinf(nll).any():
        return Distance(math.inf, math.nan, n)
    return Distance(float(nll.mean()), float(nll.std()) / math.sqrt(n) if n > 1 else math.nan, n)


def chain_quality(samples: torch.Tensor, source) -> dict:
    """What a reader of samples from a Markov chain (``source.transition [V, V]``,
    ``source.log_prob``) sees, exactly:

    - ``impossible``: the share of samples holding a transition the chain never makes (or a
      token outside the vocabulary), with its binomial standard error ``impossible_stderr``;
    - ``nll``: the exact NLL in nats per token of the possible samples (``nan`` if none), with
      ``nll_stderr``: how typical they are under the data distribution;
    - ``entropy``: diversity, the plug-in entropy (nats) of the next token given the previous
      one over the samples' transitions that the chain makes (impossible ones are counted by
      ``impossible`` and left out here, so they cannot pass for diversity). A sampler that
      repeats a few likely sequences has a low NLL and a low entropy; compare with the data's
      value at the same sample size, since the plug-in estimate is biased low.
    """
    x = samples.cpu().long()
    n, length = x.shape
    v = source.vocab_size
    lp = source.log_prob(x)
    possible = torch.isfinite(lp)
    p_bad = float((~possible).double().mean())
    nll = -lp[possible] / length
    a, b = x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)
    inside = (a >= 0) & (a < v) & (b >= 0) & (b < v)
    a, b = a[inside], b[inside]
    allowed = source.transition[a, b] > 0
    counts = torch.zeros(v * v, dtype=torch.float64)
    counts.index_add_(0, (a * v + b)[allowed], torch.ones(int(allowed.sum()), dtype=torch.float64))
    joint = counts.view(v, v) / counts.sum().clamp_min(1)
    cond = joint / joint.sum(1, keepdim=True).clamp_min(1e-300)
    seen = joint > 0
    return {"impossible": p_bad, "impossible_stderr": math.sqrt(p_bad * (1 - p_bad) / n),
            "nll": float(nll.mean()) if len(nll) else math.nan,
            "nll_stderr": float(nll.std()) / math.sqrt(len(nll)) if len(nll) > 1 else math.nan,
            "entropy": float(-(joint[seen] * cond[seen].log()).sum()), "samples": n}
