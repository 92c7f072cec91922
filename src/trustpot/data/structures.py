"""One labelled structure as plain NumPy arrays, and its checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from trustpot.errors import DataError

#: Two atoms closer than this (Å) make a structure invalid: almost always a unit or parse error.
MIN_DISTANCE: float = 0.1


@dataclass
class Structure:
    """A structure with optional labels, in eV and Å.

    Attributes:
        numbers: [n_atoms] atomic numbers.
        positions: [n_atoms, 3] Å.
        cell: [3, 3] Å, lattice vectors as rows (zeros allowed when not periodic).
        pbc: [3] periodic directions.
        energy: total energy in eV, or None when unlabelled.
        forces: [n_atoms, 3] eV/Å, or None.
        stress: [3, 3] eV/Å^3 (ASE sign), or None.
        info: per-frame metadata (``config_type``, temperature, ...) and per-structure
            properties (a HOMO-LUMO gap, a [3] dipole...), kept as read.
        arrays: per-atom properties as float64 arrays with first axis n_atoms (partial charges
            [n_atoms], atomic dipoles [n_atoms, 3]...), kept as read.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def is_periodic(self) -> bool:
        return bool(np.any(self.pbc))

    def to_atoms(self, with_labels: bool = True) -> Atoms:
        """An ASE ``Atoms``; labels go into a ``SinglePointCalculator`` when present."""
        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        atoms.info.update(self.info)
        for name, values in self.arrays.items():
            atoms.new_array(name, np.array(values))
        if with_labels and (self.energy is not None or self.forces is not None):
            results: dict[str, Any] = {}
            if self.energy is not None:
                results["energy"] = self.energy
            if self.forces is not None:
                results["forces"] = self.forces
            if self.stress is not None:
                results["stress"] = self.stress
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


def check_structure(s: Structure, path: str, frame: int) -> None:
    """Raise :class:`DataError` naming file, frame and field if ``s`` holds invalid values."""
    n = s.n_atoms
    if n == 0:
        raise DataError(path, "structure has no atoms", frame, "positions")
    if s.positions.shape != (n, 3):
        raise DataError(path, f"shape {s.positions.shape}, expected ({n}, 3)", frame, "positions")
    if not np.all(np.isfinite(s.positions)):
        raise DataError(path, "contains NaN or inf", frame, "positions")
    if np.any(s.numbers <= 0) or np.any(s.numbers > 118):
        bad = sorted({int(z) for z in s.numbers if z <= 0 or z > 118})
        raise DataError(path, f"unknown element(s) with atomic number {bad}", frame, "numbers")
    if s.energy is not None and not np.isfinite(s.energy):
        raise DataError(path, f"value {s.energy} is not finite", frame, "energy")
    if s.forces is not None:
        if s.forces.shape != (n, 3):
            raise DataError(path, f"shape {s.forces.shape}, expected ({n}, 3)", frame, "forces")
        if not np.all(np.isfinite(s.forces)):
            atom = int(np.argwhere(~np.isfinite(s.forces))[0, 0])
            raise DataError(path, f"contains NaN or inf (atom {atom})", frame, "forces")
    if s.stress is not None:
        if s.stress.shape != (3, 3):
            raise DataError(path, f"shape {s.stress.shape}, expected (3, 3)", frame, "stress")
        if not np.all(np.isfinite(s.stress)):
            raise DataError(path, "contains NaN or inf", frame, "stress")
    for name, values in s.arrays.items():
        if values.shape[:1] != (n,):
            raise DataError(path, f"shape {values.shape}, expected ({n}, ...)", frame, name)
    if s.is_periodic:
        lengths = np.linalg.norm(s.cell, axis=1)
        if np.any(lengths[s.pbc] < 1e-6) or abs(np.linalg.det(s.cell)) < 1e-6:
            raise DataError(path, "periodic structure with a degenerate cell", frame, "cell")
    pair = closest_pair(s)
    if pair is not None:
        i, j, d = pair
        raise DataError(
            path,
            f"atoms {i} and {j} are {d:.3f} Å apart (< {MIN_DISTANCE} Å): overlapping atoms",
            frame,
            "positions",
        )


def closest_pair(s: Structure, threshold: float = MIN_DISTANCE) -> tuple[int, int, float] | None:
    """The first pair of atoms closer than ``threshold`` Å (periodic images included), or None."""
    from trustpot.data.neighbors import neighbor_pairs

    if s.n_atoms < 2 and not s.is_periodic:
        return None
    # a cell list with bins as small as ``threshold`` is slow; search a 1 Å sphere and filter
    i, j, _, d = neighbor_pairs(
        s.positions, s.cell, s.pbc, max(threshold, 1.0), with_distances=True
    )
    if len(i) == 0 or float(d.min()) >= threshold:
        return None
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])


def check_species(structures: list[Structure], species: list[int], path: str) -> None:
    """Raise :class:`DataError` at the first frame holding an element outside ``species``."""
    from ase.data import chemical_symbols

    known = set(species)
    for frame, s in enumerate(structures):
        unknown = sorted({int(z) for z in s.numbers} - known)
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            known_names = ", ".join(chemical_symbols[z] for z in sorted(known))
            raise DataError(
                path,
                f"element(s) {names} not in the model (trained on {known_names})",
                frame,
                "numbers",
            )


def info_values(structures: Sequence[Structure], key: str, source: str) -> np.ndarray:
    """[n] the number stored under ``key`` in each structure's info (float64).

    Raises:
        DataError: naming ``source``, the first frame without a finite number, and the field.
    """
    values = []
    for k, s in enumerate(structures):
        try:
            number = float(s.info[key])
        except (KeyError, TypeError, ValueError):
            number = float("nan")
        if not np.isfinite(number):
            raise DataError(source, "missing or not a finite number", k, key)
        values.append(number)
    return np.asarray(values, dtype=np.float64)
