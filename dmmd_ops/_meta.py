"""Fake (meta) and autograd registrations of the compiled ops.

The schemas live in ``csrc/ops.cpp``; here each op gets the shape function torch.compile
and ``opcheck`` need, and the loss ops get their backward: ``generator_loss_forward``
differentiates wrt the student logits only and ``aux_loss_forward`` wrt the aux logits only
(docs/design.md §8), each through its single-pass backward kernel; ``teacher_logprobs`` through
a closed form.
"""
from __future__ import annotations

import torch

from dmmd_ops._ext import EXTENSION_LOADED

# Per-row float32 statistics the loss forwards save (csrc/include/dmmd/rowmath.h).
GEN_STATS = 9
AUX_STATS = 7
# The i_star slot of each: -1 marks a row a CUDA kernel could not use (kernels cannot raise).
GEN_I_STAR = 7
AUX_I_STAR = 5


def _rows(t: torch.Tensor) -> int:
    return t.shape[0]


def _loss_outputs(logits: torch.Tensor, stats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss forward's outputs: float32 ``loss [rows]`` and ``stats [rows, stats]``."""
    n = _rows(logits)
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n, stats), dtype=torch.float32)


def _register() -> None:
    lib = "dmmd::"

    @torch.library.register_fake(lib + "philox4x32")
    def _(counter, key):
        return torch.empty_like(counter)

    @torch.library.register_fake(lib + "teacher_logprobs")
    def _(teacher_logits, temperature, top_p, delta):
        return teacher_logits.new_empty(teacher_logits.shape, dtype=torch.float32)

    @torch.library.register_fake(lib + "generator_loss_forward")
    def _(student_logits, teacher_logits, aux_logits, temperature, top_p, delta):
        return _loss_outputs(student_logits, GEN_STATS)

    @torch.library.register_fake(lib + "generator_loss_backward")
    def _(grad_loss, student_logits, teacher_logits, aux_logits, stats, temperature, top_p, delta):
        return torch.empty_like(student_logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "aux_loss_forward")
    def _(aux_logits, target, teacher_logits, temperature, top_p, delta):
        return _loss_outputs(aux_logits, AUX_STATS)

    @torch.library.register_fake(lib + "aux_loss_backward")
    def _(grad_loss, aux_logits, target, teacher_logits, stats, temperature, top_p, delta):
        return torch.empty_like(aux_logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "sample_categorical")
    def _(logits, temperature, top_p, seed, offset):
        return logits.new_empty((_rows(logits),), dtype=torch.int64)

    @torch.library.register_fake(lib + "posterior_sample")
    def _(z_t, x, alpha_s, alpha_t, process, mask_id, num_classes, seed, offset):
        return torch.empty_like(z_t, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "denoise_step")
    def _(logits, z_t, alpha_s, alpha_t, process, mask_id, temperature, top_p, seed, offset):
        return torch.empty_like(z_t, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "grad_gram")
    def _(a, g):
        return a.new_empty((a.shape[0], a.shape[0]), dtype=torch.float32)

    # ------------------------------------------------------------------ autograd

    def teacher_setup(ctx, inputs, output):
        ctx.temperature = inputs[1]
        ctx.dtype = inputs[0].dtype
        ctx.save_for_backward(output)

    def teacher_backward(ctx, grad):
        # d log q_c / d a_j = ([c = j] - q_j) / temperature (the top-p mask is piecewise constant)
        (out,) = ctx.saved_tensors
        g = (grad - out.exp() * grad.sum(-1, keepdim=True)) / ctx.temperature
        return g.to(ctx.dtype), None, None, None

    torch.library.register_autograd(lib + "teacher_logprobs", teacher_backward, setup_context=teacher_setup)

    def generator_setup(ctx, inputs, output):
        student, teacher, aux, temperature, top_p, delta = inputs
        ctx.params = (temperature, top_p, delta)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(student, teacher, aux, output[1])

    def generator_backward(ctx, grad_loss, _grad_stats):
        student, teacher, aux, stats = ctx.saved_tensors
        grad = None
        if grad_loss is not None and ctx.needs_input_grad[0]:
            grad = torch.ops.dmmd.generator_loss_backward(
                grad_loss.to(torch.float32).contiguous(), student, teacher, aux, stats, *ctx.params)
        return grad, None, None, None, None, None

    torch.library.register_autograd(lib + "generator_loss_forward", generator_backward,
                                    setup_context=generator_setup)

    def aux_setup(ctx, inputs, output):
        aux, target, teacher, temperature, top_p, delta = inputs
        ctx.params = (temperature, top_p, delta)
        ctx.has_teacher = teacher is not None
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(aux, target, teacher, output[1])

    def aux_backward(ctx, grad_loss, _grad_stats):
        aux, target, teacher, stats = ctx.saved_tensors
        grad = None
        if grad_loss is not None and ctx.needs_input_grad[0]:
            grad = torch.ops.dmmd.aux_loss_backward(
                grad_loss.to(torch.float32).contiguous(), aux, target, teacher if ctx.has_teacher else None,
                stats, *ctx.params)
        return grad, None, None, None, None, None

    torch.library.register_autograd(lib + "aux_loss_forward", aux_backward, setup_context=aux_setup)


if EXTENSION_LOADED:
    _register()
