"""dmmd: distilling discrete diffusion models with Discrete Moment Matching Distillation.

Training, sampling, metrics and the command line, built on the ops of :mod:`dmmd_ops`.
"""
__version__ = "0.1.0"
