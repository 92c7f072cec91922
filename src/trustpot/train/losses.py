"""Weighted energy / force / stress losses as sums, so data-parallel ranks can add them up.

Every term is a sum of squared (or Huber) errors in units of the force scale; the trainer
divides by global counts (structures for energy and stress, force components for forces), so
the loss of a batch split across processes equals the loss of the whole batch.

All terms are dimensionless. Energy errors are per atom (eV) over the force scale ``s`` (eV/Å),
i.e. in Å; force errors (eV/Å) over ``s``. A stress error (eV/Å^3) is first multiplied by
``(V/N)^(2/3)`` (Å^2, volume per atom to the 2/3), which turns it into a force-like quantity
(eV/Å) -- the force per atom's cross-section -- and then divided by ``s``. The stress term
thus does not change when all lengths and the force scale are rescaled consistently, and its
weight means the same for dense and dilute cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.nn import cell_volume


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms; a zero weight skips the term (and its derivative work)."""

    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0
    kind: str = "mse"
    huber_delta: float = 0.1


def _penalty(diff: Tensor, kind: str, delta: float) -> Tensor:
    if kind == "huber":
        return torch.nn.functional.huber_loss(
            diff, torch.zeros_like(diff), reduction="none", delta=delta
        )
    return diff * diff


def loss_sums(
    pred: dict[str, Tensor], g: Graph, weights: LossWeights, scale: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-term error sums and the counts they should be divided by.

    Args:
        pred: model outputs (``energy`` [n_graphs] eV, ``forces`` [n_atoms, 3] eV/Å, ...).
        g: the batch with labels and label weights.
        weights: which terms to compute.
        scale: force scale (eV/Å) that makes errors dimensionless (stress errors are first
            multiplied by ``(V/N)^(2/3)``, see the module docstring).

    Returns:
        ``sums[term]`` and ``counts[term]`` (0-d tensors).
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    if weights.energy > 0:
        w = g[K.ENERGY_WEIGHT]
        diff = (pred[K.ENERGY] - g[K.ENERGY]) / g[K.N_ATOMS] / scale
        sums["energy"] = (_penalty(diff.to(w.dtype), weights.kind, weights.huber_delta) * w).sum()
        counts["energy"] = w.sum()
    if weights.forces > 0:
        w = g[K.FORCES_WEIGHT][g[K.BATCH]].unsqueeze(-1)
        diff = (pred[K.FORCES] - g[K.FORCES]) / scale
        sums["forces"] = (_penalty(diff, weights.kind, weights.huber_delta) * w).sum()
        counts["forces"] = w.sum() * 3
    if weights.stress > 0 and K.STRESS in pred:
        w = g[K.STRESS_WEIGHT].view(-1, 1, 1)
        diff = (pred[K.STRESS] - g[K.STRESS]) * stress_length2(g).view(-1, 1, 1) / scale
        sums["stress"] = (_penalty(diff, weights.kind, weights.huber_delta) * w).sum()
        counts["stress"] = w.sum() * 9
    return sums, counts


def stress_length2(g: Graph) -> Tensor:
    """[n_graphs] ``(V/N)^(2/3)`` in Å^2: volume per atom to the 2/3 (0 for a cell without
    volume, where no stress label can exist)."""
    volume = cell_volume(g[K.CELL])
    per_atom = volume / g[K.N_ATOMS].to(volume.dtype)
    length2: Tensor = per_atom.clamp_min(0.0) ** (2.0 / 3.0)
    return length2


def combine(sums: dict[str, Tensor], counts: dict[str, Tensor], weights: LossWeights) -> Tensor:
    """Weighted sum of term means; a term with no labels anywhere contributes zero."""
    total: Tensor | None = None
    for term, value in sums.items():
        mean = value / counts[term].clamp_min(1.0)
        part: Tensor = getattr(weights, term) * mean
        total = part if total is None else total + part
    assert total is not None, "at least one loss term must have a positive weight"
    return total


def required_outputs(weights: LossWeights, has_stress: bool) -> frozenset[str]:
    """Model outputs the losses need."""
    out = {K.ENERGY}
    if weights.forces > 0:
        out.add(K.FORCES)
    if weights.stress > 0 and has_stress:
        out.add(K.STRESS)
    return frozenset(out)
