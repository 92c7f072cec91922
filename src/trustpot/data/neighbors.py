"""Neighbour lists from vesin (O(N), periodic), requested by models through specs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vesin


@dataclass(frozen=True)
class NeighborListSpec:
    """A neighbour list a model needs.

    Attributes:
        name: key suffix in the graph (``edge_index:<name>``); e.g. ``"sr"`` or ``"lr"``.
        cutoff: radius in Å.
    """

    name: str
    cutoff: float


def neighbor_pairs(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    with_distances: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbour list (both i->j and j->i) within ``cutoff``.

    Args:
        positions: [n_atoms, 3] Å.
        cell: [3, 3] Å, rows are lattice vectors; ignored in non-periodic directions.
        pbc: [3] bool.
        cutoff: Å.
        with_distances: also return the distances (else an empty array).

    Returns:
        ``i`` [n_pairs], ``j`` [n_pairs], ``shifts`` [n_pairs, 3] (integers, such that the
        vector is ``positions[j] - positions[i] + shifts @ cell``) and distances [n_pairs] Å.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    box = np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        box = np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    quantities = "ijSd" if with_distances else "ijS"
    out = calculator.compute(
        points=positions, box=box, periodic=pbc.tolist(), quantities=quantities
    )
    i, j, shifts = (np.asarray(out[0], np.int64), np.asarray(out[1], np.int64), np.asarray(out[2]))
    d = np.asarray(out[3]) if with_distances else np.empty(0)
    # a stable order makes batched and single results (and runs) reproducible
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    return i[order], j[order], shifts[order].astype(np.int64), d[order] if with_distances else d
