"""``benchmarks/accuracy.py``: model specs, the one scorer both codes go through, the report's
verdicts, and a tiny end-to-end run of the trustpot side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.io import read, write
from conftest import needs_shared

from trustpot.bench.paths import ProbePath, read_paths, torsion_scan, write_paths
from trustpot.data.reader import read_structures

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402
import accuracy_report  # noqa: E402


def test_model_spec_sets_hypers_and_full_option_paths() -> None:
    name, overrides = accuracy.model_spec("ace:correlation=3,train.ema_decay=0")
    assert name == "ace"
    assert overrides == ["-o", "model.hypers.correlation=3", "-o", "train.ema_decay=0"]
    assert accuracy.model_spec("mace-small") == ("mace-small", [])
    for bad in ("mace-small:x=1", "nequip", "painn:cutoff"):
        with pytest.raises(SystemExit):
            accuracy.model_spec(bad)


def _save(path: Path, energies: np.ndarray, forces: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n_atoms = np.array([len(f) for f in forces])
    np.savez(path, energy=energies, forces=np.concatenate(forces), n_atoms=n_atoms)


def test_score_run_measures_known_errors_and_path_errors(
    ethanol_file: Path, tmp_path: Path
) -> None:
    frames = read_structures(ethanol_file, use_cache=False)[:4]
    ref_e = np.array([s.energy for s in frames])
    _save(tmp_path / "t.npz", ref_e + 0.09, [s.forces + 0.1 for s in frames])
    # a torsion path labelled with a made-up curve; the prediction is half as high plus 7 eV
    scan, coords = torsion_scan(molecule("CH3CH2OH"), (0, 1), 6)
    curve = 0.2 * (1 - np.cos(np.radians(3 * np.array(coords))))
    for atoms, e in zip(scan, curve):
        atoms.info["energy"] = float(e)
        atoms.arrays["forces"] = np.zeros((len(atoms), 3))
    path = ProbePath("torsion C0-C1", "torsion", (0, 1), tuple(scan), tuple(coords), "deg")
    write_paths([path], tmp_path / "probes.xyz")
    _save(tmp_path / "p.npz", 7.0 + 0.5 * curve, [np.zeros((9, 3))] * len(scan))
    sub = tmp_path / "four.xyz"
    write(sub, read(ethanol_file, ":4"), format="extxyz")
    got = accuracy_report.score_run(
        {"t": str(sub)}, str(tmp_path / "probes.xyz"), tmp_path, {"t": "t.npz", "probes": "p.npz"}
    )
    assert got["tests"]["t"]["forces_mae"] == pytest.approx(0.1, abs=1e-9)
    assert got["tests"]["t"]["energy_mae"] == pytest.approx(0.09, abs=1e-9)
    errors = got["probes"]["torsion C0-C1"]
    assert errors["reference_barrier"] == pytest.approx(curve.max() - curve.min())
    assert errors["barrier_error"] == pytest.approx(-0.5 * (curve.max() - curve.min()))
    assert errors["relative_rmse"] > 0


def test_tail_gain_tells_a_plateau_from_a_falling_curve() -> None:
    flat = [{"minutes": m, "val_forces_mae": 1.0} for m in range(1, 9)]
    falling = [{"minutes": m, "val_forces_mae": 1.0 / m} for m in range(1, 9)]
    assert accuracy_report.tail_gain(flat) == 0.0
    assert accuracy_report.tail_gain(falling) == pytest.approx(1 - 6 / 8)


def _run(mae: float, epochs: int = 10) -> dict:
    metrics = {"forces_mae": mae, "forces_rmse": 1.5 * mae, "energy_mae_per_atom": 0.001}
    curve = [{"minutes": 1.0, "val_forces_mae": mae}]
    return {"epochs": epochs, "curve": curve, "tests": {"id": metrics, "ood": metrics}}


def test_report_verdicts_name_where_the_goal_is_not_met(tmp_path: Path) -> None:
    results = {
        "mode": "quick", "seed": 0, "minutes": 1.0, "threads_per_run": 1, "parallel": 2,
        "machine": {"platform": "test", "cpus": 2},
        "tasks": {"t": {"in_domain": "id", "tests": {"id": "a", "ood": "b"}}},
        "runs": {"budget/t/painn": _run(0.1), "budget/t/mace-small": _run(0.12)},
    }  # fmt: skip
    text = accuracy_report.write_report(results, tmp_path / "a.md")
    assert "| t | id (in domain) | painn | 1.20x | 1.0x | met |" in text
    assert "| t | ood (out of domain) | painn | 1.20x | 1.3x | NOT met |" in text


def test_portable_strips_machine_paths(tmp_path: Path) -> None:
    spec = f"{tmp_path / 'work' / 'a.json'}:train,{accuracy.ROOT.parent / 'shared' / 'x.xyz'}"
    assert accuracy.portable({"train": spec}, tmp_path) == {
        "train": "OUT/work/a.json:train,../shared/x.xyz"
    }


def test_quick_run_of_the_trustpot_side_writes_tables(tmp_path: Path) -> None:
    needs_shared("ethanol", "train.xyz")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--skip-mace"]
    cmd += ["--tasks", "ethanol", "--models", "schnet", "--minutes", "0.03"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "accuracy.json").read_text())
    run = results["runs"]["budget/ethanol/schnet"]
    assert run["epochs"] == len(run["curve"]) >= 1
    assert run["tests"]["test_MD"]["n_structures"] == 100
    assert str(tmp_path) not in json.dumps(results)
    assert "| ethanol | schnet |" in (tmp_path / "accuracy.md").read_text()
    assert (tmp_path / "curves_ethanol.png").is_file()


def test_generated_molecule_task_builds_its_own_files(tmp_path: Path) -> None:
    """A second xTB molecule gets its own frames, split and probes (nothing shared with
    ethanol's), and the probes include the enol's O-H stretch."""
    pytest.importorskip("tblite", reason="the xtb extra (tblite) is not installed")
    pytest.importorskip("rdkit", reason="the xtb extra (rdkit) is not installed")
    tiny = accuracy.Sizes(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6, 2, 3, 1, 3, 3)
    task = accuracy.build_xtb_task("xtb-acetylacetone", tiny, 0, tmp_path, lambda _: None)
    assert task.name == "xtb-acetylacetone" and task.in_domain == "test_300K"
    frames = read_structures(tmp_path / "xtb_acetylacetone_300K.xyz")
    assert len(frames) == 6 and sorted(frames[0].numbers.tolist()).count(8) == 2
    assert len(read_structures(tmp_path / "xtb_acetylacetone_600K.xyz")) == 2
    assert not list(tmp_path.glob("xtb_ethanol*"))
    paths = read_paths(task.probes)
    names = [p.name for p in paths]
    assert any(p.kind == "torsion" for p in paths), names
    assert any(n.startswith("stretch O") and "-H" in n for n in names), names
    assert all("energy" in f.info for p in paths for f in p.frames)
