"""ASE calculator and Predictor: declared properties, batching, periodic stress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from conftest import labelled_bulk, labelled_molecules

from trustpot import Predictor, TrustpotCalculator
from trustpot.io.checkpoint import save_model
from trustpot.models import build_potential


@pytest.fixture()
def mol_ckpt(ethanol_structures: list, tmp_path: Path) -> Path:
    model = build_potential("painn", {"n_features": 8, "n_layers": 2}, ethanol_structures)
    path = tmp_path / "m.ckpt"
    save_model(model, path)
    return path


def test_implemented_properties_are_what_is_returned(mol_ckpt: Path) -> None:
    calc = TrustpotCalculator.from_checkpoint(mol_ckpt)
    atoms = labelled_molecules(1)[0]
    atoms.calc = calc
    atoms.get_potential_energy()
    returned = set(calc.results)
    assert returned <= set(calc.implemented_properties)
    assert set(calc.implemented_properties) - returned == {"stress"}  # molecule: no stress
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy())


def test_periodic_returns_every_declared_property(bulk_structures: list, tmp_path: Path) -> None:
    model = build_potential("schnet", {"n_features": 8, "n_layers": 1}, bulk_structures)
    save_model(model, tmp_path / "cu.ckpt")
    calc = TrustpotCalculator.from_checkpoint(tmp_path / "cu.ckpt")
    atoms = labelled_bulk(1)[0]
    atoms.calc = calc
    atoms.get_forces()
    assert "stress" not in calc.results  # computed only when asked for
    assert atoms.get_stress().shape == (6,)
    assert set(calc.results) == set(calc.implemented_properties)


def test_predictor_batches_match_calculator(mol_ckpt: Path) -> None:
    frames = labelled_molecules(5, seed=3)
    predictor = Predictor.from_checkpoint(mol_ckpt, batch_size=2)
    batched = predictor.predict(frames)
    calc = TrustpotCalculator.from_checkpoint(mol_ckpt)
    for atoms, res in zip(frames, batched):
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(res["energy"]), abs=1e-5)
        assert np.allclose(atoms.get_forces(), res["forces"], atol=1e-5)
