"""Diffusion: noise schedules (:mod:`.schedules`), the masked and uniform processes with their
posterior and training loss (:mod:`.processes`), the k-step sampler (:mod:`.sampling`) and the
bookkeeping of every random stream (:mod:`.randomness`). May import :mod:`dmmd_ops` and
:mod:`dmmd.options`; never training, metrics or the applications."""
from dmmd.diffusion.processes import PROCESSES, DiffusionProcess
from dmmd.diffusion.sampling import sample
from dmmd.diffusion.schedules import Schedule, get_schedule

__all__ = ["PROCESSES", "DiffusionProcess", "Schedule", "get_schedule", "sample"]
