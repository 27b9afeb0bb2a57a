"""Teacher training: the denoiser's weighted cross-entropy (``DiffusionProcess.teacher_loss``)
with AdamW, linear warm-up then cosine decay, gradient clipping, an EMA of the weights,
bf16 autocast on CUDA, periodic validation (ELBO bound in bits per token), JSONL logs, atomic
checkpoints and exact resume, on one process or many (``torchrun``, DDP).

Every step's batch, times and noise come from a generator seeded by ``(seed, step)``: a run
resumed from a checkpoint replays exactly the batches it would have seen, so on CPU it ends
bit-identical to an uninterrupted run. Under DDP each rank takes its rows of the same global
batch, so the update equals the single-process one on that batch.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dmmd.checkpoint import load_checkpoint, save_checkpoint
from dmmd.data import ByteText, MarkovSource, TokenFile, TokenGrids
from dmmd.model import Denoiser, DenoiserConfig
from dmmd.processes import DiffusionProcess


class ConfigFromDict:
    """``from_dict`` for run configs (dataclasses): unknown keys are an error, not ignored."""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class TeacherConfig(ConfigFromDict):
    """Everything a teacher run needs; saved in its checkpoints."""

    data: str = "text"              # text | markov | grids | a path to a nanoGPT .bin file
    vocab_size: int = 0             # for .bin data (and markov: its V)
    bin_dtype: str = "uint16"
    markov_fanout: int = 3
    markov_seed: int = 0
    grid_size: int = 8
    grid_colors: int = 4
    process: str = "masked"
    schedule: str = "loglinear"
    length: int = 128
    width: int = 256
    depth: int = 4
    heads: int = 4
    block_size: int | None = None
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    t_min: float = 1e-3
    eval_every: int = 250
    eval_batches: int = 4
    eval_steps: int = 128
    save_every: int = 250
    seed: int = 0
    out: str = "runs/teacher"
    device: str = "cpu"
    time_limit_min: float = 0.0     # > 0: stop (and save) after this many minutes


def make_source(cfg: TeacherConfig):
    """The token source named by ``cfg.data``."""
    if cfg.data == "text":
        return ByteText(cfg.length)
    if cfg.data == "markov":
        return MarkovSource(cfg.vocab_size or 8, cfg.length, fanout=cfg.markov_fanout, seed=cfg.markov_seed)
    if cfg.data == "grids":
        if cfg.length != cfg.grid_size ** 2:
            raise ValueError(f"grids of size {cfg.grid_size} need length {cfg.grid_size ** 2}, got {cfg.length}")
        return TokenGrids(cfg.grid_size, cfg.grid_colors)
    if not os.path.exists(cfg.data):
        raise ValueError(f"data must be text, markov, grids or an existing .bin path, got {cfg.data!r}")
    if cfg.vocab_size < 2:
        raise ValueError("a .bin token file needs --vocab-size")
    return TokenFile(cfg.data, cfg.vocab_size, cfg.length, dtype=cfg.bin_dtype)


def build(cfg: TeacherConfig) -> tuple[DiffusionProcess, Denoiser]:
    """The process and a freshly initialised denoiser for ``cfg`` (seeded by ``cfg.seed``)."""
    v = make_source(cfg).vocab_size
    num_classes = v + 1 if cfg.process == "masked" else v
    process = DiffusionProcess(cfg.process, num_classes, cfg.schedule)
    torch.manual_seed(cfg.seed)
    model = Denoiser(DenoiserConfig(num_classes=num_classes, length=cfg.length, process=cfg.process,
                                    mask_id=process.mask_id, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                                    block_size=cfg.block_size))
    return process, model


def lr_at(step: int, cfg) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 10% of ``cfg.lr`` at
    ``cfg.steps`` (any config with those three fields)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def ema_decay(step: int, ema: float) -> float:
    """EMA decay with a warm-up, ``min(ema, (1 + step) / (10 + step))``: early weights, which
    are far from the final ones, do not linger for ``1 / (1 - ema)`` steps."""
    return min(ema, (1 + step) / (10 + step))


def step_generator(seed: int, step: int, purpose: int = 0) -> torch.Generator:
    """The generator of one step's randomness: a function of ``(seed, step)`` only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + purpose)


def batch_for_step(source, process: DiffusionProcess, cfg: TeacherConfig, step: int):
    """The global batch of ``step``: clean ``x``, times ``t`` and noised ``z_t``."""
    gen = step_generator(cfg.seed, step)
    x = source.sample(cfg.batch_size, gen)
    t = torch.rand(cfg.batch_size, generator=gen, dtype=torch.float64).clamp_min(cfg.t_min)
    return x, t, process.diffuse(x, t, gen)


