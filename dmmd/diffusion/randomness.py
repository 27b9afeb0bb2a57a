"""Every random stream of dmmd, decided in one place.

Two kinds of randomness, both a function of the run's ``seed`` and a position in the run, never
of the process count or of what ran before (so a resumed run replays its steps exactly, and
``torchrun`` ranks make the single-process update):

- ``torch.Generator`` streams (data batches, diffusion times, noise, priors): seeded by
  :func:`generator`, from ``(seed, stream, index)``.
- Philox ``(seed, offset)`` streams of the fused ops (categorical and posterior draws): the
  element index is Philox's counter, the offset says which step / block of rows it is.

=================== ================================== =========================================
stream              torch.Generator seed               Philox offsets
=================== ================================== =========================================
teacher step i      ``(seed * 1000003 + i) * 7 + 0``   -
distill step i      ``(seed * 1000003 + i) * 7 + 1``   ``2 * (i * B / b + r)`` draw x, ``+ 1``
                                                       draw z_s; ``b`` rows per block, ``r``
                                                       the block of global rows (DDP-proof);
                                                       x's chunk c of token rows: ``+ c * 2^40``
reference step i    ``(seed * 1000003 + i) * 7 + 2``   -
teacher validation  ``seed + 12345``                   -
reference valid.    ``seed + 999``                     -
sampling, chunk c   prior: ``seed * 1000003 + c``      ``(c * nb + j) * k + (k - i)`` at block j
                                                       of nb, step i of k
student noise       ``seed + 7777777`` (one stream     -
                    per sampler call)
noise projection    ``seed`` (its initial weights)     -
=================== ================================== =========================================
"""
from __future__ import annotations

from enum import IntEnum

import torch

_SPREAD = 1_000_003


class Stream(IntEnum):
    """The per-step ``torch.Generator`` streams of the three kinds of training run."""

    TEACHER = 0
    DISTILL = 1
    REFERENCE = 2


def step_generator(seed: int, step: int, stream: Stream) -> torch.Generator:
    """The generator of one training step's batch, times and noise: a function of
    ``(seed, step, stream)`` only."""
    return torch.Generator().manual_seed((seed * _SPREAD + step) * 7 + int(stream))


def validation_generator(seed: int, stream: Stream) -> torch.Generator:
    """The generator of a run's fixed validation batches (the same at every evaluation)."""
    offsets = {Stream.TEACHER: 12345, Stream.REFERENCE: 999}
    return torch.Generator().manual_seed(seed + offsets[stream])


def prior_generator(seed: int, chunk: int) -> torch.Generator:
    """The generator of a sampler chunk's starting tokens ``z_1``."""
    return torch.Generator().manual_seed(seed * _SPREAD + chunk)


def sampling_offset(chunk: int, num_blocks: int, block: int, steps: int, i: int) -> int:
    """The Philox offset of sampling step ``i`` (``k .. 1``) of ``block`` in ``chunk``: distinct
    for every (chunk, block, step), so no stream is ever reused within a call."""
    return (chunk * num_blocks + block) * steps + (steps - i)


def distill_draw_offsets(step: int, blocks_per_batch: int, block: int) -> tuple[int, int]:
    """The Philox offsets of distillation step ``step`` for the ``block``-th block of global rows:
    ``(x ~ Cat(x_hat_eta), z_s ~ q(z_s | z_t, x))``. Blocks of global rows, not ranks, key the
    draws, so they do not depend on how the batch is split across processes."""
    base = 2 * (step * blocks_per_batch + block)
    return base, base + 1


# A block's categorical draws too large for one call are made in chunks of its token rows; chunk
# c > 0 draws from offset + c * CHUNK_OFFSET (above every block's own offset, 2^40 apart).
CHUNK_OFFSET = 1 << 40


def chunk_offset(offset: int, chunk: int) -> int:
    """The Philox offset of chunk ``chunk`` of the token rows a draw at ``offset`` covers (chunk 0:
    ``offset`` itself, so a block drawn in one call draws as it always did)."""
    if offset >= CHUNK_OFFSET:
        raise ValueError(f"offset {offset} leaves no room for chunks (must be < 2^40)")
    return offset + chunk * CHUNK_OFFSET


def student_noise_generator(seed: int) -> torch.Generator:
    """The generator of a D-MMD student's Gaussian noise during sampling."""
    return torch.Generator().manual_seed(seed + 7_777_777)


def noise_projection_generator(seed: int) -> torch.Generator:
    """The generator of a new generator's initial noise projection weights."""
    return torch.Generator().manual_seed(seed)
