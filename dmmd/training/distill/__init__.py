"""D-MMD distillation (docs/design.md §5; paper Algorithm 1): a k-step student generator from a
trained teacher, for masked and uniform diffusion.

One step ``i``: ``s ~ U(0,1)``, ``delta ~ U(0, 1/k)``, ``t = min(1, s + delta)``; data diffused to
``z_t``; ``x ~ Cat(x_hat_eta(z_t))``; ``z_s ~ q(z_s | z_t, x)`` without gradient. Generator steps
minimise eq. 11 through :func:`dmmd_ops.generator_loss`, auxiliary steps eq. 12 through
:func:`dmmd_ops.aux_loss` (``aux_per_gen`` auxiliary steps after each generator step). The
generator and the auxiliary model start as copies of the teacher; the generator also takes
Gaussian noise through small random projections. For uniform diffusion with
``form="posterior"`` (paper Appendix D, eq. 24-26) the same ops act on the log posterior vectors
``log pi_{s'}(x_hat, z_s)``, ``s' = max(0, s - posterior_ds)``. On CUDA the models run under
bf16 autocast.

Reproducibility: everything random in step ``i`` is a function of ``(seed, i)`` (the batch,
times and noise from a seeded ``torch.Generator``; the categorical and posterior draws from the
Philox stream with one offset per block of global sequences; :mod:`dmmd.diffusion.randomness`),
so a resumed run replays exactly the steps it would have taken, and ``torchrun`` ranks that
each take their rows of the global batch make the same update as one process.

Where things live (each module imports only those above it):

- :mod:`.options`: :class:`DistillConfig` and the per-process defaults;
- :mod:`.noise`: the generator built from the teacher with its noise input (what the noise is:
  :mod:`dmmd.models.noise`), :func:`student_fn`;
- :mod:`.algorithm`: Algorithm 1 itself, the batch of a step and the :class:`Distiller`
  (the draws and the two losses);
- :mod:`.monitor`: the collapse warning;
- :mod:`.teachers`: the teacher to distil, the student saved and loaded back;
- :mod:`.run`: the run: Algorithm 1's step under :class:`dmmd.training.loop.RunLoop`.
"""
from dmmd.training.distill.algorithm import DistillBatch, Distiller, draw_batch, loss_weight
from dmmd.training.distill.monitor import CollapseMonitor
from dmmd.training.distill.noise import build_generator, student_fn
from dmmd.training.distill.options import (
    FORMS,
    FUSED_MIN_CLASSES,
    LR_SCHEDULES,
    PROCESS_DEFAULTS,
    WEIGHTS,
    DistillConfig,
)
from dmmd.training.distill.run import distill, distill_model, distill_teacher
from dmmd.training.distill.teachers import (
    DistillTeacher,
    is_student,
    load_distill_teacher,
    load_student,
    student_state,
)

__all__ = ["FORMS", "FUSED_MIN_CLASSES", "LR_SCHEDULES", "PROCESS_DEFAULTS", "WEIGHTS", "CollapseMonitor",
           "DistillBatch", "DistillConfig", "DistillTeacher", "Distiller", "build_generator", "distill",
           "distill_model", "distill_teacher", "draw_batch", "is_student", "load_distill_teacher",
           "load_student", "loss_weight", "student_fn", "student_state"]
