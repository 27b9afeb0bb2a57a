"""Models: the bidirectional transformer denoiser (:mod:`.denoiser`) that teachers, D-MMD
generators and auxiliary models share. May import torch only; training, sampling and the
applications import it."""
from dmmd.models.denoiser import Denoiser, DenoiserConfig, block_causal_mask
from dmmd.models.reference_lm import build_reference, load_reference

__all__ = ["Denoiser", "DenoiserConfig", "block_causal_mask", "build_reference", "load_reference"]
