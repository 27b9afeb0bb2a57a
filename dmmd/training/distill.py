"""D-MMD distillation (docs/design.md, "Algorithm 1"; paper Algorithm 1): a k-step student generator from a
trained teacher, for masked and uniform diffusion.

One step ``i``: ``s ~ U(0,1)``, ``delta ~ U(0, 1/k)``, ``t = min(1, s + delta)``; data diffused to
``z_t``; ``x ~ Cat(x_hat_eta(z_t))``; ``z_s ~ q(z_s | z_t, x)`` without gradient. Generator steps
minimise eq. 11 through :func:`dmmd_ops.generator_loss`, auxiliary steps eq. 12 through
:func:`dmmd_ops.aux_loss` (``aux_per_gen`` auxiliary steps after each generator step). The
generator and the auxiliary model start as copies of the teacher; the generator (optionally)
also takes Gaussian noise, whose projection starts at zero.

For uniform diffusion with ``form="posterior"`` (paper Appendix D, eq. 24-26) the same ops act
on the log posterior vectors ``log pi_{s'}(x_hat, z_s)``, ``s' = max(0, s - posterior_ds)``: a
probability row passed as logits is its own softmax, so eq. 11/12 on those rows are eq. 24/26.

On CUDA the models run under bf16 autocast (the ops take the bf16 logits).

Reproducibility: everything random in step ``i`` is a function of ``(seed, i)`` (the batch,
times and noise from a seeded ``torch.Generator``; the categorical and posterior draws from the
Philox stream with one offset per block of global sequences; :mod:`dmmd.diffusion.randomness`),
so a resumed run replays exactly the steps it would have taken, and ``torchrun`` ranks that
each take their rows of the global batch make the same update as one process. The run itself
(resume, schedule, EMA, checkpoints, DDP) is :class:`dmmd.training.loop.RunLoop`'s.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass

import torch

import dmmd_ops
from dmmd.data import DataConfig, make_source
from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.randomness import (
    Stream,
    distill_draw_offsets,
    noise_projection_generator,
    step_generator,
    student_noise_generator,
)
from dmmd.models.denoiser import NOISE_INTO, NOISE_PER, Denoiser, DenoiserConfig, carry_over
from dmmd.models.external import ExternalDenoiser
from dmmd.options import Options, nested, option
from dmmd.training.checkpoint import load_tensors, read_state
from dmmd.training.loop import RunConfig, RunLoop, Trained, Update, run_context, warmup_constant, warmup_cosine
from dmmd.training.masked_lm import is_masked_lm, is_masked_lm_dir, load_masked_lm, read_meta, save_masked_lm
from dmmd.training.teacher import TeacherConfig, load_teacher, model_state, rebuild_model

WEIGHTS = ("constant", "elbo")
FORMS = ("xhat", "posterior")


# The defaults that differ by process, chosen on the exact-source study over seeds (README,
# "D-MMD on a source with an exactly known distribution"): a None option takes its process's.
PROCESS_DEFAULTS = {
    "masked": {"lr_schedule": "cosine", "soft_target": True, "noise_dim": 32, "noise_init": 0.1,
               "noise_into": "blocks"},
    "uniform": {"lr_schedule": "constant", "soft_target": False, "noise_dim": 0, "noise_init": 0.02,
                "noise_into": "embedding"},
}
LR_SCHEDULES = ("constant", "cosine")
# From this many classes on, the distiller takes the fused linear losses by default (their
# chunking saves the [rows, V] logits; below it the whole logits are small and one matmul each
# is simpler).
FUSED_MIN_CLASSES = 16384


def _per_process(name: str) -> str:
    """The help's note on a per-process default."""
    return " (default: " + ", ".join(f"{PROCESS_DEFAULTS[k][name]} for {k}" for k in PROCESS_DEFAULTS) + ")"


