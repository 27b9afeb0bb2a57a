"""Generative perplexity under a reference causal LM and per-sample unigram entropy (paper
Tables 2 and 5: perplexity "should not be too high", entropy "should not be too low")."""
from __future__ import annotations

import math

import torch

from dmmd.metrics.gram import _model_inputs


@torch.no_grad()
def generative_perplexity(model, samples: torch.Tensor, *, batch_size: int = 16, prompt_length: int = 0) -> float:
    """``exp`` of the mean next-token NLL of ``samples [N, T]`` under the causal LM ``model``,
    over every scored token (positions ``>= max(1, prompt_length)``)."""
    if samples.dim() != 2 or samples.shape[1] < 2:
        raise ValueError(f"samples must be token ids [N, T] with T >= 2, got {tuple(samples.shape)}")
    total, count = 0.0, 0
    first = max(1, prompt_length)
    for i in range(0, samples.shape[0], batch_size):
        x = samples[i:i + batch_size]
        logits = model(**_model_inputs(model, x, None)).logits[:, first - 1:-1].double()
        nll = -torch.log_softmax(logits, -1).gather(-1, x[:, first:].unsqueeze(-1))
        total += float(nll.sum())
        count += nll.numel()
    return math.exp(total / count)


def unigram_entropy(samples: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's own token frequencies."""
    if samples.dim() != 2:
        raise ValueError(f"samples must be [N, T], got {tuple(samples.shape)}")
    out = []
    for row in samples:
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / row.numel()
        out.append(float(-(p * p.log()).sum()))
    return sum(out) / len(out)
