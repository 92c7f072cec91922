"""Learning-rate schedules whose state is a small dict, so runs resume exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Schedule:
    """Plateau or cosine schedule.

    ``plateau``: multiply the rate by ``factor`` after ``patience`` epochs without a better
    validation loss. ``cosine``: linear warm-up for ``warmup`` epochs, then cosine decay to
    ``min_lr`` along ``progress`` in [0, 1] (epochs or wall clock, whichever is further).
    """

    kind: str
    lr: float
    min_lr: float
    factor: float = 0.8
    patience: int = 20
    warmup: int = 5
    state: dict[str, Any] = field(default_factory=lambda: {"best": math.inf, "bad": 0, "lr": None})

    def rate(self, epoch: int, progress: float) -> float:
        """Learning rate for ``epoch`` (0-based) at budget ``progress``."""
        if self.kind == "cosine":
            if epoch < self.warmup:
                return self.lr * (epoch + 1) / (self.warmup + 1)
            p = min(max(progress, 0.0), 1.0)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * p))
        current = self.state["lr"]
        return self.lr if current is None else float(current)

    def observe(self, val_loss: float) -> None:
        """Feed the epoch's validation loss (plateau bookkeeping)."""
        if self.kind != "plateau":
            return
        if self.state["lr"] is None:
            self.state["lr"] = self.lr
        if val_loss < self.state["best"] * (1 - 1e-4):
            self.state["best"] = val_loss
            self.state["bad"] = 0
        else:
            self.state["bad"] += 1
            if self.state["bad"] > self.patience:
                self.state["lr"] = max(self.state["lr"] * self.factor, self.min_lr)
                self.state["bad"] = 0
