"""Close-contact geometry of ionic solutions and force errors resolved by ion distance.

Distances use the minimum-image convention in periodic directions: the difference vector is
wrapped to fractional coordinates in [-0.5, 0.5) and then the 27 neighbouring images are
searched, which is exact for any cell whose shortest image distance exceeds the wrapped vector
(all boxes of liquid simulations). Non-periodic directions are never wrapped.

Definitions (the seed's close-contact metric, made precise):

- frame distance: the shortest cation-anion distance of a frame (Å); a frame is a close-contact
  frame when it is below ``threshold`` (6 Å = 0.6 nm by default), and its error counts all its
  atoms;
- atom distance: for an ion, the distance to its nearest counter-ion (Å); water atoms have none
  (NaN). A close-contact atom is an ion whose nearest counter-ion lies below ``threshold``.

All force errors here are mean absolute errors over force components, in eV/Å.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from trustpot.data.structures import Structure
from trustpot.metrics.accuracy import pooled_mae

#: 1 eV/Å in kJ/mol/nm (defined in :mod:`trustpot.units`; this name is kept for the modules
#: that import it from here).
#: Default close-contact threshold, Å (0.6 nm).
CONTACT_THRESHOLD: Final[float] = 6.0
#: Default cations and anions (atomic numbers).
CATIONS: Final[tuple[int, ...]] = (11,)
ANIONS: Final[tuple[int, ...]] = (17,)

_IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.float64)


def minimum_image_distances(
    a: np.ndarray, b: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> np.ndarray:
    """[n_a, n_b] minimum-image distances (Å) between points ``a`` [n_a, 3] and ``b`` [n_b, 3].

    Args:
        cell: [3, 3] Å, lattice vectors as rows.
        pbc: [3] bool, periodic directions.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    d = a[:, None, :] - b[None, :, :]
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any() or len(a) == 0 or len(b) == 0:
        direct: np.ndarray = np.linalg.norm(d, axis=-1)
        return direct
    cell = np.asarray(cell, dtype=np.float64)
    frac = d @ np.linalg.inv(cell)
    frac[..., pbc] -= np.round(frac[..., pbc])
    images = _IMAGES * pbc[None, :]
    images = np.unique(images, axis=0)
    shifted = (frac[..., None, :] + images[None, None, :, :]) @ cell
    nearest: np.ndarray = np.linalg.norm(shifted, axis=-1).min(axis=-1)
    return nearest


def ion_distances(
    s: Structure,
    cations: Sequence[int] = CATIONS,
    anions: Sequence[int] = ANIONS,
) -> np.ndarray:
    """[n_atoms] distance (Å) of each ion to its nearest counter-ion; NaN for other atoms and
    for ions without any counter-ion in the structure."""
    out = np.full(s.n_atoms, np.nan)
    cat = np.isin(s.numbers, cations)
    an = np.isin(s.numbers, anions)
    if not cat.any() or not an.any():
        return out
    d = minimum_image_distances(s.positions[cat], s.positions[an], s.cell, s.pbc)
    out[np.flatnonzero(cat)] = d.min(axis=1)
    out[np.flatnonzero(an)] = d.min(axis=0)
    return out


def frame_distance(
    s: Structure, cations: Sequence[int] = CATIONS, anions: Sequence[int] = ANIONS
) -> float:
    """Shortest cation-anion distance of a structure (Å); inf when it has no ion pair."""
    d = ion_distances(s, cations, anions)
    return float(np.nanmin(d)) if np.isfinite(d).any() else float("inf")


@dataclass(frozen=True)
class ContactErrors:
    """Force MAEs (eV/Å) of one prediction, overall and in close contact.

    Attributes:
        overall: all force components of all frames.
        contact_frames: components of frames whose nearest cation-anion distance < threshold.
        contact_atoms: components of ions whose nearest counter-ion < threshold.
        far_frames: components of the other frames.
        n_contact_frames: number of close-contact frames.
        n_contact_atoms: number of close-contact ions.
    """

    overall: float
    contact_frames: float
    contact_atoms: float
    far_frames: float
    n_contact_frames: int
    n_contact_atoms: int


