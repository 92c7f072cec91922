"""The reliability benchmark's quick mode runs end to end and writes its table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_uq_benchmark_quick_nbody(tmp_path):
    out = tmp_path / "uq"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "uq.py"), "--quick", "--out", str(out)]
    cmd += ["--datasets", "nbody-30", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "uq.json").read_text())
    rows = result["rows"]
    methods = {
        "ensemble",
        "mc-dropout",
        "probe",
        "perturb",
        "llpr",
        "llpr-distance",
        "shallow-ensemble",
    }
    for test in ("test_id", "test_ood"):
        got = {r["method"] for r in rows if r["test"] == test}
        assert got == methods
    for r in rows:
        assert -1 <= r["spearman"] <= 1 and 0 <= r["auroc"] <= 1
        assert r["train_cost"] > 0 and r["inference_cost"] > 0 and r["md_cost"] > 0
        assert math.isnan(r["crps"]) == (r["method"] == "probe")
    table = (out / "uq.md").read_text()
    assert table.count("| nbody-30 |") >= 14
    curves = result["learning_curves"]  # the five members and MC dropout at least
    runs = {c["run"] for c in curves}
    assert {f"ensemble/member_{k}" for k in range(5)} <= runs
    assert all(c["epochs"] >= 2 and math.isfinite(c["best_val_loss"]) for c in curves)
    # two seeds' outputs combine into one table with ranges
    seeds = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "uq_seeds.py"), str(out), str(out),
         "--out", str(tmp_path / "seeds")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert seeds.returncode == 0, seeds.stderr[-2000:]
    combined = (tmp_path / "seeds" / "uq_seeds.md").read_text()
    assert combined.count("| nbody-30 | test_ood |") == 7 and "[" in combined
    # a rerun reuses every model and evaluation
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "training" not in again.stdout


@pytest.mark.slow
def test_llpr_scores_benchmark_quick(tmp_path):
    """benchmarks/llpr_scores.py --quick scores every per-atom score on both test sets."""
    out = tmp_path / "scores"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "llpr_scores.py"), "--quick"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads((out / "llpr_scores.json").read_text())
    assert set(result["sets"]) == {"test_id", "test_ood"}
    for metrics in result["sets"].values():
        for score in ("local", "local-centered", "distance", "knn", "energy-std", "samples"):
            assert -1 <= metrics[score]["spearman"] <= 1 and 0 <= metrics[score]["auroc"] <= 1
    assert "| nbody-sizes, 0 | test_ood |" in (out / "llpr_scores.md").read_text()
