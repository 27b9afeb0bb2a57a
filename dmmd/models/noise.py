"""A D-MMD generator's Gaussian noise input, owned by the model that takes it (docs/design.md §5):
what the noise is (:class:`NoiseSpec`: its width, how it is shared over the tokens, where it
enters), how one batch of it is drawn (:meth:`NoiseSpec.draw`) and how its projections start
(:func:`init_projections`). dmmd's denoiser and wrapped models both read it from here, and
expose ``noise_spec`` and ``draw_noise``. Imports torch only."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

NOISE_PER = ("token", "sequence", "pyramid")  # one noise vector per token, per sequence, or a 2-D pyramid
# the noise's projection at the embedding, also before every block, or that and into the adaLN conditioning
NOISE_INTO = ("embedding", "blocks", "conditioning")


@dataclass(frozen=True)
class NoiseSpec:
    """A model's noise input ``[B, L, dim]``: independent per ``token``, one vector per
    ``sequence`` shared by its tokens, or a 2-D ``pyramid`` for pixel tokens; entering at the
    ``embedding``, also before every block (``blocks``), or that and the time conditioning
    (``conditioning``; dmmd's denoiser only). How its projections start is not part of it: that
    is the building's choice (:func:`init_projections`)."""

    dim: int
    per: str = "sequence"
    into: str = "embedding"

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"noise_dim must be >= 1, got {self.dim}")
        check_noise_options(self.per, self.into)

    def draw(self, batch: int, length: int, generator: torch.Generator,
             image_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Noise ``[batch, length, dim]`` from ``generator``. For ``per="pyramid"`` the tokens
        are pixels of ``image_shape`` (H, W, C): Gaussian maps at H x W, H/2 x W/2, ... down to
        1 x 1, each upsampled (nearest) to H x W, their channels concatenated to ``dim`` and each
        pixel's vector shared by its C channel tokens."""
        dim = self.dim
        if self.per == "sequence":
            return torch.randn(batch, 1, dim, generator=generator).expand(batch, length, dim)
        if self.per == "token":
            return torch.randn(batch, length, dim, generator=generator)
        if image_shape is None or math.prod(image_shape) != length:
            raise ValueError(f"pyramid noise needs image data whose H * W * C is the length {length}, "
                             f"got image shape {image_shape}")
        h, w, c = image_shape
        sizes = [(h, w)]
        while sizes[-1] != (1, 1):
            sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
        dims = [dim // len(sizes) + (i < dim % len(sizes)) for i in range(len(sizes))]
        maps = []
        for (mh, mw), d in zip(sizes, dims, strict=True):
            if d == 0:
                continue
            m = torch.randn(batch, mh, mw, d, generator=generator)
            rows = torch.arange(h) * mh // h  # nearest upsampling: pixel -> its cell at this level
            cols = torch.arange(w) * mw // w
            maps.append(m[:, rows][:, :, cols])
        pixel = torch.cat(maps, dim=-1)  # [batch, H, W, dim]
        return pixel.unsqueeze(3).expand(batch, h, w, c, dim).reshape(batch, length, dim)


def check_noise_options(per: str | None, into: str | None) -> None:
    """``ValueError`` naming ``noise_per`` or ``noise_into`` when out of its choices (None: unset)."""
    if per is not None and per not in NOISE_PER:
        raise ValueError(f"noise_per must be one of {NOISE_PER}, got {per!r}")
    if into is not None and into not in NOISE_INTO:
        raise ValueError(f"noise_into must be one of {NOISE_INTO}, got {into!r}")


def init_projections(projections: Iterable[nn.Linear], std: float, generator: torch.Generator | None) -> None:
    """Set the noise projections' weights to ``N(0, std^2)`` draws from ``generator`` (float32
    draws, one projection after the other), or to zero for ``std = 0`` (the model is then
    exactly the model without noise). A zero projection gets only zero-mean gradients at first;
    a small random one breaks the symmetry."""
    with torch.no_grad():
        for proj in projections:
            w = proj.weight
            if std > 0:
                w.copy_(std * torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.dtype))
            else:
                w.zero_()


def check_noise(spec: NoiseSpec | None, noise: torch.Tensor | None, z_t: torch.Tensor) -> None:
    """A model with a noise input is never called without its noise (it would silently be the
    model without noise: its teacher), and a model without one never gets noise."""
    if spec is None:
        if noise is not None:
            raise ValueError("noise: this model has no noise input (noise_dim 0)")
        return
    if noise is None:
        raise ValueError(f"noise: this model takes Gaussian noise [B, L, {spec.dim}] (a D-MMD generator); draw it "
                         f"with model.draw_noise(batch, length, generator), or sample with student_fn")
    if noise.dim() != 3 or tuple(noise.shape) != (*z_t.shape, spec.dim):
        raise ValueError(f"noise: shape {list(noise.shape)}; this model takes [B, L, noise_dim] = "
                         f"{[*z_t.shape, spec.dim]}")
