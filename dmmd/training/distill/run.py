"""A distillation run: Algorithm 1's steps under the run loop (:class:`dmmd.training.loop.RunLoop`:
resume, schedules, EMA, checkpoints, DDP), for a teacher named by a path (:func:`distill`), a
model given in Python (:func:`distill_model`) or one already loaded (:func:`distill_teacher`)."""
from __future__ import annotations

import os
import sys

import torch

from dmmd.diffusion.processes import DiffusionProcess
from dmmd.models.conventions import TeacherConventions
from dmmd.models.denoiser import Denoiser
from dmmd.models.external import ExternalDenoiser
from dmmd.training.checkpoint import save_checkpoint
from dmmd.training.distill.algorithm import Distiller, draw_batch
from dmmd.training.distill.monitor import CollapseMonitor
from dmmd.training.distill.options import ABSENT_OPTIONS, DistillConfig
from dmmd.training.distill.teachers import DistillTeacher, load_distill_teacher, student_state
from dmmd.training.loop import RunLoop, Trained, Update, UserError, run_context, warmup_constant, warmup_cosine
from dmmd.training.masked_lm import is_masked_lm, save_masked_lm
from dmmd.training.memory_plan import GIB, describe, memory_plan, parts, shape_of, size
from dmmd.training.sharding import is_sharded_run


def distill(cfg: DistillConfig, *, resume: bool = True, progress: bool = True, stop_at: int | None = None,
            dry_run: bool = False) -> dict:
    """Distill (or resume) a student of the teacher ``cfg.teacher``; returns ``{"step",
    "checkpoint", "seconds", "metrics"}`` (and ``"student"``: the transformers directory of a
    transformers teacher's student).

    Writes ``OUT/checkpoint/`` (generator, auxiliary, EMA, both optimizers, step) every
    ``save_every`` steps, at the end and when stopped early, and ``OUT/log.jsonl``; for a
    transformers teacher also ``OUT/student/`` (the EMA generator, ``save_pretrained``, with
    its tokenizer and noise weights) at the end of the run; a sharded run (FSDP) of another
    teacher writes ``OUT/student/`` as an ordinary checkpoint of the generator and its EMA.
    With ``dry_run``: every check, then ``{"memory_plan": bytes per part}`` per rank
    (:mod:`dmmd.training.memory_plan`), nothing written.
    """
    cfg.validate()
    return distill_teacher(load_distill_teacher(cfg), cfg, resume=resume, progress=progress, stop_at=stop_at,
                           dry_run=dry_run)


def distill_model(model: Denoiser | ExternalDenoiser, process: DiffusionProcess, source, cfg: DistillConfig, *,
                  resume: bool = True, progress: bool = True, stop_at: int | None = None) -> dict:
    """Distill a teacher given in Python: ``model`` (dmmd's denoiser, or any model wrapped by
    :func:`dmmd.models.external.as_denoiser`), its ``process`` and ``source`` (``.sample(batch,
    generator) -> [batch, L]`` clean token ids); ``cfg.teacher`` is not read. Same outputs as
    :func:`distill`; :func:`load_student` with ``model=`` your module class's instance loads the
    student back. ``model`` is the teacher itself, not a copy (a large teacher is not held
    twice): during the run it is in eval mode, frozen and on the run's device; afterwards its
    train/eval mode, its parameters' ``requires_grad`` and its device are as they were."""
    if not isinstance(model, Denoiser | ExternalDenoiser):
        raise ValueError(f"model: a {type(model).__name__} is not a denoiser yet; wrap it first: "
                         f"dmmd.models.as_denoiser(model, num_classes=...)")
    cfg.validate()
    if cfg.run.parallel == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("parallel: fsdp would shard your module in place (distill_model hands it back as it came); "
                         "give the teacher as a checkpoint or directory (distill) to shard it")
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    where = next((p.device for p in model.parameters()), None)
    try:
        return distill_teacher(DistillTeacher(model, process, source), cfg, resume=resume, progress=progress,
                               stop_at=stop_at)
    finally:  # the caller's module as it came
        if where is not None:
            model.to(where)
        for m, training in modes.items():
            m.training = training
        for p, wanted in grads.items():
            p.requires_grad_(wanted)


