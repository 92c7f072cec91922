"""SevenNet-0 through trustpot's contract, checked against the package's own ASE calculator.

Needs the ``sevennet`` extra (``sevenn``, which ships the 7net-0 weights) and, for the
agreement tests, the shared datasets beside the checkout. Measured on CPU with sevenn 0.13.0
(3 zeolite frames of 15 atoms, 3 NaCl-water frames of 160 atoms): energy per atom within
1.0e-6 eV/atom, forces within 6e-5 eV/Å, stress within 1e-7 eV/Å^3 of ``SevenNetCalculator``.
The tolerances below leave a few times that margin for float32 summation order.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read, write

pytest.importorskip("sevenn", reason="the sevennet extra (sevenn) is not installed")

from conftest import needs_shared

from trustpot import keys as K
from trustpot.calculator import Predictor, TrustpotCalculator
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.reader import atoms_to_structure
from trustpot.errors import CheckpointError
from trustpot.io.checkpoint import load_model, read_checkpoint, save_model
from trustpot.models.pretrained import sevennet
from trustpot.models.pretrained.sevennet import SEVENNET_0, SevenNetAdapter
from trustpot.testing import check_forces_finite_difference, check_invariances

ENERGY_PER_ATOM_TOL = 5e-6  # eV/atom
FORCES_TOL = 3e-4  # eV/Å
STRESS_TOL = 1e-6  # eV/Å^3
FIXTURE_FRAMES = Path(__file__).resolve().parent / "fixtures" / "checkpoints" / "frames.xyz"


@pytest.fixture(scope="module")
def model() -> SevenNetAdapter:
    loaded = load_model("sevennet-0")
    assert isinstance(loaded, SevenNetAdapter)
    return loaded


@pytest.fixture(scope="module")
def reference() -> Any:
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator("7net-0", device="cpu")


@pytest.fixture(scope="module")
def zeolite() -> list[Atoms]:
    path = needs_shared("sio2_zeolites", "train_topology_EDI.xyz.gz")  # 15-atom cells
    frames: list[Atoms] = read(path, index=":3")
    return frames


@pytest.fixture(scope="module")
def nacl_water() -> list[Atoms]:
    path = needs_shared("nacl_water", "revPBE0-D3_gen1a.xyz")  # 160-atom cells
    frames: list[Atoms] = read(path, index=":3")
    return frames


def _pairs(
    frames: list[Atoms], ours: TrustpotCalculator, reference: Any
) -> Iterator[tuple[Atoms, Atoms]]:
    for atoms in frames:
        mine, theirs = atoms.copy(), atoms.copy()
        mine.calc, theirs.calc = ours, reference
        yield mine, theirs


@pytest.mark.parametrize("dataset", ["zeolite", "nacl_water"])
def test_agrees_with_package_calculator(
    dataset: str, model: SevenNetAdapter, reference: Any, request: pytest.FixtureRequest
) -> None:
    frames: list[Atoms] = request.getfixturevalue(dataset)
    ours = TrustpotCalculator(Predictor(model))
    for mine, theirs in _pairs(frames, ours, reference):
        n = len(mine)
        e_diff = abs(mine.get_potential_energy() - theirs.get_potential_energy()) / n
        assert e_diff < ENERGY_PER_ATOM_TOL
        np.testing.assert_allclose(mine.get_forces(), theirs.get_forces(), atol=FORCES_TOL)
        np.testing.assert_allclose(mine.get_stress(), theirs.get_stress(), atol=STRESS_TOL)
        np.testing.assert_allclose(
            mine.get_potential_energies(), theirs.get_potential_energies(), atol=1e-5
        )


def test_agrees_on_molecules(model: SevenNetAdapter, reference: Any) -> None:
    """Non-periodic frames (no cell): measured 4e-7 eV/atom and 6e-6 eV/Å."""
    frames = read(FIXTURE_FRAMES, index=":2")
    ours = TrustpotCalculator(Predictor(model))
    for mine, theirs in _pairs(frames, ours, reference):
        e_diff = abs(mine.get_potential_energy() - theirs.get_potential_energy()) / len(mine)
        assert e_diff < ENERGY_PER_ATOM_TOL
        np.testing.assert_allclose(mine.get_forces(), theirs.get_forces(), atol=FORCES_TOL)


def test_gradients_reach_every_trainable_weight(zeolite: list[Atoms]) -> None:
    model = SEVENNET_0.load().train()
    g = collate([structure_to_graph(atoms_to_structure(zeolite[0]), model.neighbor_lists())])
    out = model(g, {K.ENERGY, K.FORCES, K.STRESS})
    loss = (out[K.FORCES] ** 2).mean() + (out[K.STRESS] ** 2).sum() + 1e-3 * out[K.ENERGY].sum()
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for _, p in trainable)


def test_eval_predictor_calculator_and_md(
    model: SevenNetAdapter, zeolite: list[Atoms], tmp_path: Path
) -> None:
    frames_path = tmp_path / "frames.xyz"
    write(frames_path, zeolite, format="extxyz")
    out = tmp_path / "eval"
    assert main(["eval", "sevennet-0", str(frames_path), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] == len(zeolite)
    assert np.isfinite(metrics["forces_mae"])

    batched = Predictor(model, batch_size=3).predict(zeolite)
    calc = TrustpotCalculator.from_checkpoint("sevennet-0")
    for atoms, expected in zip(zeolite, batched):
        atoms = atoms.copy()
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(expected[K.ENERGY]), abs=1e-4)
        np.testing.assert_allclose(atoms.get_forces(), expected[K.FORCES], atol=1e-4)

    start = tmp_path / "start.xyz"
    write(start, zeolite[0], format="extxyz")
    trajectory = tmp_path / "md.xyz"
    argv = ["md", "sevennet-0", str(start), "--steps", "3", "--temperature", "300"]
    assert main([*argv, "--interval", "1", "--out", str(trajectory)]) == 0
    assert len(read(trajectory, index=":")) >= 2


def test_shipped_contracts(model: SevenNetAdapter, zeolite: list[Atoms]) -> None:
    s = atoms_to_structure(zeolite[0])
    # float32 network: measured, rotations move the energy by up to 2.4e-6 eV and the forces
    # by up to 2e-5 eV/Å on this 15-atom cell
    check_invariances(model, s, atol=1e-4)
    # central differences of a float32 energy: a step of 2e-3 Å keeps round-off near 1e-3
    check_forces_finite_difference(model, s, delta=2e-3, rtol=1e-2, atol=5e-3)


def test_save_load_round_trip(model: SevenNetAdapter, zeolite: list[Atoms], tmp_path: Path) -> None:
    path = tmp_path / "sevennet.ckpt"
    save_model(model, path)
    data = read_checkpoint(path)
    assert data["kind"] == "pretrained:sevennet"
    assert data["meta"] == {
        "name": "sevennet-0",
        "package": "sevenn",
        "package_version": importlib.metadata.version("sevenn"),
        "checkpoint": "7net-0",
    }
    again = load_model(path)
    structures = [atoms_to_structure(a) for a in zeolite]
    first = Predictor(model).predict_structures(structures)
    second = Predictor(again).predict_structures(structures)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[K.FORCES], b[K.FORCES])


def test_fine_tuned_weights_persist_and_versions_are_recorded(
    model: SevenNetAdapter, zeolite: list[Atoms], tmp_path: Path
) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name] * 1.01
    payload = model.payload(state)
    payload["meta"] = {**payload["meta"], "package_version": "0.0.1"}
    path = tmp_path / "tuned.ckpt"
    from trustpot.io.checkpoint import model_summary, save_checkpoint

    save_checkpoint({**payload, "summary": model_summary(model)}, path)
    tuned = load_model(path)
    assert torch.equal(tuned.state_dict()[name], state[name])
    assert isinstance(tuned, SevenNetAdapter)
    assert tuned.meta["saved_package_version"] == "0.0.1"
    assert tuned.meta["package_version"] == importlib.metadata.version("sevenn")

    bad = dict(payload)
    bad["model"] = {**state, name: state[name][:1]}
    save_checkpoint({**bad, "summary": model_summary(model)}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path / "bad.ckpt")


def test_missing_package_is_one_line(
    model: SevenNetAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sevennet, "package_available", lambda package: False)
    with pytest.raises(CheckpointError, match=r'pip install "trustpot\[sevennet\]"') as err:
        SevenNetAdapter.from_payload(model.payload(), "x.ckpt")
    assert "\n" not in str(err.value)


def test_embed(model: SevenNetAdapter, zeolite: list[Atoms]) -> None:
    structures = [atoms_to_structure(a) for a in zeolite[:2]]
    g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures])
    emb = model.embed(g)
    n_atoms = g[K.POSITIONS].shape[0]
    assert emb["node"].shape == (n_atoms, 128)
    assert len(emb["layers"]) == 5
    assert all(layer.shape == (n_atoms, 128) for layer in emb["layers"])
    assert torch.equal(emb["node"], emb["layers"][-1])


def test_contract_declarations(model: SevenNetAdapter) -> None:
    assert model.kind == "pretrained:sevennet" and not model.training
    assert model.dtype == torch.float32
    assert [(s.name, s.cutoff) for s in model.neighbor_lists()] == [("main", 5.0)]
    assert model.species == list(sevennet.ELEMENTS)
    assert {K.ENERGY, K.FORCES, K.STRESS, K.VIRIAL, K.NODE_ENERGY} == model.supported_outputs()


def test_info(monkeypatch: pytest.MonkeyPatch) -> None:
    info = SEVENNET_0.info()
    assert info.name == "sevennet-0" and info.package == "sevenn" and info.extra == "sevennet"
    assert info.package_version == importlib.metadata.version("sevenn")
    assert info.n_parameters == 842_623
    assert info.elements == sevennet.ELEMENTS and len(info.elements) == 89
    assert info.cutoff == 5.0
    assert "MPtrj" in info.reference and "MIT" in info.licence

    def absent(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sevennet, "package_available", lambda package: False)
    monkeypatch.setattr(importlib.metadata, "version", absent)
    bare = SEVENNET_0.info()
    assert bare.package_version == "not installed" and bare.n_parameters == 0
    assert bare.elements == sevennet.ELEMENTS
