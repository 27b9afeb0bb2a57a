"""Shared fixtures: devices, dtype tolerances, and helpers for the statistical tests."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import dmmd_ops

HAS_CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `make test` runs the tests in TEST_WORKERS pytest-xdist workers, one per core: each worker gets
# one intra-op thread, or the workers' threads would outnumber the cores (the tests of thread
# counts set their own).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def nvcc_host_program(tmp_path_factory, name: str):
    """tests/csrc/<name>.cu built by nvcc as a host program over the shared headers (skips
    without nvcc): CI's check of the device toolchain's view of the shared math, no GPU needed."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    exe = tmp_path_factory.mktemp(name) / name
    subprocess.run([nvcc, "-O2", "-x", "cu", "-I", os.path.join(ROOT, "csrc", "include"),
                    os.path.join(ROOT, "tests", "csrc", f"{name}.cu"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    return exe

# dtype -> (rtol, atol) for losses / log-probs computed from logits of that dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),  # same float32 math on the bf16 values the reference sees
    torch.float16: (1e-5, 1e-5),
}


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A seeded torch.Generator for building random test inputs."""
    return torch.Generator().manual_seed(1234)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of observed ``counts`` against exact ``probs``.

    Classes with tiny expected counts are pooled into one bin so the test stays valid.
    Classes with probability zero must never be observed (asserted here).
    """
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    assert counts[probs == 0].sum() == 0, "a class of probability zero was drawn"
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = list(counts[big])
    exp = list(expected[big])
    rest_exp = expected[~big & (probs > 0)].sum()
    if rest_exp > 0:
        obs.append(counts[~big].sum())
        exp.append(rest_exp)
    if len(obs) < 2:
        return 1.0
    obs_t = torch.tensor(obs, dtype=torch.float64)
    exp_t = torch.tensor(exp, dtype=torch.float64)
    exp_t = exp_t * (obs_t.sum() / exp_t.sum())
    stat = ((obs_t - exp_t) ** 2 / exp_t).sum()
    # P(chi2_{k-1} >= stat) = Q((k - 1) / 2, stat / 2), the regularised upper incomplete gamma
    # (torch, not scipy: the GPU check machine has no scipy).
    dof = torch.tensor((len(obs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def bincount(x: torch.Tensor, v: int) -> np.ndarray:
    return torch.bincount(x.reshape(-1).cpu(), minlength=v).numpy()


__all__ = ["HAS_CUDA", "TOLERANCES", "bincount", "chi2_pvalue", "dmmd_ops"]


class OnCuda:
    """The public ops with every tensor argument moved to the GPU and tensor results moved back,
    so that a CPU-written behavioural test holds the CUDA kernels to the same oracle."""

    def __getattr__(self, name):
        fn = getattr(dmmd_ops, name)

        def to_cuda(x):
            return x.cuda() if isinstance(x, torch.Tensor) else x

        def call(*args, **kwargs):
            out = fn(*map(to_cuda, args), **{k: to_cuda(v) for k, v in kwargs.items()})
            return out.cpu() if isinstance(out, torch.Tensor) else out

        return call


@pytest.fixture(params=["kernel", "reference", pytest.param("cuda", marks=pytest.mark.cuda)])
def ops(request):
    """The op implementation under test: the public ops (compiled CPU kernels), the float64
    reference, or the CUDA kernels, so each behavioural test holds all of them to one oracle."""
    if request.param == "reference":
        return dmmd_ops.reference
    if request.param == "cuda":
        if not dmmd_ops.has_kernel("generator_loss_forward", "cuda"):
            pytest.fail("a GPU is present but the extension has no CUDA kernels; build it with CUDA")
        return OnCuda()
    if not dmmd_ops.has_kernel("generator_loss_forward", "cpu"):
        pytest.fail("the extension has no CPU kernels; build it (make test does)")
    return dmmd_ops
