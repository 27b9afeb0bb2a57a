"""Argument checks of the public ops: every bad input raises with the argument's name.

Checks on tensor *values* (NaN, id ranges, alpha order) read the data, so they are
skipped while ``torch.compile`` traces and while a CUDA graph is being captured, where a
host sync is impossible; the eager path always runs them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dmmd_ops.reference import DIVERGENCES

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("none", "sum", "mean")
PROCESSES = ("masked", "uniform")
MAX_SEED = 2**63


def value_checks_enabled(*tensors: torch.Tensor | None) -> bool:
    """Whether checks that read tensor values may run now (not tracing, not capturing)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and t.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
    return True


def tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def logits(name: str, t: object) -> torch.Tensor:
    """A float tensor ``[..., V]`` with V >= 1 and a supported dtype."""
    t = tensor(name, t)
    if t.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 (float64 for checks), got {t.dtype}")
    if t.dim() < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(t.shape)}")
    return t


def same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")


def temperature(value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def top_p(value: float) -> float:
    if not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {value!r}")
    return float(value)


def delta(value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {value!r}")
    return float(value)


def divergence(value: str) -> str:
    if value not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {value!r}")
    return value


def ratio_max(value: float) -> float:
    if not isinstance(value, (int, float)) or not value >= 1:  # nan too; inf: no cap
        raise ValueError(f"ratio_max must be a number >= 1, got {value!r}")
    return float(value)


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def process(value: str) -> str:
    if value not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {value!r}")
    return value


def seed(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value < MAX_SEED):
        raise ValueError(f"{name} must be an int in [0, 2^63), got {value!r}")
    return value


def class_id(name: str, value: int | None, v: int | None, required_for: str | None = None) -> int | None:
    """An optional class index in ``[0, v)``; ``required_for`` names why it may not be None."""
    if value is None:
        if required_for is not None:
            raise ValueError(f"{name} is required {required_for}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 0 or (v is not None and value >= v):
        raise ValueError(f"{name} must be in [0, {v}), got {value}")
    return value


def weight(value: torch.Tensor | None, lead: Sequence[int], ref: torch.Tensor) -> torch.Tensor | None:
    """Per-row loss weights: a float tensor of shape ``logits.shape[:-1]``."""
    if value is None:
        return None
    value = tensor("weight", value)
    if not value.is_floating_point():
        raise ValueError(f"weight must be a float tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(lead):
        raise ValueError(f"weight must have shape {tuple(lead)} (logits without the class dim), "
                         f"got {tuple(value.shape)}")
    same_device("weight", value, "the logits", ref)
    return value


def token_ids(name: str, t: object) -> torch.Tensor:
    t = tensor(name, t)
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 tensor of token ids, got {t.dtype}")
    return t


# ------------------------------------------------------------------ checks that read values


def no_nan(name: str, t: torch.Tensor | None) -> None:
    if t is not None and value_checks_enabled(t) and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")


def ids_in_range(name: str, t: torch.Tensor, v: int | None) -> None:
    """Token ids must lie in ``[0, v)`` (only ``>= 0`` when v is unknown)."""
    if t.numel() == 0 or not value_checks_enabled(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or (v is not None and hi >= v):
        bound = f"[0, {v})" if v is not None else "[0, inf)"
        raise ValueError(f"{name} has token ids out of range {bound}: min {lo}, max {hi}")


def probabilities(name: str, t: torch.Tensor) -> None:
    """A soft target / soft x: finite, non-negative."""
    if not value_checks_enabled(t):
        return
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
    if bool((t < 0).any()) or bool(torch.isinf(t).any()):
        raise ValueError(f"{name} must hold finite non-negative probabilities")


def alphas(alpha_s: torch.Tensor | float, alpha_t: torch.Tensor | float, z_t: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha_s`` and ``alpha_t`` as float tensors broadcast to ``z_t`` (views, no copies)."""
    out = []
    for name, a in (("alpha_s", alpha_s), ("alpha_t", alpha_t)):
        if isinstance(a, torch.Tensor):
            if not a.is_floating_point():
                raise ValueError(f"{name} must be a float or a float tensor, got {a.dtype}")
            if a.device != z_t.device and a.dim() > 0:
                raise ValueError(f"{name} is on {a.device} but z_t is on {z_t.device}")
            a = a.to(device=z_t.device)
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            a = torch.tensor(float(a), dtype=torch.float64, device=z_t.device)
        else:
            raise ValueError(f"{name} must be a float or a tensor, got {type(a).__name__}")
        try:
            a = torch.broadcast_to(a, z_t.shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(a.shape)} does not broadcast to z_t's "
                             f"shape {tuple(z_t.shape)}") from None
        out.append(a)
    a_s, a_t = out
    if value_checks_enabled(a_s, a_t) and a_s.numel() > 0:
        for name, a in (("alpha_s", a_s), ("alpha_t", a_t)):
            if bool(torch.isnan(a).any()) or bool(((a < 0) | (a > 1)).any()):
                raise ValueError(f"{name} must lie in [0, 1]")
        if bool((a_s < a_t).any()):
            raise ValueError("alpha_s must be >= alpha_t (s < t); got alpha_s < alpha_t")
    return a_s, a_t


def bad_rows(op: str, bad: torch.Tensor, named: dict[str, torch.Tensor | None], *,
             exclude: int | None = None, fallback: str | None = None) -> None:
    """Raise for the first row a kernel flagged (kernels do not raise: CUDA ones cannot, and the
    CPU ones flag the same way so that there is one error path), naming the argument.

    ``bad`` is a bool ``[rows]``; ``named`` maps argument names to their ``[rows, V]`` logits, read
    only for the flagged row (class ``exclude`` left out, as the kernel did). ``fallback`` is
    the message when no logits explain it (such as a soft target that is not a distribution).
    """
    if bad.numel() == 0 or not value_checks_enabled(bad) or not bool(bad.any()):
        return
    r = int(bad.nonzero()[0, 0])
    for name, t in named.items():
        if t is None:
            continue
        row = t[r].float()
        if exclude is not None:
            row = torch.cat([row[:exclude], row[exclude + 1:]])
        if bool(torch.isnan(row).any()):
            raise ValueError(f"{op}: {name} contains NaN (row {r})")
        if bool((row == math.inf).any()):
            raise ValueError(f"{op}: {name} contains +inf (row {r}); only -inf logits are allowed")
        if not bool((row > -math.inf).any()):
            raise ValueError(f"{op}: {name} has a row where every logit is -inf (row {r}): no class can occur")
    raise ValueError(f"{op}: {fallback or 'the kernel rejected the inputs'} (row {r})")
