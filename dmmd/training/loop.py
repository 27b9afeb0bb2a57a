"""The one run loop behind teacher training, D-MMD distillation and reference-LM training.

A run supplies its models (any ``nn.Module``), a step function and a :class:`RunConfig`; the
loop owns everything else: the output directory and its lock, resume from the checkpoint,
the learning-rate schedule, gradient clipping, the EMA of the weights, the JSONL log, the
progress bar, atomic checkpoints, the time limit and DDP (``torchrun``).

Step ``i`` of a run asks ``step_fn(i)`` for an :class:`Update` (a loss and which trained model
it trains), then zeroes that model's gradients, back-propagates, clips, sets the learning rate
of step ``i``, steps its optimizer and updates its EMA. Everything random in a step is the
step function's business and must be a function of ``(seed, i)`` (see
:mod:`dmmd.diffusion.randomness`): a run resumed from a checkpoint then replays exactly the
steps it would have taken, and ends bit-identical to an uninterrupted one on CPU.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dmmd.options import Options, option
from dmmd.training import sharding
from dmmd.training.checkpoint import (
    checkpoint_exists,
    load_checkpoint,
    read_checkpoint_meta,
    read_state,
    save_checkpoint,
)
from dmmd.training.sharding import PARALLEL


class UserError(ValueError):
    """Bad input from the user (an option, a file, an output directory), found before any work."""


class RunFailed(RuntimeError):
    """A run that started and could not go on: the error, the step, and the last good checkpoint
    (which is kept)."""


# RunConfig options that do not change what a run's steps compute (left out of cache keys and
# free to differ when a run is resumed)
NOT_RESULT = ("out", "save_every", "time_limit_min", "max_nonfinite", "parallel", "shard_modules",
              "checkpoint_activations", "max_memory_per_rank")
# ... and what else a resumed run may change: raising steps continues a finished run
RESUME_FREE = (*NOT_RESULT, "steps")


@dataclass
class RunConfig(Options):
    """What every run of the loop takes (each kind of run gives its own defaults)."""

    batch_size: int = option(32, "sequences per step (the global batch under torchrun)")
    steps: int = option(2000, "optimizer steps in total (a resumed run continues to this count)")
    warmup: int = option(100, "linear learning-rate warm-up steps")
    grad_clip: float = option(1.0, "clip the trained model's gradient norm to this value")
    save_every: int = option(250, "write the checkpoint every this many steps")
    seed: int = option(0, "seed of the initialisation and of every step's randomness")
    out: str = option("runs/run", "output directory (checkpoint/, log.jsonl)")
    device: str = option("cpu", "cpu or cuda")
    time_limit_min: float = option(0.0, "stop and save after this many minutes (0: no limit)")
    max_nonfinite: int = option(10, "a step whose loss or gradient is not finite is skipped (weights, optimizer "
                                    "and EMA untouched); this many in a row stop the run as failed")
    parallel: str = option("ddp", "under torchrun: ddp (every rank holds whole models) or fsdp (the models sharded "
                                  "per block across the ranks, FSDP2; checkpoints written by every rank)")
    shard_modules: str = option("", "fsdp: the classes whose instances are sharded on their own, comma-separated "
                                    "(default: dmmd's Block, a transformers model's _no_split_modules)")
    checkpoint_activations: bool = option(False, "keep only each block's input for the backward pass and recompute "
                                                 "the rest (less memory, about a third more compute)")
    max_memory_per_rank: float = option(0.0, "distill: refuse to start when the memory plan needs more than this "
                                             "many GiB per rank (0: no limit)")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option out of its domain."""
        for name in ("batch_size", "steps", "save_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "time_limit_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not self.out:
            raise ValueError("out must name a directory")
        if self.max_memory_per_rank < 0:
            raise ValueError(f"max_memory_per_rank must be >= 0, got {self.max_memory_per_rank}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")


# ---------------------------------------------------------------- learning-rate schedules

def warmup_cosine(lr: float, warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``."""
    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    return at


def warmup_constant(lr: float, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then constant ``lr``."""
    return lambda step: lr * min(1.0, (step + 1) / max(1, warmup))


def ema_decay(step: int, ema: float) -> float:
    """EMA decay with a warm-up, ``min(ema, (1 + step) / (10 + step))``: early weights, which
    are far from the final ones, do not linger for ``1 / (1 - ema)`` steps."""
    return min(ema, (1 + step) / (10 + step))


# ---------------------------------------------------------------- processes and devices

@dataclass(frozen=True)
class RunContext:
    """This process's place in the run: rank, process count and device."""

    rank: int
    world: int
    device: torch.device

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (contiguous, equal shares)."""
        per_rank = batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_context(cfg: RunConfig) -> RunContext:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA), check that the
    global batch splits evenly, and pick this rank's device (on CUDA: one GPU per rank)."""
    cfg.validate()
    # (fsdp under torchrun joins a group of one too: the sharded code path on a single device)
    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (cfg.parallel == "fsdp" and "MASTER_ADDR" in os.environ)
    if wanted and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    return RunContext(rank, world, dev)


def leave_process_group(code: int | None = None) -> int | None:
    """Leave the process group ``run_context`` joined (nothing when none was joined); with an exit
    ``code``, also end this process at once with it.

    A rank that exits while C++ threads of the group still run can abort in the interpreter's
    shutdown ("terminate called without an active exception", SIGABRT: a thread that needs the
    GIL then is ended inside C++), failing a rank whose run succeeded. So: after a success every
    rank waits for the others (no rank tears the group down while a peer still works), the group
    is destroyed, and ``os._exit`` (after flushing the output) skips the interpreter's shutdown."""
    if not (dist.is_available() and dist.is_initialized()):
        return code
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
    if code is None:
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------- the output directory's lock

class OutputInUse(RuntimeError):
    """Another live run holds the output directory."""


class OutputLock:
    """An exclusive lock on an output directory (``OUT/.lock``, ``flock``): a second run on the
    same directory is refused while the first lives; the kernel drops it when a run dies."""

    def __init__(self, out: str):
        self.fd = -1
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, ".lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputInUse(f"output directory {out} is in use by another run (pid {holder}); "
                              f"wait for it to end or choose another --out") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- the loop

@dataclass
class Trained:
    """A model the loop trains: its optimizer (saved as ``opt_name``), learning rate per step,
    and optionally an EMA copy (saved as ``ema_name``). ``label`` prefixes its log fields."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    lr: Callable[[int], float]
    ema: nn.Module | None = None
    ema_decay: float = 0.999
    opt_name: str = "opt"
    ema_name: str = "ema"
    label: str = ""


@dataclass
class Update:
    """What one step asks of the loop: minimise ``loss`` w.r.t. the trained model ``model``;
    ``stats`` (floats) go to the log."""

    loss: torch.Tensor
    model: str
    stats: dict = field(default_factory=dict)


StepFn = Callable[[int], Update]


class RunLoop:
    """Resume, train, log and checkpoint one run (see the module docstring).

    Args:
        cfg: the run's :class:`RunConfig`.
        ctx: from :func:`run_context` (call it before building the models: it picks the device).
        trained: name -> :class:`Trained`; the names are the models' names in the checkpoint.
        name: the progress bar's label.
        state: ``done -> dict`` of JSON state saved beside the weights (configs and such).
        evaluate: ``done -> dict`` after each update (e.g. a validation every N steps); what it
            returns is logged, kept and saved in the checkpoint state.
        postfix: ``(record, metrics) -> dict`` for the progress bar.
    """

    def __init__(self, cfg: RunConfig, ctx: RunContext, trained: dict[str, Trained], *, name: str,
                 state: Callable[[int], dict] | None = None, evaluate: Callable[[int], dict] | None = None,
                 postfix: Callable[[dict, dict], dict] | None = None, settings: dict | None = None,
                 absent: dict | None = None):
        self.cfg, self.ctx, self.trained, self.name = cfg, ctx, trained, name
        self.settings = settings  # the run's resolved config, checked against a resumed checkpoint's
        self.absent = absent  # what an option missing from an older checkpoint's config stood for
        self.state_fn = state or (lambda done: {})
        self.evaluate = evaluate or (lambda done: {})
        self.postfix = postfix or (lambda record, metrics: {})
        self.checkpoint = os.path.join(cfg.out, "checkpoint")
        self.metrics: dict = {}
        self.start = 0
        self.seconds_before = 0.0  # training time of the runs this one resumes
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self._t0 = time.perf_counter()
        self.nets = {n: t.module for n, t in trained.items()}
        self.lock = OutputLock(cfg.out) if ctx.rank == 0 else None
        self.sharded = sharding.is_sharded_run(cfg.parallel)
        self._resume_from: str | None = None  # sharded: the checkpoint to load once the models are sharded

    def _models(self) -> dict[str, nn.Module]:
        models = {}
        for n, t in self.trained.items():
            models[n] = t.module
            if t.ema is not None:
                models[t.ema_name] = t.ema
        return models

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {t.opt_name: t.optimizer for t in self.trained.values()}

    def resume(self) -> dict:
        """Load the checkpoint, if there is one, into every model and optimizer; returns its
        JSON state (``{}`` when starting afresh). A checkpoint made with other settings (those
        of :data:`RESUME_FREE` aside) is refused, naming the first that differs, before loading."""
        try:
            if self.ctx.rank == 0:  # a killed save repaired before any rank reads
                checkpoint_exists(self.checkpoint, repair=True)
            if self.ctx.world > 1 and dist.is_initialized():
                dist.barrier()
            if not checkpoint_exists(self.checkpoint):
                return {}
            saved = read_state(self.checkpoint).get("config")
            if self.settings is not None and isinstance(saved, dict):
                diff = first_difference(saved, self.settings, free=RESUME_FREE, absent=self.absent)
                if diff is not None:
                    key, old, new = diff
                    raise UserError(f"{self.cfg.out} holds a run made with other settings: {key} was {old!r} there, "
                                    f"{new!r} now; resume it with its settings or choose another output directory")
            if self.sharded:  # the tensors are loaded into the shards (wrap_parallel)
                self._resume_from = self.checkpoint
                state = read_state(self.checkpoint)
            else:
                state = load_checkpoint(self.checkpoint, models=self._models(), optimizers=self._optimizers())
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        self.start = int(state["step"])
        self.metrics = dict(state.get("metrics", {}))
        self.seconds_before = float(state.get("train_seconds", 0.0))
        return state

    def wrap_parallel(self, frozen: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
        """Under ``torchrun``: with ``parallel`` ddp the trained modules wrapped in DDP (gradients
        averaged over the ranks); with fsdp every model sharded in place (the trained ones, their
        EMAs and the ``frozen`` ones, e.g. a teacher; :mod:`dmmd.training.sharding`), the
        optimizers rebuilt over the shards and a resumed checkpoint loaded into them. Step
        functions call ``loop.nets[name]`` for anything that needs a gradient."""
        if self.cfg.checkpoint_activations:
            for t in self.trained.values():
                sharding.checkpoint_units(t.module, self.cfg.shard_modules)
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world,))
            for module in (*self._models().values(), *(frozen or {}).values()):
                sharding.shard(module, mesh, self.cfg.shard_modules)
            for t in self.trained.values():  # the parameters are new (sharded) tensors: new optimizers
                if len(t.optimizer.param_groups) != 1:
                    raise ValueError("fsdp: an optimizer with more than one parameter group is not supported")
                t.optimizer = _rebuilt(t.optimizer, t.module.parameters())
            if self._resume_from is not None:
                sharding.load_into(self._resume_from, self._models(), self._optimizers(),
                                   read_checkpoint_meta(self._resume_from).get("optimizers", {}))
        elif self.ctx.world > 1:
            self.nets = {n: nn.parallel.DistributedDataParallel(t.module) for n, t in self.trained.items()}
        return self.nets

    def save(self, done: int) -> None:
        """Write the checkpoint of step ``done`` (atomically; every rank calls this); never one
        holding a non-finite weight."""
        for name, model in self._models().items():
            if not sharding.all_finite(model, self.ctx.world):
                raise RunFailed(f"{self.name}: {name} has non-finite weights at step {done}; not saved (the last "
                                f"good checkpoint is kept in {self.checkpoint})")
        state = {"step": done, "metrics": self.metrics, "train_seconds": self._train_seconds(), **self.state_fn(done)}
        if self.sharded:
            sharding.save_sharded(self.checkpoint, self._models(), self._optimizers(), state, self.ctx.rank)
        elif self.ctx.rank == 0:
            save_checkpoint(self.checkpoint, models=self._models(), optimizers=self._optimizers(), state=state)

    def _train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._t0

    def run(self, step_fn: StepFn, *, progress: bool = True, stop_at: int | None = None) -> dict:
        """Train from ``self.start`` to ``cfg.steps`` (or until the time limit, or ``stop_at``);
        returns ``{"step", "checkpoint", "seconds", "train_seconds", "metrics"}``: ``seconds`` this
        call took, ``train_seconds`` the training time of every run up to here, resumed ones too."""
        cfg, rank = self.cfg, self.ctx.rank
        log = open(os.path.join(cfg.out, "log.jsonl"), "a" if self.start else "w") if rank == 0 else None
        bar = tqdm(range(self.start, cfg.steps), initial=self.start, total=cfg.steps, desc=self.name,
                   disable=not progress or rank > 0)
        t0 = self._t0 = time.perf_counter()
        done = self.start
        saved = self.start  # the step of the last checkpoint written (or resumed from)
        in_a_row = 0
        try:
            for step in bar:
                try:
                    update = step_fn(step)
                    applied = self._apply(update, step)
                except Exception as e:
                    raise RunFailed(f"{self.name} failed at step {step + 1}: {type(e).__name__}: {e} (the last good "
                                    f"checkpoint, step {saved}, is kept in {self.checkpoint})") from e
                record = {"step": step + 1, **update.stats, **applied}
                in_a_row = in_a_row + 1 if applied.get("skipped") else 0
                if in_a_row >= cfg.max_nonfinite:
                    raise RunFailed(f"{self.name} failed at step {step + 1}: {in_a_row} steps in a row of the "
                                    f"{update.model} had a non-finite loss or gradient (the last good checkpoint, "
                                    f"step {saved}, is kept in {self.checkpoint})")
                done = step + 1
                evaluated = self.evaluate(done)
                self.metrics.update(evaluated)
                record.update(evaluated)
                stop = self._agreed(cfg.time_limit_min > 0 and time.perf_counter() - t0 > 60 * cfg.time_limit_min) \
                    or (stop_at is not None and done >= stop_at)
                if rank == 0:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(self.postfix(record, self.metrics))
                # (no periodic save during a streak of skipped steps: the last good one stays the last)
                if (done % cfg.save_every == 0 and not in_a_row) or done == cfg.steps or stop:
                    self.save(done)
                    saved = done
                if stop:
                    break
        finally:
            if log is not None:
                log.close()
            bar.close()
            if self.lock is not None:
                self.lock.release()
        return {"step": done, "checkpoint": self.checkpoint, "seconds": time.perf_counter() - t0,
                "train_seconds": self._train_seconds(), "metrics": dict(self.metrics),
                "skipped_steps": self.skipped}

    def _agreed(self, flag: bool) -> bool:
        """``flag`` if any rank raises it (one all-reduce under DDP), so every rank stops at the
        same step instead of leaving the others waiting in a collective."""
        if self.ctx.world == 1 or self.cfg.time_limit_min <= 0:
            return flag
        t = torch.tensor([float(flag)], device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _apply(self, update: Update, step: int) -> dict:
        """Back-propagate ``update.loss`` into its model, clip, set the lr, step, update the EMA;
        or, when the loss or the gradient is not finite on any rank, skip the step (weights,
        optimizer and EMA untouched) and say so (``skipped``)."""
        t = self.trained[update.model]
        t.optimizer.zero_grad(set_to_none=True)
        update.loss.backward()
        gnorm = sharding.full(torch.nn.utils.clip_grad_norm_(t.module.parameters(), self.cfg.grad_clip))
        finite = torch.isfinite(update.loss.detach()).all() & torch.isfinite(gnorm)
        if self.ctx.world > 1:  # the gradients are averaged, the losses are not: agree on the loss too
            flag = finite.float().reshape(1).to(self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag[0] > 0
        prefix = f"{t.label}_" if t.label else ""
        if not bool(finite):
            t.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return {f"{prefix}grad_norm": float(gnorm), "skipped": 1, "skipped_steps": self.skipped}
        lr = t.lr(step)
        for g in t.optimizer.param_groups:
            g["lr"] = lr
        t.optimizer.step()
        if t.ema is not None:
            with torch.no_grad():
                decay = ema_decay(step, t.ema_decay)
                for pe, pm in zip(t.ema.parameters(), t.module.parameters(), strict=True):
                    pe.lerp_(pm, 1 - decay)
        return {f"{prefix}grad_norm": float(gnorm), f"{prefix}lr": lr}


def _rebuilt(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class and settings over ``params`` (fresh state)."""
    import inspect

    takes = inspect.signature(type(optimizer).__init__).parameters
    return type(optimizer)(params, **{k: v for k, v in optimizer.defaults.items() if k in takes})


def first_difference(saved: dict, now: dict, *, free=(), absent: dict | None = None,
                     prefix: str = "") -> tuple[str, object, object] | None:
    """The first option (``section.name``) whose value differs between two nested config dicts,
    with both values, or ``None``; leaf names in ``free`` are not compared, nor keys only one side
    has (options added since the other was written), unless ``absent`` (``section.name`` -> value)
    says what the code that wrote ``saved`` did in the option's place."""
    absent = absent or {}
    for key in now:
        if key not in saved and f"{prefix}{key}" not in absent:
            continue
        a, b = saved.get(key, absent.get(f"{prefix}{key}")), now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, free=free, absent=absent, prefix=f"{prefix}{key}.")
            if found is not None:
                return found
        elif key not in free and _normal(a) != _normal(b):
            return f"{prefix}{key}", a, b
    return None


def _normal(value):
    """JSON's view of a value (tuples are lists once saved)."""
    return json.loads(json.dumps(value))
