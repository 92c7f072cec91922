"""Out-of-fold calibration examples: every training frame labelled by a model that did not see
it, then used by PROBE instead of held-out frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trustpot.cli.main import main
from trustpot.data.reader import read_structures
from trustpot.data.structures import info_values
from trustpot.errors import DataError
from trustpot.io.checkpoint import load_model, read_checkpoint
from trustpot.uq.calibration import FOLD_KEY, OOF_KEY, fold_of
from trustpot.uq.probe import Probe

TINY = ["-o", "model.hypers.n_features=8", "-o", "model.hypers.n_layers=1", "--epochs", "2"]


def test_folds_cover_every_frame_once() -> None:
    fold = fold_of(23, 4, seed=0)
    assert sorted(set(fold.tolist())) == [0, 1, 2, 3]
    assert all(5 <= int((fold == k).sum()) <= 6 for k in range(4))
    assert np.array_equal(fold, fold_of(23, 4, seed=0))


def test_calibration_set_then_probe(ethanol_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "oof"
    argv = ["uq", "calibration-set", "--train", str(ethanol_file), "--folds", "3", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    frames = read_structures(out / "oof.xyz", use_cache=False)
    assert len(frames) == 24
    errors = info_values(frames, OOF_KEY, "oof.xyz")
    assert np.all(errors > 0)
    assert sorted({int(s.info[FOLD_KEY]) for s in frames}) == [0, 1, 2]
    for k in range(3):
        assert (out / f"fold_{k}" / "state.json").is_file()
    # a rerun reuses the finished folds and writes the same labels
    assert main([*argv, "--out", str(out)]) == 0
    again = info_values(read_structures(out / "oof.xyz", use_cache=False), OOF_KEY, "oof.xyz")
    assert np.array_equal(errors, again)

    base = Path(__file__).parent / "fixtures" / "checkpoints" / "potential.ckpt"
    probe_dir = tmp_path / "probe"
    fit = ["uq", "fit", "probe", "--from", str(base), "--calibration", str(out / "oof.xyz")]
    fit += ["--errors-key", OOF_KEY, "--epochs", "2", "--out", str(probe_dir)]
    assert main(fit) == 0
    report = read_checkpoint(probe_dir / "uq.ckpt")["extra"]["fit_report"]
    # the tolerance is a quantile of the out-of-fold errors, not of the base's own errors
    assert report["tolerance"] == pytest.approx(np.quantile(errors, 0.8))
    assert isinstance(load_model(probe_dir / "uq.ckpt", Probe), Probe)


def test_missing_error_field_names_frame_and_field(ethanol_file: Path) -> None:
    frames = read_structures(ethanol_file, use_cache=False)
    with pytest.raises(DataError, match=r"frame 0.*oof_forces_mae"):
        info_values(frames, OOF_KEY, str(ethanol_file))


@pytest.mark.slow
def test_probe_calibration_benchmark_quick(tmp_path: Path) -> None:
    """The learning-curve benchmark runs end to end in quick mode and writes its table."""
    import subprocess
    import sys

    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "3bpa"
    if not shared.is_dir():
        pytest.skip(f"needs the 3BPA data at {shared}")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_calibration.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "probe_calibration.md").read_text()
    for n in (10, 20, 40):
        assert f"| {n} |" in table
