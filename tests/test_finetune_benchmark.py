"""The safe fine-tuning benchmark's quick mode runs both tasks end to end and writes every row
(scratch, full, LLRD, freeze, replay, MFT) with the seed's claims answered."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("scratch", "full", "llrd", "freeze", "replay", "mft")


@pytest.mark.slow
def test_finetune_benchmark_quick(tmp_path: Path) -> None:
    for module, extra in (("tblite", "xtb"), ("rdkit", "xtb"), ("chgnet", "chgnet")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed: pip install 'trustpot[{extra}]'")
    if not (SHARED_DATA / "sio2_zeolites").is_dir() or not (SHARED_DATA / "nacl_water").is_dir():
        pytest.skip(f"shared data absent: {SHARED_DATA}")
    out = tmp_path / "finetune"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "finetune.json").read_text())
    assert result["skipped"] == {}
    got = {(r["task"], r["target"], r["row"]) for r in result["rows"]}
    expected = {(t, g, r) for t, g in (("molecules", "gap"), ("materials", "forces")) for r in ROWS}
    assert got == expected
    for r in result["rows"]:
        assert math.isfinite(r["id"]) and r["id"] > 0 and math.isfinite(r["ood"]), r
        rep = r["report"]
        assert math.isfinite(rep["forgetting"]) and rep["db_before"] > 0 and rep["db_after"] > 0
        assert math.isfinite(rep["w1_mean"]) == (r["row"] != "scratch"), r
        assert rep["verdict"]
    assert {(c["task"], c["target"]) for c in result["claims"]} == {
        ("molecules", "gap"),
        ("materials", "forces"),
    }
    for c in result["claims"]:
        assert c["full_collapses_answer"] in ("yes", "no", "partly")
        assert isinstance(c["mft_ood_within_1.2x"], bool)
    table = (out / "finetune.md").read_text()
    for row in ROWS:
        assert table.count(f"| {row} |") == 2, row
    assert "smoke test" in table and "seed's claims" in table
    # the freeze row trains only the heads: its embeddings did not move
    freeze = next(r for r in result["rows"] if r["row"] == "freeze" and r["task"] == "materials")
    assert freeze["report"]["w1_mean"] < 1e-6
