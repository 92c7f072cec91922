"""Every model kind, from a stored checkpoint, through every consumer.

The fixtures (``tests/fixtures/checkpoints``, written by ``make_checkpoints.py``) hold one tiny
model of each kind the registry knows and a potential in the previous format version. Each is
sent through ``trustpot eval``, the batched :class:`Predictor`, the ASE calculator and a few
steps of ``trustpot md``, and through the shipped contract checks (:mod:`trustpot.testing`).
A kind registered without a fixture fails :func:`test_every_kind_has_a_fixture`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

from trustpot import keys as K
from trustpot.calculator import Predictor, TrustpotCalculator
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.reader import read_structures
from trustpot.io.checkpoint import CHECKPOINT_VERSION, load_model, read_checkpoint, save_model
from trustpot.models.contract import Model
from trustpot.models.pretrained import package_available
from trustpot.registry import lookup, names
from trustpot.testing import (
    check_batch_equals_single,
    check_forces_finite_difference,
    check_invariances,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
FRAMES = FIXTURES / "frames.xyz"


def fixture_file(kind: str) -> Path:
    return FIXTURES / f"{kind.replace(':', '-')}.ckpt"


KINDS = names("model")
#: adapter kind -> the pretrained name that loads it (their weights ship in packages, not here)
PRETRAINED = {
    lookup("pretrained", name).kind: name
    for name in names("pretrained")
    # a pretrained model of a stored kind (trustpot-mol is a potential) is tested in its own file
    if not fixture_file(lookup("pretrained", name).kind).is_file()
}


def source(kind: str) -> str:
    """What to load for ``kind``: its stored fixture, or a pretrained name (skipped when the
    package that ships the weights is not installed)."""
    if kind in PRETRAINED:
        entry = lookup("pretrained", PRETRAINED[kind])
        if not package_available(entry.package):
            pytest.skip(f"{entry.package} not installed: pip install 'trustpot[{entry.extra}]'")
        return PRETRAINED[kind]
    return str(fixture_file(kind))


def tolerance(model: Model) -> float:
    """Agreement expected between two evaluation paths of the same model (batch vs single)."""
    return 1e-8 if model.dtype == torch.float64 else 1e-4


def test_every_kind_has_a_fixture() -> None:
    missing = [k for k in KINDS if k not in PRETRAINED and not fixture_file(k).is_file()]
    assert not missing, f"no stored checkpoint for kind(s) {missing}: run make_checkpoints.py"
    assert all(kind in KINDS for kind in PRETRAINED), "a pretrained entry of an unknown kind"


@pytest.mark.parametrize("kind", KINDS)
def test_loads_as_its_kind(kind: str) -> None:
    model = load_model(source(kind))
    assert isinstance(model, Model)
    assert model.kind == kind
    assert not model.training
    assert {K.ENERGY, K.FORCES} <= model.supported_outputs()
    for name, spec in model.output_specs().items():
        assert spec.level in ("node", "graph", "edge"), name
    structures = read_structures(FRAMES, use_cache=False)
    g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures])
    emb = model.embed(g)
    assert emb["node"].shape[0] == g[K.POSITIONS].shape[0]
    assert all(layer.shape[0] == emb["node"].shape[0] for layer in emb.get("layers", []))


@pytest.mark.parametrize("kind", KINDS)
def test_eval_command(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["eval", str(source(kind)), str(FRAMES), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] == 6
    assert np.isfinite(metrics["forces_mae"])


@pytest.mark.parametrize("kind", KINDS)
def test_predictor_and_calculator_agree(kind: str) -> None:
    predictor = Predictor.from_checkpoint(source(kind), batch_size=4)
    tol = tolerance(predictor.model)
    frames = read(FRAMES, index=":")
    batched = predictor.predict(frames)
    calc = TrustpotCalculator.from_checkpoint(source(kind))
    for atoms, expected in zip(frames, batched):
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(expected[K.ENERGY]), abs=tol)
        np.testing.assert_allclose(atoms.get_forces(), expected[K.FORCES], atol=tol)
        assert set(calc.results) <= set(calc.implemented_properties)
        assert calc.results["forces"].shape == (len(atoms), 3)
        for key in ("forces_std", "atom_importance"):
            if key in calc.results:
                assert calc.results[key].shape == (len(atoms),)
        if "reliability" in calc.results:
            assert 0.0 <= calc.results["reliability"] <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_md_command(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "md.xyz"
    argv = ["md", str(source(kind)), str(FRAMES), "--steps", "4", "--temperature", "300"]
    assert main([*argv, "--interval", "2", "--out", str(out)]) == 0
    assert len(read(out, index=":")) >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_contracts(kind: str) -> None:
    if kind in PRETRAINED:
        pytest.skip("float32 adapters: checked at their own tolerances in test_pretrained_*.py")
    model = load_model(source(kind))
    structures = read_structures(FRAMES, use_cache=False)
    # MC dropout's fixed masks are tied to atom order (documented on MCDropout)
    check_invariances(model, structures[0], atol=1e-7, permutation=kind != "uq:mc-dropout")
    check_forces_finite_difference(model, structures[1])
    check_batch_equals_single(model, structures[:3])


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    model = load_model(source(kind))
    path = tmp_path / "again.ckpt"
    save_model(model, path)
    again = load_model(path)
    structures = read_structures(FRAMES, use_cache=False)
    first = Predictor(model).predict_structures(structures)
    second = Predictor(again).predict_structures(structures)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[K.FORCES], b[K.FORCES])
    assert read_checkpoint(path)["summary"]["kind"] == kind


def test_previous_version_migrates() -> None:
    old = FIXTURES / "potential-v1.ckpt"
    raw = torch.load(old, weights_only=True)
    assert raw["version"] == 1 < CHECKPOINT_VERSION and "summary" not in raw
    data = read_checkpoint(old)
    assert data["version"] == CHECKPOINT_VERSION and data["summary"] is None
    structures = read_structures(FRAMES, use_cache=False)
    migrated = Predictor(load_model(old)).predict_structures(structures)
    current = Predictor(load_model(FIXTURES / "potential.ckpt")).predict_structures(structures)
    for a, b in zip(migrated, current):
        np.testing.assert_array_equal(a[K.FORCES], b[K.FORCES])


def test_summary_mismatch_is_refused(tmp_path: Path) -> None:
    from trustpot.errors import CheckpointError
    from trustpot.io.checkpoint import save_checkpoint

    data = read_checkpoint(FIXTURES / "potential.ckpt")
    data["summary"] = {**data["summary"], "neighbor_lists": {"main": 9.0}}
    bad = tmp_path / "bad.ckpt"
    save_checkpoint(data, bad)
    with pytest.raises(CheckpointError, match="differs from the one saved"):
        load_model(bad)


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    from trustpot.errors import CheckpointError
    from trustpot.io.checkpoint import save_checkpoint

    data = read_checkpoint(FIXTURES / "potential.ckpt")
    data["kind"] = "no-such-kind"
    bad = tmp_path / "bad.ckpt"
    save_checkpoint(data, bad)
    with pytest.raises(CheckpointError, match="unknown model kind 'no-such-kind'"):
        load_model(bad)
