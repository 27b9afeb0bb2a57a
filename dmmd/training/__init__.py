"""Training: one run loop (:mod:`.loop`: resume, learning-rate schedule, clipping, EMA, logs,
atomic checkpoints, time limit, DDP) and the three things it runs, which supply only their
models, their step and their config: teacher training (:mod:`.teacher`), D-MMD distillation
(:mod:`.distill`, Algorithm 1) and reference-LM training (:mod:`.reference`). Checkpoints live
in :mod:`.checkpoint`. May import data, models, diffusion and :mod:`dmmd_ops`; never metrics
or the applications."""
