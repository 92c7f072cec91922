"""``trustpot pretrain`` end to end on a tiny corpus, and the shipped ``trustpot-mol``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from trustpot.cli.main import main
from trustpot.errors import ConfigError
from trustpot.models.pretrained.trustpot_mol import TRUSTPOT_MOL, _resource
from trustpot.pretrain import PretrainOptions, run_pretrain, split_molecules

HAS_XTB = all(importlib.util.find_spec(m) is not None for m in ("tblite", "rdkit"))
SHIPPED = _resource(".ckpt").is_file()
TINY = [
    "pretrain", "--molecules", "CCO", "CC=O", "CCN", "--temperatures", "300", "--frames", "3",
    "--equilibration", "5", "--interval", "3", "--test-fraction", "0.34", "--epochs", "2",
    "--minutes", "0.2", "--features", "8", "--layers", "1", "--workers", "0", "--quiet",
    "--threads", "1",
]  # fmt: skip


@pytest.mark.skipif(not HAS_XTB, reason="needs the xtb extra (tblite, rdkit)")
def test_tiny_pretrain_then_rerun_reuses(tmp_path: Path) -> None:
    out = tmp_path / "mol"
    assert main([*TINY, "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert (out / "trustpot-mol.ckpt").is_file() and (out / "card.md").is_file()
    assert card["data"]["test_molecules"] == ["CCO"]  # the only one whose elements stay covered
    assert card["training"]["epochs"] == 2 and card["training"]["parameters"] > 0
    assert card["held_out"]["overall"]["frames"] == 3
    assert set(card["held_out"]["per_element"]) == {"H", "C", "O"}
    assert list(card["held_out"]["per_temperature"]) == ["300 K"]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["smiles"] == ["CCO", "CC=O", "CCN"] and len(manifest["data_sha256"]) == 64
    split = json.loads((out / "data" / "split.json").read_text())
    assert split["sizes"] == {"train": 6, "test": 3}

    messages: list[str] = []
    opts = PretrainOptions(
        out=str(out), molecules=("CCO", "CC=O", "CCN"), temperatures=(300.0,), frames=3,
        equilibration=5, interval=3, test_fraction=0.34, epochs=2, minutes=0.2, features=8,
        layers=1, workers=0, quiet=True, threads=1,
    )  # fmt: skip
    again = run_pretrain(opts, log=messages.append)
    assert sum("done already, reused" in m for m in messages) == 4  # corpus, data, train, eval
    assert again["held_out"] == card["held_out"]
    with pytest.raises(ConfigError, match="differ"):
        run_pretrain(PretrainOptions(**{**opts.__dict__, "frames": 4}), log=messages.append)


def test_split_keeps_test_elements_covered() -> None:
    pytest.importorskip("rdkit")
    smiles = ["CCO", "CCC", "CCCl", "CCF", "CCCF", "CCN", "CCCN"]
    test = split_molecules(smiles, 0.5, seed=1)
    assert "CCCl" not in test and len(test) >= 1
    with pytest.raises(ConfigError, match="at least 2"):
        split_molecules(["CCO"], 0.5, 0)


def test_info_from_the_shipped_card() -> None:
    if not _resource(".json").is_file():
        pytest.skip("trustpot-mol card not shipped in this checkout")
    info = TRUSTPOT_MOL.info()
    assert info.name == "trustpot-mol" and info.package == "trustpot" and info.extra == ""
    assert info.licence == "MIT" and info.n_parameters > 1000
    assert set(info.elements) == {1, 6, 7, 8, 9, 16, 17}
    assert info.cutoff == 5.0 and info.reference.startswith("GFN2-xTB (tblite), ")
    assert TRUSTPOT_MOL.kind == "potential"


@pytest.mark.skipif(not SHIPPED, reason="trustpot-mol weights not shipped in this checkout")
def test_shipped_model_loads_by_name_and_evaluates(tmp_path: Path) -> None:
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from trustpot.calculator import TrustpotCalculator
    from trustpot.data.structures import Structure
    from trustpot.io.checkpoint import load_model
    from trustpot.models.potential import Potential
    from trustpot.testing.contracts import check_invariances

    model = load_model("trustpot-mol", Potential)
    assert not model.training and sorted(model.species) == [1, 6, 7, 8, 9, 16, 17]
    frames = []
    rng = np.random.default_rng(0)
    for name in ("CH3CH2OH", "CH3COOH", "CH3CN"):
        atoms = molecule(name)
        atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
        atoms.calc = TrustpotCalculator.from_checkpoint("trustpot-mol")
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        assert np.isfinite(energy) and np.all(np.isfinite(forces))
        assert abs(forces.sum(axis=0)).max() < 1e-3  # no net force
        atoms.calc = SinglePointCalculator(atoms, energy=energy + 0.1, forces=forces)
        frames.append(atoms)
    # the contract checks, at float32 tolerance (energies of ~-300 eV)
    check_invariances(model, Structure(
        frames[0].numbers, frames[0].positions, np.zeros((3, 3)), np.zeros(3, dtype=bool)
    ), atol=1e-3)  # fmt: skip
    write(tmp_path / "f.xyz", frames)
    assert (
        main(["eval", "trustpot-mol", str(tmp_path / "f.xyz"), "--out", str(tmp_path / "e")]) == 0
    )
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["forces_mae"] < 1e-4


def test_listed_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    if not _resource(".json").is_file():
        pytest.skip("trustpot-mol card not shipped in this checkout")
    assert main(["pretrained", "list"]) == 0
    assert "trustpot-mol" in capsys.readouterr().out
