"""Every bad-input class of docs/design.md §8 raises, and the message names the argument."""
from __future__ import annotations

import re

import pytest
import torch

import dmmd_ops


@pytest.fixture
def logits3(gen):
    return tuple(torch.randn(4, 10, generator=gen) for _ in range(3))


def raises(name, fn, *args, **kwargs):
    """``fn`` raises ``ValueError`` whose message names the argument ``name`` as a word (an
    identifier not inside a longer one: ``x`` does not match ``max``)."""
    with pytest.raises(ValueError, match=rf"(?<![\w.]){re.escape(name)}(?!\w)"):
        fn(*args, **kwargs)


def test_loss_shapes_dtypes_devices(logits3):
    u, a, b = logits3
    raises("teacher_logits", dmmd_ops.generator_loss, u, a[:, :9], b)
    raises("aux_logits", dmmd_ops.generator_loss, u, a, b[:3])
    raises("student_logits", dmmd_ops.generator_loss, u.long(), a, b)
    raises("teacher_logits", dmmd_ops.generator_loss, u, a.to(torch.int32), b)
    raises("aux_logits", dmmd_ops.generator_loss, u, a, b.to("meta"))
    raises("student_logits", dmmd_ops.generator_loss, torch.randn(()), a, b)
    raises("student_logits", dmmd_ops.generator_loss, [1.0], a, b)
    raises("weight", dmmd_ops.generator_loss, u, a, b, weight=torch.ones(5))
    raises("weight", dmmd_ops.generator_loss, u, a, b, weight=torch.ones(4, dtype=torch.int64))
    raises("reduction", dmmd_ops.generator_loss, u, a, b, reduction="avg")
    raises("divergence", dmmd_ops.generator_loss, u, a, b, divergence="forward_kl")
    for bad in (0.5, float("nan"), "20"):
        raises("ratio_max", dmmd_ops.generator_loss, u, a, b, divergence="jeffreys", ratio_max=bad)
    raises("aux_logits", dmmd_ops.aux_loss, u.long(), torch.zeros(4, dtype=torch.int64))
    raises("teacher_logits", dmmd_ops.aux_loss, b, torch.zeros(4, dtype=torch.int64), a[:2])
    raises("target", dmmd_ops.aux_loss, b, torch.zeros(4, 9))
    raises("target", dmmd_ops.aux_loss, b, torch.zeros(3, dtype=torch.int64))
    raises("target", dmmd_ops.aux_loss, b, torch.zeros(4, dtype=torch.int32))
    raises("teacher_logits", dmmd_ops.teacher_logprobs, torch.zeros(3, 0))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature(bad, logits3):
    u, a, b = logits3
    for fn, args in ((dmmd_ops.generator_loss, (u, a, b)), (dmmd_ops.teacher_logprobs, (a,)),
                     (dmmd_ops.aux_loss, (b, torch.zeros(4, dtype=torch.int64), a))):
        raises("temperature", fn, *args, temperature=bad)
    raises("temperature", dmmd_ops.sample_categorical, a, temperature=bad, seed=0)
    raises("temperature", dmmd_ops.denoise_step, a, torch.zeros(4, dtype=torch.int64), 0.5, 0.2,
           process="uniform", temperature=bad, seed=0)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, float("nan")])
def test_top_p(bad, logits3):
    u, a, b = logits3
    raises("top_p", dmmd_ops.generator_loss, u, a, b, top_p=bad)
    raises("top_p", dmmd_ops.teacher_logprobs, a, top_p=bad)
    raises("top_p", dmmd_ops.aux_loss, b, torch.zeros(4, dtype=torch.int64), a, top_p=bad)
    raises("top_p", dmmd_ops.sample_categorical, a, top_p=bad, seed=0)
    raises("top_p", dmmd_ops.denoise_step, a, torch.zeros(4, dtype=torch.int64), 0.5, 0.2,
           process="uniform", top_p=bad, seed=0)


