"""The small image classifier whose penultimate activations are the features of our FID on
pixel-token images (``dmmd reference train --data digits`` trains it; ``dmmd evaluate`` and
the image study load it). Inception features need a download; a classifier trained on the
data itself is the usual stand-in for small image sets.

Input: pixel tokens ``[B, L]`` (``levels`` classes per channel value), scaled to [0, 1];
an MLP ``L -> 256 -> 128 -> classes`` with ReLUs; :meth:`ImageClassifier.features` gives the
128 activations before the last layer.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "dmmd_classifier.json"
HIDDEN = (256, 128)


class ImageClassifier(nn.Module):
    def __init__(self, length: int, levels: int, classes: int):
        super().__init__()
        self.length, self.levels, self.classes = length, levels, classes
        self.body = nn.Sequential(nn.Linear(length, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU())
        self.head = nn.Linear(HIDDEN[1], classes)

    def _pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise ValueError(f"images must be tokens [N, {self.length}], got {tuple(tokens.shape)}")
        return tokens.to(self.head.weight.dtype) / max(1, self.levels - 1)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, 128]`` penultimate activations (the FID features)."""
        return self.body(self._pixels(tokens.to(self.head.weight.device)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, classes]``."""
        return self.head(self.features(tokens))


def save_classifier(model: ImageClassifier, path: str, info: dict) -> None:
    """Weights (safetensors) and ``dmmd_classifier.json`` (shape and ``info``) in directory ``path``."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "weights.safetensors"))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"length": model.length, "levels": model.levels, "classes": model.classes, **info}, f, indent=1)


def is_classifier(path: str) -> bool:
    """Whether ``path`` is a directory written by :func:`save_classifier`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def load_classifier(path: str, *, device: str = "cpu") -> ImageClassifier:
    """The classifier saved in ``path``, in eval mode; ``ValueError`` naming ``path`` otherwise."""
    if not is_classifier(path):
        raise ValueError(f"{path!r} is not an image classifier directory (dmmd reference train --data digits "
                         f"writes one: OUT/model/{CONFIG_FILE})")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    model = ImageClassifier(meta["length"], meta["levels"], meta["classes"])
    model.load_state_dict(load_file(os.path.join(path, "weights.safetensors")))
    return model.to(device).eval()