def contact_errors(
    errors: Sequence[np.ndarray],
    frame_d: np.ndarray,
    atom_d: Sequence[np.ndarray],
    threshold: float = CONTACT_THRESHOLD,
) -> ContactErrors:
    """Overall and close-contact force MAEs.

    Args:
        errors: per frame, [n_atoms, 3] predicted minus reference forces (eV/Å).
        frame_d: [n_frames] nearest cation-anion distance of each frame (Å).
        atom_d: per frame, [n_atoms] nearest counter-ion distance (NaN for non-ions).
        threshold: close-contact distance (Å).
    """
    frame_d = np.asarray(frame_d, dtype=np.float64)
    if len(errors) != len(frame_d) or len(errors) != len(atom_d):
        raise ValueError(
            f"{len(errors)} error arrays, {len(frame_d)} frame distances, {len(atom_d)} atom "
            "distance arrays: they must match"
        )
    close = frame_d < threshold
    atom_rows = [e[np.nan_to_num(d, nan=np.inf) < threshold] for e, d in zip(errors, atom_d)]
    return ContactErrors(
        overall=pooled_mae(errors),
        contact_frames=pooled_mae([e for e, c in zip(errors, close) if c]),
        contact_atoms=pooled_mae(atom_rows),
        far_frames=pooled_mae([e for e, c in zip(errors, close) if not c]),
        n_contact_frames=int(close.sum()),
        n_contact_atoms=int(sum(len(r) for r in atom_rows)),
    )


@dataclass(frozen=True)
class BinnedErrors:
    """Force MAE (eV/Å) in bins of distance (Å).

    Attributes:
        edges: [n_bins + 1] bin edges.
        mae: [n_bins] MAE of the force components falling in each bin (NaN when empty).
        count: [n_bins] number of frames (frame binning) or ions (atom binning) per bin.
    """

    edges: np.ndarray
    mae: np.ndarray
    count: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "edges": [float(x) for x in self.edges],
            "mae": [float(x) for x in self.mae],
            "count": [int(x) for x in self.count],
        }


def distance_edges(values: np.ndarray, width: float = 0.5, start: float = 2.0) -> np.ndarray:
    """Bin edges of ``width`` Å from ``start`` up to past the largest finite value."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    top = max(float(finite.max()) if len(finite) else start + width, start + width)
    n = int(np.ceil((top - start) / width)) + 1
    return start + width * np.arange(n + 1)


def binned_errors(
    errors: Sequence[np.ndarray],
    distances: Sequence[np.ndarray] | np.ndarray,
    edges: np.ndarray,
    per_frame: bool,
) -> BinnedErrors:
    """MAE per distance bin.

    Args:
        errors: per frame, [n_atoms, 3] force errors (eV/Å).
        distances: with ``per_frame``, [n_frames] (a frame's atoms all fall in its bin);
            otherwise, per frame, [n_atoms] (atom binning; NaN atoms are skipped).
        edges: [n_bins + 1] increasing bin edges (Å).
        per_frame: bin frames (True) or atoms (False).
    """
    if len(errors) != len(distances):
        raise ValueError(f"{len(errors)} error arrays but {len(distances)} distance entries")
    n_bins = len(edges) - 1
    sums, comps, count = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins, dtype=np.int64)
    for k, e in enumerate(errors):
        d = np.asarray(distances[k], dtype=np.float64)
        rows = np.full(len(e), float(d)) if per_frame else d
        b = np.searchsorted(edges, rows, side="right") - 1
        ok = np.isfinite(rows) & (b >= 0) & (b < n_bins)
        absum = np.abs(e).sum(axis=1)
        np.add.at(sums, b[ok], absum[ok])
        np.add.at(comps, b[ok], 3)
        if per_frame:
            if ok.any():
                count[b[ok][0]] += 1
        else:
            np.add.at(count, b[ok], 1)
    mae = np.divide(sums, comps, out=np.full(n_bins, np.nan), where=comps > 0)
    return BinnedErrors(np.asarray(edges, dtype=np.float64), mae, count)
