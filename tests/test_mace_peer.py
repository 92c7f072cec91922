"""``benchmarks/mace_peer.py``, the MACE peer of the accuracy benchmark: a tiny real run with the
MACE environment's Python, and a bad job refused with exit code 2.

The job check uses the standard library only (torch and mace are imported after it), so the
refusal is tested with this interpreter and needs no MACE environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_shared

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mace_peer.py"
MACE_PYTHON = ROOT / "benchmarks" / ".mace-venv" / "bin" / "python"


def _job(train: Path, test: Path, out: Path, **changes: object) -> dict[str, object]:
    """A tiny job: 12 ethanol frames to train, 4 to validate, 5 test frames, 2 epochs."""
    job: dict[str, object] = {
        "size": "small", "cutoff": 5.0,
        "train": [[str(train), list(range(12))]], "valid": [[str(train), [12, 13, 14, 15]]],
        "tests": {"md": [[str(test), [0, 1, 2, 3, 4]]]},
        "minutes": 5.0, "max_epochs": 2, "seed": 0, "threads": 1, "batch_size": 5,
        "lr": 0.01, "out": str(out),
    }  # fmt: skip
    job.update(changes)
    return job


def _run(python: Path | str, job: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return subprocess.run(
        [str(python), str(SCRIPT), str(path)], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_tiny_ethanol_run_writes_curve_and_predictions(tmp_path: Path) -> None:
    if not MACE_PYTHON.exists():
        pytest.skip(f"no MACE environment at {MACE_PYTHON} (python benchmarks/speed.py "
                    "--install-mace creates it)")  # fmt: skip
    train = needs_shared("ethanol", "train.xyz")
    test = needs_shared("ethanol", "test_MD.xyz")
    proc = _run(MACE_PYTHON, _job(train, test, tmp_path / "out"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2" in proc.stdout
    report = json.loads((tmp_path / "out" / "mace_peer.json").read_text())
    assert report["code"] == "mace" and report["stopped_by"] == "max_epochs"
    assert report["epochs"] == 2 and [r["epoch"] for r in report["curve"]] == [1, 2]
    assert (report["n_train"], report["n_valid"], report["size"]) == (12, 4, "small")
    assert report["tests"] == {"md": "md/predictions.npz"}
    for row in report["curve"]:
        assert all(np.isfinite(row[k]) for k in ("minutes", "valid_forces_mae"))
    pred = np.load(tmp_path / "out" / report["tests"]["md"])
    assert pred["energy"].shape == (5,) and pred["forces"].shape == (45, 3)
    assert pred["energy"].dtype == np.float64 and pred["forces"].dtype == np.float64
    assert pred["n_atoms"].tolist() == [9] * 5
    assert np.isfinite(pred["energy"]).all() and np.isfinite(pred["forces"]).all()


def test_unknown_size_exits_2_naming_the_field(tmp_path: Path) -> None:
    data = tmp_path / "frames.xyz"
    data.write_text("1\n\nH 0 0 0\n")
    proc = _run(sys.executable, _job(data, data, tmp_path / "out", size="huge"), tmp_path)
    assert proc.returncode == 2
    assert "'size'" in proc.stderr and "huge" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_field_and_missing_file_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "frames.xyz"
    data.write_text("1\n\nH 0 0 0\n")
    job = _job(data, data, tmp_path / "out")
    del job["lr"]
    proc = _run(sys.executable, job, tmp_path)
    assert proc.returncode == 2 and "lr" in proc.stderr
    proc = _run(sys.executable, _job(data, tmp_path / "absent.xyz", tmp_path / "out"), tmp_path)
    assert proc.returncode == 2 and "tests.md" in proc.stderr and "absent.xyz" in proc.stderr
