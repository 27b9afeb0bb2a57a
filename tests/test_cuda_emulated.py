"""The CUDA kernels' own code (csrc/cuda/*_kernels.cuh) run on the host through a small CUDA
emulation (tests/csrc/cuda_emulation.h: a block's threads are fibers, warp shuffles and
__syncthreads are barriers, a divergent barrier is an error), against the float64 reference and
the CPU kernels: values, gradients, the radix-selection nucleus, and the draws for the same
(seed, offset); every emulated call runs under several thread schedules and must give
bit-identical results under all of them (:class:`AllSchedules`), and under every one the race
detector watches each shared-memory and global-output access (a race fails the call, named). Most tests use 64-thread
blocks (fast to emulate); a few the 256 threads the GPU build uses. This is how CI checks the
device code without a GPU; tests/test_cuda.py checks it on one."""
from __future__ import annotations

import glob
import os
import re
import shutil

import pytest
import torch

import dmmd_ops
from dmmd_ops import reference
from dmmd_ops.testing import grad_tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not dmmd_ops.has_kernel("generator_loss_forward", "cpu"),
                                reason="the extension has no CPU kernels")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GEN_I_STAR, AUX_I_STAR = 7, 5


def _build(threads: int):
    """Compiles tests/csrc/emulated_ops.cpp for `threads`-thread blocks; returns torch.ops.dmmd_emu<threads>.
    The kernels come from csrc/, or from the copy DMMD_EMU_CSRC names (the barrier-mutation
    study, scripts/barrier_mutations.py, builds one per mutant, beside it)."""
    from torch.utils.cpp_extension import load

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    csrc = os.environ.get("DMMD_EMU_CSRC") or os.path.join(ROOT, "csrc")
    build = os.path.join(os.path.dirname(os.path.abspath(csrc)), "build", f"cuda-emulation-{threads}")
    os.makedirs(build, exist_ok=True)
    name = f"dmmd_emu{threads}"
    load(name=f"dmmd_cuda_emulated{threads}", sources=[os.path.join(ROOT, "tests", "csrc", "emulated_ops.cpp")],
         extra_include_paths=[os.path.join(csrc, "include"), csrc, os.path.join(ROOT, "tests", "csrc")],
         # Hidden symbols: the builds for different block sizes share names (Scratch's
         # constructor, the kernels' static shared memory) but not layouts, and load side by side.
         extra_cflags=["-O2", "-ffp-contract=off", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                       f"-DDMMD_CUDA_THREADS={threads}", f"-DDMMD_EMU_LIB={name}"],
         is_python_module=False, build_directory=build)
    assert glob.glob(os.path.join(build, "*.so"))
    return getattr(torch.ops, name)


# Thread orders between barriers (tests/csrc/cuda_emulation.h): index order, reverse, and a seeded
# permutation drawn afresh for every barrier interval.
SCHEDULES = (0, 1, 7)


class AllSchedules:
    """The emulated ops, each call run once per schedule in SCHEDULES; the results must be
    bit-identical (a kernel that is right in one thread order only has a race), and the first
    is returned."""

    def __init__(self, ops, schedules=SCHEDULES):
        self.ops, self.schedules = ops, schedules

    def two_schedules(self) -> AllSchedules:
        """Index order and a random order only: for the draw tests, the slowest here."""
        return AllSchedules(self.ops, (SCHEDULES[0], SCHEDULES[-1]))

    def __getattr__(self, name):
        op = getattr(self.ops, name)
        if name in ("set_schedule", "last_vector_accesses", "set_race_detection", "set_exchange_buffers",
                    "last_stage_bytes", "set_dynamic_shared_limit"):
            return op

        def run(*args):
            outs = []
            try:
                for s in self.schedules:
                    self.ops.set_schedule(s)
                    outs.append(op(*args))
            finally:
                self.ops.set_schedule(0)
            for s, out in zip(self.schedules[1:], outs[1:], strict=True):
                for x, y in zip(*(o if isinstance(o, tuple) else (o,) for o in (outs[0], out)), strict=True):
                    torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True,
                                               msg=lambda m, s=s: f"{name} under schedule {s}: {m}")
            return outs[0]
        return run


