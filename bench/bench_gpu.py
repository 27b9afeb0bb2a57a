"""GPU benchmarks (skipped without a GPU): bf16 rows at N in {4096, 32768} x V in {32768, 50257,
131072}, eager PyTorch (bench/baselines.py), torch.compile of it, and dmmd_ops, each timed with
the GPU synchronised. Every result records its achieved bandwidth from the minimal bytes (each
input read once, each output written once, per op; fwd+bwd counts the forward's reads plus the
backward's reads and gradient write) and its share of this card's device-to-device copy
bandwidth, measured in the same run. A baseline that runs out of memory is recorded as skipped.
The nucleus ops also run as `dmmd_unstaged`: the same ops with DMMD_ROW_STAGING=0, their rows
read from global memory pass after pass instead of staged in shared memory once (the kernels
before the staging), side by side with the staged ones. DMMD_BENCH_QUICK=1 keeps the smallest
size only. `python bench/report.py --gpu run.json` turns
the JSON into the markdown table; with DMMD_BENCH_GPU_LOG=path each result is also appended to a
JSON-lines file as soon as it is measured (what scripts/device_check.sh reads, so that a run cut
short by its time limit keeps what it measured)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import dmmd_ops
from bench import baselines
from bench.conftest import QUICK
from dmmd_ops.testing import unstaged_rows

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = [(4096, 32768)] if QUICK else [(n, v) for n in (4096, 32768) for v in (32768, 50257, 131072)]
ONLY = os.environ.get("DMMD_BENCH_GPU_SIZES")  # e.g. "4096x50257,32768x50257"
if ONLY:
    SIZES = [tuple(int(x) for x in s.split("x")) for s in ONLY.split(",")]
ALPHA_S, ALPHA_T = 1.0, 0.0  # every masked token is revealed: every row draws
BF16 = 2  # bytes per element


def _compile(fn):
    # One compilation for every size (dynamic shapes) keeps the run short.
    return torch.compile(fn, dynamic=True)


_gen_compiled = _compile(baselines.generator_loss)
_denoise_compiled = _compile(baselines.denoise_step)
_teacher_compiled = _compile(baselines.teacher_logprobs)
_sample_compiled = _compile(baselines.sample_categorical)


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 4 GiB buffer."""
    src = torch.empty(2**31, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**32 / best / 1e9


def _logits(n, v, count, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, v, generator=gen, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(count)]


def _unstaged(fn):
    """``fn`` with the rows not staged in shared memory."""
    def run():
        with unstaged_rows():
            return fn()
    return run


def _run(benchmark, fn, impl, min_bytes, copy_gbps):
    """Warm-up (compiles), then timed rounds with the GPU synchronised; records GB/s."""
    if impl == "dmmd_unstaged":
        fn = _unstaged(fn)
    if impl.startswith("dmmd") or impl == "fused":
        assert dmmd_ops.has_kernel("generator_loss_forward", "cuda"), "the extension has no CUDA kernels"

    def timed():
        fn()
        torch.cuda.synchronize()

    try:
        timed()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of GPU memory")
    benchmark.pedantic(timed, rounds=5 if impl.startswith("dmmd") else 3, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    if min_bytes:  # a bandwidth-bound op: its achieved GB/s
        benchmark.extra_info.update(min_bytes=min_bytes, gbps=min_bytes / seconds / 1e9, copy_gbps=copy_gbps,
                                    share_of_copy=min_bytes / seconds / 1e9 / copy_gbps)
    log = os.environ.get("DMMD_BENCH_GPU_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"group": benchmark.group, "impl": impl, "median": seconds,
                                "extra_info": dict(benchmark.extra_info), "torch": torch.__version__}) + "\n")
    torch.cuda.empty_cache()


IMPLS = ["eager", "compile", "dmmd"]
NUCLEUS_IMPLS = [*IMPLS, "dmmd_unstaged"]  # ops that stage their rows in shared memory


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,v", SIZES, ids=lambda x: str(x))
def test_gpu_generator_loss_fwd_bwd(benchmark, copy_gbps, n, v, impl):
    benchmark.group = f"generator_loss fwd+bwd N={n} V={v} bf16"
    u, a, b = _logits(n, v, 3)
    u.requires_grad_(True)
    loss = {"eager": baselines.generator_loss, "compile": _gen_compiled,
            "dmmd": lambda u, a, b: dmmd_ops.generator_loss(u, a, b)}[impl]

    def step():
        u.grad = None
        loss(u, a, b).backward()

    _run(benchmark, step, impl, 7 * n * v * BF16, copy_gbps)


@pytest.mark.parametrize("impl", NUCLEUS_IMPLS)
@pytest.mark.parametrize("n,v", SIZES, ids=lambda x: str(x))
def test_gpu_generator_loss_top_p_fwd_bwd(benchmark, copy_gbps, n, v, impl):
    """The paper's text setting: the teacher under a top-p 0.85 nucleus (the target: at most 1.3x
    the top-p 1 time of the group above)."""
    benchmark.group = f"generator_loss fwd+bwd top_p=0.85 N={n} V={v} bf16"
    u, a, b = _logits(n, v, 3)
    u.requires_grad_(True)
    loss = {"eager": lambda u, a, b: baselines.generator_loss(u, a, b, top_p=0.85),
            "compile": lambda u, a, b: _gen_compiled(u, a, b, top_p=0.85)}.get(
        impl, lambda u, a, b: dmmd_ops.generator_loss(u, a, b, top_p=0.85))

    def step():
        u.grad = None
        loss(u, a, b).backward()

    _run(benchmark, step, impl, 7 * n * v * BF16, copy_gbps)


