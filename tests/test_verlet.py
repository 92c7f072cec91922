"""Verlet neighbour lists with a skin: the same pairs as a fresh list, rebuilt when they must be,
and MD that conserves energy exactly as with a fresh list every step. The MD calculator's cached
graph and fast change check give what a fresh plain evaluation and ASE's own check give."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import compare_atoms
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from conftest import labelled_bulk, labelled_molecules

from trustpot.calculator import Predictor, TrustpotCalculator, system_changes
from trustpot.data.neighbors import VerletNeighbors, neighbor_pairs
from trustpot.data.reader import atoms_to_structure
from trustpot.errors import ConfigError
from trustpot.models.build import build_potential
from trustpot.uq.ensemble import DeepEnsemble, MCDropout


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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("periodic", [False, True])
def test_md_calculator_equals_a_fresh_plain_evaluation_every_step(
    dtype: str, periodic: bool
) -> None:
    """Along a short NVE run, the calculator (graph tensors reused, Verlet lists, fast change
    check) gives the energy and forces of a fresh ``Predictor.predict_structures`` call with
    fresh lists, to 1e-6 eV/Å in float32 and 1e-12 in float64, also after the cell changes
    (periodic) or two atoms swap elements (molecule), which must rebuild the cached graph."""
    frames = labelled_bulk(4) if periodic else labelled_molecules(4)
    structures = [atoms_to_structure(a) for a in frames]
    hypers = {"n_features": 16, "n_layers": 2, "cutoff": 4.0}
    model = build_potential("painn", hypers, structures, dtype=dtype, seed=1)
    plain = Predictor(model, batch_size=1)
    atoms = frames[0].repeat((2, 1, 1)) if periodic else frames[0].copy()
    MaxwellBoltzmannDistribution(atoms, temperature_K=500, rng=np.random.default_rng(2))
    calc = TrustpotCalculator(Predictor(model, batch_size=1), skin=0.5)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    tol = 1e-6 if dtype == "float32" else 1e-12
    checked = 0

    def compare() -> None:
        nonlocal checked
        (ref,) = plain.predict_structures([atoms_to_structure(atoms)])
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=0, atol=tol)
        assert abs(atoms.get_potential_energy() - float(ref["energy"])) <= tol * len(atoms)
        checked += 1

    dyn.attach(compare, interval=1)
    dyn.run(15)
    if periodic:
        atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=True)
    else:
        atoms.numbers[[0, 2]] = atoms.numbers[[2, 0]]  # C and O of ethanol swap
    dyn.run(15)
    assert checked >= 30 and calc.neighbors.builds >= 2


def _moved(atoms: Atoms, dx: float) -> Atoms:
    out = atoms.copy()
    out.positions[1, 2] += dx
    return out


def test_fast_change_check_answers_as_ase() -> None:
    """:func:`system_changes` returns ASE's ``compare_atoms`` list in every case."""
    base = molecule("CH3CH2OH")
    base.cell = [10.0, 10.0, 10.0]
    cases = {
        "same": base.copy(),
        "below tol": _moved(base, 1e-16),
        "moved": _moved(base, 1e-9),
        "cell": base.copy(),
        "pbc": base.copy(),
        "numbers": base.copy(),
        "charges": base.copy(),
        "nan": _moved(base, float("nan")),
        "fewer atoms": base[:-1],
    }
    cases["cell"].cell = [10.0, 10.0, 11.0]
    cases["pbc"].pbc = [True, False, False]
    cases["numbers"].numbers[0] = 8
    cases["charges"].set_initial_charges(np.full(len(base), 0.1))
    for name, new in cases.items():
        for old, cur in ((base, new), (new, base)):
            want = compare_atoms(old, cur, tol=1e-15)
            assert sorted(system_changes(old, cur, 1e-15)) == sorted(want), name
    assert system_changes(base, cases["moved"]) == ["positions"]
    assert system_changes(base, cases["same"]) == []


@pytest.mark.slow
def test_compiled_md_calculator_agrees_with_the_plain_path_to_float_rounding() -> None:
    """``compile=True`` (torch.compile of a plain potential's energies, dynamic shapes): along
    an NVE run whose edge count changes, forces within 1e-5 eV/Å of a fresh eager evaluation in
    float32, and the model itself is left as it was (still trainable, its state unchanged)."""
    frames = labelled_molecules(4)
    structures = [atoms_to_structure(a) for a in frames]
    model = build_potential("painn", {"n_features": 16, "n_layers": 2, "cutoff": 3.0},
                            structures, dtype="float32", seed=1)  # fmt: skip
    keys = set(model.state_dict())
    plain = Predictor(model, batch_size=1)
    atoms = frames[0].copy()
    MaxwellBoltzmannDistribution(atoms, temperature_K=800, rng=np.random.default_rng(2))
    atoms.calc = TrustpotCalculator(Predictor(model, batch_size=1), skin=0.5, compile=True)
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    edges: set[int] = set()

    def compare() -> None:
        (ref,) = plain.predict_structures([atoms_to_structure(atoms)])
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=0, atol=1e-5)
        assert abs(atoms.get_potential_energy() - float(ref["energy"])) < 1e-4
        edges.add(int(atoms.calc.graph(atoms)["edge_index:main"].shape[1]))

    dyn.attach(compare, interval=1)
    dyn.run(20)
    assert len(edges) > 1 and set(model.state_dict()) == keys
    dropped = build_potential("painn", {"n_features": 8, "n_layers": 1, "cutoff": 3.0},
                              structures, dtype="float32", head_dropout=0.1)  # fmt: skip
    with pytest.raises(ConfigError, match="compile needs a plain potential or a deep ensemble"):
        TrustpotCalculator(Predictor(MCDropout(dropped, n_samples=2)), compile=True)


@pytest.mark.slow
def test_compiled_stacked_ensemble_md_agrees_with_the_eager_ensemble() -> None:
    """``compile=True`` on a deep ensemble compiles its stacked network: along an NVE run,
    forces and force std within float rounding of the eager ensemble, evaluated one by one."""
    frames = labelled_molecules(4)
    structures = [atoms_to_structure(a) for a in frames]
    hypers = {"n_features": 16, "n_layers": 2, "cutoff": 3.0}
    members = [
        build_potential("painn", hypers, structures, dtype="float32", seed=k) for k in range(3)
    ]
    ensemble = DeepEnsemble(members)
    eager = Predictor(DeepEnsemble(members, stacked=False), batch_size=1)
    atoms = frames[0].copy()
    MaxwellBoltzmannDistribution(atoms, temperature_K=800, rng=np.random.default_rng(2))
    atoms.calc = TrustpotCalculator(Predictor(ensemble, batch_size=1), skin=0.5, compile=True)
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)

    def compare() -> None:
        (ref,) = eager.predict_structures([atoms_to_structure(atoms)], ["forces", "forces_std"])
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=0, atol=1e-5)
        got = atoms.calc.results["forces_std"]
        np.testing.assert_allclose(got, ref["forces_std"], rtol=0, atol=1e-5)

    dyn.attach(compare, interval=1)
    dyn.run(10)
    assert ensemble.evaluation == "stacked, compiled"
    with pytest.raises(ConfigError, match="only a stacked ensemble compiles"):
        TrustpotCalculator(Predictor(DeepEnsemble(members, stacked=False)), compile=True)