@pytest.fixture(scope="module")
def emu():
    return AllSchedules(_build(64))


@pytest.fixture(scope="module")
def emu256():
    return AllSchedules(_build(256))


def test_an_order_dependent_kernel_is_caught_across_schedules(emu):
    """A racy kernel (every thread writes one shared slot with no barrier between the writes;
    thread 0 reads it after one) answers whichever thread ran last: thread 63 in index order,
    0 in reverse. In index order alone it would pass; across schedules it fails, named (the
    race detector, off here, would stop it first)."""
    answers = []
    old = emu.ops.set_race_detection(False)
    try:
        for s in (0, 1):
            emu.set_schedule(s)
            answers.append(int(emu.ops.last_writer()))
        emu.set_schedule(0)
        assert answers == [63, 0]
        with pytest.raises(AssertionError, match="last_writer under schedule 1"):
            emu.last_writer()
    finally:
        emu.ops.set_race_detection(old)


# hazard_kernel's mutations (tests/csrc/emulated_ops.cpp) and what the race detector says (a read
# and a write are reported in the order the schedule ran them).
READ_WRITE = (r"(read by thread \d+ and written|written by thread \d+ and read) by thread \d+"
              r" with no __syncthreads between")
HAZARDS = {
    1: r"cells\[0\] in block 0: written by thread \d+ and by thread \d+ with no __syncthreads between",
    2: r"cells\[\d+\] in block 0: " + READ_WRITE,
    3: r"cells\[\d+\] in block 0: " + READ_WRITE,
    4: r"cells\[\d+\] in block 0: " + READ_WRITE,
    5: r"global result written by block 0 thread \d+ and by block 0 thread \d+ in one launch",
}


def test_the_race_detector_passes_the_correct_kernel(emu):
    want = torch.tensor([10 * ((t + 1) % 64) for t in range(64)])
    assert torch.equal(emu.hazard(0), want)


@pytest.mark.parametrize("hazard", sorted(HAZARDS))
@pytest.mark.parametrize("schedule", (0, 1, 7))
def test_the_race_detector_names_kernel_variable_and_threads(emu, hazard, schedule):
    """Write-write, write-read, read-write, a shuffle standing in for __syncthreads (the
    emulation's shuffle orders the block, a GPU's nothing) and two threads writing one global
    output: each is an error naming the kernel, the variable and two threads, whatever order the
    threads run in; hazard 4 gives the right answer in every schedule here, so only the detector
    can see it."""
    emu.set_schedule(schedule)
    try:
        with pytest.raises(RuntimeError, match="race in hazard_kernel: " + HAZARDS[hazard]) as info:
            emu.ops.hazard(hazard)
    finally:
        emu.set_schedule(0)
    threads = re.findall(r"thread (\d+)", str(info.value))
    assert len(threads) == 2 and threads[0] != threads[1]


def test_every_shared_declaration_is_watched():
    """The race detector sees shared memory only through DMMD_SHARED_ARRAY / DMMD_SHARED_SCALAR
    (or a Scratch, made of them only): a plain __shared__ array in a kernel would escape it. The
    one exception is the dynamic shared memory of a staged row (row_stage, which the emulation
    replaces by its own buffer), declared once and reached only through DMMD_ROW_STAGE()."""
    found, dynamic = 0, []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu*"))):
        for n, line in enumerate(open(path), 1):
            if "dmmd_row_stage" in line:
                dynamic.append((os.path.basename(path), line.strip()))
            if "__shared__" in line and not line.lstrip().startswith("//"):
                found += 1
                if line.strip().startswith("extern __shared__ uint4 dmmd_row_stage[];"):
                    continue
                assert re.search(r"__shared__ (DMMD_SHARED_(ARRAY|SCALAR)\(|Scratch \w+;)", line), \
                    f"{path}:{n}: {line.strip()}"
    assert found >= 9
    assert [f for f, _ in dynamic] == ["row_block.cuh", "row_block.cuh"], dynamic  # declared, returned
    text = open(os.path.join(ROOT, "csrc", "cuda", "row_block.cuh")).read()
    members = text.split("struct Scratch {")[1].split("};")[0].strip().splitlines()
    assert len(members) == 6 and all(m.strip().startswith("DMMD_SHARED_") for m in members), members