@pytest.mark.parametrize("impl", NUCLEUS_IMPLS)
@pytest.mark.parametrize("n,v", SIZES, ids=lambda x: str(x))
def test_gpu_denoise_step_top_p(benchmark, copy_gbps, n, v, impl):
    benchmark.group = f"denoise_step masked top_p=0.9 N={n} V={v} bf16"
    (x,) = _logits(n, v, 1)
    mask_id = v - 1
    z = torch.full((n,), mask_id, device="cuda")  # every token masked: every row draws
    fn = {
        "eager": lambda: baselines.denoise_step(x, z, ALPHA_S, ALPHA_T, "masked", mask_id, 1.0, 0.9),
        "compile": lambda: _denoise_compiled(x, z, ALPHA_S, ALPHA_T, "masked", mask_id, 1.0, 0.9),
    }.get(impl, lambda: dmmd_ops.denoise_step(x, z, ALPHA_S, ALPHA_T, process="masked", mask_id=mask_id,
                                              top_p=0.9, seed=0))
    _run(benchmark, fn, impl, n * v * BF16, copy_gbps)


@pytest.mark.parametrize("impl", NUCLEUS_IMPLS)
@pytest.mark.parametrize("n,v", SIZES, ids=lambda x: str(x))
def test_gpu_teacher_logprobs_top_p(benchmark, copy_gbps, n, v, impl):
    benchmark.group = f"teacher_logprobs top_p=0.9 N={n} V={v} bf16"
    (a,) = _logits(n, v, 1)
    fn = {"eager": lambda: baselines.teacher_logprobs(a, 1.0, 0.9, 2.0),
          "compile": lambda: _teacher_compiled(a, 1.0, 0.9, 2.0)}.get(
        impl, lambda: dmmd_ops.teacher_logprobs(a, top_p=0.9))
    _run(benchmark, fn, impl, n * v * (BF16 + 4), copy_gbps)


@pytest.mark.parametrize("impl", NUCLEUS_IMPLS)
@pytest.mark.parametrize("n,v", SIZES, ids=lambda x: str(x))
def test_gpu_sample_categorical(benchmark, copy_gbps, n, v, impl):
    benchmark.group = f"sample_categorical top_p=1 N={n} V={v} bf16"
    (x,) = _logits(n, v, 1)
    fn = {"eager": lambda: baselines.sample_categorical(x),
          "compile": lambda: _sample_compiled(x)}.get(impl, lambda: dmmd_ops.sample_categorical(x, seed=0))
    _run(benchmark, fn, impl, n * v * BF16, copy_gbps)


# The fused linear losses at the GPU shape: rows = 32768, d = 4096, V = 128256, bf16.
LINEAR = (2048, 1024, 32768) if QUICK else (32768, 4096, 128256)


def _linear_models(rows, d, v, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    models = []
    for _ in range(3):
        h = torch.randn(rows, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(v, d, generator=gen, device="cuda") / d ** 0.5 * 2).to(torch.bfloat16)
        models.append((h, w))
    for t in models[0]:
        t.requires_grad_(True)
    return models


def _liger_step():
    """One fused linear cross-entropy (Liger) on the student's h and w, where it is installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pytest.skip("liger_kernel is not installed")
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda models, target: loss(models[0][1], models[0][0], target).backward()


@pytest.mark.parametrize("impl", ["unfused", "fused", "liger_ce"])
def test_gpu_linear_generator_loss_fwd_bwd(benchmark, copy_gbps, impl):
    """Time and peak memory (above the inputs) of eq. 11 on h @ w.T: whole logits then the op,
    the fused op, and, for scale, one fused linear cross-entropy (Liger) of the student alone."""
    rows, d, v = LINEAR
    benchmark.group = f"linear_generator_loss fwd+bwd rows={rows} d={d} V={v} bf16"
    models = _linear_models(rows, d, v)
    target = torch.randint(0, v, (rows,), device="cuda")
    (hs, ws), (ht, wt), (ha, wa) = models

    def unfused(models, target):
        u = hs @ ws.T
        with torch.no_grad():
            a, b = ht @ wt.T, ha @ wa.T
        dmmd_ops.generator_loss(u, a, b).backward()

    def fused(models, target):
        dmmd_ops.linear_generator_loss(hs, ws, ht, wt, ha, wa).backward()

    fn = {"unfused": lambda: unfused, "fused": lambda: fused, "liger_ce": _liger_step}[impl]()

    def step():
        hs.grad = ws.grad = None
        fn(models, target)

    torch.cuda.synchronize()
    hs.grad = ws.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of GPU memory")
    benchmark.extra_info["peak_step_bytes"] = torch.cuda.max_memory_allocated() - base
    _run(benchmark, step, impl, 0, copy_gbps)
