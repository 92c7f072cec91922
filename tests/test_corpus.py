"""The trustpot-mol corpus: valid, diverse, without acetylacetone; xTB properties per frame."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from trustpot.engines.corpus import (
    CORPUS,
    EXCLUDED,
    FAMILIES,
    CorpusOptions,
    corpus_smiles,
    generate_corpus,
)
from trustpot.engines.xtb import homo_lumo_gap
from trustpot.errors import ConfigError

Chem = pytest.importorskip("rdkit.Chem")

HAS_XTB = all(importlib.util.find_spec(m) is not None for m in ("tblite", "rdkit"))


def canonical(smiles: str) -> str:
    mol = Chem.MolFromSmiles(smiles)
    assert mol is not None, f"RDKit cannot parse {smiles}"
    return str(Chem.MolToSmiles(mol))


def test_corpus_is_valid_and_diverse() -> None:
    assert len(CORPUS) >= 200
    assert len(FAMILIES) >= 10
    canon = [canonical(s) for s in CORPUS]
    assert len(set(canon)) == len(canon), "a molecule is listed twice"
    elements: set[str] = set()
    for s in CORPUS:
        mol = Chem.MolFromSmiles(s)
        assert 3 <= mol.GetNumHeavyAtoms() <= 20, s
        assert Chem.GetFormalCharge(mol) == 0, s
        elements |= {a.GetSymbol() for a in Chem.AddHs(mol).GetAtoms()}
    assert elements == {"H", "C", "N", "O", "F", "S", "Cl"}


def test_no_acetylacetone() -> None:
    banned = {canonical(s) for s in ("CC(=O)CC(C)=O", "CC(O)=CC(C)=O", *EXCLUDED)}
    assert not banned & {canonical(s) for s in CORPUS}


def test_limit_spreads_over_the_corpus() -> None:
    picked = corpus_smiles(CorpusOptions(limit=12))
    assert len(picked) == 12 and picked[0] == CORPUS[0] and picked[-1] == CORPUS[-1]
    assert corpus_smiles(CorpusOptions(molecules=("CCO", "CC=O"))) == ["CCO", "CC=O"]
    with pytest.raises(ConfigError, match="limit"):
        corpus_smiles(CorpusOptions(limit=-1))


def test_gap_from_orbitals() -> None:
    energies = np.array([-0.6, -0.4, -0.1, 0.2])  # Hartree
    assert homo_lumo_gap(energies, np.array([2.0, 2.0, 0.0, 0.0])) == pytest.approx(
        0.3 * 27.211386245988
    )
    # spin-resolved: one unpaired electron in channel 0
    spin = np.array([[-0.6, -0.4, -0.1, 0.2], [-0.6, -0.4, -0.1, 0.2]])
    occ = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert homo_lumo_gap(spin, occ) == pytest.approx(0.0)  # HOMO -0.1 (up), LUMO -0.1 (down)


@pytest.mark.skipif(not HAS_XTB, reason="needs the xtb extra (tblite, rdkit)")
def test_frames_carry_xtb_properties(tmp_path: Path) -> None:
    from ase.io import read

    opts = CorpusOptions(
        molecules=("CO",), temperatures=(300.0,), frames=2, equilibration=5, interval=3
    )
    summary = generate_corpus(tmp_path / "c.xyz", opts, workers=0, progress=False)
    assert summary.written == 2 and summary.failed == 0
    frames = read(tmp_path / "c.xyz", ":")
    for atoms in frames:
        assert atoms.info["smiles"] == "CO" and atoms.info["temperature"] == 300.0
        assert 3.0 < atoms.info["homo_lumo_gap"] < 20.0  # eV
        dipole = np.asarray(atoms.info["xtb_dipole"])
        assert dipole.shape == (3,) and 0.05 < np.linalg.norm(dipole) < 1.0  # e·Å (~0.3 e·Å)
        charges = atoms.arrays["xtb_charges"]
        assert charges.shape == (len(atoms),) and abs(charges.sum()) < 1e-3  # neutral
        assert charges[atoms.numbers == 8][0] < 0 < charges[atoms.numbers == 1].max()
