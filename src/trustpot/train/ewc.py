"""Elastic weight consolidation: a quadratic pull towards the starting weights, weighted by how
much each weight mattered for the starting model's forces.

``penalty = sum_i F_i (theta_i - theta*_i)^2`` where ``F`` is the diagonal of the Gauss-Newton
(Fisher) matrix of the per-component force MSE in units of the force scale, at the starting
weights ``theta*``: ``F_i = E[(d(v . f)/d theta_i)^2] / (scale^2 n_components)`` with ``v`` random
unit-variance vectors over the force components ``f`` (Hutchinson's estimator of
``diag(J^T J)``; a few projections per batch). With that normalisation an EWC weight of 1 stands,
in the quadratic approximation, for "as if the frames the Fisher was measured on were still
trained on with a force weight of 1". Measured on the tiny test of ``tests/test_finetune.py``
(AdamW, lr 1e-2, 3 epochs): a weight of 1e4 made no visible difference, 1e7 held the weights;
Adam's per-parameter step sizes make the useful range large and data dependent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.train.objectives import ObjectiveLoss, Sums


@torch.enable_grad()
def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    names: set[str],
    scale: float,
    projections: int = 4,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Gauss-Newton of the force MSE for the parameters ``names`` of ``model``.

    Args:
        model: a model answering ``model(g, {energy, forces}, create_graph=True)``.
        batches: graphs (the frames whose knowledge is to be kept).
        names: parameter names to measure (others get no entry).
        scale: force scale (eV/Å) of the loss the penalty joins.
        projections: random projections per batch.
        seed: seed of the projections.
    """
    params = {n: p for n, p in model.named_parameters() if n in names and p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for g in batches:
        if g is None:
            continue
        forces = model(g, {K.ENERGY, K.FORCES}, create_graph=True)[K.FORCES]
        n_components = forces.numel()
        for _ in range(projections):
            v = torch.randn(forces.shape, generator=gen, dtype=forces.dtype).to(forces.device)
            grads = torch.autograd.grad(
                (v * forces).sum(), list(params.values()), retain_graph=True, allow_unused=True
            )
            for (name, _), grad in zip(params.items(), grads):
                if grad is not None:
                    fisher[name] += grad.detach() ** 2 / (scale**2 * n_components)
            count += 1
    return {n: f / max(count, 1) for n, f in fisher.items()}


@dataclass
class EWCPenalty(ObjectiveLoss):
    """``sum_i F_i (theta_i - theta*_i)^2`` as an objective (one term, ``ewc``).

    Its dataset is any one-item dataset (``trustpot.train.datasets.full_batch``) whose item is
    not ``None`` (a ``None`` batch means a rank without data): the batch is ignored. Under
    torchrun every rank adds the whole penalty with count 1; the Trainer divides by the global
    count, so the ranks' gradients add up to the single-process one.
    """

    fisher: dict[str, Tensor]
    anchor: dict[str, Tensor]
    weights: dict[str, float] = field(default_factory=lambda: {"ewc": 1.0})

    def sums(self, model: nn.Module, batch: Any, training: bool) -> tuple[Sums, Sums]:
        params = dict(model.named_parameters())
        total: Tensor | None = None
        for name, f in self.fisher.items():
            p = params[name]
            part = (f.to(p.device) * (p - self.anchor[name].to(p.device)) ** 2).sum()
            total = part if total is None else total + part
        if total is None:
            total = torch.zeros(())
        one = torch.ones((), dtype=total.dtype, device=total.device)
        return {"ewc": total}, {"ewc": one}