def test_the_race_detector_sees_the_emulation_s_own_shuffle_buffers(emu, gen):
    """With one exchange buffer instead of two, a shuffle's write can overtake a neighbour's read
    of the previous shuffle: the detector names the buffer (the real kernels, with two, pass)."""
    a = torch.randn(3, 100, generator=gen)
    old = emu.ops.set_exchange_buffers(1)
    try:
        with pytest.raises(RuntimeError, match=r"race in teacher_logprobs_staged: the shuffle exchange buffer"
                                               r"\[\d+\] in block 0: .* with no barrier between"):
            emu.ops.teacher_logprobs(a, 1.0, 0.9, 2.0)
    finally:
        emu.ops.set_exchange_buffers(old)
    emu.teacher_logprobs(a, 1.0, 0.9, 2.0)


def _make(shape, dtype, gen, layout="contiguous", scale=3.0):
    if layout == "contiguous":
        return (torch.randn(shape, generator=gen) * scale).to(dtype)
    # rows of stride 2V: a slice of wider rows
    return (torch.randn(shape[0], 2 * shape[1], generator=gen) * scale).to(dtype)[:, : shape[1]]


# (rows, V, layout): misaligned rows (odd V), strided rows, V = 1, one long row, a vector body
CASES = [(13, 50, "contiguous"), (5, 333, "row_stride"), (4, 1, "contiguous"), (1, 5001, "contiguous"),
         (3, 1030, "contiguous")]
SETTINGS = [(1.0, 1.0), (0.7, 0.9), (1.3, 0.3)]