def test_delta(logits3):
    u, a, b = logits3
    raises("delta", dmmd_ops.generator_loss, u, a, b, delta=-1.0)
    raises("delta", dmmd_ops.teacher_logprobs, a, delta=float("inf"))


def test_nan_in_loss_inputs(logits3):
    u, a, b = logits3
    for i, name in enumerate(("student_logits", "teacher_logits", "aux_logits")):
        args = [u.clone(), a.clone(), b.clone()]
        args[i][2, 3] = float("nan")
        raises(name, dmmd_ops.generator_loss, *args)
    bad = b.clone()
    bad[0, 0] = float("nan")
    raises("aux_logits", dmmd_ops.aux_loss, bad, torch.zeros(4, dtype=torch.int64))
    bad_a = a.clone()
    bad_a[1, 1] = float("nan")
    raises("teacher_logits", dmmd_ops.aux_loss, b, torch.zeros(4, dtype=torch.int64), bad_a)
    soft = torch.softmax(b, -1)
    soft[0, 0] = float("nan")
    raises("target", dmmd_ops.aux_loss, b, soft)
    raises("target", dmmd_ops.aux_loss, b, -torch.softmax(b, -1))
    raises("weight", dmmd_ops.generator_loss, u, a, b, weight=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    raises("logits", dmmd_ops.sample_categorical, bad, seed=0)


def test_token_ids_out_of_range(logits3):
    _, a, b = logits3
    raises("target", dmmd_ops.aux_loss, b, torch.tensor([0, 1, 10, 2]))
    raises("target", dmmd_ops.aux_loss, b, torch.tensor([0, -1, 1, 2]))
    z = torch.tensor([0, 1, 2, 3])
    raises("z_t", dmmd_ops.denoise_step, a, torch.tensor([0, 1, 2, 10]), 0.5, 0.2, process="uniform", seed=0)
    raises("z_t", dmmd_ops.posterior_sample, torch.tensor([0, 1, 2, 10]), z, 0.5, 0.2, process="uniform",
           num_classes=10, seed=0)
    raises("x", dmmd_ops.posterior_sample, z, torch.tensor([0, 1, 2, 12]), 0.5, 0.2, process="uniform",
           num_classes=10, seed=0)
    raises("x", dmmd_ops.posterior_sample, z, torch.tensor([0, 1, 9, 2]), 0.5, 0.2, process="masked",
           mask_id=9, seed=0)
    raises("mask_id", dmmd_ops.denoise_step, a, z, 0.5, 0.2, process="masked", mask_id=10, seed=0)
    raises("mask_id", dmmd_ops.posterior_sample, z, torch.softmax(a, -1), 0.5, 0.2, process="masked",
           mask_id=-1, seed=0)


def test_process_and_required_ids(logits3):
    _, a, _ = logits3
    z = torch.tensor([0, 1, 2, 3])
    raises("process", dmmd_ops.denoise_step, a, z, 0.5, 0.2, process="absorbing", seed=0)
    raises("mask_id", dmmd_ops.denoise_step, a, z, 0.5, 0.2, process="masked", seed=0)
    raises("mask_id", dmmd_ops.denoise_step, a, z, 0.5, 0.2, process="uniform", mask_id=3, seed=0)
    raises("num_classes", dmmd_ops.posterior_sample, z, z, 0.5, 0.2, process="uniform", seed=0)
    raises("num_classes", dmmd_ops.posterior_sample, z, torch.softmax(a, -1), 0.5, 0.2, process="uniform",
           num_classes=7, seed=0)
    raises("num_classes", dmmd_ops.posterior_sample, z, z, 0.5, 0.2, process="uniform", num_classes=0, seed=0)


def test_alphas(logits3):
    _, a, _ = logits3
    z = torch.tensor([0, 1, 2, 3])
    raises("alpha_s", dmmd_ops.denoise_step, a, z, 0.2, 0.5, process="uniform", seed=0)
    raises("alpha_s", dmmd_ops.posterior_sample, z, z, torch.tensor([0.5, 0.5, 0.1, 0.5]), 0.2,
           process="uniform", num_classes=10, seed=0)
    raises("alpha_s", dmmd_ops.denoise_step, a, z, 1.5, 0.5, process="uniform", seed=0)
    raises("alpha_t", dmmd_ops.denoise_step, a, z, 0.5, -0.1, process="uniform", seed=0)
    raises("alpha_t", dmmd_ops.denoise_step, a, z, 0.5, float("nan"), process="uniform", seed=0)
    raises("alpha_s", dmmd_ops.denoise_step, a, z, torch.ones(3), 0.1, process="uniform", seed=0)
    raises("alpha_s", dmmd_ops.denoise_step, a, z, "0.5", 0.1, process="uniform", seed=0)


def test_seeds_and_shapes(logits3):
    _, a, _ = logits3
    z = torch.tensor([0, 1, 2, 3])
    raises("seed", dmmd_ops.sample_categorical, a, seed=-1)
    raises("seed", dmmd_ops.sample_categorical, a, seed=2**63)
    raises("seed", dmmd_ops.sample_categorical, a, seed=1.5)
    raises("offset", dmmd_ops.sample_categorical, a, seed=0, offset=-3)
    raises("z_t", dmmd_ops.denoise_step, a, z[:3], 0.5, 0.2, process="uniform", seed=0)
    raises("z_t", dmmd_ops.denoise_step, a, z.float(), 0.5, 0.2, process="uniform", seed=0)
    raises("x", dmmd_ops.posterior_sample, z, torch.softmax(a[:3], -1), 0.5, 0.2, process="uniform", seed=0)
    raises("x", dmmd_ops.posterior_sample, z, z[:2], 0.5, 0.2, process="uniform", num_classes=10, seed=0)
    raises("x", dmmd_ops.posterior_sample, z, z.to("meta"), 0.5, 0.2, process="uniform", num_classes=10,
           seed=0)


def test_grad_gram_arguments(gen):
    a = torch.randn(3, 4, 5, generator=gen)
    g = torch.randn(3, 4, 6, generator=gen)
    raises("a", dmmd_ops.grad_gram, a[0], g)
    raises("g", dmmd_ops.grad_gram, a, g.long())
    raises("agree", dmmd_ops.grad_gram, a, g[:, :3])
    bad = a.clone()
    bad[0, 0, 0] = float("nan")
    raises("a", dmmd_ops.grad_gram, bad, g)


def test_outputs_never_alias_inputs(logits3):
    u, a, b = logits3
    out = dmmd_ops.teacher_logprobs(a)
    assert out.data_ptr() != a.data_ptr()
    loss = dmmd_ops.generator_loss(u, a, b, reduction="none")
    assert loss.data_ptr() not in (u.data_ptr(), a.data_ptr(), b.data_ptr())


def test_bad_rows_names_the_argument_and_row():
    """What the wrappers raise for a row a CUDA kernel flagged (kernels cannot raise): the first
    flagged row, the argument that explains it, the mask class left out like the kernel does."""
    from dmmd_ops import _validate as check

    a = torch.zeros(4, 6)
    b = torch.zeros(4, 6)
    none = torch.zeros(4, dtype=torch.bool)
    check.bad_rows("op", none, {"a": a})  # nothing flagged: no error
    flag = torch.tensor([False, False, True, True])
    b[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"op: b contains NaN \(row 2\)"):
        check.bad_rows("op", flag, {"a": a, "b": b})
    b[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"op: b contains \+inf \(row 2\)"):
        check.bad_rows("op", flag, {"a": a, "b": b})
    b[2] = float("-inf")
    b[2, 3] = 5.0  # only the excluded class can occur
    with pytest.raises(ValueError, match=r"op: b has a row where every logit is -inf \(row 2\)"):
        check.bad_rows("op", flag, {"a": a, "b": b}, exclude=3)
    check.bad_rows("op", flag & False, {"b": b}, exclude=3)
    with pytest.raises(ValueError, match=r"op: target is bad \(row 2\)"):
        check.bad_rows("op", flag, {"a": a, "b": None}, fallback="target is bad")
