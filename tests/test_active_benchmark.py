"""The active-learning benchmark's quick mode (N-body engine, no extra package) runs every
strategy through ``trustpot learn`` and writes its tables, with the shared frames reused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("ensemble", "probe", "perturb", "random")


@pytest.mark.slow
def test_active_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "active"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "active.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "active.json").read_text()
    assert str(tmp_path) not in text  # relative paths only
    result = json.loads(text)
    assert result["settings"]["mode"] == "quick"
    (task,) = result["tasks"].values()
    runs = task["runs"]
    assert sorted(r["strategy"] for r in runs) == sorted(STRATEGIES)
    rounds = result["settings"]["rounds"]
    for r in runs:
        assert (out / r["folder"] / "report.json").is_file()
        assert len(r["rounds"]) == rounds + 1
        labels = [row["labels"] for row in r["rounds"]]
        assert labels[0] == task["start_frames"] and labels == sorted(labels)
        for row in r["rounds"]:
            for key in ("test", "member0"):
                assert math.isfinite(row[key]["forces_mae"]) and row[key]["forces_mae"] > 0
    # the same start and test frames for every strategy: round 0 of the plain potential
    # (member 0, trained on the same training frames) scores alike in the three UQ runs
    first = {r["strategy"]: r["rounds"][0]["member0"]["forces_mae"] for r in runs}
    assert first["ensemble"] == pytest.approx(first["probe"]) == pytest.approx(first["perturb"])
    for key in ("test", "member0"):
        comp = task[key]
        assert set(comp["strategies"]) == set(STRATEGIES)
        target = comp["target"]["0"]
        ref = comp["strategies"]["random"]["seeds"][0]
        assert ref["final_forces_mae"] == target and ref["ratio"] == 1.0
        for s in STRATEGIES:
            (p,) = comp["strategies"][s]["seeds"]
            assert math.isfinite(p["final_forces_mae"])
            reached = p["labels_to_target"] is not None
            assert reached == (p["ratio"] is not None)
    md = (out / "active.md").read_text()
    assert "goal: at most half of random's labels" in md.lower()
    for s in STRATEGIES:
        assert md.count(f"| {s} |") == 3  # model, control, curve tables
    assert (out / "active_curve.png").stat().st_size > 0
