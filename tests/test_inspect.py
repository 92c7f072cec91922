"""``trustpot data stats`` finds outliers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.io import write
from conftest import labelled_molecules, needs_shared

from trustpot.cli.main import main
from trustpot.data.inspect import dataset_stats
from trustpot.data.reader import read_structures


def test_planted_force_outlier_is_found(tmp_path: Path) -> None:
    frames = labelled_molecules(30, seed=2)
    frames[17].calc.results["forces"] = frames[17].get_forces() + np.array([40.0, 0, 0])
    write(tmp_path / "d.xyz", frames, format="extxyz")
    stats = dataset_stats(read_structures(tmp_path / "d.xyz", use_cache=False))
    assert [o["frame"] for o in stats["outliers"]] == [17]
    assert stats["elements"] == {"C": 60, "H": 180, "O": 30}


def test_known_outlier_in_nacl_water(tmp_path: Path, capsys) -> None:
    path = needs_shared("nacl_water", "revPBE0-D3_gen1b.xyz")
    assert main(["data", "stats", str(path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "frame 156: largest force 34.94" in out
    assert (tmp_path / "stats.png").stat().st_size > 1000
