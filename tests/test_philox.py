"""Philox4x32-10 against the Random123 known-answer vectors: the reference, the CPU
kernel, the shared header compiled by nvcc (host side), and CUDA when present."""
from __future__ import annotations

import subprocess

import pytest
import torch

import dmmd_ops
from dmmd_ops import reference
from tests.conftest import nvcc_host_program

# (counter x4, key x2) -> output x4, from Random123's kat_vectors.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def kat_tensors(device="cpu"):
    counter = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64, device=device)
    key = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64, device=device)
    expected = torch.tensor([o for _, _, o in KAT], dtype=torch.int64, device=device)
    return counter, key, expected


def random_words(n, gen):
    counter = torch.randint(0, 2**32, (n, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (n, 2), generator=gen, dtype=torch.int64)
    return counter, key


def test_reference_known_answers():
    counter, key, expected = kat_tensors()
    assert torch.equal(reference.philox4x32(counter, key), expected)


def test_cpu_kernel_known_answers():
    assert dmmd_ops.has_kernel("philox4x32", "cpu"), "the CPU Philox kernel is not compiled"
    counter, key, expected = kat_tensors()
    assert torch.equal(torch.ops.dmmd.philox4x32(counter, key), expected)


def test_cpu_kernel_matches_reference(gen):
    counter, key = random_words(10_000, gen)
    assert torch.equal(torch.ops.dmmd.philox4x32(counter, key), reference.philox4x32(counter, key))


def test_public_op_validates():
    counter, key, _ = kat_tensors()
    with pytest.raises(ValueError, match="counter"):
        dmmd_ops.philox4x32(counter[:, :3], key)
    with pytest.raises(ValueError, match="key"):
        dmmd_ops.philox4x32(counter, key[:2])
    with pytest.raises(ValueError, match="counter"):
        dmmd_ops.philox4x32(counter + 2**32, key)
    with pytest.raises(ValueError, match="key"):
        dmmd_ops.philox4x32(counter, key.to(torch.int32))


def test_uniforms_are_53_bit_and_in_range():
    u0, u1 = reference.element_uniforms(seed=7, offset=3, n=100_000)
    for u in (u0, u1):
        assert u.dtype == torch.float64
        assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
        # 53-bit grid: u * 2^53 is an integer, and the low bits are used.
        scaled = u * 2.0**53
        assert torch.equal(scaled, torch.floor(scaled))
        assert bool(((scaled.to(torch.int64) & 0x7FF) != 0).any())
    assert abs(float(u0.mean()) - 0.5) < 0.005 and abs(float(u1.mean()) - 0.5) < 0.005
    # Different offsets and seeds give different streams.
    v0, _ = reference.element_uniforms(seed=7, offset=4, n=100)
    w0, _ = reference.element_uniforms(seed=8, offset=3, n=100)
    assert not torch.equal(v0, u0[:100]) and not torch.equal(w0, u0[:100])


def test_stream_layout_matches_header():
    """element_uniforms uses key=(seed lo, hi), counter=(index lo, hi, offset lo, hi), and
    takes u0 from words 0-1 and u1 from words 2-3 (53 bits each), as philox.h does."""
    seed, offset, idx = 0x0123456789ABCDEF, 0x0FEDCBA987654321, 2
    counter = torch.tensor([[idx, 0, offset & 0xFFFFFFFF, offset >> 32]])
    key = torch.tensor([[seed & 0xFFFFFFFF, seed >> 32]])
    w = torch.ops.dmmd.philox4x32(counter, key)[0].tolist()
    u0, u1 = reference.element_uniforms(seed, offset, 3)
    assert float(u0[idx]) == ((w[0] << 21) | (w[1] >> 11)) * 2.0**-53
    assert float(u1[idx]) == ((w[2] << 21) | (w[3] >> 11)) * 2.0**-53


@pytest.fixture(scope="module")
def nvcc_program(tmp_path_factory):
    return nvcc_host_program(tmp_path_factory, "philox_host")


def run_nvcc_philox(exe, counter, key):
    lines = "\n".join(" ".join(f"{v:x}" for v in (*c, *k)) for c, k in zip(counter.tolist(), key.tolist(), strict=True))
    out = subprocess.run([str(exe)], input=lines + "\n", capture_output=True, text=True, check=True).stdout
    return torch.tensor([[int(w, 16) for w in line.split()] for line in out.strip().splitlines()])


def test_nvcc_compiled_header_known_answers(nvcc_program):
    counter, key, expected = kat_tensors()
    assert torch.equal(run_nvcc_philox(nvcc_program, counter, key), expected)


def test_nvcc_compiled_header_matches_cpu(nvcc_program, gen):
    counter, key = random_words(2000, gen)
    assert torch.equal(run_nvcc_philox(nvcc_program, counter, key), torch.ops.dmmd.philox4x32(counter, key))


@pytest.mark.cuda
def test_cuda_kernel_known_answers_and_matches_cpu(gen):
    assert dmmd_ops.has_kernel("philox4x32", "cuda"), "a GPU is present but the CUDA kernel is not built"
    counter, key, expected = kat_tensors("cuda")
    assert torch.equal(torch.ops.dmmd.philox4x32(counter, key).cpu(), expected.cpu())
    counter, key = random_words(1_000_000, gen)
    cuda = torch.ops.dmmd.philox4x32(counter.cuda(), key.cuda()).cpu()
    assert torch.equal(cuda, torch.ops.dmmd.philox4x32(counter, key))
