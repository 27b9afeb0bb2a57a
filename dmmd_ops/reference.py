"""Pure-PyTorch references of every dmmd op: the test oracle and the fallback.

Everything here follows ``docs/design.md`` §8 literally and computes in float64 on
whatever device the inputs live on. Results are float32 (float64 when an input is
float64, so that ``gradcheck`` can hold the references to finite differences).

The samplers draw from the same Philox4x32-10 stream as the compiled kernels
(key = seed, counter = (row index, offset)), with a float64 inverse CDF, so they are exact
to sampling precision and reproducible from ``(seed, offset)``.

Shapes: ``[..., V]`` logits; ``[...]`` token ids; leading dimensions are arbitrary.
"""
from __future__ import annotations

import torch

F64 = torch.float64
MASK32 = 0xFFFFFFFF

# ----------------------------------------------------------------------------- Philox

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * m`` for int64 tensors holding uint32 values.

    Split into 16-bit halves so that no intermediate product leaves int64.
    """
    ah, al = a >> 16, a & 0xFFFF
    mh, ml = m >> 16, m & 0xFFFF
    mid = ah * ml + al * mh
    low = al * ml + ((mid & 0xFFFF) << 16)
    lo = low & MASK32
    hi = ah * mh + (mid >> 16) + (low >> 32)
    return hi & MASK32, lo


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10 words.

    Args:
        counter: int64 ``[n, 4]`` with values in ``[0, 2^32)``.
        key: int64 ``[n, 2]`` with values in ``[0, 2^32)``.
    Returns:
        int64 ``[n, 4]``, the four output words per row.
    """
    c0, c1, c2, c3 = (counter[:, i].to(torch.int64) for i in range(4))
    k0, k1 = key[:, 0].to(torch.int64), key[:, 1].to(torch.int64)
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=1)


