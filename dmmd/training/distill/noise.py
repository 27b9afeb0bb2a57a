"""The generator's noise in a distillation: the generator built from the teacher with its noise
input (:func:`build_generator`; what the noise is and how it is drawn is the model's,
:mod:`dmmd.models.noise`), and a student as the sampler's model function with fresh noise per
call (:func:`student_fn`). Imports the models and the random streams, nothing else of the
distiller."""
from __future__ import annotations

import copy

import torch

from dmmd.diffusion.randomness import noise_projection_generator, student_noise_generator
from dmmd.models.denoiser import Denoiser, DenoiserConfig
from dmmd.models.external import ExternalDenoiser
from dmmd.models.noise import NoiseSpec, init_projections


def build_generator(teacher: Denoiser | ExternalDenoiser, noise: NoiseSpec | None, init: float = 0.0, seed: int = 0,
                    module: str = "", extra_blocks: int = 0) -> Denoiser | ExternalDenoiser:
    """The teacher's architecture and weights plus the noise input ``noise`` (none: a plain copy),
    its projections starting at zero (the generator is then exactly the teacher) or at
    ``N(0, init^2)`` drawn from the run's projection stream (:func:`~dmmd.models.noise.init_projections`).
    A wrapped model (:class:`~dmmd.models.external.ExternalDenoiser`) gets its projection
    installed from outside, added to ``module``'s output (default: its input embeddings).
    ``extra_blocks`` (dmmd's denoiser only) more blocks after the teacher's, each starting as the
    identity (its attention and MLP output layers zero): the same function as the teacher with
    more depth to turn the noise into joint decisions (a larger student initialised from its
    teacher)."""
    if extra_blocks < 0:
        raise ValueError(f"extra_blocks must be >= 0, got {extra_blocks}")
    if isinstance(teacher, ExternalDenoiser):
        if extra_blocks:
            raise ValueError("extra_blocks is for dmmd's own denoiser; a wrapped model keeps its teacher's "
                             "architecture")
        if noise is not None and noise.into != "embedding":
            raise ValueError(f"noise_into={noise.into!r} is for dmmd's own denoiser; a wrapped model's noise enters "
                             f"at one submodule (noise_module)")
        gen = copy.deepcopy(teacher)
        if noise is not None:
            gen.install_noise(noise.dim, noise.per, init, noise_projection_generator(seed), module=module or None)
        return gen
    if module:
        raise ValueError("noise_module is for a transformers or your own teacher; dmmd's denoiser takes noise_into")
    spec = {"noise_dim": 0} if noise is None else {"noise_dim": noise.dim, "noise_per": noise.per,
                                                   "noise_into": noise.into}
    depth = teacher.config.depth
    cfg = DenoiserConfig(**{**teacher.config.to_dict(), **spec, "depth": depth + extra_blocks})
    ref = next(teacher.parameters())
    gen = Denoiser(cfg).to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = gen.load_state_dict(teacher.state_dict(), strict=False)
    added = tuple(f"blocks.{i}." for i in range(depth, depth + extra_blocks))
    if unexpected or {m for m in missing if not m.startswith(("noise_proj.", "block_noise.", "cond_noise.", *added))}:
        raise RuntimeError(f"teacher and generator do not match: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for block in gen.blocks[depth:]:  # the identity: what each adds to the residual starts at zero
            for layer in (block.proj, block.mlp[-1]):
                layer.weight.zero_()
                layer.bias.zero_()
    init_projections(gen.noise_projections(), init, noise_projection_generator(seed))
    return gen


def student_fn(model: Denoiser | ExternalDenoiser, seed: int):
    """A generator (or a teacher: no noise input, nothing drawn) as the sampler's
    ``model_fn(z_t, t)``: each call draws fresh Gaussian noise from a ``torch.Generator`` seeded
    with ``seed`` (so sampling stays reproducible)."""
    gen = student_noise_generator(seed)
    noisy = model.noise_spec is not None

    def fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = model.draw_noise(*z_t.shape, gen).to(z_t.device) if noisy else None
        return model(z_t, t, noise)

    return fn
