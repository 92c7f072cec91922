"""Fine-tuning on a downstream property (``trustpot finetune --target``): the property heads,
their equivariance, extensive and intensive targets, training, mft, persistence, errors and
``trustpot eval``.

The frames carry synthetic properties computed here: ``zsum`` (the sum of the atomic numbers,
an extensive structure scalar), ``mu`` (a dipole ``sum_i q_i (r_i - centroid)`` with fixed
charges per element, made neutral per molecule: a structure vector) and ``q`` (those charges,
a per-atom scalar).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import write
from conftest import labelled_molecules
from torch import Tensor

from trustpot.calculator import Predictor
from trustpot.cli.main import main
from trustpot.data.graph import Graph
from trustpot.data.reader import read_structures
from trustpot.data.structures import Structure
from trustpot.errors import CheckpointError, ConfigError, DataError
from trustpot.finetune import FinetuneOptions, run_finetune
from trustpot.io.checkpoint import load_model, read_checkpoint, save_checkpoint, save_model
from trustpot.models.finetuned import FineTuned
from trustpot.models.property_head import PropertyHead, PropertyTarget
from trustpot.testing.contracts import random_rotation

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
POTENTIAL = FIXTURES / "potential.ckpt"
CHARGE = {1: 0.25, 6: -0.2, 8: -0.6}  # e, before neutralising each molecule
MOLECULES = ("CH3CH2OH", "CH3OH", "H2O", "CH4")


def with_properties(frames: list[Atoms]) -> list[Atoms]:
    """``frames`` with ``zsum``, ``mu`` (e*Å) and per-atom ``q`` (e) set (module docstring)."""
    for a in frames:
        q = np.array([CHARGE[int(z)] for z in a.numbers])
        q -= q.mean()
        a.info["zsum"] = float(a.numbers.sum())
        a.info["mu"] = (q[:, None] * (a.positions - a.positions.mean(0))).sum(0)
        a.arrays["q"] = q
    return frames


def mixed_frames(n_each: int, seed: int = 0) -> list[Atoms]:
    return with_properties(
        [a for k, m in enumerate(MOLECULES) for a in labelled_molecules(n_each, seed + k, m)]
    )


@pytest.fixture(scope="module")
def prop_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prop") / "mixed.xyz"
    write(path, mixed_frames(8), format="extxyz")
    return path


def headed(target: PropertyTarget, seed: int = 0) -> FineTuned:
    """The stored potential with a freshly initialised head for ``target``."""
    torch.manual_seed(seed)
    model = FineTuned(load_model(POTENTIAL))
    spec = model.base.neighbor_lists()[0]
    head = PropertyHead(target, model.base.node_width(), spec.name, spec.cutoff, hidden=16,
                        dtype=model.dtype)  # fmt: skip
    model.head = head
    return model.eval()


def predict(model: FineTuned, structures: list[Structure]) -> list[np.ndarray]:
    assert model.head is not None
    key = model.head.target.output
    return [p[key] for p in Predictor(model).predict_structures(structures, (key,))]


def rotated(s: Structure, rot: np.ndarray, shift: np.ndarray) -> Structure:
    return Structure(s.numbers, s.positions @ rot.T + shift, s.cell, s.pbc)


def test_reader_keeps_per_atom_arrays_and_calculator_properties(tmp_path: Path) -> None:
    """Per-atom arrays reach Structure.arrays, a dipole the extended XYZ reader moved into the
    calculator results reaches Structure.info; both survive the parse cache."""
    frames = mixed_frames(1)
    for a in frames:
        a.info["dipole"] = np.array([0.1, 0.2, 0.3])  # ASE reads this back as a calc result
    write(tmp_path / "p.xyz", frames, format="extxyz")
    for _ in range(2):  # parsed, then from the cache
        structures = read_structures(tmp_path / "p.xyz")
        for s, a in zip(structures, frames):
            np.testing.assert_allclose(s.arrays["q"], a.arrays["q"])
            np.testing.assert_allclose(s.info["mu"], a.info["mu"])
            np.testing.assert_allclose(s.info["dipole"], [0.1, 0.2, 0.3])
            assert "forces" not in s.arrays and "energies" not in s.arrays


class Broken(PropertyHead):
    """A head that adds a fixed vector: not equivariant (the check below must catch it)."""

    def forward(self, g: Graph, node: Tensor) -> Tensor:
        out = super().forward(g, node)
        return out + torch.tensor([0.3, 0.0, 0.0], dtype=out.dtype)


def equivariance_error(model: FineTuned, s: Structure, seed: int) -> tuple[float, float]:
    """max |p(R r + t) - R p(r)| and max |p(r)| of the head's vector output."""
    rot = random_rotation(seed)
    (before,) = predict(model, [s])
    (after,) = predict(model, [rotated(s, rot, np.array([1.0, -2.0, 0.5]))])
    return float(np.abs(after - before @ rot.T).max()), float(np.abs(before).max())


