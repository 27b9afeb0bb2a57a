"""What a user would write in eager PyTorch: the float32 baselines our kernels race.

Same math as :mod:`dmmd_ops.reference` but in float32 with the usual sort-based top-p,
so the eager and ``torch.compile`` timings are the fair competition (the float64
reference is an oracle, not a competitor).
"""
from __future__ import annotations

import torch


def nucleus_keep(logits: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    p_sorted = probs.gather(-1, order)
    keep_sorted = (torch.cumsum(p_sorted, -1) - p_sorted) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def teacher_logprobs(a: torch.Tensor, temperature: float, top_p: float, delta: float) -> torch.Tensor:
    s = a.float() / temperature
    if top_p < 1.0:
        s = s - delta * (~nucleus_keep(a, torch.softmax(s, -1), top_p)).float()
    return torch.log_softmax(s, -1)


def generator_loss(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0,
                   top_p: float = 1.0, delta: float = 2.0) -> torch.Tensor:
    """Sum over rows of ``-sum_c softmax(u)_c (teacher_logprobs(a) - log_softmax(b))_c``."""
    p = torch.softmax(u.float(), -1)
    d = teacher_logprobs(a, temperature, top_p, delta) - torch.log_softmax(b.float(), -1)
    return -(p * torch.where(p > 0, d, torch.zeros_like(d))).sum()