@torch.no_grad()
def validate(model: Denoiser, process: DiffusionProcess, source, cfg: TeacherConfig) -> float:
    """The ELBO bound in bits per token on ``eval_batches`` fixed validation batches."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    bits = []
    for _ in range(cfg.eval_batches):
        x = source.sample(cfg.batch_size, gen, split="val").to(device)
        bits.append(process.nll_bound_bits(lambda z, t: torch.softmax(model(z, t), -1), x,
                                           steps=cfg.eval_steps, generator=gen))
    model.train()
    return float(torch.cat(bits).mean())


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def process_device(device: str, batch_size: int) -> torch.device:
    """This process's device (under ``torchrun`` on CUDA: one GPU per rank); checks that the
    global batch splits evenly over the processes."""
    rank, world = dist_info()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {world} processes")
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    return dev


def out_of_time(time_limit_min: float, t0: float, done: int, stop_at: int | None) -> bool:
    """Whether a run should save and stop now: past its time limit or at ``stop_at``."""
    return (time_limit_min > 0 and time.perf_counter() - t0 > 60 * time_limit_min) or \
        (stop_at is not None and done >= stop_at)


def train_teacher(cfg: TeacherConfig, *, resume: bool = True, progress: bool = True,
                  stop_at: int | None = None) -> dict:
    """Train (or resume) a teacher; returns ``{"step", "val_bits", "tokens_per_s", "checkpoint"}``.

    Writes ``cfg.out/checkpoint/`` (model, EMA, optimizer, step) every ``save_every`` steps
    and at the end, and ``cfg.out/log.jsonl``. With ``resume`` an existing checkpoint is
    continued. ``stop_at`` ends this run (with a checkpoint) after that step, for jobs cut
    into time slices; the schedule still runs to ``cfg.steps``.
    """
    init_distributed(cfg.device)
    rank, world = dist_info()
    device = process_device(cfg.device, cfg.batch_size)
    source = make_source(cfg)
    process, model = build(cfg)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    ckpt = os.path.join(cfg.out, "checkpoint")
    start, val_bits = 0, float("nan")
    if resume and os.path.exists(ckpt):
        state = load_checkpoint(ckpt, models={"model": model, "ema": ema}, optimizers={"opt": opt})
        start = int(state["step"])
        val_bits = state.get("val_bits_per_token", float("nan"))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="teacher", disable=not progress or rank)
    t0, tokens = time.perf_counter(), 0
    step = start
    for step in bar:
        x, t, z = batch_for_step(source, process, cfg, step)
        x, t, z = (v[rank::world].to(device) for v in (x, t, z))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(z, t.float())
        loss = process.teacher_loss(logits, x, z, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.step()
        with torch.no_grad():
            decay = ema_decay(step, cfg.ema)
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        tokens += x.numel() * world
        done = step + 1
        record = {"step": done, "loss": float(loss.detach()), "grad_norm": float(gnorm), "lr": lr_at(step, cfg)}
        if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
            val_bits = validate(ema, process, source, cfg)
            record["val_bits_per_token"] = val_bits
        stop = out_of_time(cfg.time_limit_min, t0, done, stop_at)
        if rank == 0:
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val_bits:.3f}")
            if done % cfg.save_every == 0 or done == cfg.steps or stop:
                save_checkpoint(ckpt, models={"model": model, "ema": ema}, optimizers={"opt": opt},
                                state={"step": done, "config": asdict(cfg), "model": model.config.to_dict(),
                                       "val_bits_per_token": val_bits})
        if stop:
            break
    elapsed = time.perf_counter() - t0
    if log is not None:
        log.close()
    return {"step": step + 1 if cfg.steps > start else start, "val_bits": val_bits,
            "tokens_per_s": tokens / max(elapsed, 1e-9), "checkpoint": ckpt}


def load_teacher(path: str, *, use_ema: bool = True, device: str = "cpu") -> tuple[Denoiser, DiffusionProcess, dict]:
    """A trained denoiser (EMA weights by default), its process and its state, from a checkpoint."""
    from dmmd.checkpoint import load_tensors, read_state

    state = read_state(path)
    mcfg = DenoiserConfig(**state["model"])
    model = Denoiser(mcfg)
    model.load_state_dict(load_tensors(path, "ema" if use_ema else "model"))
    cfg = TeacherConfig.from_dict(state["config"])
    process = DiffusionProcess(mcfg.process, mcfg.num_classes, cfg.schedule, mask_id=mcfg.mask_id)
    return model.to(device).eval(), process, state
