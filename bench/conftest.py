"""Benchmark sizes and the shared timing rule. DMMD_BENCH_QUICK=1 (the README's quick run,
CI smoke runs) uses small shapes; the default uses the sizes the issues quote (N = 4096,
V in {32768, 50257})."""
from __future__ import annotations

import os

import torch

from dmmd_ops import testing

QUICK = os.environ.get("DMMD_BENCH_QUICK", "0") == "1"
ROW_SIZES = [(256, 8192)] if QUICK else [(4096, 32768), (4096, 50257)]
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
IMPLS = ["eager", "compile", "dmmd"]


def make_logits(n: int, v: int, dtype: torch.dtype, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` random ``[n, v]`` logits (std 2), as the tests make them (dmmd_ops.testing)."""
    gen = torch.Generator().manual_seed(seed)
    return [testing.make_logits((n, v), dtype, gen, scale=2.0) for _ in range(count)]


ROUNDS = 3


def run(benchmark, fn, impl: str) -> None:
    """The same rule for every implementation: one warm-up call (which compiles for
    torch.compile and faults in first-touch memory for everyone), then ``ROUNDS`` timed rounds."""
    fn()
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers were measured with: torch, threads, which kernels were compiled."""
    import dmmd_ops
    from dmmd_ops.info import OPS

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["dmmd_cpu_kernels"] = [op for op in OPS if dmmd_ops.has_kernel(op, "cpu")]
