"""``benchmarks/speed.py --quick`` reports MD steps per second (ethanol, 3BPA, water; trustpot
against SchNetPack's PaiNN and MACE) and the inference cost of every reliability method from one
run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_shared

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_speed_quick_reports_md_and_uncertainty_costs(tmp_path: Path) -> None:
    needs_shared("3bpa", "train_300K.xyz")
    needs_shared("water", "train_data_0-2.xyz")
    needs_shared("ethanol", "train.xyz")
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
        "ensemble", "ensemble-one-by-one", "mc-dropout", "probe", "perturb", "llpr",
        "llpr-distance", "shallow-ensemble",
    }  # fmt: skip
    assert all(r["md"] > 0 and r["batch"] > 0 for r in costs.values())
    text = (tmp_path / "speed.md").read_text()
    assert "## Inference cost of the reliability methods" in text and "| llpr-distance |" in text
    # the small-molecule rows: trustpot's PaiNN on ethanol, SchNetPack's PaiNN (measured when
    # benchmarks/.schnetpack-venv exists, else said so) and MACE-small (skipped here)
    assert report["trustpot"]["models"]["painn"]["md"]["ethanol"]["steps_per_second"] > 0
    spk = report["schnetpack"]
    ratio = report["ratios"]["md"]["ethanol"]["painn"]
    if spk["status"] == "measured":
        assert spk["models"]["schnetpack-painn"]["md"]["ethanol"]["steps_per_second"] > 0
        assert ratio["schnetpack-painn"] > 0 and ratio["schnetpack-painn-skin"] > 0
    else:
        assert spk["status"] == "not measured (run with --install-schnetpack)"
        assert (
            "| SchNetPack PaiNN (ASE list) |  | not measured (run with --install-schnetpack)"
            in text
        )
    assert ratio["mace-small"] == "not measured (--skip-mace)"
    md_ethanol = text[text.index("## MD, ASE velocity Verlet 0.5 fs: ethanol") :]
    assert "ratio vs schnetpack-painn |" in md_ethanol and "ratio vs mace-small |" in md_ethanol
    assert "| trustpot painn |" in md_ethanol and "| MACE 32x0e + 32x1o |" in md_ethanol
    # MD with uncertainty: the 5-member ensemble stacked and one by one (compiled: full mode)
    models = report["trustpot"]["models"]
    auto = models["painn-ensemble5"]["evaluation"]
    assert auto["ethanol"] == "stacked" and "stacking limit" in auto["water"]  # small vs large
    assert set(models["painn-ensemble5-stacked"]["evaluation"].values()) == {"stacked"}
    assert models["painn-ensemble5-one-by-one"]["evaluation"]["ethanol"].startswith("one by one")
    assert models["painn-ensemble5"]["md"]["ethanol"]["steps_per_second"] > 0
    assert "| trustpot painn-ensemble5 |" in md_ethanol
    assert "painn-ensemble5-compiled" not in models
    assert models["ace-ensemble5"]["evaluation"]["ethanol"] == "stacked"


def test_install_schnetpack_flag_installs_before_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--install-schnetpack`` creates the SchNetPack environment before any worker runs (the
    install itself needs the network and minutes, so it is replaced here)."""
    import speed

    calls: list[str] = []

    def fake_install() -> None:
        calls.append("install")
        raise SystemExit("stop before timing")

    monkeypatch.setattr(speed, "install_schnetpack", fake_install)
    monkeypatch.setattr(speed, "run_worker", lambda *a: calls.append("worker"))
    with pytest.raises(SystemExit, match="stop before timing"):
        speed.main(["--install-schnetpack", "--quick", "--out", "unused"])
    assert calls == ["install"]
