"""Reference causal LMs for the Gradient Moment and generative perplexity.

Any ``transformers`` causal LM in a local directory loads with :func:`load_reference`
(``local_files_only``: no hub access; a directory holding GPT-2's weights gives the paper's
GPT-2 GM); :func:`build_reference` makes the small GPT-2 configuration that
``dmmd reference train`` trains on our own sources.
"""
from __future__ import annotations

import os

import torch

from dmmd.extras import require


def load_reference(path: str, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """A causal LM from a local transformers directory, in eval mode."""
    if not os.path.isdir(path):
        raise ValueError(f"reference must be a local transformers directory, got {path!r}")
    transformers = require("transformers", "a reference LM")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def build_reference(vocab_size: int, length: int, *, n_layer: int, n_embd: int, n_head: int):
    """A freshly initialised GPT-2 LM (draws from the global torch RNG: seed it first)."""
    transformers = require("transformers", "a reference LM")
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=length, n_layer=n_layer, n_embd=n_embd,
                                     n_head=n_head, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.config.loss_type = "ForCausalLM"
    return model
