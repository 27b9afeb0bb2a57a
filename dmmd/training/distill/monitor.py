"""The collapse monitor: a warning when the generator's output entropy falls to nothing while the
auxiliary loss rises (docs/design.md §5). Reads the step's logged statistics only."""
from __future__ import annotations

import math
import warnings


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
