"""Loading the compiled extension and asking which kernels it registered."""
from __future__ import annotations

import warnings

import torch

try:  # Importing _C runs the TORCH_LIBRARY registrations; it never initialises CUDA.
    from dmmd_ops import _C  # noqa: F401

    EXTENSION_LOADED = True
    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    EXTENSION_LOADED = False
    EXTENSION_ERROR = str(exc)

# Every op of the schema (csrc/ops.cpp).
OPS = ("philox4x32", "teacher_logprobs", "generator_loss_forward", "generator_loss_backward",
       "aux_loss_forward", "aux_loss_backward", "sample_categorical", "posterior_sample",
       "denoise_step", "grad_gram")

_warned: set[str] = set()
_has: dict[tuple[str, str], bool] = {}


def _lookup(op: str, device_type: str) -> bool:
    if not EXTENSION_LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dmmd::{op}", device_type.upper())
    except RuntimeError:
        return False


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether `dmmd::<op>` has a compiled kernel for the dispatch key of `device`.

    Cached per (op, device type): a plain dict lookup, so torch.compile traces through it.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (op, device_type)
    if key not in _has:
        _has[key] = _lookup(op, device_type)
    return _has[key]


# Filled at import, so that calls traced by torch.compile only ever read the dict.
for _op in OPS:
    for _device_type in ("cpu", "cuda"):
        has_kernel(_op, _device_type)


def warn_fallback(op: str, device: torch.device | str) -> None:
    """Warn once per (op, device type) that the pure-PyTorch reference is used instead."""
    tag = f"{op}@{torch.device(device).type}"
    if tag in _warned:
        return
    _warned.add(tag)
    why = "the extension failed to load: " + EXTENSION_ERROR if not EXTENSION_LOADED else \
        f"no compiled {torch.device(device).type} kernel"
    warnings.warn(f"dmmd_ops.{op}: using the pure-PyTorch reference ({why}); results are the same, "
                  "only slower", RuntimeWarning, stacklevel=3)