@pytest.mark.parametrize(
    ("level", "reduce"), [("atom", None), ("structure", "sum"), ("structure", "mean")]
)
def test_vector_heads_are_rotation_equivariant(
    level: str, reduce: str | None, ethanol_structures: list[Structure]
) -> None:
    target = PropertyTarget("v", level, "vector", reduce)
    model = headed(target)
    s = ethanol_structures[0]
    err, size = equivariance_error(model, s, seed=3)
    assert size > 1e-3, "a vanishing prediction proves nothing"
    assert err < 1e-9 * max(size, 1.0)
    # the check is not vacuous: a head adding a fixed vector fails it
    assert model.head is not None
    broken = Broken(target, model.head.width, model.head.edges, model.head.cutoff, 16,
                    dtype=model.dtype)  # fmt: skip
    broken.load_state_dict(model.head.state_dict())
    model.head = broken
    assert equivariance_error(model, s, seed=3)[0] > 0.1


def test_scalar_heads_are_invariant(ethanol_structures: list[Structure]) -> None:
    s = ethanol_structures[1]
    for level, reduce in (("atom", None), ("structure", "mean")):
        model = headed(PropertyTarget("x", level, "scalar", reduce))
        (before,) = predict(model, [s])
        (after,) = predict(model, [rotated(s, random_rotation(5), np.array([3.0, 0.0, 1.0]))])
        np.testing.assert_allclose(after, before, atol=1e-10)


