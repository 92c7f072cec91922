"""The trust-policy benchmark's quick mode runs end to end and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_policy_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "policy"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "policy.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "policy.json").read_text())
    rows = result["rows"]
    paths = {"stretch", "torsion", "hot", "test_id"}
    assert {r["path"] for r in rows} == paths
    for path in paths:
        rules = {(r["method"], r["rule"]) for r in rows if r["path"] == path}
        # PROBE gives no forces_std: only its reliability rule is evaluated
        assert {rule for method, rule in rules if method == "probe"} == {"reliability<0.5"}
        for method in ("ensemble", "mc-dropout", "perturb"):
            assert (method, "force-error>0.5@0.95") in rules
    for r in rows:
        n = len(r["coords"])
        assert len(r["fired"]) == n and r["n_fired"] == sum(r["fired"])
        assert r["first_fired"] is None or r["fired"][r["first_fired"]]
        if r["rule"].startswith("force-error"):
            assert 0 <= r["mean_predicted_p"] <= 1 and 0 <= r["observed_fraction"] <= 1
    table = (out / "policy.md").read_text()
    assert table.count("| stretch |") == sum(r["path"] == "stretch" for r in rows)


@pytest.mark.slow
def test_policy_benchmark_quick_on_a_wrapped_adapter(tmp_path: Path) -> None:
    """``--foundation chgnet``: an ensemble of CHGNet fine-tunes, PROBE and perturbations on
    the first, zero-shot PROBE on the untouched adapter, through the same rules and paths."""
    pytest.importorskip("chgnet", reason="the CHGNet adapter needs 'pip install trustpot[chgnet]'")
    out = tmp_path / "policy"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "policy.py"), "--quick", "--out", str(out)]
    cmd += ["--foundation", "chgnet", "--minutes", "0.02"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "policy.json").read_text())
    assert result["settings"]["foundation"] == "chgnet" and result["settings"]["minutes"] == 0.02
    rules = {(r["path"], r["method"], r["rule"]) for r in result["rows"]}
    for path in ("stretch", "torsion", "hot", "test_id"):
        assert {(m, rule) for p, m, rule in rules if p == path} == {
            ("ensemble", "force-error>0.5@0.5"),
            ("ensemble", "force-error>0.5@0.95"),
            ("ensemble", "reliability<0.5"),
            ("probe", "reliability<0.5"),
            ("perturb", "force-error>0.5@0.5"),
            ("perturb", "force-error>0.5@0.95"),
            ("perturb", "reliability<0.5"),
            ("zero-shot-probe", "reliability<0.5"),
        }
    table = (out / "policy.md").read_text()
    assert "Methods: chgnet wrapped" in table and "| mc-dropout |" not in table
