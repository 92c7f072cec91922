"""Dataset statistics a model is initialised with: reference energies, force scale, degree."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trustpot.data.neighbors import neighbor_pairs
from trustpot.data.structures import Structure
from trustpot.errors import DataError


def fit_reference_energies(
    structures: Sequence[Structure], species: Sequence[int]
) -> dict[int, float]:
    """Per-element energies E0 (eV) minimising sum_s (E_s - sum_i E0[z_i])^2.

    With fewer distinct compositions than elements the problem is rank deficient and the
    minimum-norm solution is taken (for one composition: the same mean energy per atom for
    every element), which is all a single-molecule dataset can tell.
    """
    labelled = [s for s in structures if s.energy is not None]
    if not labelled:
        raise DataError("training data", "no energies to fit reference energies to", None, "energy")
    column = {z: k for k, z in enumerate(species)}
    counts = np.zeros((len(labelled), len(species)))
    for row, s in enumerate(labelled):
        zs, n = np.unique(s.numbers, return_counts=True)
        for z, c in zip(zs, n):
            counts[row, column[int(z)]] = c
    energies = np.array([s.energy for s in labelled], dtype=np.float64)
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {int(z): float(solution[column[z]]) for z in species}


def isolated_atom_energies(structures: Sequence[Structure], path: str) -> dict[int, float]:
    """Reference energies from a file of one-atom structures."""
    out: dict[int, float] = {}
    for frame, s in enumerate(structures):
        if s.n_atoms != 1:
            raise DataError(path, f"expected one atom, found {s.n_atoms}", frame, "positions")
        if s.energy is None:
            raise DataError(path, "label missing", frame, "energy")
        out[int(s.numbers[0])] = float(s.energy)
    return out


def residual_energy_stats(
    structures: Sequence[Structure], e0: dict[int, float]
) -> tuple[float, float]:
    """Mean and standard deviation (eV/atom) of (E - sum E0) / n_atoms."""
    values = [
        (s.energy - sum(e0[int(z)] for z in s.numbers)) / s.n_atoms
        for s in structures
        if s.energy is not None
    ]
    if not values:
        return 0.0, 1.0
    return float(np.mean(values)), float(np.std(values))


def force_rms(structures: Sequence[Structure]) -> float:
    """Root mean square of all force components (eV/Å); 1.0 when there are no forces."""
    sq = [np.mean(s.forces**2) for s in structures if s.forces is not None]
    value = float(np.sqrt(np.mean(sq))) if sq else 1.0
    return value if value > 1e-8 else 1.0


def average_neighbors(structures: Sequence[Structure], cutoff: float, limit: int = 200) -> float:
    """Mean number of neighbours within ``cutoff`` Å over (up to ``limit``) structures."""
    counts = []
    for s in structures[:limit]:
        i, *_ = neighbor_pairs(s.positions, s.cell, s.pbc, cutoff)
        counts.append(len(i) / s.n_atoms)
    return float(np.mean(counts)) if counts else 1.0
