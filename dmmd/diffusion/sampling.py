"""The k-step ancestral sampler of docs/design.md §6, for teachers and students alike.

``t_i = i / k``; start at ``z_1`` (all masks, or uniform tokens), then for ``i = k .. 1``:
``x ~ Cat(x_hat(z_{t_i}))`` (temperature, top-p) and ``z_{t_{i-1}} ~ q(. | z_{t_i}, x)``, fused
in ``dmmd_ops.denoise_step``. Randomness comes from ``seed`` only: the prior from a
``torch.Generator`` seeded with it, step ``i`` from the Philox stream ``(seed, offset)`` with a
distinct offset per step and block (:mod:`dmmd.diffusion.randomness`), so a run is
reproducible on any device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.randomness import prior_generator, sampling_offset

# model_fn(z_t [B, L], t [B]) -> logits [B, L, V]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(model_fn: ModelFn, process: DiffusionProcess, batch: int, length: int, steps: int, *,
           seed: int, temperature: float = 1.0, top_p: float = 1.0, block_size: int | None = None,
           device: torch.device | str = "cpu", progress: bool = False, batch_size: int | None = None
           ) -> torch.Tensor:
    """Draw ``batch`` sequences of ``length`` tokens with ``steps`` denoising steps.

    Args:
        model_fn: ``(z_t [B, L], t [B]) -> logits [B, L, V]`` (a :class:`~dmmd.models.denoiser.Denoiser`,
            or a D-MMD generator with its noise drawn inside).
        block_size: generate block by block (block-autoregressive, paper section 6.3), each
            block with ``steps`` steps, conditioned on the blocks before it; the model should
            use block-causal attention with the same block size.
        batch_size: sequences per model call (default: all at once).
    Returns:
        int64 ``[batch, length]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    chunk = batch_size or batch
    out = []
    for c, start in enumerate(range(0, batch, chunk)):
        n = min(chunk, batch - start)
        out.append(_sample_chunk(model_fn, process, n, length, steps, seed=seed, chunk_index=c,
                                 temperature=temperature, top_p=top_p, block_size=block_size, device=device,
                                 progress=progress))
    return torch.cat(out)


def _sample_chunk(model_fn, process, n, length, steps, *, seed, chunk_index, temperature, top_p, block_size,
                  device, progress):
    gen = prior_generator(seed, chunk_index)
    z = process.prior((n, length), generator=gen).to(device)
    blocks = [(0, length)] if block_size is None else [(b, min(b + block_size, length))
                                                        for b in range(0, length, block_size)]
    bar = tqdm(total=steps * len(blocks), desc="sampling", disable=not progress, leave=False)
    for bi, (lo, hi) in enumerate(blocks):
        for i in range(steps, 0, -1):
            t = torch.full((n,), i / steps, device=device)
            s = torch.full((n,), (i - 1) / steps, device=device)
            logits = model_fn(z[:, :hi], t)[:, lo:hi]
            offset = sampling_offset(chunk_index, len(blocks), bi, steps, i)
            z_block = process.denoise_step(logits, z[:, lo:hi].contiguous(), s.double(), t.double(),
                                           temperature=temperature, top_p=top_p, seed=seed, offset=offset)
            z = torch.cat([z[:, :lo], z_block, z[:, hi:]], dim=1)
            bar.update(1)
    bar.close()
    return z
