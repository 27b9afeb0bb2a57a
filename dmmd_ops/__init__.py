"""dmmd_ops: fused kernels for Discrete Moment Matching Distillation, as torch custom ops.

Each op validates its arguments, runs the compiled kernel for the input's device when
the extension has one, and otherwise the pure-PyTorch reference in
:mod:`dmmd_ops.reference` (identical contract, slower). See docs/design.md §8.
"""
from dmmd_ops import reference
from dmmd_ops._ext import EXTENSION_LOADED, has_kernel
from dmmd_ops.linear import linear_aux_loss, linear_generator_loss
from dmmd_ops.ops import (
    aux_loss,
    denoise_step,
    generator_loss,
    grad_gram,
    philox4x32,
    posterior_sample,
    sample_categorical,
    teacher_logprobs,
)

__all__ = [
    "EXTENSION_LOADED",
    "aux_loss",
    "denoise_step",
    "generator_loss",
    "grad_gram",
    "has_kernel",
    "linear_aux_loss",
    "linear_generator_loss",
    "philox4x32",
    "posterior_sample",
    "reference",
    "sample_categorical",
    "teacher_logprobs",
]
__version__ = "0.1.0"
