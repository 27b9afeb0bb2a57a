"""Masked and uniform discrete diffusion (docs/design.md §1-§3): the forward process, the posterior
(through ``dmmd_ops``), the denoiser's training loss and a validation bound on the NLL.

Shapes: token ids ``[..., L]`` (int64), model logits ``[..., L, V]``, times ``[...]`` (one
per sequence) or python floats. ``V`` counts every class the model outputs; for masked
diffusion the mask is one of them (``mask_id``, by default ``V - 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import dmmd_ops
from dmmd.diffusion.schedules import Schedule, get_schedule

PROCESSES = ("masked", "uniform")


def _per_token(a: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sequence value ``[...]`` (or a float) broadcast over the tokens of ``like [..., L]``."""
    a = torch.as_tensor(a, dtype=torch.float64, device=like.device)
    if a.dim() > 0:
        a = a.unsqueeze(-1)
    return torch.broadcast_to(a, like.shape)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    """Where ``generator`` draws (the default generator: CPU); draws then move to the data's device."""
    return generator.device if generator is not None else torch.device("cpu")


def masked_output_rule(logits: torch.Tensor, z_t: torch.Tensor, mask_id: int, *, inplace: bool = False
                       ) -> torch.Tensor:
    """Masked diffusion's output rule on logits ``[..., L, V]`` at ``z_t [..., L]``: never the
    mask class; an unmasked position is its own token (one finite logit, 0). The one
    implementation, used by every model and the distiller; one new ``[..., V]`` tensor (the
    copy; none with ``inplace``, for logits the caller just made), the rest is written in place."""
    out = logits if inplace else logits.clone()
    out[..., mask_id] = float("-inf")
    unmasked = z_t != mask_id
    out[unmasked] = float("-inf")
    out[(*unmasked.nonzero(as_tuple=True), z_t[unmasked])] = 0.0
    return out


