"""Algorithm 1 (docs/design.md §5): one step's global batch (:func:`draw_batch`, lines 1-2) and
the :class:`Distiller`, which holds the three models (teacher, generator, auxiliary) and computes
the generator's draws (lines 3-4) and the two losses, eq. 11 and eq. 12, along one path: each
model gives its output and a head turns outputs into a loss (:class:`LogitsHead`: whole logits;
:class:`PosteriorHead`: Appendix D's eq. 24 and 26; :class:`FusedHead`: final hidden states into
the fused linear ops). Imports the models, the process, the ops and the options; knows nothing
of runs, files or the loop."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial

import torch

import dmmd_ops
from dmmd.diffusion.processes import DiffusionProcess
from dmmd.diffusion.randomness import Stream, chunk_offset, distill_draw_offsets, step_generator
from dmmd.models.denoiser import Denoiser
from dmmd.models.external import ExternalDenoiser
from dmmd.models.noise import NoiseSpec
from dmmd.training.distill.noise import build_generator
from dmmd.training.distill.options import FUSED_MIN_CLASSES, DistillConfig
from dmmd.training.sharding import full
from dmmd_ops.linear import DEFAULT_CHUNK_BYTES, chunk_rows_for

# The generator's output entropy is computed for this many logits at a time (a few [rows, V]
# float32 temporaries of 16 MiB each).
ENTROPY_CHUNK = 2 ** 22
# The draws make the generator's logits this many bytes (float32) at a time, the fused linear
# ops' chunk budget: a block of draw_block sequences that fits is drawn in one call.
DRAW_CHUNK_BYTES = DEFAULT_CHUNK_BYTES


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


def draw_batch(source, process: DiffusionProcess, cfg: DistillConfig, noise: NoiseSpec | None, step: int, *,
               block_size: int | None = None) -> DistillBatch:
    """Algorithm 1 lines 1-2 for the global batch of ``step``. With ``block_size`` (a block
    diffusion teacher, paper section 6.3) one block per sequence, drawn uniformly, is diffused
    and the rest of ``z_t`` is the clean data: the student learns each block given the clean
    blocks before it (masked diffusion keeps clean positions clean through ``z_s`` and the
    sampler), as it generates them block by block."""
    gen = step_generator(cfg.run.seed, step, Stream.DISTILL)
    b = cfg.run.batch_size
    x0 = source.sample(b, gen)
    s = torch.rand(b, generator=gen, dtype=torch.float64)
    window = cfg.step_window if cfg.step_window is not None else cfg.for_process(process.kind).step_window
    delta = torch.rand(b, generator=gen, dtype=torch.float64) / cfg.student_steps * window
    t = torch.clamp(s + delta, max=1.0)
    z_t = process.diffuse(x0, t, gen)
    drawn = None if noise is None else noise.draw(b, x0.shape[1], gen, getattr(source, "shape", None))
    if block_size is not None:
        n = x0.shape[1]
        if process.kind != "masked" or n % block_size:
            raise ValueError(f"block_size: block-by-block distillation needs masked diffusion and a length that is a "
                             f"whole number of blocks of {block_size} tokens, got {process.kind} and length {n}")
        block = torch.randint(0, n // block_size, (b, 1), generator=gen)
        inside = torch.arange(n) // block_size == block
        z_t = torch.where(inside, z_t, x0)
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
        self.generator = build_generator(teacher, cfg.noise_spec(), cfg.noise_init, cfg.run.seed, cfg.noise_module,
                                         cfg.extra_blocks)
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
        # a block-diffusion teacher that denoises a block given the clean blocks before it: its
        # batches diffuse one block per sequence (draw_batch)
        self.block_size = teacher.config.block_size if getattr(teacher.config, "clean_context", False) else None
        # how the models' outputs become the losses: one path, three heads
        self.head = FusedHead(self) if self.fused else PosteriorHead(self) if cfg.form == "posterior" else \
            LogitsHead(self)
        # Rows per Philox stream: a divisor of the batch, so every process holds whole blocks.
        self.draw_block = math.gcd(cfg.draw_block, cfg.run.batch_size)
        k = cfg.student_steps
        self.posterior_ds = cfg.posterior_ds if cfg.posterior_ds is not None else 1.0 / (2 * k)

    def unfuse(self) -> None:
        """The losses from whole logits instead of the fused linear ops (FSDP keeps the output
        layers' weights sharded outside their forward)."""
        self.fused = False
        self.head = PosteriorHead(self) if self.cfg.form == "posterior" else LogitsHead(self)

    def is_generator_step(self, step: int) -> bool:
        return step % (1 + self.cfg.aux_per_gen) == 0

    # ---------------------------------------------------------------- Algorithm 1, lines 3-4

    def generate(self, batch: DistillBatch, step: int):
        """The generator's output at ``z_t`` (its logits, or for the fused losses its final hidden
        states: :attr:`head`), ``x ~ Cat`` and ``z_s ~ q(z_s | z_t, x)``.

        Draws use Philox ``(seed, offset)`` with one offset per (step, block of ``draw_block``
        global rows), so they do not depend on how the batch is split across processes.
        """
        return self._generate(batch, step)[:3]

    def _generate(self, batch: DistillBatch, step: int):
        """:meth:`generate` and the generator's output-entropy stats (:meth:`_draw`)."""
        fn = self.gen_net if torch.is_grad_enabled() else self.generator
        out = self.head.output(fn, batch.z_t, batch.t.float(), batch.noise)

        def chunk_logits(rows: slice, tokens: slice) -> torch.Tensor:
            flat = out[rows].detach().reshape(-1, out.shape[-1])[tokens]
            return self.head.logits(self.generator, flat, batch.z_t[rows].reshape(-1)[tokens])

        return out, *self._draw(batch, step, chunk_logits)

    def _draw(self, batch: DistillBatch, step: int, chunk_logits):
        """``x ~ Cat`` and ``z_s ~ q(z_s | z_t, x)`` block by block of ``draw_block`` sequences,
        with the generator's output entropy (:meth:`_entropies`). A block's token rows are drawn
        in chunks of at most :data:`DRAW_CHUNK_BYTES` of float32 logits (``chunk_logits(rows,
        tokens)``: the generator's logits of those token rows of those sequences), so no draw
        makes the ``[rows, V]`` logits of a block at once.

        Draws use Philox ``(seed, offset)`` with one offset per (step, block of ``draw_block``
        global rows) and per chunk (:func:`~dmmd.diffusion.randomness.chunk_offset`), so they
        do not depend on how the batch is split across processes."""
        a_s = self.process.alpha(batch.s).unsqueeze(-1).expand(batch.z_t.shape)
        a_t = self.process.alpha(batch.t).unsqueeze(-1).expand(batch.z_t.shape)
        k = self.cfg.student_steps
        # the student's sampling step that t falls in: j covers t in (j/k, (j+1)/k], j = 0 the last
        coarse = (torch.ceil(batch.t * k).long() - 1).clamp(0, k - 1)
        blk = self.draw_block
        per_chunk = max(1, DRAW_CHUNK_BYTES // (4 * self.process.num_classes))
        x, z_s, entropy, by_step = [], [], _Mean(), [_Mean() for _ in range(k)]
        with torch.no_grad():
            for lo in range(0, batch.z_t.shape[0], blk):
                rows = slice(lo, lo + blk)
                z_flat = batch.z_t[rows].reshape(-1)
                step_of = coarse[rows].unsqueeze(-1).expand(batch.z_t[rows].shape).reshape(-1)
                x_offset, z_offset = distill_draw_offsets(step, self.cfg.run.batch_size // blk,
                                                          int(batch.rows[lo]) // blk)
                xb = []
                for c, first in enumerate(range(0, z_flat.numel(), per_chunk)):
                    tokens = slice(first, first + per_chunk)
                    logits = chunk_logits(rows, tokens)
                    xb.append(dmmd_ops.sample_categorical(logits, seed=self.cfg.run.seed,
                                                          offset=chunk_offset(x_offset, c)))
                    h, chosen = self._entropies(logits, z_flat[tokens])
                    entropy.add(h[chosen])
                    chunk_step = step_of[tokens].to(h.device)
                    for j in range(k):
                        by_step[j].add(h[chosen & (chunk_step == j)])
                    del logits
                xb = torch.cat(xb).reshape(batch.z_t[rows].shape)
                z_s.append(dmmd_ops.posterior_sample(
                    batch.z_t[rows], xb, a_s[rows], a_t[rows], process=self.process.kind,
                    mask_id=self.process.mask_id, num_classes=self.process.num_classes, seed=self.cfg.run.seed,
                    offset=z_offset))
                x.append(xb)
        stats = {"gen_entropy": entropy.value(), "gen_entropy_by_step": [m.value(none=True) for m in by_step],
                 "noise_proj_norm": self._noise_norm()}
        return torch.cat(x), torch.cat(z_s), stats

    def _noise_norm(self) -> float:
        """The Frobenius norm of all the generator's noise projections together (0 without noise)."""
        with torch.no_grad():
            projections = self.generator.noise_projections()
            return math.sqrt(sum(float(full(p.weight).float().square().sum()) for p in projections))

    def _head_logits(self, model, h: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """``model``'s logits from its final hidden states ``h`` (what its forward returns)."""
        weight, bias = model.output_head()
        logits = h @ weight.T
        if logits.dtype != torch.float64:  # as the models' forward: float32 logits (float64 oracles stay)
            logits = logits.float()
        logits += bias  # in place, as the rule below: one [rows, V] tensor in all
        return self.process.output_rule(logits, z_t, inplace=True)

    @staticmethod
    def _fused_losses(cfg: DistillConfig, teacher) -> bool:
        """Whether the losses go through the fused linear ops (see ``fused_losses``)."""
        exposes = isinstance(teacher, Denoiser) or teacher.head_layer() is not None
        if cfg.fused_losses:
            if cfg.form == "posterior":
                raise ValueError("fused_losses: the posterior form (Appendix D) needs whole probability rows")
            if cfg.divergence != "reverse_kl":
                raise ValueError(f"fused_losses: divergence={cfg.divergence!r} has no fused linear loss "
                                 "(the paper's reverse_kl has)")
            if not exposes:
                raise ValueError("fused_losses: the teacher exposes no output layer (as_denoiser(..., head=...))")
            return True
        if cfg.fused_losses is None:
            return exposes and cfg.form == "xhat" and cfg.divergence == "reverse_kl" and \
                teacher.config.num_classes >= FUSED_MIN_CLASSES
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
        out, x, z_s, entropy = self._generate(batch, step)
        w, keep = self._weights(batch, z_s)
        with torch.no_grad():
            t_out = self.head.output(self.teacher, z_s, batch.s.float())
            a_out = self.head.output(self.aux, z_s, batch.s.float())
        loss = self.head.generator_loss(out, t_out, a_out, keep, w, z_s, batch.s) / z_s.numel()
        stats = {"gen_loss": float(loss.detach())}
        if self.cfg.entropy_penalty:
            loss = loss + self.cfg.entropy_penalty * self._entropy_sum(out, batch.z_t) / z_s.numel()
        return loss, {**stats, **entropy}

    def _entropy_sum(self, out: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """The generator's output entropies (nats) summed over the undecided ``z_t`` positions,
        with gradient (``entropy_penalty``)."""
        chosen = self.process.undecided(z_t)
        logits = self.head.logits(self.generator, out[chosen], z_t[chosen])
        return _entropy(torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)).sum()

    def aux_loss(self, batch: DistillBatch, step: int) -> tuple[torch.Tensor, dict]:
        """Eq. 12 (or eq. 26), gradient to the auxiliary model only, its teacher term weighted by
        ``aux_teacher_weight`` (the teacher is not run at weight 0). Returns ``(loss, stats)``."""
        lam = self.cfg.aux_teacher_weight
        with torch.no_grad():
            out, x, z_s, entropy = self._generate(batch, step)
            w, keep = self._weights(batch, z_s)
            t_out = self.head.output(self.teacher, z_s, batch.s.float()) if lam else None
        a_out = self.head.output(self.aux_net, z_s, batch.s.float())
        loss = partial(self.head.aux_loss, a_out, keep=keep, w=w, z_s=z_s, s=batch.s, x=x, gen=out.detach(),
                       z_t=batch.z_t)
        # -sum (x + lam q_teacher) log q_aux = lam * (eq. 12) + (1 - lam) * (its data term alone)
        loss = loss(t_out) if lam in (0, 1) else lam * loss(t_out) + (1 - lam) * loss(None)
        loss = loss / z_s.numel()
        return loss, {"aux_loss": float(loss.detach()), **entropy}

    def _entropies(self, logits: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's output entropies (nats, float64) ``[rows, L]`` and where it has a
        choice (bool ``[rows, L]``: masked ``z_t`` positions; every position for uniform), paper
        Table 6."""
        flat = logits.detach().reshape(-1, logits.shape[-1])
        h = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
        step = max(1, ENTROPY_CHUNK // flat.shape[1])
        for lo in range(0, flat.shape[0], step):  # in chunks: the temporaries stay small
            h[lo:lo + step] = _entropy(torch.log_softmax(flat[lo:lo + step].float(), -1)).double()
        return h.reshape(logits.shape[:-1]), self.process.undecided(z_t)

    def _weights(self, batch: DistillBatch, z_s: torch.Tensor):
        """``w(s)`` per token and the positions that carry signal."""
        w = loss_weight(self.process, self.cfg.weight, batch.s).unsqueeze(-1).expand_as(z_s)
        return w, self.process.undecided(z_s)  # at a decided z_s teacher and aux both carry the token over


class LogitsHead:
    """How the models' outputs become the losses, with whole logits: each model's forward (its
    output rule applied), then :func:`dmmd_ops.generator_loss` / :func:`dmmd_ops.aux_loss` on the
    positions that carry signal. The other heads change only what differs."""

    def __init__(self, d: Distiller):
        self.d = d

    def output(self, model, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """What ``model`` gives the losses at ``z``: here its logits ``[B, L, V]``."""
        return model(z, t, noise)

    def logits(self, model, out: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """``model``'s logits from its :meth:`output` ``out`` (rows of it) at ``z_t``."""
        return out

    def targets(self, x: torch.Tensor, gen: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """The auxiliary model's targets at (rows of) positions: the sample ``x``, or with
        ``soft_target`` the generator's probabilities from its output ``gen`` at ``z_t``."""
        if not self.d.cfg.soft_target:
            return x
        with torch.no_grad():
            return torch.softmax(self.logits(self.d.generator, gen, z_t), -1)

    def _teacher_options(self) -> dict:
        c = self.d.cfg
        return {"temperature": c.temperature, "top_p": c.top_p, "delta": c.delta}

    def generator_loss(self, u, a, b, keep, w, z_s, s) -> torch.Tensor:
        """Eq. 11 summed over the kept positions: generator ``u`` at ``z_t``, teacher ``a`` and
        auxiliary ``b`` at ``z_s``."""
        return dmmd_ops.generator_loss(u[keep], a[keep], b[keep], weight=w[keep], divergence=self.d.cfg.divergence,
                                       **self._teacher_options())

    def aux_loss(self, b, a, keep, w, z_s, s, *, x, gen, z_t) -> torch.Tensor:
        """Eq. 12 summed over the kept positions: auxiliary ``b`` and teacher ``a`` at ``z_s``
        (``a`` None: without the teacher term), the target (:meth:`targets`) from the sample ``x``
        or the generator's output ``gen``."""
        target = self.targets(x[keep], gen[keep], z_t[keep])
        return dmmd_ops.aux_loss(b[keep], target, None if a is None else a[keep], weight=w[keep],
                                 **self._teacher_options())


class PosteriorHead(LogitsHead):
    """Appendix D (uniform diffusion): the same ops on the log posterior vectors
    ``log pi_{s'}(x_hat, z_s)`` of each model's probabilities (eq. 24 and 26)."""

    def generator_loss(self, u, a, b, keep, w, z_s, s) -> torch.Tensor:
        d = self.d
        u = d._log_posterior(torch.softmax(u, -1), z_s, s)
        with torch.no_grad():
            a = d._log_posterior(d._teacher_probs(a), z_s, s)
            b = d._log_posterior(torch.softmax(b, -1), z_s, s)
        return dmmd_ops.generator_loss(u[keep], a[keep], b[keep], weight=w[keep], divergence=d.cfg.divergence)

    def aux_loss(self, b, a, keep, w, z_s, s, *, x, gen, z_t) -> torch.Tensor:
        d = self.d
        b = d._log_posterior(torch.softmax(b, -1), z_s, s)
        with torch.no_grad():  # the target: the hard sample (uniform diffusion)'s posterior vector
            onehot = torch.nn.functional.one_hot(x, d.process.num_classes).to(torch.float64)
            target = torch.exp(d._log_posterior(onehot, z_s, s))
            target = (target / target.sum(-1, keepdim=True)).to(b.dtype)
            a = None if a is None else d._log_posterior(d._teacher_probs(a), z_s, s)[keep]
        return dmmd_ops.aux_loss(b[keep], target[keep], a, weight=w[keep])


class FusedHead(LogitsHead):
    """The fused linear losses: each model's final hidden states and output layer go to
    :func:`dmmd_ops.linear_generator_loss` / :func:`dmmd_ops.linear_aux_loss`, which make the
    logits chunk by chunk; whole logits are made only for rows that need them (the draws, block
    by block, and the soft targets of the kept positions)."""

    def output(self, model, z, t, noise=None):
        return model(z, t, noise, features=True)

    def logits(self, model, out, z_t):
        return self.d._head_logits(model, out, z_t)

    def generator_loss(self, h, ht, ha, keep, w, z_s, s) -> torch.Tensor:
        d = self.d
        with torch.no_grad():
            (wt, bt), (wa, ba) = ((w_.detach(), b_.detach()) for w_, b_ in (d.teacher.output_head(),
                                                                            d.aux.output_head()))
        ws, bs = d.generator.output_head()
        return dmmd_ops.linear_generator_loss(h[keep], ws, ht[keep], wt, ha[keep], wa, b_student=bs, b_teacher=bt,
                                              b_aux=ba, weight=w[keep], **self._teacher_options())

    def aux_loss(self, ha, ht, keep, w, z_s, s, *, x, gen, z_t) -> torch.Tensor:
        """Soft targets are made as the op makes its logits, a chunk of rows at a time, and made
        again in the backward pass (:class:`_RecomputedChunks`), so their ``[rows, V]``
        probabilities never exist at once either."""
        d = self.d
        with torch.no_grad():
            wt, bt = (None, None) if ht is None else (p.detach() for p in d.teacher.output_head())
        wa, ba = d.aux.output_head()
        ha, w, x, gen, z_t = ha[keep], w[keep], x[keep], gen[keep], z_t[keep]
        ht = None if ht is None else ht[keep]

        def chunk_loss(rows: slice, h, weight, bias) -> torch.Tensor:
            return dmmd_ops.linear_aux_loss(h, weight, self.targets(x[rows], gen[rows], z_t[rows]),
                                            None if ht is None else ht[rows], wt, b_aux=bias, b_teacher=bt,
                                            weight=w[rows], **self._teacher_options())

        rows = chunk_rows_for(wa.shape[0], 3)
        if not d.cfg.soft_target or ha.shape[0] <= rows:  # hard targets: ids, the op chunks the rest
            return chunk_loss(slice(None), ha, wa, ba)
        return _RecomputedChunks.apply(ha, wa, ba, chunk_loss, rows)


class _RecomputedChunks(torch.autograd.Function):
    """``sum_c chunk_loss(rows_c, h[rows_c], weight, bias)`` over chunks of ``rows`` rows, each
    chunk's loss (and whatever it makes, such as its soft targets) made once in the forward pass
    without a graph and again, with one, in the backward pass: nothing of a chunk is kept."""

    @staticmethod
    def forward(ctx, h, weight, bias, chunk_loss, rows):
        ctx.save_for_backward(h, weight, bias)
        ctx.chunk_loss, ctx.rows = chunk_loss, rows
        total = None
        for lo in range(0, h.shape[0], rows):
            part = chunk_loss(slice(lo, lo + rows), h[lo:lo + rows], weight, bias)
            total = part if total is None else total + part
        return total

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias = ctx.saved_tensors
        grads = [torch.zeros_like(h), torch.zeros_like(weight), torch.zeros_like(bias)]
        for lo in range(0, h.shape[0], ctx.rows):
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() for t in (h[lo:lo + ctx.rows], weight, bias)]
                loss = ctx.chunk_loss(slice(lo, lo + ctx.rows), *inputs)
                g_h, g_w, g_b = torch.autograd.grad(loss, inputs, grad)
            grads[0][lo:lo + ctx.rows] = g_h
            grads[1] += g_w
            grads[2] += g_b
        return (*grads, None, None)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Per row, ``-sum p log p`` of log-probabilities ``logp`` (a class at ``-inf`` adds 0, with
    no nan in the gradient)."""
    return -(logp.exp() * torch.where(logp > -math.inf, logp, 0.0)).sum(-1)


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
