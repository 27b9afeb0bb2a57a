"""What tests and benchmarks hold the ops to, in one place: the dtypes with their tolerances,
the awkward input shapes and layouts, and random logits. The oracle itself is
:mod:`dmmd_ops.reference` (float64). Users may import this to test code built on the ops."""
from __future__ import annotations

import contextlib
import os

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# dtype -> (rtol, atol) of a loss or log-probability computed from logits of that dtype against
# the float64 reference: the kernels do float32 math on the values the reference sees, so the
# tolerance is float32's whatever the input dtype.
VALUE_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4), torch.float16: (1e-4, 1e-4)}

# dtype -> relative rounding of a gradient written in that dtype (its atol scales with the
# gradient's largest entry).
GRAD_EPS = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}

# (shape, layout): one row of an odd V; many rows of an odd V (most start off a 16-byte
# boundary); 3-D inputs; rows that are slices of wider rows; a non-unit last stride; V = 1.
CASES = [
    ((1, 50257), "contiguous"),
    ((8, 50257), "contiguous"),
    ((37, 50), "contiguous"),
    ((3, 5, 333), "contiguous"),
    ((9, 1000), "row_stride"),
    ((6, 129), "transposed"),
    ((4, 1), "contiguous"),
]


def make_logits(shape, dtype: torch.dtype, generator: torch.Generator, layout: str = "contiguous",
                scale: float = 3.0) -> torch.Tensor:
    """Random logits ``N(0, scale^2)`` of ``shape`` in ``dtype`` with the given memory layout:
    ``contiguous``, ``row_stride`` (rows are slices of rows twice as wide) or ``transposed``
    (the class dimension is not the last in memory)."""
    if layout == "contiguous":
        t = torch.randn(shape, generator=generator) * scale
    elif layout == "row_stride":
        t = (torch.randn((*shape[:-1], 2 * shape[-1]), generator=generator) * scale)[..., : shape[-1]]
    elif layout == "transposed":
        t = (torch.randn((shape[-1], *shape[:-1]), generator=generator) * scale).movedim(0, -1)
    else:
        raise ValueError(f"layout must be contiguous, row_stride or transposed, got {layout!r}")
    return t.to(dtype)


def grad_tol(dtype: torch.dtype, grad: torch.Tensor) -> dict:
    """``assert_close`` tolerances for a gradient in ``dtype`` whose exact value is ``grad``."""
    return dict(rtol=0, atol=GRAD_EPS[dtype] * float(grad.abs().max()) + 1e-7)


def on_device(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    """The same values and memory layout on ``device`` (strided views stay strided)."""
    if t is None or t.device.type == device:
        return t
    if t.is_contiguous():
        return t.to(device)
    base = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    base.copy_(t)
    return base


@contextlib.contextmanager
def unstaged_rows():
    """Within it, the CUDA kernels read rows from global memory pass after pass instead of
    staging them in shared memory once (``DMMD_ROW_STAGING=0``, read at every launch): how the
    GPU benchmarks and the sanitizer probe reach the unstaged kernels. Restores the setting."""
    old = os.environ.get("DMMD_ROW_STAGING")
    os.environ["DMMD_ROW_STAGING"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["DMMD_ROW_STAGING"]
        else:
            os.environ["DMMD_ROW_STAGING"] = old
