"""The public ops of ``docs/design.md`` §8: argument checks, then the compiled kernel for
the input's device when the extension has one, else the pure-PyTorch reference (with one
warning per op and device type)."""
from __future__ import annotations

import torch

from dmmd_ops import (
    _meta,  # fake and autograd registrations
    reference,
)
from dmmd_ops import _validate as check
from dmmd_ops._ext import has_kernel, warn_fallback


def _use_kernel(op: str | None, device: torch.device, *tensors: torch.Tensor | None) -> bool:
    """Whether to run the compiled kernel. float64 inputs (gradcheck, test oracles) and forms
    with no kernel (``op`` None) run the float64 reference on purpose; a missing kernel falls
    back to it with one warning."""
    if op is None:
        return False
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return False
    if has_kernel(op, device):
        return True
    warn_fallback(op, device)
    return False


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` as ``[rows, V]`` with a unit last stride (a view whenever one exists)."""
    r = t.reshape(-1, t.shape[-1])
    return r if r.stride(-1) == 1 else r.contiguous()


def _one_dtype(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The kernels take one logits dtype per call: mixed dtypes meet in float32."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) <= 1:
        return tensors
    return tuple(None if t is None else t.to(torch.float32) for t in tensors)


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10 output words.

    Args:
        counter: int64 ``[n, 4]``, values in ``[0, 2^32)``.
        key: int64 ``[n, 2]``, values in ``[0, 2^32)``.
    Returns:
        int64 ``[n, 4]``.
    """
    counter, key = check.token_ids("counter", counter), check.token_ids("key", key)
    if counter.dim() != 2 or counter.shape[1] != 4:
        raise ValueError(f"counter must have shape [n, 4], got {tuple(counter.shape)}")
    if key.shape != (counter.shape[0], 2):
        raise ValueError(f"key must have shape [{counter.shape[0]}, 2], got {tuple(key.shape)}")
    check.same_device("key", key, "counter", counter)
    for name, t in (("counter", counter), ("key", key)):
        check.ids_in_range(name, t, 2**32)
    if _use_kernel("philox4x32", counter.device):
        return torch.ops.dmmd.philox4x32(counter, key)
    return reference.philox4x32(counter, key)


def teacher_logprobs(teacher_logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                     delta: float = 2.0) -> torch.Tensor:
    """Teacher log-probabilities with temperature and the soft top-p mask (paper section 3.3).

    ``s = a / temperature``; with ``top_p < 1``, ``s -= delta * (1 - keep_p(s))``; then
    ``log_softmax(s)``. ``teacher_logits [..., V]`` -> float32 ``[..., V]``.
    """
    check.logits("teacher_logits", teacher_logits)
    temperature, top_p, delta = check.temperature(temperature), check.top_p(top_p), check.delta(delta)
    if _use_kernel("teacher_logprobs", teacher_logits.device, teacher_logits):
        a = _rows(teacher_logits)
        out = torch.ops.dmmd.teacher_logprobs(a, temperature, top_p, delta)
        # the kernels flag a row they cannot use (NaN throughout); raise naming the argument
        check.bad_rows("teacher_logprobs", out[:, 0].isnan(), {"teacher_logits": a})
        return out.reshape(teacher_logits.shape)
    check.no_nan("teacher_logits", teacher_logits)
    return reference.teacher_logprobs(teacher_logits, temperature=temperature, top_p=top_p, delta=delta)


def _check_loss_common(logits_args: dict[str, torch.Tensor | None], weight: torch.Tensor | None,
                       temperature: float, top_p: float, delta: float, reduction: str, op: str | None):
    """Shapes, devices, scalars and NaNs shared by the two loss ops; the first logits is the reference.

    Returns ``(use_kernel, weight, temperature, top_p, delta, reduction)``. The kernels check
    the logits for NaN as they stream them, so only the reference path scans for NaN here.
    """
    names = [n for n, t in logits_args.items() if t is not None]
    ref_name, ref = names[0], logits_args[names[0]]
    for name in names:
        t = check.logits(name, logits_args[name])
        if name != ref_name:
            check.same_shape(name, t, ref_name, ref)
            check.same_device(name, t, ref_name, ref)
    weight = check.weight(weight, ref.shape[:-1], ref)
    out = (check.temperature(temperature), check.top_p(top_p), check.delta(delta), check.reduction(reduction))
    use_kernel = _use_kernel(op, ref.device, *logits_args.values())
    if not use_kernel:
        for name in names:
            check.no_nan(name, logits_args[name])
    check.no_nan("weight", weight)
    return (use_kernel, weight, *out)


def generator_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, aux_logits: torch.Tensor,
                   *, weight: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
                   delta: float = 2.0, reduction: str = "sum", divergence: str = "reverse_kl",
                   ratio_max: float = 20.0) -> torch.Tensor:
    """D-MMD generator loss (paper eq. 11); the gradient flows to ``student_logits`` only.

    Per row: ``-sum_c softmax(u)_c (teacher_logprobs(a) - log_softmax(b))_c``, times ``weight[row]``.
    With ``divergence="jeffreys"`` the difference ``log r`` becomes ``(log r + min(r, ratio_max)
    - 1) / 2`` (:func:`dmmd_ops.reference.generator_pull`); that form has no kernel: it runs the
    float64 reference on every device.

    Args:
        student_logits: ``u`` ``[..., V]``, the generator's logits at ``z_t``.
        teacher_logits: ``a`` ``[..., V]``, the teacher's logits at ``z_s``.
        aux_logits: ``b`` ``[..., V]``, the auxiliary model's logits at ``z_s``.
        weight: optional per-row weights ``[...]`` (e.g. ``w(s)``).
        reduction: ``"none"`` (float32 ``[...]``), ``"sum"`` or ``"mean"`` (weighted sum / rows).
        divergence: ``"reverse_kl"`` (the paper's eq. 11) or ``"jeffreys"``.
        ratio_max: ``"jeffreys"``: the cap on ``r = teacher / aux`` per class.
    """
    divergence, ratio_max = check.divergence(divergence), check.ratio_max(ratio_max)
    logits = {"student_logits": student_logits, "teacher_logits": teacher_logits, "aux_logits": aux_logits}
    op = "generator_loss_forward" if divergence == "reverse_kl" else None
    use_kernel, weight, temperature, top_p, delta, reduction = _check_loss_common(
        logits, weight, temperature, top_p, delta, reduction, op)
    if use_kernel:
        u, a, b = (_rows(t) for t in _one_dtype(student_logits, teacher_logits, aux_logits))
        rows, stats = torch.ops.dmmd.generator_loss_forward(u, a, b, temperature, top_p, delta)
        check.bad_rows("generator_loss", stats[:, _meta.GEN_I_STAR] < 0,
                       {"student_logits": u, "teacher_logits": a, "aux_logits": b})
        return reference.reduce_rows(rows.reshape(student_logits.shape[:-1]), weight, reduction)
    return reference.generator_loss(student_logits, teacher_logits, aux_logits, weight=weight,
                                    temperature=temperature, top_p=top_p, delta=delta, reduction=reduction,
                                    divergence=divergence, ratio_max=ratio_max)


def aux_loss(aux_logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             *, weight: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
             delta: float = 2.0, reduction: str = "sum") -> torch.Tensor:
    """D-MMD auxiliary loss (paper eq. 12); the gradient flows to ``aux_logits`` only.

    Per row: ``-sum_c (x + q_teacher)_c log_softmax(b)_c``, times ``weight[row]``.

    Args:
        aux_logits: ``b`` ``[..., V]``.
        target: hard ``x`` as int64 ``[...]`` or soft ``x`` as float probabilities ``[..., V]``.
        teacher_logits: ``[..., V]`` giving ``q_teacher = exp(teacher_logprobs(.))``; None drops that term.
    """
    use_kernel, weight, temperature, top_p, delta, reduction = _check_loss_common(
        {"aux_logits": aux_logits, "teacher_logits": teacher_logits}, weight, temperature, top_p, delta,
        reduction, "aux_loss_forward")
    target = check.tensor("target", target)
    check.same_device("target", target, "aux_logits", aux_logits)
    v = aux_logits.shape[-1]
    if target.is_floating_point():
        check.same_shape("target", target, "aux_logits", aux_logits)
        if target.dtype == torch.float64:
            use_kernel = False
        if not use_kernel:  # the kernel checks soft targets as it reads them
            check.probabilities("target", target)
    elif target.dtype == torch.int64:
        if target.shape != aux_logits.shape[:-1]:
            raise ValueError(f"hard target must have shape {tuple(aux_logits.shape[:-1])} "
                             f"(aux_logits without the class dim), got {tuple(target.shape)}")
        check.ids_in_range("target", target, v)
    else:
        raise ValueError(f"target must be int64 ids or float probabilities, got {target.dtype}")
    if use_kernel:
        b, a = _one_dtype(aux_logits, teacher_logits)
        x = _rows(target.to(torch.float32)) if target.is_floating_point() else target.reshape(-1)
        b, a = _rows(b), None if a is None else _rows(a)
        rows, stats = torch.ops.dmmd.aux_loss_forward(b, x, a, temperature, top_p, delta)
        check.bad_rows("aux_loss", stats[:, _meta.AUX_I_STAR] < 0, {"aux_logits": b, "teacher_logits": a},
                       fallback="target must hold finite non-negative probabilities")
        return reference.reduce_rows(rows.reshape(aux_logits.shape[:-1]), weight, reduction)
    return reference.aux_loss(aux_logits, target, teacher_logits, weight=weight, temperature=temperature,
                              top_p=top_p, delta=delta, reduction=reduction)


def sample_categorical(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, seed: int,
                       offset: int = 0) -> torch.Tensor:
    """One exact draw per row from ``softmax(logits / temperature)`` restricted to the top-p nucleus.

    ``logits [..., V]`` -> int64 ``[...]``; reproducible from ``(seed, offset)`` on any device.
    """
    check.logits("logits", logits)
    temperature, top_p = check.temperature(temperature), check.top_p(top_p)
    seed, offset = check.seed("seed", seed), check.seed("offset", offset)
    if _use_kernel("sample_categorical", logits.device, logits):
        x = _rows(logits)
        out = torch.ops.dmmd.sample_categorical(x, temperature, top_p, seed, offset)
        check.bad_rows("sample_categorical", out < 0, {"logits": x})  # -1: a row with no draw
        return out.reshape(logits.shape[:-1])
    check.no_nan("logits", logits)
    return reference.sample_categorical(logits, temperature=temperature, top_p=top_p, seed=seed, offset=offset)


def _check_process_ids(process: str, mask_id: int | None, v: int | None) -> tuple[str, int | None]:
    process = check.process(process)
    if process == "masked":
        mask_id = check.class_id("mask_id", mask_id, v, required_for='for process="masked"')
    elif mask_id is not None:
        raise ValueError('mask_id is only meaningful for process="masked"; pass None for "uniform"')
    return process, mask_id


def posterior_sample(z_t: torch.Tensor, x: torch.Tensor, alpha_s: torch.Tensor | float,
                     alpha_t: torch.Tensor | float, *, process: str, mask_id: int | None = None,
                     num_classes: int | None = None, seed: int, offset: int = 0) -> torch.Tensor:
    """Draw ``z_s ~ q(z_s | z_t, x)`` (paper eq. 4) per token.

    Args:
        z_t: int64 token ids ``[...]``.
        x: int64 ``[...]`` (hard) or float probabilities ``[..., V]`` (soft).
        alpha_s, alpha_t: floats or tensors broadcastable to ``z_t``, ``1 >= alpha_s >= alpha_t >= 0``.
        process: ``"masked"`` (needs ``mask_id``) or ``"uniform"`` (hard x needs ``num_classes``).
    Returns:
        int64 ``[...]`` like ``z_t``.
    """
    z_t = check.token_ids("z_t", z_t)
    x = check.tensor("x", x)
    check.same_device("x", x, "z_t", z_t)
    soft = x.is_floating_point()
    if soft:
        if x.dtype not in check.LOGIT_DTYPES:
            raise ValueError(f"soft x must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if x.dim() < 1 or x.shape[:-1] != z_t.shape:
            raise ValueError(f"soft x must have shape {(*z_t.shape, 'V')}, got {tuple(x.shape)}")
        v = x.shape[-1]
        if num_classes is not None and num_classes != v:
            raise ValueError(f"num_classes={num_classes} disagrees with soft x's last dim {v}")
    else:
        check.token_ids("x", x)
        check.same_shape("x", x, "z_t", z_t)
        v = num_classes
    process = check.process(process)
    if process == "uniform" and not soft and num_classes is None:
        raise ValueError('num_classes is required for process="uniform" with hard x')
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    process, mask_id = _check_process_ids(process, mask_id, v)
    a_s, a_t = check.alphas(alpha_s, alpha_t, z_t)
    seed, offset = check.seed("seed", seed), check.seed("offset", offset)
    check.ids_in_range("z_t", z_t, v)
    use_kernel = _use_kernel("posterior_sample", z_t.device, x if soft else None)
    if soft:
        check.probabilities("x", x)
    else:
        check.ids_in_range("x", x, v)
        if process == "masked" and check.value_checks_enabled(x) and bool((x == mask_id).any()):
            raise ValueError("x must not contain mask_id: the mask class is never a clean token")
    if use_kernel:
        xk = _rows(x.to(torch.float32)) if soft else x.reshape(-1)
        out = torch.ops.dmmd.posterior_sample(
            z_t.reshape(-1), xk, reference.flat_alpha(a_s, z_t).contiguous(),
            reference.flat_alpha(a_t, z_t).contiguous(), process,
            -1 if mask_id is None else mask_id, -1 if num_classes is None else num_classes, seed, offset)
        check.bad_rows("posterior_sample", out < 0, {}, fallback="soft x has no mass outside mask_id"
                       if soft and process == "masked" else "z_t, x or the alphas are invalid")
        return out.reshape(z_t.shape)
    return reference.posterior_sample(z_t, x, a_s, a_t, process=process, mask_id=mask_id,
                                      num_classes=num_classes, seed=seed, offset=offset)


def denoise_step(logits: torch.Tensor, z_t: torch.Tensor, alpha_s: torch.Tensor | float,
                 alpha_t: torch.Tensor | float, *, process: str, mask_id: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int, offset: int = 0) -> torch.Tensor:
    """Fused sampler step: ``x ~ Cat(softmax(logits / temperature))`` in the nucleus, then
    ``z_s ~ q(z_s | z_t, x)``. For masked diffusion the mask class is never drawn.

    ``logits [..., V]``, ``z_t`` int64 ``[...]`` -> int64 ``[...]``.
    """
    check.logits("logits", logits)
    z_t = check.token_ids("z_t", z_t)
    check.same_device("z_t", z_t, "logits", logits)
    if z_t.shape != logits.shape[:-1]:
        raise ValueError(f"z_t must have shape {tuple(logits.shape[:-1])} (logits without the class dim), "
                         f"got {tuple(z_t.shape)}")
    v = logits.shape[-1]
    process, mask_id = _check_process_ids(process, mask_id, v)
    if process == "masked" and v < 2:
        raise ValueError("logits must have V >= 2 for masked diffusion (the mask plus one token)")
    a_s, a_t = check.alphas(alpha_s, alpha_t, z_t)
    temperature, top_p = check.temperature(temperature), check.top_p(top_p)
    seed, offset = check.seed("seed", seed), check.seed("offset", offset)
    check.ids_in_range("z_t", z_t, v)
    if _use_kernel("denoise_step", logits.device, logits):
        x = _rows(logits)
        out = torch.ops.dmmd.denoise_step(
            x, z_t.reshape(-1), reference.flat_alpha(a_s, z_t).contiguous(),
            reference.flat_alpha(a_t, z_t).contiguous(), process,
            -1 if mask_id is None else mask_id, temperature, top_p, seed, offset)
        check.bad_rows("denoise_step", out < 0, {"logits": x}, exclude=mask_id)
        return out.reshape(z_t.shape)
    check.no_nan("logits", logits)
    return reference.denoise_step(logits, z_t, a_s, a_t, process=process, mask_id=mask_id,
                                  temperature=temperature, top_p=top_p, seed=seed, offset=offset)


def grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example gradient inner products of a linear layer ``y = a W^T``.

    Args:
        a: layer inputs ``[n, T, d_in]``.
        g: gradients wrt the layer outputs ``[n, T, d_out]``.
    Returns:
        float32 ``[n, n]`` with ``K_ij = <g_i^T a_i, g_j^T a_j>_F``.
    """
    a, g = check.tensor("a", a), check.tensor("g", g)
    for name, t in (("a", a), ("g", g)):
        if t.dtype not in check.LOGIT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [n, T, d], got {tuple(t.shape)}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a {tuple(a.shape)} and g {tuple(g.shape)} must agree on [n, T]")
    check.same_device("g", g, "a", a)
    if _use_kernel("grad_gram", a.device, a, g):
        k = torch.ops.dmmd.grad_gram(a, g)
        # A NaN anywhere in a or g reaches K: scan the inputs only then, to name the culprit.
        if check.value_checks_enabled(k) and bool(torch.isnan(k).any()):
            check.no_nan("a", a)
            check.no_nan("g", g)
            raise ValueError("grad_gram: a or g holds infinite values (K has NaN)")
        return k
    check.no_nan("a", a)
    check.no_nan("g", g)
    return reference.grad_gram(a, g)
