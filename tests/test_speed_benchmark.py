"""``benchmarks/speed.py --quick`` reports MD steps per second and the inference cost of every
reliability method from one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import needs_shared

ROOT = Path(__file__).resolve().parents[1]


def test_speed_quick_reports_md_and_uncertainty_costs(tmp_path: Path) -> None:
    needs_shared("3bpa", "train_300K.xyz")
    needs_shared("water", "train_data_0-2.xyz")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--skip-mace"]
    proc = subprocess.run(
        [*cmd, "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True,
        timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    md = report["trustpot"]["models"]["painn"]["md"]["3bpa"]
    assert md["steps_per_second"] > 0
    costs = report["trustpot"]["uq_cost"]["3bpa"]["rows"]
    assert set(costs) == {
        "ensemble", "mc-dropout", "probe", "perturb", "llpr", "llpr-local", "shallow-ensemble"
    }  # fmt: skip
    assert all(r["md"] > 0 and r["batch"] > 0 for r in costs.values())
    text = (tmp_path / "speed.md").read_text()
    assert "## Inference cost of the reliability methods" in text and "| llpr-local |" in text
