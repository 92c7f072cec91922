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


class VerletNeighbors:
    """Neighbour pairs reused between MD steps: a Verlet list with a skin.

    For each cutoff asked, the pairs are built once within ``cutoff + skin`` and kept while
    every atom has moved less than ``skin / 2`` since (and the cell, periodicity and atom
    count are unchanged); each call returns those within ``cutoff`` at the current positions,
    in the order :func:`neighbor_pairs` gives (so the edges, and the results, equal a fresh
    list's). An atom wrapped back into the cell jumps by a lattice vector, which the
    displacement check sees: the list is rebuilt, never left with stale image shifts.

    Args:
        skin: Å, >= 0 (0 rebuilds every call).

    Attributes:
        builds: lists built so far (all cutoffs).
        calls: calls answered.
    """

    def __init__(self, skin: float = 1.0) -> None:
        if not skin >= 0:
            raise ValueError(f"the Verlet skin must be >= 0 Å, got {skin}")
        self.skin = float(skin)
        self.builds = 0
        self.calls = 0
        self._lists: dict[float, tuple[np.ndarray, ...]] = {}

    def _stale(
        self, cutoff: float, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray
    ) -> bool:
        if cutoff not in self._lists:
            return True
        ref, ref_cell, ref_pbc = self._lists[cutoff][3:6]
        if ref.shape != positions.shape or not np.array_equal(ref_pbc, pbc):
            return True
        if pbc.any() and not np.array_equal(ref_cell, cell):
            return True
        moved = np.sqrt(((positions - ref) ** 2).sum(axis=1).max(initial=0.0))
        return bool(moved >= 0.5 * self.skin)

    def __call__(
        self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``i``, ``j``, ``shifts`` within ``cutoff`` (as :func:`neighbor_pairs`)."""
        positions = np.asarray(positions, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool)
        self.calls += 1
        if self._stale(cutoff, positions, cell, pbc):
            i, j, shifts, _ = neighbor_pairs(positions, cell, pbc, cutoff + self.skin)
            self._lists[cutoff] = (i, j, shifts, positions.copy(), cell.copy(), pbc.copy())
            self.builds += 1
        i, j, shifts = self._lists[cutoff][:3]
        box = cell if pbc.any() else np.zeros((3, 3))
        vectors = positions[j] - positions[i] + shifts @ box
        keep = (vectors**2).sum(axis=1) < cutoff**2
        return i[keep], j[keep], shifts[keep]
