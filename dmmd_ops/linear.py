"""Fused linear + D-MMD losses: eq. 11 and eq. 12 on ``h @ w.T (+ b)`` without the
``[rows, V]`` logits in memory (docs/design.md §8, "Fused linear losses").

The rows are cut into chunks. For each chunk the three (or two) models' logits are made by one
matmul each, the loss op of :mod:`dmmd_ops.ops` gives the chunk's per-row losses and the
gradient of its (weighted) sum with respect to the trained model's logits, and that gradient
is folded at once into the gradients of ``h``, ``w`` and ``b`` (``g @ w``, ``g.T @ h``,
``g.sum(0)``); then the chunk's logits are dropped. So at most one chunk of logits per model,
plus one chunk of their gradient, is alive at a time, and the matmuls are the ones the unfused
path does (Liger's fused linear cross-entropy does the same for cross-entropy). With
``reduction="sum"`` or ``"mean"`` the loss is a scalar and the gradients are computed in the
forward, as above; with ``"none"`` the backward needs the caller's per-row gradients, so it
recomputes each chunk's logits then (one more forward of the matmuls).

Under ``torch.compile`` the fused losses run eagerly (one graph break each: the per-chunk
gradient is taken with ``torch.autograd.grad`` inside the forward), with the same results.
"""
from __future__ import annotations

import torch

from dmmd_ops import _validate as check
from dmmd_ops.ops import aux_loss, generator_loss

# What one chunk may hold (bytes) unless the caller says otherwise: the logits of each model and
# the trained one's gradient, float32.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def chunk_rows_for(vocab: int, models: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that ``models`` float32 logit rows plus one gradient row, each of
    ``vocab`` classes, fit in ``budget_bytes`` (at least one row)."""
    return max(1, budget_bytes // (4 * vocab * (models + 1)))


def _flat(name: str, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``h [..., d]`` as ``[rows, d]`` after checking ``w [V, d]`` and ``b [V]`` against it."""
    for n, t in ((f"h_{name}", h), (f"w_{name}", w)):
        check.tensor(n, t)
        if not t.is_floating_point():
            raise ValueError(f"{n} must be a floating-point tensor, got {t.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w_{name} must be [V, d], got shape {tuple(w.shape)}")
    if h.dim() < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(f"h_{name} [..., d] must end in w_{name}'s d = {w.shape[1]}, got shape {tuple(h.shape)}")
    check.same_device(f"w_{name}", w, f"h_{name}", h)
    if b is not None:
        check.tensor(f"b_{name}", b)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"b_{name} must be [V] = [{w.shape[0]}], got shape {tuple(b.shape)}")
        check.same_device(f"b_{name}", b, f"h_{name}", h)
    return h.reshape(-1, h.shape[-1])


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: slice) -> torch.Tensor:
    return torch.nn.functional.linear(h[rows], w, b)  # what an nn.Linear head computes, bias in the same pass


def _chunks(n: int, size: int):
    return (slice(lo, min(lo + size, n)) for lo in range(0, n, size))


