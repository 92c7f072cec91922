"""``fit_uq`` passes every option of a method to the code that uses it; ``uq eval`` works on
energy-only frames."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from trustpot.cli.main import main
from trustpot.errors import ConfigError
from trustpot.models.build import build_potential
from trustpot.uq import fit as F
from trustpot.uq.calibrate import recalibrate
from trustpot.uq.ensemble import DeepEnsemble
from trustpot.uq.options import (
    EnsembleOptions,
    MCDropoutOptions,
    PerturbOptions,
    ProbeOptions,
)

HYPERS = {"n_features": 8, "n_layers": 1, "cutoff": 4.0}


class _Captured(Exception):
    pass


def _stub(monkeypatch: pytest.MonkeyPatch, calls: dict[str, Any]) -> None:
    """Replace loading, reading and saving by recorders."""
    monkeypatch.setattr(F, "load_potential", lambda path: f"potential:{path}")
    monkeypatch.setattr(F, "load_model", lambda path: f"potential:{path}")
    monkeypatch.setattr("trustpot.data.splits.read_data", lambda spec, **kw: [spec] * 10)

    def finish(model: Any, out: Path, calibration: Any, name: str, report: dict, *a, **kw):
        calls["finish"] = (calibration, name, a, kw)

    monkeypatch.setattr(F, "finish", finish)


def test_fit_uq_passes_every_perturb_option(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}
    _stub(monkeypatch, calls)

    def split(structures: list, fraction: float, seed: int) -> tuple[list[int], list[int]]:
        calls["split"] = (fraction, seed)
        return list(range(8)), [8, 9]

    def fit(base: Any, train: list, valid: list, **kw: Any) -> str:
        calls["fit"] = (base, len(train), len(valid), kw)
        return "model"

    monkeypatch.setattr("trustpot.train.run.split_train_valid", split)
    monkeypatch.setattr("trustpot.uq.perturb.fit_perturbation", fit)
    opts = PerturbOptions(
        base="b.ckpt", train="t.xyz", valid_fraction=0.3, epochs=7, max_minutes=1.5, lr=0.02,
        backbone_lr=2e-4, batch_size=5, n_samples_train=3, n_samples=6, seed=4,
        calibration="c.xyz", tolerance=0.2, top_fraction=0.3,
    )  # fmt: skip
    F.fit_uq("perturb", opts, Path("unused"), log=lambda m: None)
    base, n_train, n_valid, kw = calls["fit"]
    assert (base, n_train, n_valid) == ("potential:b.ckpt", 8, 2)
    assert calls["split"] == (0.3, 4)
    expected = dict(epochs=7, max_minutes=1.5, lr=0.02, backbone_lr=2e-4, batch_size=5,
                    n_samples_train=3, n_samples=6, seed=4, finetune_backbone=True)  # fmt: skip
    assert {k: kw[k] for k in expected} == expected
    calibration, name, args, _ = calls["finish"]
    assert name == "c.xyz" and calibration == ["c.xyz"] * 10 and args[:2] == (0.2, 0.3)
    with pytest.raises(ConfigError, match="--backbone-lr"):
        dataclasses.replace(opts, freeze_backbone=True).validate()


def test_fit_uq_passes_every_probe_option(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}
    _stub(monkeypatch, calls)

    def fit(base: Any, data: list, **kw: Any) -> str:
        calls["fit"] = (base, kw)
        return "probe"

    monkeypatch.setattr("trustpot.uq.probe.fit_probe", fit)
    opts = ProbeOptions(
        base="b.ckpt", calibration="c.xyz", tolerance=0.1, top_fraction=0.3, epochs=9,
        max_minutes=2.0, batch_size=3, holdout_fraction=0.4, seed=2,
    )  # fmt: skip
    F.fit_uq("probe", opts, Path("unused"), log=lambda m: None)
    base, kw = calls["fit"]
    expected = dict(tolerance=0.1, top_fraction=0.3, epochs=9, max_minutes=2.0, batch_size=3,
                    temperature_fraction=0.4, seed=2, source="c.xyz")  # fmt: skip
    assert base == "potential:b.ckpt" and {k: kw[k] for k in expected} == expected
    # the probe calibrated itself on --calibration: finish is told so, not "no calibration"
    calibration, _, _, finish_kw = calls["finish"]
    assert calibration is None and finish_kw["calibrated_by_fit"] == "c.xyz"


def test_fit_uq_refuses_options_of_another_method(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ProbeOptions"):
        F.fit_uq("probe", PerturbOptions(base="a", train="b"), tmp_path)
    with pytest.raises(ConfigError, match="--epochs"):
        EnsembleOptions(members=("a", "b"), epochs=3).validate()
    with pytest.raises(ConfigError, match="--dropout"):
        MCDropoutOptions(base="a", dropout=0.3).validate()
    cfg = EnsembleOptions(train="t.xyz", lr=0.5, overrides=("train.epochs=3",)).run_config()
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 3 and cfg.data.train == "t.xyz"


def test_finish_logs_a_fit_calibrated_model(tmp_path: Path, ethanol_structures: list) -> None:
    ens = DeepEnsemble([build_potential("schnet", HYPERS, ethanol_structures, seed=k).eval()
                        for k in range(2)])  # fmt: skip
    logs: list[str] = []
    F.finish(ens, tmp_path, None, "", {}, log=logs.append, calibrated_by_fit="cal.xyz")
    assert not any("no --calibration" in m for m in logs)
    assert any("calibrated during the fit on cal.xyz" in m for m in logs)


def test_uq_eval_on_energy_only_frames(
    tmp_path: Path, ethanol_file: Path, ethanol_structures: list, capsys: pytest.CaptureFixture
) -> None:
    ens = DeepEnsemble([build_potential("schnet", HYPERS, ethanol_structures, seed=k).eval()
                        for k in range(2)])  # fmt: skip
    recalibrate(ens, ethanol_structures[:12])
    ckpt = F.finish(ens, tmp_path / "ens", None, "", {}, log=lambda m: None)
    frames = read(ethanol_file, ":")
    for atoms in frames:  # a scan: energies only
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    scan = tmp_path / "scan.xyz"
    write(scan, frames, format="extxyz")
    assert "forces" not in scan.read_text().splitlines()[1]
    out = tmp_path / "ev"
    assert main(["uq", "eval", str(ckpt), str(scan), "--out", str(out)]) == 0
    assert "no frame has force labels" in capsys.readouterr().out
    metrics = json.loads((out / "uq_metrics.json").read_text())
    assert "energy_std" in metrics["structure_energy"]
    assert metrics["structure_energy"]["energy_std"]["n"] == len(frames)
    assert "forces_gaussian" not in metrics or not metrics["forces_gaussian"]
    assert "structure" not in metrics and metrics["notes"]
    assert metrics["plots"] == ["energy_error_vs_uncertainty.png"]
    rows = metrics["frames"]
    assert len(rows) == len(frames) and {"energy_std", "reliability"} <= set(rows[0])
    # a frame with neither label is an error naming the frame
    empty = tmp_path / "empty.xyz"
    write(empty, [a.copy() for a in frames[:2]], format="extxyz")
    assert main(["uq", "eval", str(ckpt), str(empty), "--out", str(out)]) == 2
    assert "frame 0" in capsys.readouterr().err
