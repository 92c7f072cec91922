"""Exponential moving average of model weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copy of floating-point parameters, updated as ``s = d s + (1 - d) p``.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats: list[Tensor] = []
        values: list[Tensor] = []
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                floats.append(self.shadow[k])
                values.append(v.detach())
            else:
                self.shadow[k].copy_(v)
        if floats:  # one fused pass over all tensors (few kernel launches on a GPU)
            torch._foreach_mul_(floats, d)
            torch._foreach_add_(floats, values, alpha=1 - d)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[call-overload]
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