@dataclass
class DiffusionProcess:
    """A discrete diffusion process over ``num_classes`` classes.

    Args:
        kind: ``"masked"`` (``pi`` = the mask class) or ``"uniform"`` (``pi = 1/V``).
        num_classes: ``V``, the model's output classes (masked: data tokens plus the mask).
        schedule: a :class:`~dmmd.diffusion.schedules.Schedule` or its name.
        mask_id: the mask class for masked diffusion (default ``V - 1``).
    """

    kind: str
    num_classes: int
    schedule: Schedule | str = "linear"
    mask_id: int | None = None
    _sched: Schedule = field(init=False, repr=False)

    def __post_init__(self):
        if self.kind not in PROCESSES:
            raise ValueError(f"kind must be one of {PROCESSES}, got {self.kind!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        self._sched = get_schedule(self.schedule) if isinstance(self.schedule, str) else self.schedule
        if self.kind == "masked":
            self.mask_id = self.num_classes - 1 if self.mask_id is None else self.mask_id
            if not 0 <= self.mask_id < self.num_classes:
                raise ValueError(f"mask_id must be in [0, {self.num_classes}), got {self.mask_id}")
        elif self.mask_id is not None:
            raise ValueError("mask_id is only meaningful for masked diffusion")

    @classmethod
    def of(cls, model_config, schedule: Schedule | str) -> DiffusionProcess:
        """The process of a model whose config (any denoiser's: ``process``, ``num_classes``,
        ``mask_id``) is the one record of them; the schedule is the run's."""
        mask_id = model_config.mask_id if model_config.process == "masked" else None
        return cls(model_config.process, model_config.num_classes, schedule, mask_id=mask_id)

    # ------------------------------------------------------------------ schedule

    @property
    def schedule_name(self) -> str:
        """The schedule's name (what checkpoints save)."""
        return self._sched.name

    @property
    def data_classes(self) -> int:
        """How many classes clean data uses (the mask is not one of them)."""
        return self.num_classes - 1 if self.kind == "masked" else self.num_classes

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        return self._sched.alpha(torch.as_tensor(t, dtype=torch.float64))

    def elbo_weight(self, t: torch.Tensor | float) -> torch.Tensor:
        """``-alpha'(t) / (1 - alpha(t))``, the masked-diffusion ELBO weight (float64; the
        denominator is clamped at 1e-6, where ``t -> 0``)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return -self._sched.dalpha(t) / (1 - self._sched.alpha(t)).clamp_min(1e-6)

    # ------------------------------------------------------------------ what a model may output

    def output_rule(self, logits: torch.Tensor, z_t: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """A denoiser's logits at ``z_t`` under the process's rule: masked, never the mask and
        revealed tokens carried over (:func:`masked_output_rule`); uniform, as they are."""
        if self.kind == "masked":
            return masked_output_rule(logits, z_t, self.mask_id, inplace=inplace)
        return logits

    def undecided(self, z: torch.Tensor) -> torch.Tensor:
        """Where a denoiser still has a choice at ``z`` (bool, ``z``'s shape): the masked
        positions; every position in uniform diffusion."""
        if self.kind == "masked":
            return z == self.mask_id
        return torch.ones_like(z, dtype=torch.bool)

    # ------------------------------------------------------------------ forward process

    def diffuse(self, x: torch.Tensor, t: torch.Tensor | float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """``z_t ~ Cat(alpha_t x + (1 - alpha_t) pi)`` per token. ``x [..., L]`` -> ``[..., L]``."""
        gdev = _generator_device(generator)
        a = _per_token(self.alpha(t).to(x.device), x)
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=gdev).to(x.device)
        keep = u < a
        if self.kind == "masked":
            noise = torch.full_like(x, self.mask_id)
        else:
            noise = torch.randint(0, self.num_classes, x.shape, generator=generator, device=gdev).to(x.device)
        return torch.where(keep, x, noise)

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """``z_1``: all masks, or uniform random tokens."""
        if self.kind == "masked":
            return torch.full(shape, self.mask_id, dtype=torch.long, device=device)
        gdev = _generator_device(generator)
        return torch.randint(0, self.num_classes, shape, generator=generator, device=gdev).to(device)

    # ------------------------------------------------------------------ reverse process

    def posterior_sample(self, z_t: torch.Tensor, x: torch.Tensor, s: torch.Tensor | float,
                         t: torch.Tensor | float, *, seed: int, offset: int = 0) -> torch.Tensor:
        """``z_s ~ q(z_s | z_t, x)`` (eq. 4); ``x`` hard ``[..., L]`` or soft ``[..., L, V]``."""
        a_s, a_t = _per_token(self.alpha(s), z_t), _per_token(self.alpha(t), z_t)
        return dmmd_ops.posterior_sample(z_t, x, a_s, a_t, process=self.kind, mask_id=self.mask_id,
                                         num_classes=self.num_classes, seed=seed, offset=offset)

    def denoise_step(self, logits: torch.Tensor, z_t: torch.Tensor, s: torch.Tensor | float,
                     t: torch.Tensor | float, *, temperature: float = 1.0, top_p: float = 1.0, seed: int,
                     offset: int = 0) -> torch.Tensor:
        """One ancestral step: ``x ~ Cat(softmax(logits / T))`` in the nucleus, then the posterior."""
        a_s, a_t = _per_token(self.alpha(s), z_t), _per_token(self.alpha(t), z_t)
        return dmmd_ops.denoise_step(logits, z_t, a_s, a_t, process=self.kind, mask_id=self.mask_id,
                                     temperature=temperature, top_p=top_p, seed=seed, offset=offset)

    def posterior_probs(self, z_t: torch.Tensor, x_probs: torch.Tensor, s: torch.Tensor | float,
                        t: torch.Tensor | float) -> torch.Tensor:
        """``p(z_s | z_t) = sum_x x_probs(x) q(z_s | z_t, x)`` as a dense float64 ``[..., L, V]``.

        With a one-hot ``x_probs`` this is the true posterior; with the denoiser's ``x_hat`` it
        is the model's reverse step (what the sampler draws from).
        """
        v = self.num_classes
        xp = x_probs.to(torch.float64)
        a_s = _per_token(self.alpha(s).to(z_t.device), z_t).unsqueeze(-1)
        a_t = _per_token(self.alpha(t).to(z_t.device), z_t).unsqueeze(-1)
        zt = torch.nn.functional.one_hot(z_t, v).to(torch.float64)
        if self.kind == "masked":
            masked = (z_t == self.mask_id).unsqueeze(-1)
            reveal = torch.where(a_t < 1, (a_s - a_t) / torch.where(a_t < 1, 1 - a_t, 1.0), 0.0)
            xp = xp.clone()
            xp[..., self.mask_id] = 0.0
            stay = torch.nn.functional.one_hot(torch.full_like(z_t, self.mask_id), v).to(torch.float64)
            return torch.where(masked, reveal * xp + (1 - reveal) * stay, zt)
        # uniform: q(z_s | z_t, x) = f(z_s) g_x(z_s) / N_x with f = a_ts z_t + (1 - a_ts)/V,
        # g_x = a_s x + (1 - a_s)/V and N_x = q(z_t | x) = a_t [x = z_t] + (1 - a_t)/V.
        a_ts = torch.where(a_s > 0, a_t / torch.where(a_s > 0, a_s, 1.0), 1.0)
        f = a_ts * zt + (1 - a_ts) / v
        n_x = a_t * zt + (1 - a_t) / v
        r = xp / n_x
        g = a_s * r + (1 - a_s) / v * r.sum(-1, keepdim=True)
        w = f * g
        return w / w.sum(-1, keepdim=True)

    # ------------------------------------------------------------------ losses

    def teacher_loss(self, logits: torch.Tensor, x: torch.Tensor, z_t: torch.Tensor,
                     t: torch.Tensor | float) -> torch.Tensor:
        """The denoiser's weighted cross-entropy, averaged over tokens (docs/design.md §3).

        Masked: ``-alpha'_t / (1 - alpha_t) * CE`` on masked positions (the continuous-time
        ELBO weight), zero elsewhere. Uniform: plain CE on every position, so that
        ``x_hat -> E[x | z_t]``. ``logits [..., L, V]``, ``x, z_t [..., L]`` -> scalar.
        """
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), x.reshape(-1), reduction="none")
        ce = ce.view(x.shape)
        if self.kind == "uniform":
            return ce.mean()
        w = self.elbo_weight(_per_token(torch.as_tensor(t, dtype=torch.float64, device=x.device), x))
        masked = z_t == self.mask_id
        return (ce * torch.where(masked, w, 0.0).to(ce.dtype)).mean()

    def nll_bound_bits(self, x_hat_fn, x: torch.Tensor, *, steps: int = 128,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """An unbiased estimate of the ``steps``-step ELBO bound on ``-log2 p(x)`` per token.

        ``NLL <= KL(q(z_1|x) || prior) + sum_i E KL(q(z_{s_i}|z_{t_i}, x) || p(z_{s_i}|z_{t_i}))``
        with ``t_i = i/steps``; one step ``i`` per sequence is drawn and the sum is ``steps``
        times its KL. ``x_hat_fn(z_t, t) -> probabilities [..., L, V]``. ``x [B, L]`` -> ``[B]``.
        """
        b = x.shape[0]
        gdev = _generator_device(generator)
        i = torch.randint(1, steps + 1, (b,), generator=generator, device=gdev).to(x.device)
        t = i.to(torch.float64) / steps
        s = (i - 1).to(torch.float64) / steps
        z_t = self.diffuse(x, t, generator)
        x_hat = x_hat_fn(z_t, t.float())
        onehot = torch.nn.functional.one_hot(x, self.num_classes).to(torch.float64)
        q = self.posterior_probs(z_t, onehot, s, t)
        p = self.posterior_probs(z_t, x_hat, s, t)
        kl = torch.where(q > 0, q * (torch.log(q) - torch.log(p.clamp_min(1e-300))), 0.0).sum(-1)
        nats = steps * kl.mean(-1) + self._prior_kl(x).mean(-1)
        return nats / math.log(2)

    def _prior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """``KL(q(z_1 | x) || prior)`` per token (zero when ``alpha_1 = 0``).

        Masked diffusion with ``alpha_1 = eps > 0`` (log-linear) is taken as zero, the MDLM
        convention: the sampler starts from all masks and the eps mass is not modelled.
        """
        a1 = float(self.alpha(1.0))
        if a1 == 0 or self.kind == "masked":
            return torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        v = self.num_classes
        q_x = a1 + (1 - a1) / v
        q_o = (1 - a1) / v
        kl = q_x * math.log(q_x * v) + (v - 1) * q_o * math.log(q_o * v) if q_o > 0 else q_x * math.log(q_x * v)
        return torch.full(x.shape, kl, dtype=torch.float64, device=x.device)
