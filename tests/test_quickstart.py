"""``trustpot quickstart`` end to end on tiny settings (needs the [xtb] extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("tblite", reason="GFN2-xTB (tblite) not installed: pip install -e '.[xtb]'")
pytest.importorskip("rdkit", reason="RDKit not installed: pip install -e '.[xtb]'")

from trustpot.cli.main import main


@pytest.mark.slow
def test_quickstart_tiny(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    args = [
        "quickstart",
        "--out",
        str(out),
        "--frames",
        "20",
        "--ood-frames",
        "4",
        "--minutes",
        "0.05",
        "--uq-minutes",
        "0.02",
        "--workers",
        "0",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"in_domain_300K", "out_of_domain_800K"}
    assert summary["metrics"]["out_of_domain_800K"]["n_structures"] == 4
    assert summary["ood_id_force_mae_ratio"] > 0
    rel = summary["reliability"]
    assert set(rel["sets"]) == {"in_domain_300K", "out_of_domain_800K"}
    assert 0 <= rel["sets"]["out_of_domain_800K"]["mean_reliability"] <= 1
    assert (out / "reliability" / "uq.ckpt").is_file()
    report = (out / "report.md").read_text()
    assert "How far to trust it" in report
    assert "force_error_hist.png" in report and (out / "force_error_hist.png").is_file()
    # a rerun reuses data and the finished training run
    assert main(args) == 0