@dataclass
class DistillConfig(Options):
    """Everything a distillation run needs; saved in its checkpoints."""

    teacher: str = option("runs/teacher/checkpoint", "the teacher: a checkpoint directory from train-teacher, or a "
                                                     "transformers masked-LM directory (save_pretrained)")
    mask_id: int | None = option(None, "a transformers teacher: its mask token id (default: the mask token of the "
                                       "tokenizer saved with it)")
    source: DataConfig = nested(DataConfig, data="")
    student_steps: int = option(4, "k, the student's sampling steps")
    teacher_raw_weights: bool = option(False, "distill the teacher's raw weights instead of its EMA")
    aux_per_gen: int = option(2, "auxiliary-model steps after each generator step")
    lr_gen: float = option(3e-4, "AdamW learning rate of the generator")
    lr_aux: float = option(1e-3, "AdamW learning rate of the auxiliary model")
    lr_schedule: str | None = option(None, "learning rates after the warm-up: constant, or cosine (decay to a tenth "
                                           "at the last step)" + _per_process("lr_schedule"))
    beta1: float = option(0.0, "AdamW beta1 of both optimizers")
    beta2: float = option(0.99, "AdamW beta2 of both optimizers")
    weight_decay: float = option(0.0, "AdamW weight decay")
    ema: float = option(0.99, "decay of the generator's exponential moving average")
    weight: str = option("constant", "loss weight w(s): constant, or elbo (-alpha'(s) / (1 - alpha(s)))")
    soft_target: bool | None = option(None, "masked diffusion: train the auxiliary model on x_hat_eta(z_t) "
                                            "instead of the sample x" + _per_process("soft_target"))
    temperature: float = option(1.0, "teacher temperature (paper section 3.3)")
    top_p: float = option(1.0, "teacher top-p, applied as a soft mask")
    delta: float = option(2.0, "logit drop outside the teacher's top-p nucleus")
    noise_dim: int | None = option(None, "Gaussian noise input of the generator" + _per_process("noise_dim"))
    # One noise vector per sequence (shared by its tokens) and a small random initial projection:
    # with a zero projection the expected gradient towards using the noise is zero, and in the
    # masked Markov study (2026-11-28) masked generators left per-token noise unused.
    noise_init: float | None = option(None, "std of the generator's initial noise projections (0: the generator "
                                            "starts exactly as the teacher)" + _per_process("noise_init"))
    noise_per: str | None = option(None, "token: independent noise per token; sequence: one noise vector shared "
                                         "by a sequence's tokens; pyramid (images): Gaussian maps at halving "
                                         "resolutions, upsampled, one vector per pixel (default: pyramid for "
                                         "image teachers, else sequence)")
    noise_into: str | None = option(None, "where the noise's projections enter: the input embedding, also "
                                          "the residual stream before every block (blocks), or that and the time "
                                          "conditioning of every block's adaptive LayerNorm (conditioning)"
                                    + _per_process("noise_into"))
    noise_module: str = option("", "a transformers (or your own) teacher: the submodule, by dotted name, whose "
                                   "output the noise projection is added to (default: its input embeddings)")
    fused_losses: bool | None = option(None, "eq. 11/12 through the fused linear losses (dmmd_ops.linear_*): the "
                                             "logits made chunk by chunk from the models' final hidden states and "
                                             "output layers, never [rows, V] at once (default: on when V >= "
                                             f"{FUSED_MIN_CLASSES} and the models expose their output layer; not with "
                                             "form='posterior')")
    form: str = option("xhat", "xhat (eq. 11/12) or posterior (Appendix D, uniform diffusion)")
    posterior_ds: float | None = option(None, "Appendix D: s - s' of the posterior vectors (none: 1/(2k))")
    draw_block: int = option(16, "sequences per random stream (keeps draws independent of the process count)")
    collapse_entropy: float = option(0.02, "warn when the generator's output entropy (nats) falls below this")
    dropout: bool = option(False, "keep the models' dropout on while training generator and auxiliary model "
                                  "(train mode); its masks come from the global random state, so a resumed run is "
                                  "no longer bit-identical and torchrun no longer equals one process")
    run: RunConfig = nested(RunConfig, batch_size=64, steps=2000, warmup=50, save_every=500, out="runs/student")

    def validate(self, kind: str | None = None) -> None:
        """Raise ``ValueError`` naming the first option out of its domain, or (given the
        process ``kind``, ``"masked"`` or ``"uniform"``) the first that does not fit it."""
        if self.student_steps < 1:
            raise ValueError(f"student_steps must be >= 1, got {self.student_steps}")
        if self.aux_per_gen < 1:
            raise ValueError(f"aux_per_gen must be >= 1, got {self.aux_per_gen}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {WEIGHTS}, got {self.weight!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.delta >= 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        for name in ("lr_gen", "lr_aux"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "ema"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.noise_per is not None and self.noise_per not in NOISE_PER:
            raise ValueError(f"noise_per must be one of {NOISE_PER}, got {self.noise_per!r}")
        if self.noise_into is not None and self.noise_into not in NOISE_INTO:
            raise ValueError(f"noise_into must be one of {NOISE_INTO}, got {self.noise_into!r}")
        if self.noise_dim is not None and self.noise_dim < 0:
            raise ValueError(f"noise_dim must be >= 0, got {self.noise_dim}")
        if self.noise_init is not None and self.noise_init < 0:
            raise ValueError(f"noise_init must be >= 0, got {self.noise_init}")
        if self.mask_id is not None and self.mask_id < 0:
            raise ValueError(f"mask_id must be >= 0, got {self.mask_id}")
        if self.draw_block < 1:
            raise ValueError(f"draw_block must be >= 1, got {self.draw_block}")
        if self.posterior_ds is not None and not 0 < self.posterior_ds <= 1:
            raise ValueError(f"posterior_ds must be in (0, 1], got {self.posterior_ds}")
        self.run.validate()
        if kind == "uniform" and self.soft_target:
            raise ValueError("soft_target is only valid for masked diffusion: a uniform z_s is "
                             "consistent with the hard x only (paper section 3.2)")
        if self.form == "posterior" and kind is not None and kind != "uniform":
            raise ValueError("form='posterior' (Appendix D) is for uniform diffusion")

    def for_process(self, kind: str, image: bool = False) -> DistillConfig:
        """A copy whose unset (None) per-process options take ``kind``'s defaults
        (:data:`PROCESS_DEFAULTS`; noise per pixel pyramid for an ``image`` teacher, else per
        sequence), validated for ``kind``."""
        if kind not in PROCESS_DEFAULTS:
            raise ValueError(f"process must be one of {tuple(PROCESS_DEFAULTS)}, got {kind!r}")
        defaults = {**PROCESS_DEFAULTS[kind], "noise_per": "pyramid" if image else "sequence"}
        unset = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        cfg = self.replace(**unset) if unset else self
        cfg.validate(kind)
        return cfg


@dataclass
class DistillBatch:
    """One step's global batch: clean data, times, ``z_t`` and the generator's noise."""

    x0: torch.Tensor      # [B, L]
    s: torch.Tensor       # [B] float64
    t: torch.Tensor       # [B] float64
    z_t: torch.Tensor     # [B, L]
    noise: torch.Tensor | None  # [B, L, noise_dim]
    rows: torch.Tensor    # [B] global row ids (for the per-sequence Philox offsets)

    def take(self, index, device) -> DistillBatch:
        """The rows ``index`` (a slice) on ``device``."""
        return DistillBatch(*(None if v is None else v[index].to(device)
                              for v in (self.x0, self.s, self.t, self.z_t, self.noise, self.rows)))


def draw_batch(source, process: DiffusionProcess, cfg: DistillConfig, noise_dim: int, step: int) -> DistillBatch:
    """Algorithm 1 lines 1-2 for the global batch of ``step``."""
    gen = step_generator(cfg.run.seed, step, Stream.DISTILL)
    b = cfg.run.batch_size
    x0 = source.sample(b, gen)
    s = torch.rand(b, generator=gen, dtype=torch.float64)
    delta = torch.rand(b, generator=gen, dtype=torch.float64) / cfg.student_steps
    t = torch.clamp(s + delta, max=1.0)
    z_t = process.diffuse(x0, t, gen)
    noise = None
    if noise_dim > 0:
        noise = draw_noise(b, x0.shape[1], noise_dim, cfg.noise_per, gen, getattr(source, "shape", None))
    return DistillBatch(x0, s, t, z_t, noise, torch.arange(b))


def draw_noise(batch: int, length: int, dim: int, per: str, generator: torch.Generator,
               image_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The generator's Gaussian noise ``[batch, length, dim]``: independent per token, one
    vector per sequence repeated over its tokens (``per="sequence"``), or for pixel tokens of
    ``image_shape`` (H, W, C) a 2-D noise pyramid (``per="pyramid"``): Gaussian maps at H x W,
    H/2 x W/2, ... down to 1 x 1, each upsampled (nearest) to H x W, their channels
    concatenated to ``dim`` and each pixel's vector shared by its C channel tokens."""
    if per == "sequence":
        return torch.randn(batch, 1, dim, generator=generator).expand(batch, length, dim)
    if per == "pyramid":
        if image_shape is None or math.prod(image_shape) != length:
            raise ValueError(f"pyramid noise needs image data whose H * W * C is the length {length}, "
                             f"got image shape {image_shape}")
        h, w, c = image_shape
        sizes = [(h, w)]
        while sizes[-1] != (1, 1):
            sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
        dims = [dim // len(sizes) + (i < dim % len(sizes)) for i in range(len(sizes))]
        maps = []
        for (mh, mw), d in zip(sizes, dims, strict=True):
            if d == 0:
                continue
            m = torch.randn(batch, mh, mw, d, generator=generator)
            rows = torch.arange(h) * mh // h  # nearest upsampling: pixel -> its cell at this level
            cols = torch.arange(w) * mw // w
            maps.append(m[:, rows][:, :, cols])
        pixel = torch.cat(maps, dim=-1)  # [batch, H, W, dim]
        return pixel.unsqueeze(3).expand(batch, h, w, c, dim).reshape(batch, length, dim)
    if per == "token":
        return torch.randn(batch, length, dim, generator=generator)
    raise ValueError(f"noise_per must be one of {NOISE_PER}, got {per!r}")


def build_generator(teacher: Denoiser | ExternalDenoiser, noise_dim: int, noise_init: float = 0.0, seed: int = 0,
                    noise_per: str = "token", noise_into: str = "embedding", noise_module: str = ""
                    ) -> Denoiser | ExternalDenoiser:
    """The teacher's architecture and weights plus a noise input whose projection starts at
    zero (the generator is then exactly the teacher) or at ``N(0, noise_init^2)``: a zero
    projection gets only zero-mean gradients at first, a small random one breaks the symmetry.
    A wrapped model (:class:`~dmmd.models.external.ExternalDenoiser`) gets its projection
    installed from outside, added to ``noise_module``'s output (default: its input embeddings)."""
    if isinstance(teacher, ExternalDenoiser):
        if noise_into != "embedding":
            raise ValueError(f"noise_into={noise_into!r} is for dmmd's own denoiser; a wrapped model's noise enters "
                             f"at one submodule (noise_module)")
        gen = copy.deepcopy(teacher)
        if noise_dim > 0:
            gen.install_noise(noise_dim, noise_per, noise_init, noise_projection_generator(seed),
                              module=noise_module or None)
        return gen
    if noise_module:
        raise ValueError("noise_module is for a transformers or your own teacher; dmmd's denoiser takes noise_into")
    cfg = DenoiserConfig(**{**teacher.config.to_dict(), "noise_dim": noise_dim, "noise_per": noise_per,
                            "noise_into": noise_into})
    ref = next(teacher.parameters())
    gen = Denoiser(cfg).to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = gen.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or {m for m in missing if not m.startswith(("noise_proj.", "block_noise.", "cond_noise."))}:
        raise RuntimeError(f"teacher and generator do not match: missing {missing}, unexpected {unexpected}")
    if noise_init > 0:
        g = noise_projection_generator(seed)
        with torch.no_grad():
            for proj in gen.noise_projections():
                w = proj.weight
                w.copy_(noise_init * torch.randn(w.shape, generator=g, dtype=w.dtype))
    return gen


def loss_weight(process: DiffusionProcess, kind: str, s: torch.Tensor) -> torch.Tensor:
    """``w(s)`` per sequence: 1, or the ELBO weight ``-alpha'(s) / (1 - alpha(s))`` (clamped to
    ``[0, 1e3]``: it grows like ``1 / s`` near ``s = 0``)."""
    if kind == "constant":
        return torch.ones_like(s)
    return process.elbo_weight(s).clamp(0, 1e3)


class Distiller:
    """The three models of Algorithm 1 and the two losses of one step.

    ``teacher`` (frozen), ``generator`` (trained, with an EMA), ``aux`` (trained). Losses are
    per-token means over the batch (positions that carry no signal, such as unmasked ``z_s``
    positions in masked diffusion, count as zeros), so under DDP the average of the ranks'
    losses is the single-process loss.
    """

    def __init__(self, teacher: Denoiser | ExternalDenoiser, process: DiffusionProcess, cfg: DistillConfig):
        image = teacher.config.image_shape is not None
        if isinstance(teacher, ExternalDenoiser) and cfg.noise_into is None:
            cfg = cfg.replace(noise_into="embedding")  # a wrapped model's noise enters at one module
        if teacher.config.num_classes != process.num_classes or \
                getattr(teacher.config, "mask_id", None) != process.mask_id:
            raise ValueError(f"the teacher ({teacher.config.num_classes} classes, mask {teacher.config.mask_id}) and "
                             f"the process ({process.num_classes} classes, mask {process.mask_id}) do not match")
        cfg = cfg.for_process(process.kind, image)
        if cfg.noise_per == "pyramid" and not image:
            raise ValueError("noise_per='pyramid' needs an image teacher (trained on image data)")
        self.cfg, self.process = cfg, process
        self.teacher = teacher.eval().requires_grad_(False)
        self.noise_dim = cfg.noise_dim
        self.generator = build_generator(teacher, self.noise_dim, cfg.noise_init, cfg.run.seed, cfg.noise_per,
                                         cfg.noise_into, cfg.noise_module)
        # Dropout (and any other train-mode randomness) off unless asked for: its masks would come
        # from the global RNG, outside the (seed, step) streams that make resume and DDP exact.
        self.generator.train(cfg.dropout).requires_grad_(True)
        self.aux = copy.deepcopy(teacher).train(cfg.dropout).requires_grad_(True)
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        # What the losses call with gradient: the modules, or their DDP wrappers (the run loop's).
        self.gen_net: torch.nn.Module = self.generator
        self.aux_net: torch.nn.Module = self.aux
        self.fused = self._fused_losses(cfg, teacher)
        # Rows per Philox stream: a divisor of the batch, so every process holds whole blocks.
        self.draw_block = math.gcd(cfg.draw_block, cfg.run.batch_size)
        k = cfg.student_steps
        self.posterior_ds = cfg.posterior_ds if cfg.posterior_ds is not None else 1.0 / (2 * k)

    def is_generator_step(self, step: int) -> bool:
        return step % (1 + self.cfg.aux_per_gen) == 0

    # ---------------------------------------------------------------- Algorithm 1, lines 3-4

    def generate(self, batch: DistillBatch, step: int):
        """Generator logits at ``z_t``, ``x ~ Cat`` and ``z_s ~ q(z_s | z_t, x)``.

        Draws use Philox ``(seed, offset)`` with one offset per (step, block of ``draw_block``
        global rows), so they do not depend on how the batch is split across processes.
        """
        return self._generate(batch, step)[:3]

    def _generate(self, batch: DistillBatch, step: int):
        """:meth:`generate` and the generator's output-entropy stats (:meth:`_draw`)."""
        fn = self.gen_net if torch.is_grad_enabled() else self.generator
        logits = fn(batch.z_t, batch.t.float(), batch.noise)
        return logits, *self._draw(batch, step, lambda rows: logits[rows].detach())

    def generate_features(self, batch: DistillBatch, step: int):
        """:meth:`generate` for the fused losses: the generator's final hidden states at ``z_t``
        instead of its logits (those made block by block for the draws), ``x``, ``z_s`` and the
        generator's output-entropy stats."""
        fn = self.gen_net if torch.is_grad_enabled() else self.generator
        h = fn(batch.z_t, batch.t.float(), batch.noise, features=True)
        return h, *self._draw(batch, step, lambda rows: self._head_logits(self.generator, h[rows].detach(),
                                                                          batch.z_t[rows]))

    def _draw(self, batch: DistillBatch, step: int, block_logits):
        """``x ~ Cat`` and ``z_s ~ q(z_s | z_t, x)`` block by block (``block_logits(rows)``: the
        generator's logits of those rows), with the generator's output entropy (:meth:`_entropy_stats`).

        Draws use Philox ``(seed, offset)`` with one offset per (step, block of ``draw_block``
        global rows), so they do not depend on how the batch is split across processes."""
        a_s = self.process.alpha(batch.s).unsqueeze(-1).expand(batch.z_t.shape)
        a_t = self.process.alpha(batch.t).unsqueeze(-1).expand(batch.z_t.shape)
        k = self.cfg.student_steps
        # the student's sampling step that t falls in: j covers t in (j/k, (j+1)/k], j = 0 the last
        coarse = (torch.ceil(batch.t * k).long() - 1).clamp(0, k - 1)
        blk = self.draw_block
        x, z_s, entropy, by_step = [], [], _Mean(), [_Mean() for _ in range(k)]
        with torch.no_grad():
            for lo in range(0, batch.z_t.shape[0], blk):
                rows = slice(lo, lo + blk)
                logits = block_logits(rows)
                x_offset, z_offset = distill_draw_offsets(step, self.cfg.run.batch_size // blk,
                                                          int(batch.rows[lo]) // blk)
                xb = dmmd_ops.sample_categorical(logits, seed=self.cfg.run.seed, offset=x_offset)
                z_s.append(dmmd_ops.posterior_sample(
                    batch.z_t[rows], xb, a_s[rows], a_t[rows], process=self.process.kind,
                    mask_id=self.process.mask_id, num_classes=self.process.num_classes, seed=self.cfg.run.seed,
                    offset=z_offset))
                x.append(xb)
                h, chosen = self._entropies(logits, batch.z_t[rows])
                entropy.add(h[chosen])
                step_of = coarse[rows].to(h.device).unsqueeze(-1).expand_as(h)
                for j in range(k):
                    by_step[j].add(h[chosen & (step_of == j)])
        stats = {"gen_entropy": entropy.value(), "gen_entropy_by_step": [m.value(none=True) for m in by_step],
                 "noise_proj_norm": self._noise_norm()}
        return torch.cat(x), torch.cat(z_s), stats

    def _noise_norm(self) -> float:
        """The Frobenius norm of all the generator's noise projections together (0 without noise)."""
        with torch.no_grad():
            return math.sqrt(sum(float(p.weight.float().square().sum()) for p in self.generator.noise_projections()))

    def _head_logits(self, model, h: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """``model``'s logits from its final hidden states ``h`` (what its forward returns)."""
        weight, bias = model.output_head()
        logits = h @ weight.T + bias
        if logits.dtype != torch.float64:  # as the models' forward: float32 logits (float64 oracles stay)
            logits = logits.float()
        return carry_over(logits, z_t, self.process.mask_id) if self.process.kind == "masked" else logits

    @staticmethod
    def _fused_losses(cfg: DistillConfig, teacher) -> bool:
        """Whether the losses go through the fused linear ops (see ``fused_losses``)."""
        exposes = isinstance(teacher, Denoiser) or teacher.head_layer() is not None
        if cfg.fused_losses:
            if cfg.form == "posterior":
                raise ValueError("fused_losses: the posterior form (Appendix D) needs whole probability rows")
            if not exposes:
                raise ValueError("fused_losses: the teacher exposes no output layer (as_denoiser(..., head=...))")
            return True
        if cfg.fused_losses is None:
            return exposes and cfg.form == "xhat" and teacher.config.num_classes >= FUSED_MIN_CLASSES
        return False

    def check_fused_head(self, batch: DistillBatch, rows: int = 4) -> None:
        """Where the fused losses are on: check on ``rows`` sequences of ``batch`` that each
        model's logits made from its final hidden states and output layer (``h @ W.T + b``) are
        its own forward's, and refuse the fused path (``ValueError`` naming the model and the
        largest difference) where not: a model that scales or soft-caps its logits after its
        output layer would otherwise get silently wrong losses."""
        if not self.fused:
            return
        b = batch.take(slice(0, rows), next(self.generator.parameters()).device)
        with torch.no_grad():
            for name, model, noise in (("teacher", self.teacher, None), ("generator", self.generator, b.noise)):
                own = model(b.z_t, b.t.float(), noise)
                fused = self._head_logits(model, model(b.z_t, b.t.float(), noise, features=True), b.z_t)
                choice = torch.isfinite(own)
                diff = float((own - fused).abs().where(choice, 0.0).max()) if bool(choice.any()) else 0.0
                scale = float(own.abs().where(choice, 0.0).max()) if bool(choice.any()) else 0.0
                if diff > 1e-3 * (1.0 + scale) or not torch.equal(choice, torch.isfinite(fused)):
                    raise ValueError(f"fused_losses: the {name}'s logits made from its final hidden states and output "
                                     f"layer differ from its own forward's by up to {diff:.4g} (it changes its logits "
                                     f"after the output layer?); distill with --fused-losses false")

    def _at_z_s(self, batch: DistillBatch, z_s: torch.Tensor):
        """What both losses need at ``z_s``: the teacher's logits, ``w(s)`` per token and the
        positions that carry signal."""
        with torch.no_grad():
            t_logits = self.teacher(z_s, batch.s.float())
        return t_logits, *self._weights(batch, z_s)

    def _rows(self, z_s: torch.Tensor) -> torch.Tensor:
        """Positions whose loss can be non-zero: masked ``z_s`` (then ``z_t`` is masked too);
        every position for uniform diffusion. At an unmasked ``z_s`` teacher and auxiliary
        model both carry the token over, so the difference of their log-probabilities is zero."""
        if self.process.kind == "masked":
            return z_s == self.process.mask_id
        return torch.ones_like(z_s, dtype=torch.bool)

    def _log_posterior(self, probs: torch.Tensor, z_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Appendix D: ``log pi_{s'}(probs, z_s)`` with ``s' = max(0, s - ds)``, as logits in
        ``probs``' dtype (computed in float64)."""
        s_prev = torch.clamp(s - self.posterior_ds, min=0.0)
        pi = self.process.posterior_probs(z_s, probs, s_prev, s)
        return torch.log(pi.clamp_min(1e-300)).to(probs.dtype)

    def _teacher_probs(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return dmmd_ops.teacher_logprobs(teacher_logits, temperature=c.temperature, top_p=c.top_p,
                                         delta=c.delta).exp()

    # ---------------------------------------------------------------- the two losses

    def generator_loss(self, batch: DistillBatch, step: int) -> tuple[torch.Tensor, dict]:
        """Eq. 11 (or eq. 24), gradient to the generator only. Returns ``(loss, stats)``."""
        if self.fused:
            return self._generator_loss_fused(batch, step)
        c = self.cfg
        logits, x, z_s, entropy = self._generate(batch, step)
        t_logits, w, keep = self._at_z_s(batch, z_s)
        with torch.no_grad():
            a_logits = self.aux(z_s, batch.s.float())
        if c.form == "posterior":
            u = self._log_posterior(torch.softmax(logits, -1), z_s, batch.s)
            with torch.no_grad():
                a = self._log_posterior(self._teacher_probs(t_logits), z_s, batch.s)
                b = self._log_posterior(torch.softmax(a_logits, -1), z_s, batch.s)
            loss = dmmd_ops.generator_loss(u[keep], a[keep], b[keep], weight=w[keep])
        else:
            loss = dmmd_ops.generator_loss(logits[keep], t_logits[keep], a_logits[keep], weight=w[keep],
                                           temperature=c.temperature, top_p=c.top_p, delta=c.delta)
        loss = loss / z_s.numel()
        return loss, {"gen_loss": float(loss.detach()), **entropy}

    def aux_loss(self, batch: DistillBatch, step: int) -> tuple[torch.Tensor, dict]:
        """Eq. 12 (or eq. 26), gradient to the auxiliary model only. Returns ``(loss, stats)``."""
        if self.fused:
            return self._aux_loss_fused(batch, step)
        c, proc = self.cfg, self.process
        with torch.no_grad():
            logits, x, z_s, entropy = self._generate(batch, step)
        t_logits, w, keep = self._at_z_s(batch, z_s)
        a_logits = self.aux_net(z_s, batch.s.float())
        if c.form == "posterior":
            b = self._log_posterior(torch.softmax(a_logits, -1), z_s, batch.s)
            with torch.no_grad():
                onehot = torch.nn.functional.one_hot(x, proc.num_classes).to(torch.float64)
                target = torch.exp(self._log_posterior(onehot, z_s, batch.s))
                target = (target / target.sum(-1, keepdim=True)).to(logits.dtype)
                a = self._log_posterior(self._teacher_probs(t_logits), z_s, batch.s)
            loss = dmmd_ops.aux_loss(b[keep], target[keep], a[keep], weight=w[keep])
        else:
            target = torch.softmax(logits, -1) if c.soft_target else x
            loss = dmmd_ops.aux_loss(a_logits[keep], target[keep], t_logits[keep], weight=w[keep],
                                     temperature=c.temperature, top_p=c.top_p, delta=c.delta)
        loss = loss / z_s.numel()
        return loss, {"aux_loss": float(loss.detach()), **entropy}

    def _entropies(self, logits: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's output entropies (nats, float64) ``[rows, L]`` and where it has a
        choice (bool ``[rows, L]``: masked ``z_t`` positions; every position for uniform), paper
        Table 6."""
        logp = torch.log_softmax(logits.detach().float(), -1)
        h = -(torch.where(logp > -math.inf, logp.exp() * logp, 0.0)).sum(-1).double()
        if self.process.kind == "masked":
            return h, z_t == self.process.mask_id
        return h, torch.ones_like(z_t, dtype=torch.bool)

    # ---------------------------------------------------------------- the fused losses

    def _generator_loss_fused(self, batch: DistillBatch, step: int) -> tuple[torch.Tensor, dict]:
        """Eq. 11 through :func:`dmmd_ops.linear_generator_loss` (no ``[rows, V]`` logits)."""
        c = self.cfg
        h, x, z_s, entropy = self.generate_features(batch, step)
        w, keep = self._weights(batch, z_s)
        with torch.no_grad():
            ht = self.teacher(z_s, batch.s.float(), features=True)
            ha = self.aux(z_s, batch.s.float(), features=True)
            (wt, bt), (wa, ba) = ((w_.detach(), b_.detach()) for w_, b_ in (self.teacher.output_head(),
                                                                            self.aux.output_head()))
        ws, bs = self.generator.output_head()
        loss = dmmd_ops.linear_generator_loss(h[keep], ws, ht[keep], wt, ha[keep], wa, b_student=bs, b_teacher=bt,
                                              b_aux=ba, weight=w[keep], temperature=c.temperature, top_p=c.top_p,
                                              delta=c.delta)
        loss = loss / z_s.numel()
        return loss, {"gen_loss": float(loss.detach()), **entropy}

    def _aux_loss_fused(self, batch: DistillBatch, step: int) -> tuple[torch.Tensor, dict]:
        """Eq. 12 through :func:`dmmd_ops.linear_aux_loss` (soft targets: only the kept rows'
        probabilities are made)."""
        c = self.cfg
        with torch.no_grad():
            h, x, z_s, entropy = self.generate_features(batch, step)
        w, keep = self._weights(batch, z_s)
        with torch.no_grad():
            ht = self.teacher(z_s, batch.s.float(), features=True)
            wt, bt = (p.detach() for p in self.teacher.output_head())
            if c.soft_target:  # the kept rows' probabilities only
                target = torch.softmax(self._head_logits(self.generator, h[keep], batch.z_t[keep]), -1)
            else:
                target = x[keep]
        ha = self.aux_net(z_s, batch.s.float(), features=True)
        wa, ba = self.aux.output_head()
        loss = dmmd_ops.linear_aux_loss(ha[keep], wa, target, ht[keep], wt, b_aux=ba, b_teacher=bt, weight=w[keep],
                                        temperature=c.temperature, top_p=c.top_p, delta=c.delta)
        loss = loss / z_s.numel()
        return loss, {"aux_loss": float(loss.detach()), **entropy}

    def _weights(self, batch: DistillBatch, z_s: torch.Tensor):
        """``w(s)`` per token and the positions that carry signal."""
        w = loss_weight(self.process, self.cfg.weight, batch.s).unsqueeze(-1).expand_as(z_s)
        return w, self._rows(z_s)


class _Mean:
    """A running mean of float64 values (``nan`` when empty)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        self.total += float(values.sum())
        self.count += values.numel()

    def value(self, none: bool = False) -> float | None:
        """The mean; when empty ``nan`` (or ``None`` with ``none``, for JSON)."""
        if not self.count:
            return None if none else float("nan")
        return self.total / self.count


def student_fn(model: Denoiser | ExternalDenoiser, seed: int):
    """A generator as the sampler's ``model_fn(z_t, t)``: each call draws fresh Gaussian noise from
    a ``torch.Generator`` seeded with ``seed`` (so sampling stays reproducible)."""
    gen = student_noise_generator(seed)
    nd = model.config.noise_dim

    def fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = None
        if nd > 0:
            noise = draw_noise(*z_t.shape, nd, model.config.noise_per, gen, model.config.image_shape).to(z_t.device)
        return model(z_t, t, noise)

    return fn


class CollapseMonitor:
    """Warns when the generator collapses: its output entropy near zero while the auxiliary
    loss rises (smoothed over ~50 steps, compared with its lowest smoothed value)."""

    def __init__(self, entropy_floor: float):
        self.floor = entropy_floor
        self.entropy = None
        self.aux = None
        self.aux_min = math.inf
        self.warned = False

    def update(self, stats: dict) -> bool:
        h = stats.get("gen_entropy")
        if h is not None and math.isfinite(h):
            self.entropy = h if self.entropy is None else 0.98 * self.entropy + 0.02 * h
        if "aux_loss" in stats:
            a = stats["aux_loss"]
            self.aux = a if self.aux is None else 0.98 * self.aux + 0.02 * a
            self.aux_min = min(self.aux_min, self.aux)
        collapsed = (self.entropy is not None and self.entropy < self.floor and self.aux is not None
                     and self.aux > 1.2 * self.aux_min)
        if collapsed and not self.warned:
            warnings.warn(f"the generator is collapsing: output entropy {self.entropy:.4f} nats "
                          f"(< {self.floor}) while the auxiliary loss rose from {self.aux_min:.4f} to "
                          f"{self.aux:.4f}; lower lr_gen, raise aux_per_gen or add noise_dim",
                          RuntimeWarning, stacklevel=2)
        self.warned = self.warned or collapsed
        return collapsed


@dataclass
class DistillTeacher:
    """A teacher ready to distil: the model, its process, the data and what describes them."""

    model: Denoiser | ExternalDenoiser
    process: DiffusionProcess
    source: object                        # what draws the clean data (``.sample(batch, generator)``)
    data: DataConfig | None = None        # the source's config (None: a source given in Python)
    teacher_config: dict | None = None    # a dmmd teacher's TeacherConfig
    tokenizer: object = None              # a transformers teacher's, saved with the student


def load_distill_teacher(cfg: DistillConfig, device: torch.device | str = "cpu") -> DistillTeacher:
    """The teacher ``cfg.teacher`` names (a dmmd checkpoint or a transformers masked-LM
    directory), its process and the data to distil on; every mismatch a ``ValueError`` naming it."""
    if is_masked_lm_dir(cfg.teacher):
        if cfg.teacher_raw_weights:
            raise ValueError(f"teacher_raw_weights: the transformers directory {cfg.teacher} holds one set of weights")
        model, tokenizer, meta = load_masked_lm(cfg.teacher, mask_id=cfg.mask_id, device=str(device))
        if cfg.source.data:
            data = DataConfig.from_dict(cfg.source.to_dict())
        elif meta.get("source"):  # the data dmmd trained it on, with the data options given
            data = DataConfig.from_dict({**meta["source"], **{name: getattr(cfg.source, name)
                                                              for name in _data_options_set(cfg)}})
        else:
            raise ValueError(f"data: give the data to distil the transformers teacher {cfg.teacher} on (--data, "
                             f"--length; a .bin of its tokenizer's ids with --vocab-size)")
        source = make_source(data)
        mc = model.config
        if source.vocab_size > mc.num_classes:
            raise ValueError(f"data: its {source.vocab_size} token ids do not fit the teacher's {mc.num_classes} "
                             f"classes")
        if mc.length is not None and data.length > mc.length:
            raise ValueError(f"length: the teacher takes at most {mc.length} tokens, got {data.length}")
        process = DiffusionProcess("masked", mc.num_classes, meta.get("schedule", "loglinear"), mask_id=mc.mask_id)
        return DistillTeacher(model, process, source, data, None, tokenizer)
    changed = _data_options_set(cfg)
    if changed:
        raise ValueError(f"{changed[0]}: the dmmd teacher checkpoint {cfg.teacher} distils on the data it was "
                         f"trained on (data options are for a transformers teacher)")
    model, process, state = load_teacher(cfg.teacher, use_ema=not cfg.teacher_raw_weights, mask_id=cfg.mask_id,
                                         device=str(device))
    tcfg = TeacherConfig.from_dict(state["config"])
    return DistillTeacher(model, process, make_source(tcfg.source), tcfg.source, tcfg.to_dict())


def _data_options_set(cfg: DistillConfig) -> list[str]:
    """The data options ``cfg`` sets (those that differ from their defaults)."""
    return [f.name for f, default in DataConfig.flat_fields(DistillConfig().source)
            if getattr(cfg.source, f.name) != default]


def distill(cfg: DistillConfig, *, resume: bool = True, progress: bool = True, stop_at: int | None = None) -> dict:
    """Distill (or resume) a student of the teacher ``cfg.teacher``; returns ``{"step",
    "checkpoint", "seconds", "metrics"}`` (and ``"student"``: the transformers directory of a
    transformers teacher's student).

    Writes ``OUT/checkpoint/`` (generator, auxiliary, EMA, both optimizers, step) every
    ``save_every`` steps, at the end and when stopped early, and ``OUT/log.jsonl``; for a
    transformers teacher also ``OUT/student/`` (the EMA generator, ``save_pretrained``, with
    its tokenizer and noise weights) at the end of the run.
    """
    cfg.validate()
    return distill_teacher(load_distill_teacher(cfg), cfg, resume=resume, progress=progress, stop_at=stop_at)


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
                    stop_at: int | None = None) -> dict:
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
    d.check_fused_head(draw_batch(source, process, cfg, d.noise_dim, 0))  # before any work
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
                   state=lambda done: student_state(d, cfg, teacher), settings=cfg.to_dict())
    if resume:
        loop.resume()
    nets = loop.wrap_ddp()
    d.gen_net, d.aux_net = nets["generator"], nets["aux"]
    monitor = CollapseMonitor(cfg.collapse_entropy)
    rows = ctx.rows(run.batch_size)

    def step(i: int) -> Update:
        batch = draw_batch(source, process, cfg, d.noise_dim, i).take(rows, ctx.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
            if d.is_generator_step(i):
                loss, stats, model = *d.generator_loss(batch, i), "generator"
            else:
                loss, stats, model = *d.aux_loss(batch, i), "aux"
        if monitor.update(stats):
            stats["collapse_warning"] = True
        return Update(loss, model, stats)

    result = loop.run(step, progress=progress, stop_at=stop_at)
    if is_masked_lm(d.ema):
        if ctx.rank == 0:  # the student as its teacher came: a transformers directory
            result["student"] = os.path.join(run.out, "student")
            save_masked_lm(d.ema, result["student"], tokenizer=teacher.tokenizer,
                           meta={"kind": "student", "process": "masked", "schedule": process.schedule_name,
                                 "source": None if teacher.data is None else teacher.data.to_dict(),
                                 "student_steps": cfg.student_steps, "step": result["step"]})
    return result


def student_state(d: Distiller, cfg: DistillConfig, teacher: DistillTeacher) -> dict:
    """The JSON state saved with a student: what :func:`load_student` needs to rebuild it."""
    return {"kind": "student", "config": cfg.to_dict(), "teacher_config": teacher.teacher_config,
            "source": None if teacher.data is None else teacher.data.to_dict(),
            "schedule": d.process.schedule_name, **model_state(d.generator)}


def is_student(path: str) -> bool:
    if is_masked_lm_dir(path):
        return read_meta(path).get("kind") == "student"
    return read_state(path).get("kind") == "student"


def load_student(path: str, *, use_ema: bool = True, device: str = "cpu", model: torch.nn.Module | None = None
                 ) -> tuple[Denoiser | ExternalDenoiser, DiffusionProcess, dict]:
    """A distilled generator (EMA weights by default), its process and its state, from a run's
    checkpoint or a transformers student directory (``OUT/student``). A student of your own
    module (:func:`distill_model`) needs ``model``: an instance of that module's class, whose
    weights are replaced by the student's."""
    if is_masked_lm_dir(path):
        student, _, meta = load_masked_lm(path, device=device)
        if meta.get("kind") != "student":
            raise ValueError(f"{path} is not a D-MMD student (see dmmd distill)")
        if not use_ema:
            raise ValueError(f"{path} holds the student's EMA weights only; the raw generator is in its run's "
                             f"checkpoint")
        mc = student.config
        return student, DiffusionProcess("masked", mc.num_classes, meta["schedule"], mask_id=mc.mask_id), meta
    state = read_state(path)
    if state.get("kind") != "student":
        raise ValueError(f"{path} is not a D-MMD student checkpoint (see dmmd distill)")
    student = rebuild_model(state, module=model)
    student.load_state_dict(load_tensors(path, "ema" if use_ema else "generator"))
    mc = student.config
    process = DiffusionProcess(mc.process, mc.num_classes, state["schedule"], mask_id=mc.mask_id)
    return student.to(device).eval(), process, state
