"""The one way the applications draw samples from a teacher or a D-MMD student (the demo's
parts, the studies, the benchmark of sources and ``dmmd sample``): the model as the sampler's
model function (:func:`~dmmd.training.distill.student_fn`: a student's Gaussian noise drawn from
its own seeded stream, a teacher taking none) and the k-step sampler (docs/design.md §6), in
chunks, the draws returned on the CPU. Where the apps keep them is :mod:`dmmd.apps.stages`'s."""
from __future__ import annotations

import torch

from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.sampling import sample
from dmmd.training.distill import student_fn


def draw(model, process: DiffusionProcess, num: int, length: int, steps: int, *, seed: int, noise_seed: int,
         device: str = "cpu", batch_size: int = 1000, **sampling) -> torch.Tensor:
    """``num`` sequences of ``length`` tokens from ``model`` in ``steps`` sampling steps (draws
    from ``seed``, a student's noise from ``noise_seed``; ``sampling``: temperature, top-p),
    ``batch_size`` at a time; int64 ``[num, length]`` on the CPU."""
    return sample(student_fn(model, noise_seed), process, num, length, steps, seed=seed, batch_size=batch_size,
                  device=device, **sampling).cpu()


__all__ = ["draw"]
