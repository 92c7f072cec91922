"""The foundation-backbone benchmark's quick mode runs end to end, writes every row (n/a rows
with their reasons) and reuses its finished steps on a rerun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from trustpot.models.pretrained import package_available
from trustpot.registry import lookup

ROOT = Path(__file__).resolve().parents[1]
ZEOLITES = SHARED_DATA / "sio2_zeolites"
BACKBONES = ("foundation", "painn")
METHODS = ("probe", "ensemble", "perturb", "mc-dropout", "zero-shot-probe")
NOT_APPLICABLE = {
    ("foundation", "mc-dropout"): "head dropout",
    ("painn", "zero-shot-probe"): "no pretrained PaiNN",
}


@pytest.mark.slow
def test_foundation_benchmark_quick(tmp_path: Path) -> None:
    entry = lookup("pretrained", "chgnet")
    if not package_available(entry.package):
        pytest.skip(f"{entry.package} not installed: pip install 'trustpot[{entry.extra}]'")
    if not ZEOLITES.is_dir():
        pytest.skip(f"shared data absent: {ZEOLITES}")
    out = tmp_path / "foundation"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "foundation.py"), "--quick"]
    cmd += ["--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "foundation.json").read_text())
    rows = {(r["backbone"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(b, m) for b in BACKBONES for m in METHODS}
    for key, row in rows.items():
        if key in NOT_APPLICABLE:
            assert not row["applicable"] and NOT_APPLICABLE[key] in row["reason"]
            continue
        assert row["applicable"], key
        assert -1 <= row["spearman"] <= 1 and 0 <= row["auroc"] <= 1, key
        for name in ("forces_mae_id", "forces_mae_ood", "train_cost", "inference_cost"):
            assert math.isfinite(row[name]) and row[name] > 0, (key, name)
        has_std = "probe" not in key[1]  # PROBE gives a reliability, no std
        for name in ("crps", "nll"):
            assert math.isfinite(row[name]) == has_std, (key, name)
    targets = result["seed_targets"]
    assert targets["perturb_foundation_spearman_ge_0.84"]["answer"] in ("yes", "no")
    assert targets["probe_margin_larger_on_foundation"]["answer"] in ("yes", "no")
    table = (out / "foundation.md").read_text()
    assert table.count("| chgnet fine-tuned |") == 5 and table.count("| PaiNN scratch |") == 5
    assert "smoke test" in table and "quick" in table
    # a rerun reuses every model, wrapper and evaluation
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fine-tuning" not in again.stdout and "training painn" not in again.stdout
    assert json.loads((out / "foundation.json").read_text())["rows"] == result["rows"]
