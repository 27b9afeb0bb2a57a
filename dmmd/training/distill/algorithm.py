"""Algorithm 1 (docs/design.md §5): one step's global batch (:func:`draw_batch`, lines 1-2) and
the :class:`Distiller`, which holds the three models (teacher, generator, auxiliary) and computes
the generator's draws (lines 3-4) and the two losses, eq. 11 and eq. 12 (or Appendix D's eq. 24
and 26), unfused or through the fused linear ops. Knows nothing of runs, files or the loop."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

import dmmd_ops
from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.randomness import Stream, distill_draw_offsets, step_generator
from dmmd.models.denoiser import Denoiser
from dmmd.models.external import ExternalDenoiser
from dmmd.models.noise import NoiseSpec
from dmmd.training.distill.noise import build_generator
from dmmd.training.distill.options import FUSED_MIN_CLASSES, DistillConfig


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


def draw_batch(source, process: DiffusionProcess, cfg: DistillConfig, noise: NoiseSpec | None, step: int
               ) -> DistillBatch:
    """Algorithm 1 lines 1-2 for the global batch of ``step``."""
    gen = step_generator(cfg.run.seed, step, Stream.DISTILL)
    b = cfg.run.batch_size
    x0 = source.sample(b, gen)
    s = torch.rand(b, generator=gen, dtype=torch.float64)
    delta = torch.rand(b, generator=gen, dtype=torch.float64) / cfg.student_steps
    t = torch.clamp(s + delta, max=1.0)
    z_t = process.diffuse(x0, t, gen)
    drawn = None if noise is None else noise.draw(b, x0.shape[1], gen, getattr(source, "shape", None))
    return DistillBatch(x0, s, t, z_t, drawn, torch.arange(b))


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
        self.generator = build_generator(teacher, cfg.noise_spec(), cfg.noise_init, cfg.run.seed, cfg.noise_module)
        self.noise = self.generator.noise_spec  # what draw_batch draws for it (None: no noise input)
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
        return self.process.output_rule(logits, z_t)

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
        return h, self.process.undecided(z_t)

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
        return w, self.process.undecided(z_s)  # at a decided z_s teacher and aux both carry the token over


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
