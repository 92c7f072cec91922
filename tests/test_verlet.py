"""Verlet neighbour lists with a skin: the same pairs as a fresh list, rebuilt when they must be,
and MD that conserves energy exactly as with a fresh list every step."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from conftest import labelled_bulk

from trustpot.calculator import Predictor, TrustpotCalculator
from trustpot.data.neighbors import VerletNeighbors, neighbor_pairs
from trustpot.data.reader import atoms_to_structure
from trustpot.models.build import build_potential


def _same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("periodic", [True, False])
def test_pairs_equal_a_fresh_list_along_a_random_walk(periodic: bool) -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2) if periodic else molecule("C6H6")
    rng = np.random.default_rng(0)
    verlet = VerletNeighbors(skin=0.6)
    cutoff = 3.0
    for step in range(60):
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        if periodic and step == 30:
            atoms.wrap()  # atoms jump by lattice vectors: stale shifts must not survive
        if periodic and step == 45:  # a changed cell (NPT) forces a rebuild
            atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=True)
        args = (atoms.positions, atoms.cell.array, atoms.pbc)
        _same(verlet(*args, cutoff), neighbor_pairs(*args, cutoff)[:3])
    assert 1 < verlet.builds < verlet.calls == 60


def test_skin_zero_rebuilds_every_call_and_negative_is_refused() -> None:
    atoms = molecule("H2O")
    verlet = VerletNeighbors(skin=0.0)
    for _ in range(3):
        verlet(atoms.positions, atoms.cell.array, atoms.pbc, 2.0)
    assert verlet.builds == 3
    with pytest.raises(ValueError, match="skin must be >= 0"):
        VerletNeighbors(skin=-0.1)


def test_nve_on_a_periodic_box_matches_fresh_lists_and_conserves_energy() -> None:
    """Velocity Verlet on a hot periodic copper box, positions wrapped every 10 steps: the
    skin calculator gives the trajectory of a fresh list per step, and the total energy drifts
    no more than a fresh list's."""
    frames = labelled_bulk(4)
    structures = [atoms_to_structure(a) for a in frames]
    model = build_potential("schnet", {"n_features": 16, "n_layers": 2, "cutoff": 4.0}, structures,
                            dtype="float64", seed=3)  # fmt: skip
    runs = {}
    for skin in (0.0, 0.8):
        atoms = frames[0].repeat((2, 1, 1))
        MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(1))
        calc = TrustpotCalculator(Predictor(model), skin=skin)
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, 1.0 * units.fs)
        energies = []
        for _ in range(8):
            dyn.run(10)
            atoms.wrap()
            energies.append(atoms.get_total_energy())
        runs[skin] = (atoms.positions.copy(), np.array(energies), calc.neighbors)
    np.testing.assert_allclose(runs[0.8][0], runs[0.0][0], atol=1e-9)
    np.testing.assert_allclose(runs[0.8][1], runs[0.0][1], atol=1e-9)
    drift = np.ptp(runs[0.8][1]) / len(frames[0].repeat((2, 1, 1)))
    assert drift < 2e-3, f"NVE energy drift {drift:.2e} eV/atom over 80 fs"
    verlet = runs[0.8][2]
    assert verlet.builds < verlet.calls / 3, (verlet.builds, verlet.calls)
