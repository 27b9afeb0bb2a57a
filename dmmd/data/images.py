"""Images as token sequences (paper section 6.1: pixels as tokens): every channel value of
every pixel is one token, quantised to ``levels`` classes, in raster order with the channels
last (``[H, W, C]`` flattened), so an ``H x W x C`` image is a sequence of ``L = H * W * C``.

Formats (:func:`load_images`, each to a ``uint8`` array ``[N, H, W, C]``): a ``.npy`` array or
an ``.npz`` archive (its only array, or the one named ``images``), a folder of PNGs (all of one
size and mode), and CIFAR-10's python batch files (one ``data_batch_*`` / ``test_batch`` file
or a folder holding them). ``digits`` is the 8x8 handwritten digits that scikit-learn ships
(1797 images, grey levels 0-16: 17 tokens), the embedded image default.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from dmmd.extras import require

CIFAR_PREFIXES = ("data_batch", "test_batch")


def is_image_path(path: str) -> bool:
    """Whether ``path`` names image data in one of the formats :func:`load_images` reads."""
    name = os.path.basename(os.path.normpath(path))
    if path.endswith((".npy", ".npz")) or name.startswith(CIFAR_PREFIXES):
        return True
    return os.path.isdir(path)


def load_images(path: str) -> np.ndarray:
    """``uint8 [N, H, W, C]`` from ``path``; ``ValueError`` naming the file for anything else."""
    if not os.path.exists(path):
        raise ValueError(f"image data {path!r} does not exist")
    if path.endswith(".npy"):
        return _checked(np.load(path, allow_pickle=False), path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if len(keys) != 1 and "images" not in keys:
                raise ValueError(f"{path}: an .npz needs one array or one named 'images', has {keys}")
            return _checked(z["images" if "images" in keys else keys[0]], path)
    if os.path.isdir(path):
        batches = sorted(f for f in os.listdir(path) if f.startswith(CIFAR_PREFIXES))
        if batches:
            return np.concatenate([_cifar_batch(os.path.join(path, f)) for f in batches])
        pngs = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        if not pngs:
            raise ValueError(f"{path}: a folder of images needs .png files or CIFAR-10 batch files")
        return _checked(np.stack([_png(os.path.join(path, f)) for f in pngs]), path)
    if os.path.basename(path).startswith(CIFAR_PREFIXES):
        return _cifar_batch(path)
    raise ValueError(f"{path}: not image data (.npy, .npz, a folder of PNGs or CIFAR-10 batches)")


def _checked(x: np.ndarray, path: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8, got {x.dtype}")
    if x.ndim == 3:  # [N, H, W]: one channel
        x = x[..., None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{path}: images must be [N, H, W, C] (or [N, H, W]), got shape {x.shape}")
    return x


def _png(path: str) -> np.ndarray:
    image = require("PIL.Image", "reading PNG images")
    with image.open(path) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        x = np.asarray(im, dtype=np.uint8)
    return x if x.ndim == 3 else x[..., None]


def _cifar_batch(path: str) -> np.ndarray:
    """A CIFAR-10 python batch: ``{b"data": uint8 [N, 3072]}`` in channel-first order."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch file ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: CIFAR-10 data must be [N, 3072], got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def quantize(images: np.ndarray, levels: int) -> np.ndarray:
    """``uint8 [N, H, W, C]`` -> ``int64 [N, H * W * C]`` tokens in ``[0, levels)``
    (``floor(v * levels / 256)``: 256 levels keep every value)."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in [2, 256], got {levels}")
    return (images.astype(np.int64) * levels // 256).reshape(images.shape[0], -1)


def dequantize(tokens: torch.Tensor, levels: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Tokens ``[N, L]`` -> ``uint8 [N, H, W, C]`` at the centre of each level's value range."""
    t = tokens.detach().cpu().long().clamp(0, levels - 1).numpy()
    return ((t * 256 + 128) // levels).astype(np.uint8).reshape(-1, *shape)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``int64 [1797, 8, 8, 1]`` grey levels 0-16, and their
    labels ``int64 [1797]`` (0-9)."""
    datasets = require("sklearn.datasets", "the digits data")
    digits = datasets.load_digits()
    return digits.images.astype(np.int64)[..., None], digits.target.astype(np.int64)


class ImageSource:
    """Images as tokens with a held-out split (the last ``val_fraction`` of a fixed permutation),
    and their class labels where the data has them (digits)."""

    def __init__(self, tokens: np.ndarray, levels: int, shape: tuple[int, int, int], *, val_fraction: float = 0.1,
                 seed: int = 0, labels: np.ndarray | None = None):
        if len(tokens) < 2:
            raise ValueError(f"image data needs at least 2 images, got {len(tokens)}")
        order = np.random.default_rng(seed).permutation(len(tokens))
        n_val = max(1, int(round(len(tokens) * val_fraction)))
        self.train, self.val = torch.from_numpy(tokens[order[n_val:]]), torch.from_numpy(tokens[order[:n_val]])
        self.labels = None
        if labels is not None:
            self.labels = {"train": torch.from_numpy(labels[order[n_val:]]),
                           "val": torch.from_numpy(labels[order[:n_val]])}
        self.vocab_size, self.shape = levels, shape
        self.length = shape[0] * shape[1] * shape[2]

    @classmethod
    def from_path(cls, path: str, levels: int = 256, **kw) -> ImageSource:
        images = load_images(path)
        return cls(quantize(images, levels), levels, images.shape[1:], **kw)

    @classmethod
    def digits(cls, **kw) -> ImageSource:
        images, labels = load_digits()
        return cls(images.reshape(len(images), -1), 17, images.shape[1:], labels=labels, **kw)

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """``[batch, L]`` images drawn uniformly (with replacement) from the split."""
        pool = self.train if split == "train" else self.val
        return pool[torch.randint(0, len(pool), (batch,), generator=generator)].clone()

    def split(self, split: str = "train") -> torch.Tensor:
        """Every image of ``split`` (``"train"`` or ``"val"``) as tokens ``[N, L]``."""
        return self.train if split == "train" else self.val

    def to_images(self, tokens: torch.Tensor) -> np.ndarray:
        """Tokens ``[N, L]`` as ``uint8 [N, H, W, C]`` pictures."""
        return dequantize(tokens, self.vocab_size, self.shape)


def save_grid(images: np.ndarray, path: str, *, cols: int | None = None, min_side: int = 64, pad: int = 2) -> None:
    """Write ``uint8 [N, H, W, C]`` pictures as one PNG grid (``cols`` per row, default about
    square), each enlarged by an integer factor (nearest neighbour) to at least ``min_side``
    pixels, on a white background with ``pad`` pixels between them."""
    image = require("PIL.Image", "writing PNG grids")
    n, h, w, c = images.shape
    if c not in (1, 3):
        raise ValueError(f"a PNG grid needs 1 or 3 channels, got {c}")
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    f = max(1, -(-min_side // max(h, w)))
    big = images.repeat(f, axis=1).repeat(f, axis=2)
    hh, ww = h * f, w * f
    canvas = np.full((rows * (hh + pad) + pad, cols * (ww + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (hh + pad), pad + q * (ww + pad)
        canvas[y:y + hh, x:x + ww] = big[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)