def test_extensive_and_intensive_targets(ethanol_structures: list[Structure]) -> None:
    """Two copies of a molecule far apart: ``sum`` doubles the property, ``mean`` keeps it;
    an extensive target is standardised per atom."""
    s = ethanol_structures[2]
    far = s.positions + np.array([60.0, 0.0, 0.0])
    pair = Structure(np.concatenate([s.numbers, s.numbers]),
                     np.concatenate([s.positions, far]), s.cell, s.pbc)  # fmt: skip
    for kind in ("scalar", "vector"):
        for reduce, factor in (("sum", 2.0), ("mean", 1.0)):
            model = headed(PropertyTarget("p", "structure", kind, reduce))
            one, two = predict(model, [s, pair])
            assert np.abs(one).max() > 1e-3
            np.testing.assert_allclose(two, factor * one, rtol=1e-8, atol=1e-10)
    head = headed(PropertyTarget("p", "structure", "scalar", "sum")).head
    assert head is not None
    shift, scale = head.fit([np.array(10.0), np.array(30.0)], [5, 10])  # 2 and 3 per atom
    assert (shift, scale) == pytest.approx((2.5, 0.5))
    intensive = headed(PropertyTarget("p", "structure", "scalar", "mean")).head
    assert intensive is not None
    assert intensive.fit([np.array(10.0), np.array(30.0)], [5, 10]) == pytest.approx((20, 10))


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_short_finetune_learns_an_extensive_property(prop_file: Path, tmp_path: Path) -> None:
    """--target zsum --target-reduce sum: the validation error falls during the run and ends
    well below predicting the training mean per atom; eval reports the same property."""
    run = tmp_path / "run"
    argv = ["finetune", "--from", str(POTENTIAL), "--train", str(prop_file), "--out", str(run),
            "--target", "zsum", "--target-reduce", "sum", "--epochs", "20", "--lr", "5e-3",
            "--batch-size", "4", "--threads", "1", "--valid-fraction", "0.25"]  # fmt: skip
    assert main(argv) == 0
    rows = _rows(run)
    maes = [float(r["val_zsum_mae"]) for r in rows]
    assert min(maes) < 0.5 * maes[0]
    structures = read_structures(prop_file, use_cache=False)
    split = json.loads((run / "split.json").read_text())
    train = [structures[i] for i in split["train_indices"]]
    valid = [structures[i] for i in split["valid_indices"]]
    per_atom = np.mean([s.info["zsum"] / s.n_atoms for s in train])
    baseline = np.mean([abs(s.info["zsum"] - per_atom * s.n_atoms) for s in valid])
    assert min(maes) < 0.5 * baseline
    summary = json.loads((run / "finetune.json").read_text())
    assert summary["property_head"]["reduce"] == "sum"
    assert "property_head" in {g["name"] for g in summary["groups"]}
    assert summary["offsets"] == {}  # no energy objective: no offsets fitted
    report = json.loads((run / "report.json").read_text())
    best_row = min(rows, key=lambda r: float(r["val_loss"]))  # what best.ckpt holds
    in_domain = report["downstream"]["in_domain"]["finetuned"]["property:zsum_mae"]
    assert in_domain == pytest.approx(float(best_row["val_zsum_mae"]), rel=1e-6)
    best = load_model(run / "best.ckpt")
    assert isinstance(best, FineTuned) and best.head is not None
    spec = best.output_specs()["property:zsum"]
    assert (spec.level, spec.shape, spec.unit) == ("graph", (), "")
    out = tmp_path / "eval"
    assert main(["eval", str(run / "best.ckpt"), str(prop_file), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["property:zsum_n"] == len(structures)
    assert 0 < metrics["property:zsum_mae"] <= metrics["property:zsum_rmse"]
    assert "property:zsum_mae" in metrics["per_config_type"]["even"]
    assert metrics["units"]["property:zsum"] == ""
    assert np.isfinite(metrics["forces_mae"])  # the force field is still scored


def test_mft_with_a_property_target_runs_both_objectives(prop_file: Path, tmp_path: Path) -> None:
    """--strategy mft --target: the property objective on the downstream frames and the
    pretraining force objective on the pseudo-labelled replay frames, each with its columns;
    --forces-weight adds the downstream force labels as a third objective."""
    replay = tmp_path / "replay.xyz"
    write(replay, labelled_molecules(6, seed=11, scale=0.05), format="extxyz")
    opts = FinetuneOptions(
        str(POTENTIAL), str(prop_file), strategy="mft", replay=str(replay), target="mu",
        target_unit="e*Å", epochs=2, batch_size=4, threads=1, lr=1e-2, valid_fraction=0.25,
        replay_weight=0.5, property_weight=2.0,
    )  # fmt: skip
    result = run_finetune(opts, tmp_path / "run")
    header = _rows(tmp_path / "run")[0].keys()
    for column in ("main_val_mu_mae", "main_val_mu_rmse", "replay_val_forces_mae"):
        assert column in header
    assert not any(c.startswith("forcefield_") for c in header)
    expected = 2.0 * result.best_metrics["main_val_loss"]
    expected += 0.5 * result.best_metrics["replay_val_loss"]
    assert result.best_metrics["val_loss"] == pytest.approx(expected)
    best = load_model(tmp_path / "run" / "best.ckpt")
    assert isinstance(best, FineTuned) and best.head is not None
    assert best.head.target == PropertyTarget("mu", "structure", "vector", "sum", "e*Å")
    again = FinetuneOptions(
        str(POTENTIAL), str(prop_file), target="mu", forces_weight=5.0, epochs=1,
        batch_size=4, threads=1, valid_fraction=0.25,
    )  # fmt: skip
    run_finetune(again, tmp_path / "three")
    header = _rows(tmp_path / "three")[0].keys()
    assert "forcefield_val_forces_mae" in header and "main_val_mu_mae" in header


def test_freeze_with_a_target_trains_only_the_head(prop_file: Path, tmp_path: Path) -> None:
    """--strategy freeze --target q: every base group stays, the new head (its own group)
    trains; the starting model's head is kept when the target is the same."""
    opts = FinetuneOptions(
        str(POTENTIAL), str(prop_file), strategy="freeze", target="q", epochs=2, batch_size=4,
        threads=1, lr=1e-2, valid_fraction=0.25,
    )  # fmt: skip
    run_finetune(opts, tmp_path / "run")
    start = FineTuned(load_model(POTENTIAL)).state_dict()
    after = read_checkpoint(tmp_path / "run" / "last.ckpt")["training"]["raw_model"]
    for key, value in start.items():
        assert torch.equal(value, after[key]), f"{key} moved under freeze"
    summary = json.loads((tmp_path / "run" / "finetune.json").read_text())
    lrs = {g["name"]: g["lr"] for g in summary["groups"]}
    assert lrs["property_head"] == pytest.approx(1e-2)
    assert all(lrs[n] == 0.0 for n in ("embedding", "interaction_0", "head"))
    first = load_model(tmp_path / "run" / "best.ckpt")
    assert isinstance(first, FineTuned) and first.head is not None
    assert first.head.target == PropertyTarget("q", "atom", "scalar")
    more = FinetuneOptions(
        str(tmp_path / "run" / "best.ckpt"), str(prop_file), target="q", epochs=1,
        batch_size=4, threads=1, valid_fraction=0.25,
    )  # fmt: skip
    run_finetune(more, tmp_path / "more")
    assert "head is kept" in (tmp_path / "more" / "log.txt").read_text()


def test_property_head_round_trip(ethanol_structures: list[Structure], tmp_path: Path) -> None:
    """A head's target, standardisation and weights survive save and load; old fine-tuned
    checkpoints without a head still load; malformed heads are refused by name."""
    target = PropertyTarget("mu", "structure", "vector", "sum", "Debye")
    model = headed(target, seed=4)
    assert model.head is not None
    model.head.fit([np.ones(3), 2 * np.ones(3)], [9, 9])
    save_model(model, tmp_path / "m.ckpt")
    back = load_model(tmp_path / "m.ckpt")
    assert isinstance(back, FineTuned) and back.head is not None
    assert back.head.target == target and back.head.config() == model.head.config()
    assert float(back.head.scale) == pytest.approx(float(model.head.scale))
    np.testing.assert_allclose(predict(back, ethanol_structures[:3]),
                               predict(model, ethanol_structures[:3]), atol=1e-12)  # fmt: skip
    assert back.output_specs()["property:mu"].unit == "Debye"
    old = load_model(FIXTURES / "finetuned.ckpt")
    assert isinstance(old, FineTuned) and old.head is None
    payload = read_checkpoint(tmp_path / "m.ckpt")
    bad = {**payload, "model": dict(payload["model"])}
    bad["model"]["head.atom_mlp.0.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    save_checkpoint(bad, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"head\.atom_mlp\.0\.weight"):
        load_model(tmp_path / "bad.ckpt")
    meta: dict[str, Any] = json.loads(json.dumps(payload["meta"]))
    meta["property_head"]["target"]["kind"] = "tensor"
    save_checkpoint({**payload, "meta": meta}, tmp_path / "kind.ckpt")
    with pytest.raises(CheckpointError, match="property target"):
        load_model(tmp_path / "kind.ckpt")


def test_target_errors_name_the_file_frame_and_flag(prop_file: Path, tmp_path: Path) -> None:
    frames = mixed_frames(2)
    del frames[5].info["zsum"]
    frames[3].info["mu"] = np.array([0.1, 0.2])
    write(tmp_path / "bad.xyz", frames, format="extxyz")
    bad = str(tmp_path / "bad.xyz")

    def run(name: str, **kw: Any) -> None:
        opts = FinetuneOptions(str(POTENTIAL), bad, epochs=1, threads=1, **kw)
        run_finetune(opts, tmp_path / name)

    with pytest.raises(DataError, match=r"bad\.xyz: frame 5: field 'zsum': .*lack") as err:
        run("missing", target="zsum")
    assert err.value.frame == 5 and err.value.field == "zsum"
    with pytest.raises(DataError, match=r"frame 3: field 'mu': .*shape \(2,\)"):
        run("shape", target="mu")
    with pytest.raises(DataError, match=r"frame 0: field 'nothing'"):
        run("absent", target="nothing")
    with pytest.raises(DataError, match=r"frame 0: field 'q': .*expected \(\d+, 3\)"):
        run("kind", target="q", target_kind="vector")
    with pytest.raises(ConfigError, match="--target-reduce"):
        run("reduce", target="q", target_reduce="sum")  # q is per atom: found in the data
    with pytest.raises(ConfigError, match="--target-reduce applies to --target-level structure"):
        FinetuneOptions(str(POTENTIAL), bad, target="q", target_level="atom", target_reduce="sum")
    with pytest.raises(ConfigError, match="--target-level applies only with --target"):
        FinetuneOptions(str(POTENTIAL), bad, target_level="atom")
    with pytest.raises(ConfigError, match="--property-weight must be > 0"):
        FinetuneOptions(str(POTENTIAL), bad, target="q", property_weight=0.0)
    argv = ["finetune", "--from", str(POTENTIAL), "--train", str(prop_file), "--out"]
    assert main([*argv, str(tmp_path / "cli"), "--target", "q", "--target-reduce", "mean"]) == 2
