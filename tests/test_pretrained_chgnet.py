"""The CHGNet adapter against the package's own ASE calculator, and through every consumer.

Skipped when the ``chgnet`` package (``pip install "trustpot[chgnet]"``) or the shared data
folder is absent. Weights come from the installed package; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read, write

from trustpot import keys as K
from trustpot.calculator import Predictor, TrustpotCalculator
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.reader import atoms_to_structure
from trustpot.io.checkpoint import load_model, save_model
from trustpot.models.pretrained import chgnet as chgnet_module
from trustpot.testing import check_invariances

pytest.importorskip("chgnet", reason="the CHGNet adapter needs 'pip install trustpot[chgnet]'")
from chgnet.model.dynamics import CHGNetCalculator

from trustpot.models.pretrained.chgnet import CHGNET, CHGNetAdapter

# the package's own calculator converts a volume that requires grad to a scalar
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZEOLITE = SHARED / "sio2_zeolites" / "train_topology_EDI.xyz.gz"
NACL = SHARED / "nacl_water" / "r2SCAN_gen2.xyz"
if not (ZEOLITE.is_file() and NACL.is_file()):
    pytest.skip(f"shared data absent ({SHARED})", allow_module_level=True)

# float32 CHGNet, two autograd paths with different summation orders
E_TOL = 5e-6  # relative, on total energies of -200 to -1000 eV
F_TOL = 5e-4  # eV/Å
S_TOL = 1e-5  # eV/Å^3


@pytest.fixture(scope="module")
def model() -> CHGNetAdapter:
    loaded = load_model("chgnet")
    assert isinstance(loaded, CHGNetAdapter)
    return loaded


@pytest.fixture(scope="module")
def frames() -> list[Atoms]:
    zeolite: list[Atoms] = read(ZEOLITE, index=":3")
    nacl: list[Atoms] = read(NACL, index=":2")
    return zeolite + nacl


def test_agrees_with_the_package_calculator(model: CHGNetAdapter, frames: list[Atoms]) -> None:
    outputs = (K.ENERGY, K.FORCES, K.STRESS, K.NODE_ENERGY)
    ours = Predictor(model).predict(frames, outputs)
    calc = CHGNetCalculator(model=model.net, use_device="cpu", return_site_energies=True)
    worst = {"energy": 0.0, "forces": 0.0, "stress": 0.0, "energies": 0.0}
    for atoms, mine in zip(frames, ours):
        ref = atoms.copy()
        ref.calc = calc
        energy = ref.get_potential_energy()
        assert float(mine[K.ENERGY]) == pytest.approx(energy, rel=E_TOL)
        np.testing.assert_allclose(mine[K.FORCES], ref.get_forces(), atol=F_TOL)
        np.testing.assert_allclose(mine[K.STRESS], ref.get_stress(voigt=False), atol=S_TOL)
        np.testing.assert_allclose(mine[K.NODE_ENERGY], calc.results["energies"], atol=1e-4)
        worst["energy"] = max(worst["energy"], abs(float(mine[K.ENERGY]) - energy))
        worst["forces"] = max(
            worst["forces"], float(np.abs(mine[K.FORCES] - ref.get_forces()).max())
        )
        worst["stress"] = max(
            worst["stress"], float(np.abs(mine[K.STRESS] - ref.get_stress(voigt=False)).max())
        )
        worst["energies"] = max(
            worst["energies"], float(np.abs(mine[K.NODE_ENERGY] - calc.results["energies"]).max())
        )
    print("max |adapter - CHGNetCalculator|:", worst)


def test_eval_predictor_calculator_md(
    model: CHGNetAdapter, frames: list[Atoms], tmp_path: Path
) -> None:
    small = tmp_path / "zeolite.xyz"
    write(small, frames[:3])
    out = tmp_path / "eval"
    assert main(["eval", "chgnet", str(small), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] == 3 and np.isfinite(metrics["forces_mae"])

    batched = Predictor(model, batch_size=2).predict(frames[:3])
    calc = TrustpotCalculator.from_checkpoint("chgnet")
    for atoms, expected in zip(frames[:3], batched):
        atoms = atoms.copy()
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(expected[K.ENERGY]), rel=E_TOL)
        np.testing.assert_allclose(atoms.get_forces(), expected[K.FORCES], atol=1e-4)

    start = tmp_path / "start.xyz"
    write(start, frames[0])
    traj = tmp_path / "md.xyz"
    argv = ["md", "chgnet", str(start), "--steps", "3", "--temperature", "300"]
    assert main([*argv, "--out", str(traj)]) == 0
    assert len(read(traj, index=":")) >= 1


def test_invariances(model: CHGNetAdapter, frames: list[Atoms]) -> None:
    check_invariances(model, atoms_to_structure(frames[0]), atol=2e-4)


def test_molecule_without_cell_and_training_through_forces(model: CHGNetAdapter) -> None:
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    s = atoms_to_structure(water)
    g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype)])
    out = model(g, (K.ENERGY, K.FORCES), create_graph=True)
    assert torch.isfinite(out[K.FORCES]).all()
    out[K.FORCES].square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(grad is not None and bool(grad.abs().sum() > 0) for grad in grads)
    model.zero_grad(set_to_none=True)


def test_save_load_embed_info(model: CHGNetAdapter, frames: list[Atoms], tmp_path: Path) -> None:
    path = tmp_path / "chgnet.ckpt"
    save_model(model, path)
    again = load_model(path)
    assert isinstance(again, CHGNetAdapter) and again.kind == "pretrained:chgnet"
    first = Predictor(model).predict(frames[:2])
    second = Predictor(again).predict(frames[:2])
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[K.FORCES], b[K.FORCES])
    payload = model.payload()
    assert payload["meta"]["model"] == "0.3.0" and payload["meta"]["package"] == "chgnet"

    s = atoms_to_structure(frames[0])
    g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype)])
    emb = model.embed(g)
    assert emb["node"].shape == (len(frames[0]), 64)
    assert len(emb["layers"]) == 4 and all(x.shape == emb["node"].shape for x in emb["layers"])

    info = CHGNET.info()
    assert info.name == "chgnet" and info.package == "chgnet" and info.extra == "chgnet"
    assert info.n_parameters == sum(p.numel() for p in model.parameters()) > 400_000
    assert info.elements == tuple(range(1, 95)) and info.cutoff == 6.0
    assert "MPtrj" in info.reference and "BSD" in info.licence


def test_info_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chgnet_module, "package_available", lambda package: False)
    info = CHGNET.info()
    assert info.n_parameters == 0 and info.package_version == "not installed"


def test_checkpoint_without_the_package(
    model: CHGNetAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustpot.errors import CheckpointError

    monkeypatch.setattr(chgnet_module, "package_available", lambda package: False)
    with pytest.raises(CheckpointError, match=r'pip install "trustpot\[chgnet\]"'):
        CHGNetAdapter.from_payload(model.payload(), "x.ckpt")
