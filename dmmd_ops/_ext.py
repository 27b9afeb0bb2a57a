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

_warned: set[str] = set()


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether `dmmd::<op>` has a compiled kernel for the dispatch key of `device`."""
    if not EXTENSION_LOADED:
        return False
    key = "CUDA" if torch.device(device).type == "cuda" else torch.device(device).type.upper()
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dmmd::{op}", key)
    except RuntimeError:
        return False


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
