"""Loading the compiled extension and asking which kernels it registered."""
from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch


def build_mismatch(built: dict, runtime: str) -> str | None:
    """Why a build recorded in ``built`` (its ``_build_info.json``) must not be loaded into torch
    ``runtime``, or None: an extension compiled against another torch can crash on import."""
    wanted = built.get("torch_version")
    if wanted is None or wanted == runtime:
        return None
    return (f"dmmd_ops._C was built against torch {wanted} but this is torch {runtime}; rebuild it "
            f"against this torch (pip install --no-build-isolation ., or make build)")


def _load() -> tuple[bool, str | None]:
    """Import ``_C`` (which runs the TORCH_LIBRARY registrations and never initialises CUDA),
    unless its build record names another torch."""
    spec = importlib.util.find_spec("dmmd_ops._C")
    if spec is None or spec.origin is None:
        return False, "the extension is not built (make build, or pip install --no-build-isolation .)"
    record = os.path.join(os.path.dirname(spec.origin), "_build_info.json")
    if os.path.exists(record):
        with open(record) as f:
            why = build_mismatch(json.load(f), torch.__version__)
        if why is not None:
            warnings.warn(why + "; until then the pure-PyTorch reference runs every op", RuntimeWarning,
                          stacklevel=3)
            return False, why
    try:
        from dmmd_ops import _C  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        return False, str(exc)
    return True, None


EXTENSION_LOADED, EXTENSION_ERROR = _load()

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