@pytest.mark.parametrize("rows,v,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_teacher_logprobs(emu, rows, v, layout, dtype, temperature, top_p, gen):
    a = _make((rows, v), dtype, gen, layout)
    got = emu.teacher_logprobs(a, temperature, top_p, 2.0)
    want = reference.teacher_logprobs(a.double(), temperature=temperature, top_p=top_p, delta=2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got, torch.ops.dmmd.teacher_logprobs(a, temperature, top_p, 2.0), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("rows,v,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_generator_loss_forward_backward(emu, rows, v, layout, dtype, temperature, top_p, gen):
    u, a, b = (_make((rows, v), dtype, gen, layout) for _ in range(3))
    loss, stats = emu.generator_loss_forward(u, a, b, temperature, top_p, 1.5)
    cpu_loss, cpu_stats = torch.ops.dmmd.generator_loss_forward(u, a, b, temperature, top_p, 1.5)
    u64 = u.double().requires_grad_()
    want = reference.generator_loss(u64, a, b, temperature=temperature, top_p=top_p, delta=1.5, reduction="none")
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, cpu_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, cpu_stats, rtol=1e-5, atol=1e-5, equal_nan=True)
    g = torch.randn(rows, generator=gen)
    grad = emu.generator_loss_backward(g, u, a, b, stats, temperature, top_p, 1.5)
    (want * g).sum().backward()
    assert grad.dtype == dtype and grad.shape == (rows, v)
    torch.testing.assert_close(grad.double(), u64.grad, **grad_tol(dtype, u64.grad))


@pytest.mark.parametrize("rows,v,layout", CASES[:3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
@pytest.mark.parametrize("teacher,top_p", [(False, 1.0), (True, 1.0), (True, 0.8)])
def test_aux_loss_forward_backward(emu, rows, v, layout, dtype, target_kind, teacher, top_p, gen):
    b = _make((rows, v), dtype, gen, layout)
    a = _make((rows, v), dtype, gen, layout) if teacher else None
    if target_kind == "hard":
        target = torch.randint(0, v, (rows,), generator=gen)
    else:
        target = torch.softmax(torch.randn(rows, v, generator=gen) * 2, -1)
        target = target * (torch.rand(rows, v, generator=gen) < 0.5)
    loss, stats = emu.aux_loss_forward(b, target, a, 0.8, top_p, 2.0)
    cpu_loss, cpu_stats = torch.ops.dmmd.aux_loss_forward(b, target, a, 0.8, top_p, 2.0)
    b64 = b.double().requires_grad_()
    want = reference.aux_loss(b64, target, a, temperature=0.8, top_p=top_p, delta=2.0, reduction="none")
    torch.testing.assert_close(loss.double(), want.detach().double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, cpu_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, cpu_stats, rtol=1e-5, atol=1e-5, equal_nan=True)
    g = torch.randn(rows, generator=gen)
    grad = emu.aux_loss_backward(g, b, target, a, stats, 0.8, top_p, 2.0)
    (want * g).sum().backward()
    torch.testing.assert_close(grad.double(), b64.grad, **grad_tol(dtype, b64.grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nucleus_with_ties_signed_zeros_and_minus_inf(emu, dtype, gen):
    """The radix-selection nucleus keeps exactly the CPU kernel's classes (a*, i* identical)."""
    a = torch.randint(-6, 3, (12, 301), generator=gen).float() * 0.5
    a[torch.rand(a.shape, generator=gen) < 0.2] = float("-inf")
    a[:, ::7] = -0.0
    a = a.to(dtype)
    u = torch.zeros_like(a)
    for top_p in (0.2, 0.6, 0.95):
        _, got = emu.generator_loss_forward(u, a, u, 0.9, top_p, 2.0)
        _, want = torch.ops.dmmd.generator_loss_forward(u, a, u, 0.9, top_p, 2.0)
        assert torch.equal(got[:, 6:8], want[:, 6:8]), top_p
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_use_vector_loads_after_the_prologue(emu, dtype, gen):
    """Rows that start off a 16-byte boundary still take 16-byte loads after their scalar
    prologue: one row's worth (V / elements per vector, less the prologue and tail) or more."""
    rows, v = 13, 50
    per_vector = 16 // torch.empty((), dtype=dtype).element_size()
    a = _make((rows, v), dtype, gen)
    emu.teacher_logprobs(a, 1.0, 1.0, 2.0)
    assert emu.last_vector_accesses() >= 2 * rows * (v // per_vector - 1)  # reads of two passes


@pytest.mark.parametrize("dtype", DTYPES)
def test_streams_with_different_alignment(emu, dtype, gen):
    """u, a and b whose rows sit at different offsets modulo 16 bytes: scalar loads, same answers."""
    rows, v = 13, 50
    u = _make((rows, v), dtype, gen)
    a = _make((rows, v + 1), dtype, gen)[:, 1:]
    b = _make((rows, v + 3), dtype, gen)[:, :v]
    loss, stats = emu.generator_loss_forward(u, a, b, 0.9, 0.8, 2.0)
    want, want_stats = torch.ops.dmmd.generator_loss_forward(u, a.contiguous(), b.contiguous(), 0.9, 0.8, 2.0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, want_stats, rtol=1e-5, atol=1e-5)


def _staged_calls(emu, dtype, gen):
    """Each op that may stage its rows, on rows at shifting offsets within 16 bytes: (name, what
    it returns, whether it stages)."""
    rows, v = 7, 333
    x, a, b = (_make((rows, v), dtype, gen, "row_stride") for _ in range(3))
    z = torch.full((rows,), v - 1)
    one, zero = torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    target = torch.randint(0, v, (rows,), generator=gen)
    return [
        ("sample_categorical", lambda: emu.sample_categorical(x, 0.9, 1.0, 5, 0), True),
        ("sample_categorical top-p", lambda: emu.sample_categorical(x, 0.9, 0.8, 5, 0), True),
        ("denoise_step masked top-p", lambda: emu.denoise_step(x, z, one, zero, "masked", v - 1, 1.0, 0.8, 5, 0), True),
        ("teacher_logprobs top-p", lambda: emu.teacher_logprobs(a, 0.9, 0.8, 2.0), True),
        ("teacher_logprobs", lambda: emu.teacher_logprobs(a, 0.9, 1.0, 2.0), False),
        ("generator_loss_forward top-p", lambda: emu.generator_loss_forward(x, a, b, 0.9, 0.8, 2.0), True),
        ("generator_loss_forward", lambda: emu.generator_loss_forward(x, a, b, 0.9, 1.0, 2.0), False),
        ("aux_loss_forward top-p", lambda: emu.aux_loss_forward(b, target, a, 0.9, 0.8, 2.0), True),
        ("aux_loss_forward, no teacher", lambda: emu.aux_loss_forward(b, target, None, 0.9, 0.8, 2.0), False),
    ], v


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_are_staged_in_shared_memory(emu, dtype, gen):
    """The draws, and the forwards with a nucleus, copy each row into dynamic shared memory once
    (the row's bytes and 16 for its offset within 16 bytes) and run their passes there; the
    forwards without a nucleus read their rows once or twice and do not."""
    calls, v = _staged_calls(emu, dtype, gen)
    size = torch.empty((), dtype=dtype).element_size()
    for name, call, stages in calls:
        call()
        assert emu.last_stage_bytes() == (v * size + 16 if stages else 0), name


@pytest.mark.parametrize("unstaged_by", ["DMMD_ROW_STAGING=0", "a row too big for the block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_and_unstaged_rows_give_identical_results(emu, dtype, unstaged_by, gen, monkeypatch):
    """A row staged in shared memory or read from global memory pass after pass: bit-identical
    draws, log-probs, losses and statistics. Staging is turned off by the environment (what the
    GPU benchmarks use to time both), or left out when the row does not fit the block's shared
    memory (here an emulated GPU with less of it)."""
    calls, v = _staged_calls(emu, dtype, gen)
    staged = [call() for _, call, _ in calls]
    size = torch.empty((), dtype=dtype).element_size()
    old = None
    if unstaged_by.startswith("DMMD"):
        monkeypatch.setenv("DMMD_ROW_STAGING", "0")
    else:
        old = emu.set_dynamic_shared_limit(v * size + 15)  # one byte short of the staged row
    try:
        for (name, call, _), want in zip(calls, staged, strict=True):
            got = call()
            assert emu.last_stage_bytes() == 0, name
            for x, y in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want)), strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        if old is not None:
            emu.set_dynamic_shared_limit(old)


@pytest.mark.parametrize("backend", ["emulated cuda", "cpu"])
def test_bad_rows_are_flagged_alike(emu, backend, gen):
    """Kernels do not raise (CUDA ones cannot; the CPU ones flag alike, so dmmd_ops has one error
    path): NaN loss and i* = -1 for a loss row, -1 for a draw or a bad id, NaN log-probs."""
    ops = emu if backend == "emulated cuda" else torch.ops.dmmd
    u, a, b = (torch.randn(4, 40, generator=gen) for _ in range(3))
    a[1, 3] = float("nan")
    b[2, 0] = float("inf")
    u[3] = float("-inf")
    loss, stats = ops.generator_loss_forward(u, a, b, 1.0, 0.9, 2.0)
    assert torch.isnan(loss[1:]).all() and not torch.isnan(loss[0])
    assert (stats[1:, GEN_I_STAR] == -1).all() and stats[0, GEN_I_STAR] >= 0
    soft = torch.softmax(torch.randn(4, 40, generator=gen), -1)
    soft[0, 5] = -0.1
    loss, stats = ops.aux_loss_forward(torch.randn(4, 40, generator=gen), soft, None, 1.0, 1.0, 2.0)
    assert torch.isnan(loss[0]) and stats[0, AUX_I_STAR] == -1 and not torch.isnan(loss[1:]).any()
    loss, stats = ops.aux_loss_forward(b, torch.tensor([0, 40, 1, 2]), None, 1.0, 1.0, 2.0)
    assert torch.isnan(loss[[1, 2]]).all() and (stats[[1, 2], AUX_I_STAR] == -1).all()
    draws = ops.sample_categorical(a, 1.0, 0.9, 0, 0)
    assert draws[1] == -1 and (draws[[0, 2, 3]] >= 0).all()
    out = ops.teacher_logprobs(a, 1.0, 1.0, 2.0)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    # NaNs filling a whole tile: that thread's online softmax never sees them (its maximum stays
    # -inf), so only the block's vote (__syncthreads_or) flags the row; found missing by the
    # barrier-deletion study (scripts/barrier_mutations.py).
    nu, na, nb = (torch.randn(3, 40, generator=gen) for _ in range(3))
    nu[0, 4:8] = nb[1, 4:8] = na[2, 4:8] = float("nan")
    loss, stats = ops.generator_loss_forward(nu, na, nb, 1.0, 1.0, 2.0)
    assert torch.isnan(loss).all() and (stats[:, GEN_I_STAR] == -1).all()
    out = ops.teacher_logprobs(na, 1.0, 1.0, 2.0)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[:2]).any()
    z = torch.tensor([0, 40, 2, 3])
    alphas = torch.tensor([0.5, 0.5, 0.2, 0.5], dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64)
    out = ops.denoise_step(u[:3].repeat(2, 1)[:4], z, *alphas, "uniform", -1, 1.0, 1.0, 0, 0)
    assert out[1] == -1 and out[2] == -1 and out[0] >= 0  # id out of range; alpha_s < alpha_t
    out = ops.posterior_sample(z, torch.tensor([1, 1, 1, 1]), *alphas, "uniform", -1, 40, 0, 0)
    assert out.tolist()[1:3] == [-1, -1] and out[0] >= 0 and out[3] >= 0


def _agree(x, y) -> float:
    return float((x == y).double().mean())


# Rows per draw test: a row with top-p emulates a radix selection under two schedules (~0.1 s a
# row on a 2-core machine); 250 rows still see every draw path, and at most one draw may differ
# (a uniform that lands within float error of a boundary of the CDF).
DRAW_ROWS = 250


# every dtype and every setting, not every pair
@pytest.mark.parametrize("dtype,temperature,top_p", [(DTYPES[0], *SETTINGS[1]), (DTYPES[1], *SETTINGS[2]),
                                                     (DTYPES[2], *SETTINGS[0])])
def test_sample_categorical_same_draws_as_cpu(emu, dtype, temperature, top_p, gen):
    x = (torch.randn(DRAW_ROWS, 37, generator=gen) * 2).to(dtype)
    got = emu.two_schedules().sample_categorical(x, temperature, top_p, 2024, 2**40 + 3)
    want = torch.ops.dmmd.sample_categorical(x, temperature, top_p, 2024, 2**40 + 3)
    assert int((got != want).sum()) <= 1


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_denoise_step_same_draws_as_cpu(emu, process, top_p, gen):
    rows, v = DRAW_ROWS, 61
    logits = (torch.randn(rows, 2 * v, generator=gen) * 2).to(torch.bfloat16)[:, :v]
    masked = process == "masked"
    mask_id = v - 1 if masked else -1
    if masked:
        logits[:, mask_id] = 10.0  # never drawn
    z = torch.randint(0, v, (rows,), generator=gen)
    if masked:
        z[: rows // 2] = mask_id
    a_s = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    a_t = a_s * torch.rand(rows, generator=gen, dtype=torch.float64)
    got = emu.two_schedules().denoise_step(logits, z, a_s, a_t, process, mask_id, 0.9, top_p, 9, 3)
    want = torch.ops.dmmd.denoise_step(logits, z, a_s, a_t, process, mask_id, 0.9, top_p, 9, 3)
    assert int((got != want).sum()) <= 1
    if masked:
        assert not bool((got[z == mask_id] == mask_id).all()) and bool((got[z != mask_id] == z[z != mask_id]).all())


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("x_kind", ["hard", "soft"])
def test_posterior_sample_same_draws_as_cpu(emu, process, x_kind, gen):
    rows, v = 1000, 61
    masked = process == "masked"
    z = torch.randint(0, v, (rows,), generator=gen)
    if masked:
        z[: rows // 2] = 0
    x = torch.randint(1, v, (rows,), generator=gen) if x_kind == "hard" else \
        torch.softmax(torch.randn(rows, v, generator=gen) * 2, -1)
    a_s, a_t = torch.full((rows,), 0.8, dtype=torch.float64), torch.full((rows,), 0.3, dtype=torch.float64)
    mask_id = 0 if masked else -1
    got = emu.two_schedules().posterior_sample(z, x, a_s, a_t, process, mask_id, v, 77, 2**33)
    want = torch.ops.dmmd.posterior_sample(z, x, a_s, a_t, process, mask_id, v, 77, 2**33)
    assert _agree(got, want) >= (1.0 if x_kind == "hard" else 0.999)


@pytest.mark.parametrize("t,d_in,d_out", [(3, 20, 30), (11, 6, 5)])
def test_grad_gram_fused_kernel(emu, t, d_in, d_out, gen):
    a = torch.randn(5, t, d_in, generator=gen)
    g = torch.randn(5, t, d_out, generator=gen)
    got = emu.grad_gram(a, g)
    want = reference.grad_gram(a, g)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(got, got.T)


def test_the_gpu_block_size(emu256, gen):
    """The 256-thread blocks of the GPU build: one row long enough for several vector tiles, a
    misaligned bf16 batch with top-p, draws, and the 16 x 16 Gram tiles."""
    a = (torch.randn(1, 5001, generator=gen) * 3).to(torch.bfloat16)
    torch.testing.assert_close(emu256.teacher_logprobs(a, 0.7, 0.9, 2.0),
                               torch.ops.dmmd.teacher_logprobs(a, 0.7, 0.9, 2.0), rtol=1e-5, atol=5e-5)
    u, a, b = ((torch.randn(5, 50, generator=gen) * 3).to(torch.bfloat16) for _ in range(3))
    loss, stats = emu256.generator_loss_forward(u, a, b, 0.8, 0.9, 1.5)
    cpu_loss, cpu_stats = torch.ops.dmmd.generator_loss_forward(u, a, b, 0.8, 0.9, 1.5)
    torch.testing.assert_close(loss, cpu_loss, rtol=1e-5, atol=1e-5)
    g = torch.randn(5, generator=gen)
    torch.testing.assert_close(emu256.generator_loss_backward(g, u, a, b, stats, 0.8, 0.9, 1.5).float(),
                               torch.ops.dmmd.generator_loss_backward(g, u, a, b, cpu_stats, 0.8, 0.9, 1.5).float(),
                               rtol=0, atol=2**-7)
    x = (torch.randn(20, 3000, generator=gen) * 2).to(torch.bfloat16)
    assert _agree(emu256.sample_categorical(x, 1.0, 0.9, 5, 1), torch.ops.dmmd.sample_categorical(x, 1.0, 0.9, 5, 1)) \
        >= 0.999
    ga, gg = torch.randn(3, 20, 7, generator=gen), torch.randn(3, 20, 9, generator=gen)
    want = reference.grad_gram(ga, gg)
    torch.testing.assert_close(emu256.grad_gram(ga, gg), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
