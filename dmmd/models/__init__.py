"""Models: the bidirectional transformer denoiser (:mod:`.denoiser`) that teachers, D-MMD
generators and auxiliary models share, and any other model under the same protocol
(:mod:`.external`: your own module or a transformers masked LM), with a generator's noise input
(:mod:`.noise`). May import torch and the
process's output rule (:func:`dmmd.diffusion.processes.masked_output_rule`) only;
training, sampling and the applications import it."""
from dmmd.models.denoiser import Denoiser, DenoiserConfig, block_causal_mask
from dmmd.models.external import ExternalConfig, ExternalDenoiser, as_denoiser
from dmmd.models.reference_lm import build_reference, load_reference

__all__ = ["Denoiser", "DenoiserConfig", "ExternalConfig", "ExternalDenoiser", "as_denoiser", "block_causal_mask",
           "build_reference", "load_reference"]
