"""Physical and software contracts of a potential, as plain functions raising AssertionError.

Use float64 models and small structures (3-30 atoms); every check runs in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trustpot import keys as K
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.structures import Structure
from trustpot.models.potential import Potential


def random_rotation(seed: int = 0) -> np.ndarray:
    """A random proper rotation matrix [3, 3]."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _evaluate(
    model: Potential, structures: Sequence[Structure], outputs: Sequence[str] = (K.ENERGY, K.FORCES)
) -> dict[str, torch.Tensor]:
    g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures])
    return {k: v.detach() for k, v in model(g, frozenset(outputs), create_graph=False).items()}


def _copy(
    s: Structure,
    positions: np.ndarray | None = None,
    cell: np.ndarray | None = None,
    order: np.ndarray | None = None,
) -> Structure:
    numbers = s.numbers if order is None else s.numbers[order]
    pos = s.positions if positions is None else positions
    if order is not None:
        pos = pos[order]
    return Structure(
        numbers=numbers.copy(),
        positions=np.array(pos),
        cell=np.array(s.cell if cell is None else cell),
        pbc=s.pbc.copy(),
    )


def check_invariances(
    model: Potential, s: Structure, atol: float = 1e-8, seed: int = 0, permutation: bool = True
) -> None:
    """Energy invariant and forces equivariant under rotation; invariant under translation and
    (with ``permutation``) permutation of atoms (forces permuted accordingly). Pass
    ``permutation=False`` for a model whose answer is a finite sample over per-atom random
    draws tied to atom order (MC dropout with fixed masks)."""
    base = _evaluate(model, [s])
    rot = random_rotation(seed)
    rotated = _copy(s, s.positions @ rot.T, s.cell @ rot.T)
    out = _evaluate(model, [rotated])
    assert torch.allclose(out[K.ENERGY], base[K.ENERGY], atol=atol), "energy not rotation invariant"
    expected_f = base[K.FORCES].numpy() @ rot.T
    assert np.allclose(out[K.FORCES].numpy(), expected_f, atol=atol), (
        "forces not rotation equivariant"
    )
    shifted = _copy(s, s.positions + np.array([0.37, -1.21, 2.05]))
    out = _evaluate(model, [shifted])
    assert torch.allclose(out[K.ENERGY], base[K.ENERGY], atol=atol), (
        "energy not translation invariant"
    )
    assert torch.allclose(out[K.FORCES], base[K.FORCES], atol=atol), (
        "forces not translation invariant"
    )
    if not permutation:
        return
    order = np.random.default_rng(seed).permutation(s.n_atoms)
    permuted = _copy(s, order=order)
    out = _evaluate(model, [permuted])
    assert torch.allclose(out[K.ENERGY], base[K.ENERGY], atol=atol), (
        "energy not permutation invariant"
    )
    assert torch.allclose(out[K.FORCES], base[K.FORCES][order], atol=atol), (
        "forces not permutation equivariant"
    )


def check_forces_finite_difference(
    model: Potential, s: Structure, delta: float = 1e-4, rtol: float = 1e-4, atol: float = 1e-6
) -> None:
    """Forces equal minus the central finite difference of the energy."""
    forces = _evaluate(model, [s])[K.FORCES].numpy()
    numeric = np.zeros_like(forces)
    for a in range(s.n_atoms):
        for d in range(3):
            plus, minus = s.positions.copy(), s.positions.copy()
            plus[a, d] += delta
            minus[a, d] -= delta
            e_p = float(_evaluate(model, [_copy(s, plus)], (K.ENERGY,))[K.ENERGY][0])
            e_m = float(_evaluate(model, [_copy(s, minus)], (K.ENERGY,))[K.ENERGY][0])
            numeric[a, d] = -(e_p - e_m) / (2 * delta)
    assert np.allclose(forces, numeric, rtol=rtol, atol=atol), (
        f"forces differ from -dE/dr: max |diff| {np.abs(forces - numeric).max():.3g}"
    )


def check_stress_finite_difference(
    model: Potential, s: Structure, delta: float = 1e-5, atol: float = 1e-6
) -> None:
    """Stress equals (1/V) dE/d(strain) by finite differences of a symmetric strain."""
    stress = _evaluate(model, [s], (K.ENERGY, K.STRESS))[K.STRESS].numpy()[0]
    volume = abs(np.linalg.det(s.cell))
    numeric = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] += delta / 2
            eps[j, i] += delta / 2
            energies = []
            for sign in (1, -1):
                m = np.eye(3) + sign * eps
                energies.append(
                    float(
                        _evaluate(model, [_copy(s, s.positions @ m, s.cell @ m)], (K.ENERGY,))[
                            K.ENERGY
                        ][0]
                    )
                )
            numeric[i, j] = (energies[0] - energies[1]) / (2 * delta) / volume
    assert np.allclose(stress, numeric, atol=atol), f"stress differs from FD: {stress} vs {numeric}"


def check_batch_equals_single(
    model: Potential, structures: Sequence[Structure], atol: float = 1e-8
) -> None:
    """A batch of structures gives the same energies and forces as one at a time."""
    batch = _evaluate(model, structures)
    offset = 0
    for k, s in enumerate(structures):
        single = _evaluate(model, [s])
        assert torch.allclose(batch[K.ENERGY][k], single[K.ENERGY][0], atol=atol), (
            f"energy of structure {k} differs in a batch"
        )
        assert torch.allclose(
            batch[K.FORCES][offset : offset + s.n_atoms], single[K.FORCES], atol=atol
        ), f"forces of structure {k} differ in a batch"
        offset += s.n_atoms


def check_cutoff_smoothness(
    model: Potential, numbers: tuple[int, int], cutoff: float, eps: float = 1e-4, atol: float = 1e-6
) -> None:
    """A dimer's energy and force go continuously to the isolated-atoms value at the cutoff."""

    def dimer(r: float) -> Structure:
        return Structure(
            numbers=np.array(numbers),
            positions=np.array([[0.0, 0, 0], [r, 0, 0]]),
            cell=np.zeros((3, 3)),
            pbc=np.zeros(3, bool),
        )

    inside = _evaluate(model, [dimer(cutoff - eps)])
    outside = _evaluate(model, [dimer(cutoff + eps)])
    assert torch.allclose(inside[K.ENERGY], outside[K.ENERGY], atol=atol), (
        "energy jumps at the cutoff"
    )
    assert torch.allclose(inside[K.FORCES], outside[K.FORCES], atol=atol * 10), (
        "force jumps at the cutoff"
    )


def check_save_load(model: Potential, s: Structure, path: Path, atol: float = 0.0) -> None:
    """A checkpoint written and read back gives identical predictions."""
    from trustpot.io.checkpoint import load_potential, save_model

    save_model(model, path)
    again = load_potential(path)
    a, b = _evaluate(model.eval(), [s]), _evaluate(again, [s])
    assert torch.allclose(a[K.ENERGY], b[K.ENERGY], atol=atol), "energy changed after save/load"
    assert torch.allclose(a[K.FORCES], b[K.FORCES], atol=atol), "forces changed after save/load"
