"""Teacher training: the denoiser's weighted cross-entropy (``DiffusionProcess.teacher_loss``)
with AdamW (warm-up then cosine decay), an EMA of the weights, bf16 autocast on CUDA and a
periodic validation (ELBO bound in bits per token), run by :class:`dmmd.training.loop.RunLoop`.

Under DDP each rank takes its rows of the same global batch, so the update equals the
single-process one on that batch.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch

from dmmd.data import DataConfig, make_source
from dmmd.diffusion.processes import PROCESSES, DiffusionProcess
from dmmd.diffusion.randomness import Stream, step_generator, validation_generator
from dmmd.diffusion.schedules import get_schedule
from dmmd.models.denoiser import Denoiser, DenoiserConfig
from dmmd.models.external import ExternalDenoiser
from dmmd.options import Options, nested, option
from dmmd.training.artifacts import inspect
from dmmd.training.checkpoint import load_tensors
from dmmd.training.loop import RunConfig, RunLoop, Trained, Update, run_context, warmup_cosine
from dmmd.training.masked_lm import (
    build_masked_lm,
    is_masked_lm,
    load_masked_lm,
    masked_lm_state,
    rebuild_masked_lm,
    save_masked_lm,
    source_tokenizer,
)


@dataclass
class TeacherConfig(Options):
    """Everything a teacher run needs; saved in its checkpoints."""

    source: DataConfig = nested(DataConfig)
    process: str = option("masked", "'masked' or 'uniform' diffusion")
    schedule: str = option("loglinear", "noise schedule: linear, cosine or loglinear")
    model_config: str = option("", "a transformers masked-LM config JSON (model_type bert, roberta, modernbert, "
                                   "...): train that model, which takes no time input, as a masked-diffusion "
                                   "teacher instead of dmmd's denoiser (width, depth and heads are then the "
                                   "JSON's); OUT/model is then also a transformers directory")
    width: int = option(256, "transformer width")
    depth: int = option(4, "transformer blocks")
    heads: int = option(4, "attention heads")
    block_size: int | None = option(None, "block-causal attention with this block size "
                                          "(block-autoregressive diffusion)")
    lr: float = option(1e-3, "peak learning rate of AdamW")
    weight_decay: float = option(0.01, "AdamW weight decay")
    ema: float = option(0.999, "decay of the exponential moving average of the weights")
    t_min: float = option(1e-3, "smallest diffusion time drawn in training")
    eval_every: int = option(250, "validate (ELBO bits per token, EMA weights) every this many steps")
    eval_batches: int = option(4, "validation batches")
    eval_steps: int = option(128, "discretisation steps of the validation ELBO")
    run: RunConfig = nested(RunConfig, batch_size=32, steps=2000, warmup=100, save_every=250, out="runs/teacher")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option out of its domain (the data source's
        own checks come with :func:`make_source`)."""
        if self.process not in PROCESSES:
            raise ValueError(f"process must be one of {PROCESSES}, got {self.process!r}")
        get_schedule(self.schedule)
        for name in ("width", "depth", "heads", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.model_config:
            if self.process != "masked":
                raise ValueError("model_config: a transformers masked LM takes no time input, so it is a "
                                 "masked-diffusion teacher only (process masked)")
            if self.block_size is not None:
                raise ValueError("block_size is dmmd's denoiser's block-causal attention; a model_config "
                                 "model has none")
            if not os.path.isfile(self.model_config):
                raise ValueError(f"model_config {self.model_config}: no such file")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.t_min < 1:
            raise ValueError(f"t_min must be in [0, 1), got {self.t_min}")
        for name in ("eval_every", "eval_batches", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.run.validate()


def build(cfg: TeacherConfig, vocab_size: int, image_shape: tuple[int, int, int] | None = None
          ) -> tuple[DiffusionProcess, Denoiser | ExternalDenoiser]:
    """The process and a freshly initialised denoiser for ``cfg`` over a source of ``vocab_size``
    tokens (seeded by ``cfg.run.seed``); ``image_shape`` (H, W, C) for pixel tokens. With a
    ``model_config``, the transformers masked LM it describes (mask ``V``, padding ``V + 1``)."""
    v = vocab_size
    if cfg.model_config:
        torch.manual_seed(cfg.run.seed)
        model, _ = build_masked_lm(cfg.model_config, v, cfg.source.length)
        mc = model.config
        return DiffusionProcess.of(mc, cfg.schedule), model
    num_classes = v + 1 if cfg.process == "masked" else v
    process = DiffusionProcess(cfg.process, num_classes, cfg.schedule)
    torch.manual_seed(cfg.run.seed)
    model = Denoiser(DenoiserConfig(num_classes=num_classes, length=cfg.source.length, process=cfg.process,
                                    mask_id=process.mask_id, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                                    block_size=cfg.block_size, image_shape=image_shape))
    return process, model


def batch_for_step(source, process: DiffusionProcess, cfg: TeacherConfig, step: int):
    """The global batch of ``step``: clean ``x``, times ``t`` and noised ``z_t``."""
    gen = step_generator(cfg.run.seed, step, Stream.TEACHER)
    b = cfg.run.batch_size
    x = source.sample(b, gen)
    t = torch.rand(b, generator=gen, dtype=torch.float64).clamp_min(cfg.t_min)
    return x, t, process.diffuse(x, t, gen)


@torch.no_grad()
def validate(model: Denoiser | ExternalDenoiser, process: DiffusionProcess, source, cfg: TeacherConfig) -> float:
    """The ELBO bound in bits per token on ``eval_batches`` fixed validation batches."""
    model.eval()
    device = next(model.parameters()).device
    gen = validation_generator(cfg.run.seed, Stream.TEACHER)
    bits = []
    for _ in range(cfg.eval_batches):
        x = source.sample(cfg.run.batch_size, gen, split="val").to(device)
        bits.append(process.nll_bound_bits(lambda z, t: torch.softmax(model(z, t), -1), x,
                                           steps=cfg.eval_steps, generator=gen))
    model.train()
    return float(torch.cat(bits).mean())


def train_teacher(cfg: TeacherConfig, *, resume: bool = True, progress: bool = True,
                  stop_at: int | None = None) -> dict:
    """Train (or resume) a teacher; returns ``{"step", "val_bits", "tokens_per_s", "checkpoint",
    "seconds"}``.

    Writes ``OUT/checkpoint/`` (model, EMA, optimizer, step) every ``save_every`` steps and at
    the end, and ``OUT/log.jsonl``. With ``resume`` an existing checkpoint is continued.
    ``stop_at`` ends this run (with a checkpoint) after that step, for jobs cut into time
    slices; the schedule still runs to ``steps``.
    """
    cfg.validate()
    run = cfg.run
    source = make_source(cfg.source)  # a bad source or file, named, before any work
    ctx = run_context(run)
    process, model = build(cfg, source.vocab_size, getattr(source, "shape", None))
    model.to(ctx.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    trained = {"model": Trained(model, opt, warmup_cosine(cfg.lr, run.warmup, run.steps), ema=ema,
                                ema_decay=cfg.ema)}

    def evaluate(done: int) -> dict:
        if cfg.eval_every and done % cfg.eval_every == 0 or done == run.steps:
            return {"val_bits_per_token": validate(ema, process, source, cfg)}
        return {}

    def postfix(record: dict, metrics: dict) -> dict:
        shown = {"loss": f"{record['loss']:.3f}"}
        if "val_bits_per_token" in metrics:
            shown["val"] = f"{metrics['val_bits_per_token']:.3f}"
        return shown

    loop = RunLoop(run, ctx, trained, name="teacher", evaluate=evaluate, postfix=postfix,
                   state=lambda done: {"config": cfg.to_dict(), **model_state(model)}, settings=cfg.to_dict())
    if resume:
        loop.resume()
    net = loop.wrap_parallel()["model"]
    rows = ctx.rows(run.batch_size)

    def step(i: int) -> Update:
        x, t, z = (v[rows].to(ctx.device) for v in batch_for_step(source, process, cfg, i))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
            logits = net(z, t.float())
        loss = process.teacher_loss(logits, x, z, t)
        return Update(loss, "model", {"loss": float(loss.detach())})

    start = loop.start
    result = loop.run(step, progress=progress, stop_at=stop_at)
    tokens = (result["step"] - start) * run.batch_size * cfg.source.length
    out = {"step": result["step"], "val_bits": loop.metrics.get("val_bits_per_token", math.nan),
           "tokens_per_s": tokens / max(result["seconds"], 1e-9), "checkpoint": result["checkpoint"],
           "seconds": result["seconds"]}
    if is_masked_lm(model) and ctx.rank == 0:  # the EMA teacher as a transformers directory
        out["model"] = os.path.join(run.out, "model")
        save_masked_lm(ema, out["model"], tokenizer=source_tokenizer(source.vocab_size),
                       meta={"kind": "teacher", "process": "masked", "schedule": cfg.schedule,
                             "source": cfg.source.to_dict(), "step": result["step"]})
    return out


def model_state(model: Denoiser | ExternalDenoiser) -> dict:
    """What a checkpoint saves to rebuild ``model``'s architecture (:func:`rebuild_model`): a
    ``model_kind`` (``denoiser``, ``masked_lm`` or ``module``: a wrapped model of the user's
    own, whose class only the user has) and the configs."""
    if is_masked_lm(model):
        return {"model_kind": "masked_lm", "model": masked_lm_state(model)}
    if isinstance(model, ExternalDenoiser):
        return {"model_kind": "module", "model": model.config.to_dict()}
    return {"model_kind": "denoiser", "model": model.config.to_dict()}


def rebuild_model(state: dict, module: torch.nn.Module | None = None) -> Denoiser | ExternalDenoiser:
    """An untrained model of the architecture a checkpoint's ``state`` records; a model of the
    user's own needs ``module``, an instance of its class (a copy is wrapped)."""
    kind = state.get("model_kind", "denoiser")
    if kind == "module":
        if module is None:
            raise ValueError("this checkpoint holds a model of your own class: pass an instance of it (model=...)")
        return ExternalDenoiser.from_config(copy.deepcopy(module), state["model"])
    if module is not None:
        raise ValueError(f"model=: this checkpoint holds a {kind} model, which dmmd rebuilds itself")
    if kind == "masked_lm":
        return rebuild_masked_lm(state["model"])
    return Denoiser(DenoiserConfig(**state["model"]))


def load_teacher(path: str, *, use_ema: bool = True, device: str = "cpu", mask_id: int | None = None,
                 trust_remote_code: bool = False) -> tuple[Denoiser | ExternalDenoiser, DiffusionProcess, dict]:
    """A trained teacher (EMA weights by default), its process and its state, from a dmmd
    checkpoint or a transformers directory (called by its family's conventions,
    :func:`~dmmd.training.masked_lm.load_masked_lm`; ``mask_id``: its mask token, when neither
    its family nor a tokenizer saved there names it; ``trust_remote_code``: run model code
    shipped in the directory). The state's ``source`` is the teacher's data config (``None``
    when not known)."""
    artifact = inspect(path)
    if artifact.is_transformers:
        model, _, meta = load_masked_lm(path, mask_id=mask_id, device=device, trust_remote_code=trust_remote_code)
        process = DiffusionProcess.of(model.config, meta["schedule"])
        return model, process, {"source": meta.get("source"), "schedule": meta["schedule"],
                                "conventions": meta["conventions"]}
    if mask_id is not None:
        raise ValueError(f"mask_id is for a transformers teacher; the dmmd checkpoint {path} has its own")
    state = artifact.state
    model = rebuild_model(state)
    model.load_state_dict(load_tensors(path, "ema" if use_ema else "model"))
    cfg = TeacherConfig.from_dict(state["config"])
    mc = model.config
    process = DiffusionProcess.of(mc, cfg.schedule)
    return model.to(device).eval(), process, {**state, "source": cfg.source.to_dict(), "schedule": cfg.schedule}