def distill_teacher(teacher: DistillTeacher, cfg: DistillConfig, *, resume: bool = True, progress: bool = True,
                    stop_at: int | None = None, dry_run: bool = False) -> dict:
    """Algorithm 1 under the run loop, for a loaded teacher (see :func:`distill`)."""
    # unset per-process options take the teacher's process's defaults (and are saved resolved)
    process, source = teacher.process, teacher.source
    run = cfg.run
    d = Distiller(teacher.model, process, cfg)  # every option checked against the teacher before any work
    cfg = d.cfg
    ctx = run_context(run)
    for m in (d.teacher, d.generator, d.aux, d.ema):
        m.to(ctx.device)
    per_rank = run.batch_size // ctx.world
    if per_rank % d.draw_block:
        raise ValueError(f"each of the {ctx.world} processes gets {per_rank} sequences, not a multiple of "
                         f"the draw block {d.draw_block} (gcd of draw_block and batch_size)")
    if is_sharded_run(run.parallel) and d.fused:
        if cfg.fused_losses:
            raise ValueError("fused_losses: the fused linear losses read the output layers' weights outside their "
                             "forward, where FSDP keeps them sharded; run parallel fsdp without them")
        d.unfuse()
    first = draw_batch(source, process, cfg, d.noise, 0, block_size=d.block_size)
    d.check_fused_head(first)  # before any work
    plan = _memory_plan(d, run, ctx, first.x0.shape[1], needed=dry_run or run.max_memory_per_rank > 0)
    if plan is not None:
        line = describe(plan, title=f"distill: memory plan ({run.parallel}, {ctx.world} rank(s))")
        if run.max_memory_per_rank > 0 and plan["total"] > run.max_memory_per_rank * GIB:
            raise UserError(f"max_memory_per_rank: the run needs {size(plan['total'])} per rank, over the budget of "
                            f"{run.max_memory_per_rank:g} GiB ({parts(plan)})")
        if ctx.rank == 0 and (dry_run or ctx.world > 1):
            print(line, file=sys.stderr, flush=True)
        if dry_run:
            return {"memory_plan": plan}
    betas = (cfg.beta1, cfg.beta2)
    opt_gen = torch.optim.AdamW(d.generator.parameters(), lr=cfg.lr_gen, betas=betas, weight_decay=cfg.weight_decay)
    opt_aux = torch.optim.AdamW(d.aux.parameters(), lr=cfg.lr_aux, betas=betas, weight_decay=cfg.weight_decay)
    def schedule(lr: float):
        if cfg.lr_schedule == "cosine":
            return warmup_cosine(lr, run.warmup, run.steps)
        return warmup_constant(lr, run.warmup)

    trained = {
        "generator": Trained(d.generator, opt_gen, schedule(cfg.lr_gen), ema=d.ema, ema_decay=cfg.ema,
                             opt_name="opt_gen", label="gen"),
        "aux": Trained(d.aux, opt_aux, schedule(cfg.lr_aux), opt_name="opt_aux", label="aux"),
    }

    def postfix(record: dict, metrics: dict) -> dict:
        if "gen_loss" not in record:
            return {}
        return {"gen": f"{record['gen_loss']:.4f}", "H": f"{record['gen_entropy']:.3f}"}

    loop = RunLoop(run, ctx, trained, name=f"distill k={cfg.student_steps}", postfix=postfix,
                   state=lambda done: student_state(d, cfg, teacher), settings=cfg.to_dict(),
                   absent=ABSENT_OPTIONS)
    if resume:
        loop.resume()
    if teacher.conventions is not None and ctx.rank == 0:  # what the teacher is taken to be, before the steps
        print(f"distill: teacher conventions: {TeacherConventions(**teacher.conventions).describe()}",
              file=sys.stderr, flush=True)
    nets = loop.wrap_parallel(frozen={"teacher": d.teacher})
    d.gen_net, d.aux_net = nets["generator"], nets["aux"]
    monitor = CollapseMonitor(cfg.collapse_entropy)
    rows = ctx.rows(run.batch_size)

    def step(i: int) -> Update:
        batch = draw_batch(source, process, cfg, d.noise, i, block_size=d.block_size).take(rows, ctx.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
            if d.is_generator_step(i):
                loss, stats, model = *d.generator_loss(batch, i), "generator"
            else:
                loss, stats, model = *d.aux_loss(batch, i), "aux"
        if monitor.update(stats):
            stats["collapse_warning"] = True
        return Update(loss, model, stats)

    result = loop.run(step, progress=progress, stop_at=stop_at)
    if plan is not None:
        result["memory_plan_bytes"] = plan["total"]
    if ctx.device.type == "cuda":  # what the plan is checked against
        result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(ctx.device)
    if is_masked_lm(d.ema):
        ema = _whole_on_rank0(d.ema) if loop.sharded else d.ema
        if ctx.rank == 0:  # the student as its teacher came: a transformers directory
            result["student"] = os.path.join(run.out, "student")
            save_masked_lm(ema, result["student"], tokenizer=teacher.tokenizer, code_from=teacher.directory,
                           meta={"kind": "student", "process": process.kind, "schedule": process.schedule_name,
                                 "source": None if teacher.data is None else teacher.data.to_dict(),
                                 "student_steps": cfg.student_steps, "step": result["step"]})
    elif loop.sharded:  # the student as ordinary weights too (OUT/checkpoint is sharded): OUT/student
        ema, generator = (_full_state_on_rank0(m) for m in (d.ema, d.generator))
        if ctx.rank == 0:
            result["student"] = os.path.join(run.out, "student")
            save_checkpoint(result["student"], models={"ema": ema, "generator": generator},
                            state={"step": result["step"], **student_state(d, cfg, teacher)})
    return result


def _full_state_on_rank0(sharded: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict on rank 0's CPU, gathered a tensor at a time (empty on
    the other ranks; every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _whole_on_rank0(sharded: ExternalDenoiser) -> ExternalDenoiser | None:
    """A sharded wrapped model gathered into an ordinary copy on rank 0 (``None`` elsewhere;
    every rank must call this): its weights into a model of the same class and config."""
    state = _full_state_on_rank0(sharded)
    if not state:  # the other ranks get nothing
        return None
    whole = ExternalDenoiser.from_config(type(sharded.model)(sharded.model.config), sharded.config.to_dict())
    whole.load_state_dict(state)
    return whole.eval()


def _memory_plan(d: Distiller, run, ctx, length: int, *, needed: bool) -> dict | None:
    """The run's memory plan per rank; ``None`` when the teacher's shape cannot be read and the
    plan is not ``needed`` (a dry run or a memory budget needs it: then the ``ValueError``)."""
    try:
        shape = shape_of(d.teacher)
    except ValueError:
        if needed:
            raise
        return None
    return memory_plan(shape, world=ctx.world, parallel=run.parallel, batch_per_rank=run.batch_size // ctx.world,
                       length=length, checkpoint_activations=run.checkpoint_activations, fused=d.fused,
                       cuda=ctx.device.type == "cuda")