class _FusedLinearLoss(torch.autograd.Function):
    """Chunked loss over ``rows``; the trained model is ``(h, w, b)`` = inputs 0-2.

    ``chunk_loss(trained_logits, rows) -> per-row losses`` holds the other models and the
    loss's options; ``row_scale`` is the weight times the reduction's factor per row (unused
    with ``reduction="none"``, which returns the unweighted per-row losses)."""

    @staticmethod
    def forward(ctx, h, w, b, chunk_loss, row_scale, chunk, reduction, grad_enabled):
        ctx.chunk_loss, ctx.chunk, ctx.reduction = chunk_loss, chunk, reduction
        needs = tuple(n and grad_enabled for n in ctx.needs_input_grad[:3])  # none under no_grad
        if reduction == "none":  # per-row gradients come with the backward: recompute there
            ctx.save_for_backward(h, w, b)
            return _pass(h, w, b, chunk_loss, chunk, None, (False, False, False))[0]
        losses, grads = _pass(h, w, b, chunk_loss, chunk, row_scale, needs)
        ctx.save_for_backward(*grads)
        return (losses * row_scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":  # grad_out: the caller's per-row gradient (weights included)
            h, w, b = ctx.saved_tensors
            _, grads = _pass(h, w, b, ctx.chunk_loss, ctx.chunk, grad_out.to(_accumulator(h)),
                             ctx.needs_input_grad[:3])
        else:
            grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


def _pass(h, w, b, chunk_loss, chunk, row_scale, needs):
    """One sweep over the chunks: per-row losses and, given ``row_scale``, the gradients of
    ``sum(losses * row_scale)`` to ``(h, w, b)`` (None where not ``needs``)."""
    n, acc = h.shape[0], _accumulator(h)
    losses = torch.empty(n, dtype=acc, device=h.device)
    want = row_scale is not None and any(needs)
    gh = torch.empty_like(h) if want and needs[0] else None
    gw = torch.zeros(w.shape, dtype=acc, device=w.device) if want and needs[1] else None
    gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if want and needs[2] else None
    for rows in _chunks(n, chunk):
        if not want:
            with torch.no_grad():
                losses[rows] = chunk_loss(_logits(h, w, b, rows), rows)
            continue
        with torch.no_grad():
            u = _logits(h, w, b, rows)
        with torch.enable_grad():
            u.requires_grad_(True)
            per_row = chunk_loss(u, rows)
            (g,) = torch.autograd.grad(per_row, u, grad_outputs=row_scale[rows].to(per_row.dtype))
        losses[rows] = per_row.detach()
        g = g.to(h.dtype)
        with torch.no_grad():
            if gh is not None:
                gh[rows] = g @ w
            if gw is not None:
                gw.addmm_(g.T.to(acc), h[rows].to(acc))
            if gb is not None:
                gb += g.to(acc).sum(0)
    grads = (gh, None if gw is None else gw.to(w.dtype), None if gb is None or b is None else gb.to(b.dtype))
    return losses, grads


def _accumulator(h: torch.Tensor) -> torch.dtype:
    """Losses and summed gradients in float32, or float64 for float64 inputs (test oracles)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _weights(weight, lead, ref, reduction: str, n: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The checked weights and each row's factor in the reduced loss (weight, over n for mean)."""
    w = check.weight(weight, lead, ref)
    check.no_nan("weight", w)
    if w is not None and w.requires_grad and reduction != "none":
        raise ValueError("weight: the fused losses give no gradient to the weights with reduction 'sum' or 'mean' "
                         "(use reduction='none' and reduce yourself)")
    acc = _accumulator(ref)
    scale = torch.ones(n, dtype=acc, device=ref.device) if w is None else w.reshape(-1).to(acc)
    return w, (scale / max(n, 1) if reduction == "mean" else scale)


def _finish(out: torch.Tensor, weight: torch.Tensor | None, lead, reduction: str) -> torch.Tensor:
    """``reduction="none"``: the per-row losses in the input's shape, times the weights."""
    if reduction != "none":
        return out
    out = out.reshape(lead)
    return out if weight is None else out * weight.to(out.dtype)


def linear_generator_loss(h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor,
                          w_teacher: torch.Tensor, h_aux: torch.Tensor, w_aux: torch.Tensor, *,
                          b_student: torch.Tensor | None = None, b_teacher: torch.Tensor | None = None,
                          b_aux: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                          temperature: float = 1.0, top_p: float = 1.0, delta: float = 2.0, reduction: str = "sum",
                          chunk_rows: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """:func:`dmmd_ops.generator_loss` of ``h_student @ w_student.T + b_student`` (and the
    teacher's and auxiliary model's logits made the same way), without their ``[rows, V]``
    logits in memory. The gradient flows to ``h_student``, ``w_student`` and ``b_student``.

    Args:
        h_*: ``[..., d_*]`` final hidden states (the same rows for the three models; each model
            its own ``d``).
        w_*: ``[V, d_*]`` output heads; ``b_*``: optional ``[V]`` biases (``-inf`` marks a class
            that cannot occur, such as the mask or vocabulary padding).
        chunk_rows: rows per chunk (default: from ``chunk_bytes``, the memory one chunk of
            logits and their gradient may take).
    """
    hs, ht, ha = _flat("student", h_student, w_student, b_student), _flat("teacher", h_teacher, w_teacher,
                                                                        b_teacher), _flat("aux", h_aux, w_aux, b_aux)
    lead = h_student.shape[:-1]
    for name, h in (("h_teacher", h_teacher), ("h_aux", h_aux)):
        if h.shape[:-1] != lead:
            raise ValueError(f"{name} must have h_student's rows {tuple(lead)}, got shape {tuple(h.shape)}")
    v = w_student.shape[0]
    for name, w in (("w_teacher", w_teacher), ("w_aux", w_aux)):
        if w.shape[0] != v:
            raise ValueError(f"{name} must have w_student's V = {v} classes, got shape {tuple(w.shape)}")
    reduction = check.reduction(reduction)
    chunk = _chunk(chunk_rows, chunk_bytes, v, 3)
    weight, scale = _weights(weight, lead, h_student, reduction, hs.shape[0])

    def chunk_loss(u, rows):
        with torch.no_grad():
            a, b = _logits(ht, w_teacher, b_teacher, rows), _logits(ha, w_aux, b_aux, rows)
        return generator_loss(u, a, b, temperature=temperature, top_p=top_p, delta=delta, reduction="none")

    out = _FusedLinearLoss.apply(hs, w_student, b_student, chunk_loss, scale, chunk, reduction,
                                 torch.is_grad_enabled())
    return _finish(out, weight, lead, reduction)


def linear_aux_loss(h_aux: torch.Tensor, w_aux: torch.Tensor, target: torch.Tensor,
                    h_teacher: torch.Tensor | None = None, w_teacher: torch.Tensor | None = None, *,
                    b_aux: torch.Tensor | None = None, b_teacher: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
                    delta: float = 2.0, reduction: str = "sum", chunk_rows: int | None = None,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """:func:`dmmd_ops.aux_loss` of ``h_aux @ w_aux.T + b_aux`` (teacher term from
    ``h_teacher @ w_teacher.T + b_teacher``, or none) without the ``[rows, V]`` logits in
    memory; ``target`` is hard ids ``[...]`` or soft probabilities ``[..., V]``. The gradient
    flows to ``h_aux``, ``w_aux`` and ``b_aux``. See :func:`linear_generator_loss`."""
    ha = _flat("aux", h_aux, w_aux, b_aux)
    lead, v = h_aux.shape[:-1], w_aux.shape[0]
    if (h_teacher is None) != (w_teacher is None):
        raise ValueError("h_teacher and w_teacher come together (or neither)")
    ht = None
    if h_teacher is not None:
        ht = _flat("teacher", h_teacher, w_teacher, b_teacher)
        if h_teacher.shape[:-1] != lead:
            raise ValueError(f"h_teacher must have h_aux's rows {tuple(lead)}, got shape {tuple(h_teacher.shape)}")
        if w_teacher.shape[0] != v:
            raise ValueError(f"w_teacher must have w_aux's V = {v} classes, got shape {tuple(w_teacher.shape)}")
    target = check.tensor("target", target)
    soft = target.is_floating_point()
    want = (*lead, v) if soft else tuple(lead)
    if tuple(target.shape) != want:
        raise ValueError(f"target must have shape {want} ({'soft' if soft else 'hard'}), got {tuple(target.shape)}")
    flat_target = target.reshape(-1, v) if soft else target.reshape(-1)
    reduction = check.reduction(reduction)
    chunk = _chunk(chunk_rows, chunk_bytes, v, 2 + soft)
    weight, scale = _weights(weight, lead, h_aux, reduction, ha.shape[0])

    def chunk_loss(b, rows):
        with torch.no_grad():
            a = None if ht is None else _logits(ht, w_teacher, b_teacher, rows)
        return aux_loss(b, flat_target[rows], a, temperature=temperature, top_p=top_p, delta=delta,
                        reduction="none")

    out = _FusedLinearLoss.apply(ha, w_aux, b_aux, chunk_loss, scale, chunk, reduction, torch.is_grad_enabled())
    return _finish(out, weight, lead, reduction)


def _chunk(chunk_rows: int | None, chunk_bytes: int, v: int, models: int) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return int(chunk_rows)
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    return chunk_rows_for(v, models, chunk_bytes)
