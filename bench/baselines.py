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


def aux_loss(b: torch.Tensor, target: torch.Tensor, a: torch.Tensor | None, temperature: float = 1.0,
             top_p: float = 1.0, delta: float = 2.0) -> torch.Tensor:
    """Sum over rows of ``-sum_c (x + q_teacher)_c log_softmax(b)_c`` (hard or soft ``x``)."""
    lb = torch.log_softmax(b.float(), -1)
    if target.dtype == torch.int64:
        loss = -lb.gather(-1, target.unsqueeze(-1)).sum()
    else:
        loss = -(target * torch.where(target > 0, lb, torch.zeros_like(lb))).sum()
    if a is not None:
        q = teacher_logprobs(a, temperature, top_p, delta).exp()
        loss = loss - (q * torch.where(q > 0, lb, torch.zeros_like(lb))).sum()
    return loss


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float,
                   exclude: int | None = None) -> torch.Tensor:
    """softmax(logits / temperature) truncated to the top-p nucleus (sort-based), float32."""
    x = logits.float()
    if exclude is not None:
        x = x.clone()
        x[..., exclude] = float("-inf")
    p = torch.softmax(x / temperature, -1)
    if top_p < 1.0:
        p = p * nucleus_keep(x, p, top_p)
    return p


def sample_categorical(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    return torch.multinomial(sampling_probs(logits, temperature, top_p), 1).squeeze(-1)


def denoise_step(logits: torch.Tensor, z: torch.Tensor, alpha_s: float, alpha_t: float, process: str,
                 mask_id: int | None, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """One sampler step doing the op's work and no more. Masked: the reveal coin first, then
    ``x`` only for the revealed rows (the others keep their token); uniform: ``x`` for every
    row, then the O(1) hard-``x`` posterior."""
    if process == "masked":
        reveal = (z == mask_id) & (torch.rand(z.shape, device=z.device) < (alpha_s - alpha_t) / (1 - alpha_t))
        out = z.clone()
        out[reveal] = sample_categorical_excluding(logits[reveal], temperature, top_p, mask_id)
        return out
    x = sample_categorical(logits, temperature, top_p)
    return uniform_posterior(z, x, alpha_s, alpha_t, logits.shape[-1])


def sample_categorical_excluding(logits, temperature, top_p, exclude):
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    return torch.multinomial(sampling_probs(logits, temperature, top_p, exclude), 1).squeeze(-1)


def uniform_posterior(z: torch.Tensor, x: torch.Tensor, alpha_s: float, alpha_t: float, v: int) -> torch.Tensor:
    """eq. 4 for uniform diffusion with a hard ``x`` in O(1) per token: only ``z``, ``x`` and
    "any other class" carry distinct weights, so draw which of the three, then (for "other")
    a uniform class that skips ``z`` and ``x``. float64 weights."""
    a_ts = alpha_t / alpha_s
    zb, xb = (1 - a_ts) / v, (1 - alpha_s) / v  # the uniform parts of the two factors
    same = z == x
    w_z = (a_ts + zb) * torch.where(same, alpha_s + xb, xb)      # class z (and x, when equal)
    w_x = torch.where(same, 0.0, zb * (alpha_s + xb))             # class x != z
    n_other = torch.where(same, v - 1, v - 2).double()
    w_o = zb * xb                                                 # every other class
    u = torch.rand(z.shape, dtype=torch.float64, device=z.device) * (w_z + w_x + n_other * w_o)
    k = torch.clamp(((u - w_z - w_x) / w_o).floor(), min=0).long()
    k = torch.minimum(k, n_other.long() - 1)
    lo, hi = torch.minimum(z, x), torch.maximum(z, x)
    other = k + (k >= lo).long()                                  # skip the smaller of z, x
    other = other + ((other >= hi) & ~same).long()                # and the larger, if distinct
    return torch.where(u < w_z, z, torch.where(u < w_z + w_x, x, other))


def grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example gradients materialised, then their Gram matrix (float32)."""
    grads = torch.einsum("nto,nti->noi", g.float(), a.float()).reshape(a.shape[0], -1)
    return grads @ grads.T
