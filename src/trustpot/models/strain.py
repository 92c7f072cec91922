"""Stress and virial as derivatives with respect to a symmetric strain, shared by both ways
energy derivatives are taken (autograd in :func:`~trustpot.models.potential.compute_outputs`,
``torch.func`` in :mod:`trustpot.models.functional`)."""

from __future__ import annotations

import torch
from torch import Tensor

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.nn import cell_volume


def apply_strain(g: Graph, positions: Tensor, strain: Tensor) -> Graph:
    """A copy of ``g`` whose positions [n_atoms, 3] (Å) and cells are deformed by the
    symmetric part of ``strain`` [n_graphs, 3, 3] (a zero strain leaves the values as they
    are; the energy's derivative with respect to it gives the virial)."""
    h = dict(g)
    sym = 0.5 * (strain + strain.transpose(1, 2))
    h[K.POSITIONS] = positions + torch.einsum("ni,nij->nj", positions, sym[g[K.BATCH]])
    h[K.CELL] = g[K.CELL] + torch.einsum("gij,gjk->gik", g[K.CELL], sym)
    return h


def strain_outputs(d_strain: Tensor, g: Graph, wanted: frozenset[str]) -> dict[str, Tensor]:
    """``virial`` = -dE/d(strain) (eV) and ``stress`` = dE/d(strain) / V (eV/Å^3, ASE sign,
    zero for a structure without periodic directions), as ``wanted``.

    Args:
        d_strain: dE/d(strain) [n_graphs, 3, 3], or [n_graphs, M, 3, 3] for M samples.
        g: the batch (its cells and periodicity).
    """
    out: dict[str, Tensor] = {}
    if K.VIRIAL in wanted:
        out[K.VIRIAL] = -d_strain
    if K.STRESS in wanted:
        volume = cell_volume(g[K.CELL]).clamp_min(1e-12)
        periodic = g[K.PBC].any(dim=1)
        shape = (-1,) + (1,) * (d_strain.dim() - 1)
        stress = d_strain / volume.view(shape)
        out[K.STRESS] = torch.where(periodic.view(shape), stress, torch.zeros_like(stress))
    return out