def element_uniforms(seed: int, offset: int, n: int, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float64 uniforms in ``[0, 1)`` of elements ``0..n-1`` of stream ``(seed, offset)``.

    ``u0`` takes 53 bits from words 0 and 1, ``u1`` from words 2 and 3 (see philox.h).
    """
    idx = torch.arange(n, dtype=torch.int64, device=device)
    counter = torch.stack([idx & MASK32, idx >> 32,
                           torch.full_like(idx, offset & MASK32), torch.full_like(idx, offset >> 32)], 1)
    key = torch.stack([torch.full_like(idx, seed & MASK32), torch.full_like(idx, seed >> 32)], 1)
    w = philox4x32(counter, key)
    scale = 2.0 ** -53

    def u53(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return ((hi << 21) | (lo >> 11)).to(F64) * scale

    return u53(w[:, 0], w[:, 1]), u53(w[:, 2], w[:, 3])


# ----------------------------------------------------------------------------- helpers


def _out_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return F64 if any(t is not None and t.dtype == F64 for t in tensors) else torch.float32


def nucleus_mask(logits: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p keep set of docs/design.md §4, as a bool tensor shaped like ``logits``.

    Classes are ordered by probability, highest first, ties by lower index (we sort the
    raw logits, which orders exactly like the probabilities without rounding ties); a
    class is kept when the mass strictly before it is ``< top_p``, so the class that
    crosses ``top_p`` is kept.
    """
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    p_sorted = probs.gather(-1, order)
    cum = torch.cumsum(p_sorted, dim=-1)
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
    keep_sorted = before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _teacher_logprobs64(teacher_logits: torch.Tensor, temperature: float, top_p: float,
                        delta: float) -> torch.Tensor:
    a = teacher_logits.to(F64)
    s = a / temperature
    if top_p < 1.0:
        keep = nucleus_mask(a.detach(), torch.softmax(s.detach(), dim=-1), top_p)
        s = s - delta * (~keep).to(F64)
    return torch.log_softmax(s, dim=-1)


def reduce_rows(rows: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-row losses times the optional row weights, then ``"none"``, ``"sum"`` or ``"mean"``."""
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / max(rows.numel(), 1) if reduction == "mean" else total


# ----------------------------------------------------------------------------- losses


def teacher_logprobs(teacher_logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                     delta: float = 2.0) -> torch.Tensor:
    """Modified teacher log-probabilities (docs/design.md §4, paper section 3.3).

    ``s = a / temperature``; with ``top_p < 1``, ``s -= delta * (1 - keep_p(s))``; then
    ``log_softmax(s)``. ``[..., V]`` in, float32 ``[..., V]`` out.
    """
    out = _teacher_logprobs64(teacher_logits, temperature, top_p, delta)
    return out.to(_out_dtype(teacher_logits))


DIVERGENCES = ("reverse_kl", "jeffreys")


def generator_pull(log_ratio: torch.Tensor, divergence: str = "reverse_kl", ratio_max: float = 20.0) -> torch.Tensor:
    """How eq. 11 pulls the generator towards each class, from ``log r = log(theta / phi)``
    (teacher over auxiliary model, per class).

    ``"reverse_kl"`` (the paper's): ``log r``, the gradient of KL(generator || teacher): it
    pushes hard out of classes the teacher rules out and pulls gently into those it lacks.
    ``"jeffreys"``: ``(log r + min(r, ratio_max) - 1) / 2``, half the gradient of the symmetric
    KL(g || t) + KL(t || g): the same pull near the fixed point (``log r ~ r - 1``), a linear
    one into classes the generator lacks (capped: where the auxiliary model gives a class
    almost nothing, ``r`` would carry its error unbounded).
    """
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "jeffreys":
        return 0.5 * (log_ratio + log_ratio.exp().clamp(max=ratio_max) - 1.0)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def generator_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, aux_logits: torch.Tensor,
                   *, weight: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
                   delta: float = 2.0, reduction: str = "sum", divergence: str = "reverse_kl",
                   ratio_max: float = 20.0) -> torch.Tensor:
    """D-MMD generator loss (paper eq. 11), gradient to ``student_logits`` only.

    Per row: ``-sum_c softmax(u)_c pull_c``, times ``weight[row]``, with ``pull =``
    :func:`generator_pull` of ``teacher_logprobs(a) - log_softmax(b)`` (for the paper's
    ``"reverse_kl"`` that difference itself). Classes with ``softmax(u)_c = 0`` contribute
    exactly zero. ``[..., V]`` logits; returns ``[...]`` for ``reduction="none"``, else a scalar.
    """
    logp = torch.log_softmax(student_logits.to(F64), dim=-1)
    p = logp.exp()
    diff = _teacher_logprobs64(teacher_logits.detach(), temperature, top_p, delta) - \
        torch.log_softmax(aux_logits.detach().to(F64), dim=-1)
    diff = generator_pull(diff, divergence, ratio_max)
    diff = torch.where(p > 0, diff, torch.zeros_like(diff))  # 0 * (-inf) must be 0, not NaN
    rows = -(p * diff).sum(-1)
    out = reduce_rows(rows, weight, reduction)
    return out.to(_out_dtype(student_logits, teacher_logits, aux_logits))


def aux_loss(aux_logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             *, weight: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
             delta: float = 2.0, reduction: str = "sum") -> torch.Tensor:
    """D-MMD auxiliary loss (paper eq. 12), gradient to ``aux_logits`` only.

    Per row: ``-sum_c (x + q_teacher)_c log_softmax(b)_c`` where ``x`` is the one-hot of a
    hard ``target`` (int64 ``[...]``) or a soft ``target`` (float ``[..., V]``), and
    ``q_teacher = exp(teacher_logprobs(teacher_logits))`` (dropped when ``None``).
    Zero target weights contribute exactly zero.
    """
    alp = torch.log_softmax(aux_logits.to(F64), dim=-1)
    if target.dtype == torch.int64:
        rows = -alp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    else:
        x = target.detach().to(F64)
        rows = -(x * torch.where(x > 0, alp, torch.zeros_like(alp))).sum(-1)
    if teacher_logits is not None:
        q = _teacher_logprobs64(teacher_logits.detach(), temperature, top_p, delta).exp()
        rows = rows - (q * torch.where(q > 0, alp, torch.zeros_like(alp))).sum(-1)
    out = reduce_rows(rows, weight, reduction)
    dt = _out_dtype(aux_logits, teacher_logits, target if target.is_floating_point() else None)
    return out.to(dt)


# ----------------------------------------------------------------------------- samplers


def sampling_weights(logits: torch.Tensor, temperature: float, top_p: float,
                     exclude: int | None = None) -> torch.Tensor:
    """Unnormalised float64 class weights of the sampling distribution.

    ``softmax(logits / temperature)`` restricted to the top-p nucleus (hard truncation,
    as samplers do), with class ``exclude`` (the mask of a masked denoiser) removed
    before the nucleus is formed. ``[rows, V]`` in and out.
    """
    a = logits.detach().to(F64)
    if exclude is not None:
        a = a.clone()
        a[:, exclude] = float("-inf")
    s = a / temperature
    w = torch.exp(s - s.amax(-1, keepdim=True))
    if top_p < 1.0:
        w = w * nucleus_mask(a, w / w.sum(-1, keepdim=True), top_p)
    return w


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact categorical draws: the first class whose float64 cumulative weight exceeds ``u * total``.

    ``weights`` float64 ``[rows, V]`` (unnormalised, non-negative), ``u`` float64 ``[rows]``
    in ``[0, 1)``. Zero-weight classes are never drawn.
    """
    cum = torch.cumsum(weights, dim=-1)
    target = (u * cum[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cum, target, right=True).squeeze(-1)
    # u * total can round up to total itself: fall back to the last class with weight.
    v = weights.shape[-1]
    last = (v - 1) - torch.argmax(torch.flip(weights > 0, dims=[-1]).to(torch.int8), dim=-1)
    return torch.minimum(idx, last)


def sample_categorical(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                       seed: int, offset: int = 0) -> torch.Tensor:
    """One draw per row from ``softmax(logits / temperature)`` restricted to the nucleus.

    ``[..., V]`` logits -> int64 ``[...]``. Row ``i`` (flattened) uses Philox element ``i``'s ``u0``.
    """
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    u0, _ = element_uniforms(seed, offset, flat.shape[0], flat.device)
    out = inverse_cdf(sampling_weights(flat, temperature, top_p), u0)
    return out.reshape(logits.shape[:-1])


def _alpha_ts(alpha_s: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """alpha_{t|s} = alpha_t / alpha_s, taken as 1 when alpha_s = 0 (then alpha_t = 0 too)."""
    return torch.where(alpha_s > 0, alpha_t / torch.where(alpha_s > 0, alpha_s, 1.0), 1.0)


def _unmask_probability(alpha_s: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """Masked diffusion: P(a masked z_t is revealed at s) = (alpha_s - alpha_t) / (1 - alpha_t)."""
    return torch.where(alpha_t < 1, (alpha_s - alpha_t) / torch.where(alpha_t < 1, 1 - alpha_t, 1.0), 0.0)


def _uniform_posterior_hard(z: torch.Tensor, x: torch.Tensor, alpha_s: torch.Tensor,
                            alpha_t: torch.Tensor, v: int, u: torch.Tensor) -> torch.Tensor:
    """Uniform diffusion, hard x: eq. 4 has three distinct masses (z_t, x, any other), O(1) per token.

    One uniform picks the group in the order (z_t, x, others); within "others" the same
    uniform, rescaled, picks the index, skipping z_t and x. A posterior with no mass
    (x contradicts z_t at alpha_t = 1) keeps z_t.
    """
    a_ts = _alpha_ts(alpha_s, alpha_t)
    beta = (1 - a_ts) / v
    gamma = (1 - alpha_s) / v
    same = z == x
    m_z = torch.where(same, (a_ts + beta) * (alpha_s + gamma), (a_ts + beta) * gamma)
    m_x = torch.where(same, torch.zeros_like(beta), beta * (alpha_s + gamma))
    n_other = torch.where(same, v - 1, v - 2)
    bg = beta * gamma
    total = m_z + m_x + bg * n_other
    t = u * total
    in_other = t >= m_z + m_x
    r = torch.floor((t - m_z - m_x) / torch.where(bg > 0, bg, 1.0)).to(torch.int64)
    r = torch.clamp(r, 0, None)
    r = torch.minimum(r, torch.clamp(n_other - 1, 0, None))
    lo, hi = torch.minimum(z, x), torch.maximum(z, x)
    c = torch.where(r >= lo, r + 1, r)
    c = torch.where(~same & (c >= hi), c + 1, c)
    out = torch.where(t < m_z, z, torch.where(in_other, c, x))
    return torch.where(total > 0, out, z)


def _uniform_posterior_soft(z: torch.Tensor, x: torch.Tensor, alpha_s: torch.Tensor,
                            alpha_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Uniform diffusion, soft x ``[rows, V]``: eq. 4 over all V classes, O(V) per token."""
    v = x.shape[-1]
    a_ts = _alpha_ts(alpha_s, alpha_t).unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(z, v).to(F64)
    w = (a_ts * onehot + (1 - a_ts) / v) * (alpha_s.unsqueeze(-1) * x.to(F64) + (1 - alpha_s.unsqueeze(-1)) / v)
    total = w.sum(-1)
    return torch.where(total > 0, inverse_cdf(w, u), z)


def flat_alpha(alpha: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``alpha`` (a float or a tensor broadcastable to ``like``) as float64 ``[like.numel()]``."""
    a = torch.as_tensor(alpha, dtype=F64, device=like.device)
    return torch.broadcast_to(a, like.shape).reshape(-1)


def posterior_sample(z_t: torch.Tensor, x: torch.Tensor, alpha_s: torch.Tensor | float,
                     alpha_t: torch.Tensor | float, *, process: str, mask_id: int | None = None,
                     num_classes: int | None = None, seed: int, offset: int = 0) -> torch.Tensor:
    """A draw of ``z_s ~ q(z_s | z_t, x)`` (paper eq. 4) per token.

    ``z_t`` int64 ``[...]``; ``x`` int64 ``[...]`` (hard) or float probabilities ``[..., V]``
    (soft); ``alpha_s >= alpha_t`` broadcastable to ``z_t``. Masked: an unmasked ``z_t``
    stays; a masked one is revealed with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``
    (uniform ``u0``) as ``x`` or a draw from soft ``x`` without the mask class (``u1``).
    Uniform: hard ``x`` in O(1), soft ``x`` by inverse CDF over V (``u0``).
    """
    z = z_t.reshape(-1)
    a_s, a_t = flat_alpha(alpha_s, z_t), flat_alpha(alpha_t, z_t)
    hard = not x.is_floating_point()
    xf = x.reshape(-1) if hard else x.reshape(-1, x.shape[-1])
    u0, u1 = element_uniforms(seed, offset, z.numel(), z.device)
    if process == "masked":
        reveal = (z == mask_id) & (u0 < _unmask_probability(a_s, a_t))
        if hard:
            drawn = xf
        else:
            w = xf.to(F64).clone()
            w[:, mask_id] = 0.0
            drawn = inverse_cdf(w, u1)
        out = torch.where(reveal, drawn, z)
    elif hard:
        out = _uniform_posterior_hard(z, xf, a_s, a_t, int(num_classes), u0)
    else:
        out = _uniform_posterior_soft(z, xf, a_s, a_t, u0)
    return out.reshape(z_t.shape)


def denoise_step(logits: torch.Tensor, z_t: torch.Tensor, alpha_s: torch.Tensor | float,
                 alpha_t: torch.Tensor | float, *, process: str, mask_id: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int, offset: int = 0) -> torch.Tensor:
    """One ancestral sampler step: ``x ~ Cat(nucleus(softmax(logits / temperature)))``, then the posterior.

    Masked: the reveal coin is drawn first (``u0``); only revealed positions draw a class
    (``u1``), never the mask class. Uniform: ``x`` from ``u0``, the posterior from ``u1``.
    ``logits [..., V]``, ``z_t [...]`` -> int64 ``[...]``.
    """
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    z = z_t.reshape(-1)
    a_s, a_t = flat_alpha(alpha_s, z_t), flat_alpha(alpha_t, z_t)
    u0, u1 = element_uniforms(seed, offset, z.numel(), z.device)
    if process == "masked":
        reveal = (z == mask_id) & (u0 < _unmask_probability(a_s, a_t))
        x = inverse_cdf(sampling_weights(flat, temperature, top_p, exclude=mask_id), u1)
        out = torch.where(reveal, x, z)
    else:
        x = inverse_cdf(sampling_weights(flat, temperature, top_p), u0)
        out = _uniform_posterior_hard(z, x, a_s, a_t, v, u1)
    return out.reshape(z_t.shape)


# ----------------------------------------------------------------------------- Gram


def grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gram matrix of per-example weight gradients of a linear layer.

    ``a [n, T, d_in]`` inputs, ``g [n, T, d_out]`` output gradients; example ``i``'s weight
    gradient is ``G_i = g_i^T a_i`` and ``K_ij = <G_i, G_j>_F``. Returns ``[n, n]``.
    """
    grads = torch.einsum("nto,nti->noi", g.to(F64), a.to(F64)).reshape(a.shape[0], -1)
    return (grads @ grads.T).to(_out_dtype(a, g))
