"""Noise schedules: ``alpha_t``, the probability that a token is still clean at time ``t``.

``alpha`` decreases from ``alpha_0 = 1``; ``alpha_{t|s} = alpha_t / alpha_s``. Each schedule
also gives ``d alpha / dt`` for the continuous-time ELBO weight of masked diffusion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Base class: ``alpha(t)`` and ``dalpha(t)`` for ``t`` in ``[0, 1]`` (tensors of any shape)."""

    name: str = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """``alpha_t = 1 - t``."""

    name: str = "linear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -1.0)


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """``alpha_t = cos(pi t / 2)``."""

    name: str = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


@dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    """MDLM's log-linear schedule: noise ``sigma_t = -log(1 - (1 - eps) t)``, so
    ``alpha_t = 1 - (1 - eps) t`` (``alpha_1 = eps`` keeps the ELBO weight finite at t = 1)."""

    name: str = "loglinear"
    eps: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1.0 - self.eps))


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule, "loglinear": LogLinearSchedule}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (one of ``linear``, ``cosine``, ``loglinear``)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]()
