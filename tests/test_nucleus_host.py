"""The radix-selection nucleus the CUDA kernels run (csrc/include/dmmd/radix.h), replayed on the
host through nvcc, against the CPU kernels' nucleus (the threshold logit a*, the last kept index
i* and the kept mass) on rows with ties, signed zeros, -inf classes and the three logit dtypes."""
from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch

import dmmd_ops
from tests.conftest import nvcc_host_program

A_STAR, I_STAR, LOG_ZT = 6, 7, 3  # GenStat slots (csrc/include/dmmd/rowmath.h)
KIND = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

pytestmark = pytest.mark.skipif(not dmmd_ops.has_kernel("generator_loss_forward", "cpu"),
                                reason="the extension has no CPU kernels")


@pytest.fixture(scope="module")
def nucleus_program(tmp_path_factory):
    return nvcc_host_program(tmp_path_factory, "nucleus_host")


def _from_bits(bits: int, dtype) -> float:
    """The value of a raw bit pattern of `dtype` (unsigned, in the dtype's width)."""
    width = 8 * torch.empty((), dtype=dtype).element_size()
    signed = bits - (1 << width) if bits >= 1 << (width - 1) else bits
    return float(torch.tensor([signed], dtype=INT_VIEW[dtype]).view(dtype).float())


def radix_nucleus(exe, rows: torch.Tensor, temperature: float, top_p: float):
    """(a_star, i_star, kept, total) per row from the host replay of radix.h."""
    bits = rows.contiguous().view(INT_VIEW[rows.dtype]).to(torch.int64) & ((1 << (8 * rows.element_size())) - 1)
    inv_t = np.float32(1.0 / temperature)
    lines = [f"{KIND[rows.dtype]} {rows.shape[1]} {float(inv_t)!r} {top_p!r} " + " ".join(f"{b:x}" for b in r)
             for r in bits.tolist()]
    out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True).stdout.split("\n")
    result = []
    for line in out[: rows.shape[0]]:
        a_bits, i_star, kept, total = line.split()
        a_star = _from_bits(int(a_bits, 16), rows.dtype)
        result.append((a_star, int(i_star), float(kept), float(total)))
    return result


def cpu_nucleus(rows: torch.Tensor, temperature: float, top_p: float, delta: float = 2.0):
    """(a_star, i_star, log Z_t) per row from the CPU kernel's generator_loss statistics."""
    u = torch.zeros(rows.shape, dtype=rows.dtype)
    _, stats = torch.ops.dmmd.generator_loss_forward(u, rows, u, temperature, top_p, delta)
    return [(float(s[A_STAR]), int(s[I_STAR]), float(s[LOG_ZT])) for s in stats]


def _rows(kind: str, dtype, gen):
    if kind == "random":
        return (torch.randn(24, 1000, generator=gen) * 3).to(dtype)
    if kind == "ties":  # few distinct values: the threshold usually sits inside a run of ties
        return (torch.randint(-6, 3, (24, 777), generator=gen).float() * 0.5).to(dtype)
    if kind == "signed_zero":  # -0.0 and +0.0 are one value: ties by index, never by sign
        x = torch.zeros(16, 64)
        x[:, ::2] = -0.0
        x[:, 5] = 1.0
        return x.to(dtype)
    if kind == "minus_inf":
        x = torch.randn(16, 333, generator=gen) * 2
        x[torch.rand(16, 333, generator=gen) < 0.4] = -math.inf
        return x.to(dtype)
    if kind == "one_class":
        return torch.randn(8, 1, generator=gen).to(dtype)
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", list(KIND))
@pytest.mark.parametrize("kind", ["random", "ties", "signed_zero", "minus_inf", "one_class"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.3), (1.3, 0.999), (1.0, 1e-6)])
def test_radix_nucleus_matches_the_cpu_kernel(nucleus_program, dtype, kind, temperature, top_p, gen):
    rows = _rows(kind, dtype, gen)
    got = radix_nucleus(nucleus_program, rows, temperature, top_p)
    want = cpu_nucleus(rows, temperature, top_p)
    for r, ((a_g, i_g, kept, total), (a_w, i_w, log_zt)) in enumerate(zip(got, want, strict=True)):
        assert (a_g, i_g) == (a_w, i_w), f"row {r}: radix (a*={a_g}, i*={i_g}) vs CPU (a*={a_w}, i*={i_w})"
        log_z = math.log(kept + math.exp(-2.0) * max(total - kept, 0.0))
        assert log_z == pytest.approx(log_zt, abs=2e-5), f"row {r}"


def test_radix_nucleus_keeps_the_nucleus_rule(nucleus_program, gen):
    """Independently of the CPU kernel: the kept set is the shortest prefix of the classes ranked
    by logit (ties by lower index) whose mass reaches top_p, computed here in float64."""
    rows = (torch.randn(40, 500, generator=gen) * 2).to(torch.bfloat16)
    rows[:20] = rows[:20].mul(2).round().div(2)  # many ties
    for top_p in (0.5, 0.95):
        got = radix_nucleus(nucleus_program, rows, 1.0, top_p)
        for r, (a_star, i_star, _, _) in enumerate(got):
            a = rows[r].double()
            order = sorted(range(a.numel()), key=lambda i: (-float(a[i]), i))
            p = torch.softmax(a, 0)[order]
            before = torch.cumsum(p, 0) - p
            kept = {order[k] for k in range(len(order)) if before[k] < top_p}
            mine = {i for i in range(a.numel()) if a[i] > a_star or (a[i] == a_star and i <= i_star)}
            assert mine == kept, f"row {r} top_p {top_p}"


def test_order_keys_are_monotone(nucleus_program):
    """The row maximum of every dtype is the key maximum: a single-class nucleus picks it."""
    for dtype in KIND:
        row = torch.tensor([[-math.inf, -3.5, -0.0, 0.0, 1e-3, 2.0, 2.0, -1e4]], dtype=dtype)
        ((a_star, i_star, _, _),) = radix_nucleus(nucleus_program, row, 1.0, 1e-6)
        assert (a_star, i_star) == (2.0, 5)
