"""The generator's Gaussian noise: how it is drawn (per token, per sequence, or a pixel pyramid),
the generator built from the teacher with its noise projections (:func:`build_generator`), and
a student as the sampler's model function with fresh noise per call (:func:`student_fn`).
Imports the models and the random streams, nothing else of the distiller."""
from __future__ import annotations

import copy
import math

import torch

from dmmd.diffusion.randomness import noise_projection_generator, student_noise_generator
from dmmd.models.denoiser import NOISE_PER, Denoiser, DenoiserConfig
from dmmd.models.external import ExternalDenoiser


def draw_noise(batch: int, length: int, dim: int, per: str, generator: torch.Generator,
               image_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The generator's Gaussian noise ``[batch, length, dim]``: independent per token, one
    vector per sequence repeated over its tokens (``per="sequence"``), or for pixel tokens of
    ``image_shape`` (H, W, C) a 2-D noise pyramid (``per="pyramid"``): Gaussian maps at H x W,
    H/2 x W/2, ... down to 1 x 1, each upsampled (nearest) to H x W, their channels
    concatenated to ``dim`` and each pixel's vector shared by its C channel tokens."""
    if per == "sequence":
        return torch.randn(batch, 1, dim, generator=generator).expand(batch, length, dim)
    if per == "pyramid":
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
    if per == "token":
        return torch.randn(batch, length, dim, generator=generator)
    raise ValueError(f"noise_per must be one of {NOISE_PER}, got {per!r}")


def build_generator(teacher: Denoiser | ExternalDenoiser, noise_dim: int, noise_init: float = 0.0, seed: int = 0,
                    noise_per: str = "token", noise_into: str = "embedding", noise_module: str = ""
                    ) -> Denoiser | ExternalDenoiser:
    """The teacher's architecture and weights plus a noise input whose projection starts at
    zero (the generator is then exactly the teacher) or at ``N(0, noise_init^2)``: a zero
    projection gets only zero-mean gradients at first, a small random one breaks the symmetry.
    A wrapped model (:class:`~dmmd.models.external.ExternalDenoiser`) gets its projection
    installed from outside, added to ``noise_module``'s output (default: its input embeddings)."""
    if isinstance(teacher, ExternalDenoiser):
        if noise_into != "embedding":
            raise ValueError(f"noise_into={noise_into!r} is for dmmd's own denoiser; a wrapped model's noise enters "
                             f"at one submodule (noise_module)")
        gen = copy.deepcopy(teacher)
        if noise_dim > 0:
            gen.install_noise(noise_dim, noise_per, noise_init, noise_projection_generator(seed),
                              module=noise_module or None)
        return gen
    if noise_module:
        raise ValueError("noise_module is for a transformers or your own teacher; dmmd's denoiser takes noise_into")
    cfg = DenoiserConfig(**{**teacher.config.to_dict(), "noise_dim": noise_dim, "noise_per": noise_per,
                            "noise_into": noise_into})
    ref = next(teacher.parameters())
    gen = Denoiser(cfg).to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = gen.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or {m for m in missing if not m.startswith(("noise_proj.", "block_noise.", "cond_noise."))}:
        raise RuntimeError(f"teacher and generator do not match: missing {missing}, unexpected {unexpected}")
    if noise_init > 0:
        g = noise_projection_generator(seed)
        with torch.no_grad():
            for proj in gen.noise_projections():
                w = proj.weight
                w.copy_(noise_init * torch.randn(w.shape, generator=g, dtype=w.dtype))
    return gen


def student_fn(model: Denoiser | ExternalDenoiser, seed: int):
    """A generator as the sampler's ``model_fn(z_t, t)``: each call draws fresh Gaussian noise from
    a ``torch.Generator`` seeded with ``seed`` (so sampling stays reproducible)."""
    gen = student_noise_generator(seed)
    nd = model.config.noise_dim

    def fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = None
        if nd > 0:
            noise = draw_noise(*z_t.shape, nd, model.config.noise_per, gen, model.config.image_shape).to(z_t.device)
        return model(z_t, t, noise)

    return fn
