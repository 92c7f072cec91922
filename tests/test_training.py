"""Training: learning happens, determinism, resume after a kill, data-parallel equivalence."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trustpot.config import load_config
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import read_checkpoint
from trustpot.train.run import run_training

TINY = ["model.hypers.n_features=8", "model.hypers.n_layers=2", "model.hypers.cutoff=4.0"]


def config(train: Path, *extra: str) -> object:
    return load_config(
        overrides=[
            f"data.train={train}",
            "data.valid_fraction=0.25",
            "train.batch_size=4",
            "train.threads=1",
            *TINY,
            *extra,
        ]
    )


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_loss_decreases(ethanol_file: Path, tmp_path: Path) -> None:
    result = run_training(
        config(ethanol_file, "train.epochs=15", "model.name=schnet"), tmp_path / "r"
    )
    history = rows(tmp_path / "r")
    assert len(history) == 15
    assert float(history[-1]["train_loss"]) < 0.5 * float(history[0]["train_loss"])
    assert result.best_epoch >= 0
    for name in ("best.ckpt", "last.ckpt", "config.resolved.yaml", "split.json", "log.txt"):
        assert (tmp_path / "r" / name).is_file()


def test_same_seed_same_result(ethanol_file: Path, tmp_path: Path) -> None:
    a = run_training(config(ethanol_file, "train.epochs=3"), tmp_path / "a")
    b = run_training(config(ethanol_file, "train.epochs=3"), tmp_path / "b")
    c = run_training(config(ethanol_file, "train.epochs=3", "train.seed=1"), tmp_path / "c")
    assert a.best_metrics == b.best_metrics
    assert a.best_metrics != c.best_metrics


def test_refuses_to_overwrite_a_run(ethanol_file: Path, tmp_path: Path) -> None:
    run_training(config(ethanol_file, "train.epochs=1"), tmp_path / "r")
    with pytest.raises(ConfigError, match="holds a run already"):
        run_training(config(ethanol_file, "train.epochs=1"), tmp_path / "r")


def test_unknown_option_is_an_error(ethanol_file: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        config(ethanol_file, "train.learning_rate=0.1")
    with pytest.raises(ConfigError, match="unknown model option"):
        run_training(config(ethanol_file, "model.hypers.n_feature=3"), "unused")


def _train_cmd(train: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trustpot",
        "train",
        "--train",
        str(train),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "2",
        "--dtype",
        "float64",
        "-o",
        "train.threads=1",
        "-o",
        "data.valid_fraction=0.25",
        *[x for o in TINY for x in ("-o", o)],
        *extra,
    ]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(ethanol_file: Path, tmp_path: Path) -> None:
    epochs = 30
    full = tmp_path / "full"
    subprocess.run(_train_cmd(ethanol_file, full, epochs), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(ethanol_file, killed, epochs),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (
            (killed / "last.ckpt").exists()
            and (killed / "metrics.csv").exists()
            and len(rows(killed)) >= 3
        ):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = read_checkpoint(killed / "last.ckpt")["training"]["epoch"]
    assert 0 < done_before < epochs

    subprocess.run(
        _train_cmd(ethanol_file, killed, epochs, "--resume"), check=True, capture_output=True
    )
    history = rows(killed)
    assert [int(r["epoch"]) for r in history] == list(range(epochs)), "epochs lost or repeated"
    a = read_checkpoint(full / "last.ckpt")
    b = read_checkpoint(killed / "last.ckpt")
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], rtol=0, atol=1e-12), key


@pytest.mark.slow
def test_torchrun_two_processes_match_one(ethanol_file: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter")
    single = tmp_path / "single"
    subprocess.run(
        _train_cmd(ethanol_file, single, 4, "--batch-size", "4"), check=True, capture_output=True
    )
    multi = tmp_path / "multi"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trustpot",
        *_train_cmd(ethanol_file, multi, 4, "--batch-size", "4")[3:],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = rows(single), rows(multi)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_forces_mae", "val_energy_mae_per_atom"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-7), key


def _stress_term(length: float) -> float:
    """Stress loss of a synthetic two-structure batch whose lengths are ``length`` times the
    reference ones (energies fixed: forces, force scale and stress rescale with them)."""
    from trustpot import keys as K
    from trustpot.train.losses import LossWeights, loss_sums

    cell = torch.tensor([[[3.0, 0.0, 0.0], [0.5, 4.0, 0.0], [0.0, 0.0, 5.0]]]).double()
    cells = torch.cat([cell, 1.7 * cell]) * length
    stress_ref = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0)).double()
    stress_err = 0.01 * torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(1)).double()
    g = {
        K.CELL: cells,
        K.N_ATOMS: torch.tensor([4, 9]),
        K.STRESS: stress_ref / length**3,
        K.STRESS_WEIGHT: torch.ones(2, dtype=torch.float64),
    }
    pred = {K.STRESS: (stress_ref + stress_err) / length**3}
    weights = LossWeights(energy=0.0, forces=0.0, stress=1.0)
    sums, counts = loss_sums(pred, g, weights, scale=0.7 / length)
    return float(sums["stress"] / counts["stress"])


def test_stress_loss_is_dimensionless() -> None:
    """Rescaling every length by 2 (eV/Å^3 by 1/8, eV/Å by 1/2) leaves the stress term as it
    is; the old formula (stress error / force scale) changed it by a factor 1/16."""
    one, two = _stress_term(1.0), _stress_term(2.0)
    assert one > 0
    assert two == pytest.approx(one, rel=1e-12)
    assert _stress_term(0.37) == pytest.approx(one, rel=1e-12)


PROBE_SCRIPT = """
import sys, os, torch
from trustpot.data.reader import read_structures
from trustpot.io.checkpoint import load_potential
from trustpot.uq.probe import ProbeHypers, fit_probe

base = load_potential(sys.argv[1])
data = read_structures(sys.argv[2], use_cache=False)
probe = fit_probe(base, data, hypers=ProbeHypers(width=8, heads=2, dropout=0.0), epochs=3,
                  batch_size=4, run_dir=sys.argv[3] + "/run", log=lambda m: None)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(probe.classifier.state_dict(), sys.argv[3] + "/classifier.pt")
"""


def test_torchrun_probe_fit_matches_one_process(ethanol_file: Path, tmp_path: Path) -> None:
    """A loop ported onto the Trainer (PROBE's classifier, without dropout so that no random
    mask differs between ranks) runs under torchrun and gives the single-process classifier:
    the Trainer's sums/counts reductions make the ranks add up."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter")
    script = tmp_path / "fit.py"
    script.write_text(PROBE_SCRIPT)
    base = Path(__file__).parent / "fixtures" / "checkpoints" / "potential.ckpt"
    single, multi = tmp_path / "single", tmp_path / "multi"
    runs = [[sys.executable], [torchrun, "--standalone", "--nproc_per_node", "2"]]
    for prefix, out in zip(runs, (single, multi)):
        out.mkdir()
        cmd = [*prefix, str(script), str(base), str(ethanol_file), str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(single / "classifier.pt", weights_only=True)
    b = torch.load(multi / "classifier.pt", weights_only=True)
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_warm_start_begins_from_the_checkpoint(ethanol_file: Path, tmp_path: Path) -> None:
    """``model.init_from`` starts from the checkpoint's weights; a mismatch names it."""
    import torch

    from trustpot.errors import ConfigError
    from trustpot.io.checkpoint import load_potential
    from trustpot.train.run import warm_start

    run_training(config(ethanol_file, "train.epochs=2"), tmp_path / "a")
    best = tmp_path / "a" / "best.ckpt"
    warm = warm_start(config(ethanol_file, f"model.init_from={best}"))
    for (name, x), y in zip(warm.state_dict().items(), load_potential(best).state_dict().values()):
        assert torch.equal(x, y), name
    run_training(config(ethanol_file, "train.epochs=1", f"model.init_from={best}"), tmp_path / "b")
    for bad in ("model.name=schnet", "model.hypers.n_features=16", "model.head_dropout=0.1"):
        with pytest.raises(ConfigError, match=r"model\.init_from"):
            warm_start(config(ethanol_file, f"model.init_from={best}", bad))


def test_second_stage_moves_weight_to_energies_late(ethanol_file: Path, tmp_path: Path) -> None:
    """Epochs in the last half train with the second stage's weights (a larger loss, as the
    energy weight rises 100x), the first half exactly as without it; validation keeps the
    first weights, so its loss stays comparable across the switch."""
    from trustpot.train.losses import LossWeights
    from trustpot.train.objectives import ForceFieldLoss

    loss = ForceFieldLoss(LossWeights(1.0, 10.0, 0.0), stage_two=(0.25, 100.0, 5.0))
    sums = {"energy": torch.tensor(2.0), "forces": torch.tensor(3.0)}
    counts = {"energy": torch.tensor(1.0), "forces": torch.tensor(1.0)}
    loss.at_progress(0.5)
    assert float(loss.combine(sums, counts)) == pytest.approx(2.0 + 30.0)
    loss.at_progress(0.8)
    assert float(loss.combine(sums, counts)) == pytest.approx(200.0 + 15.0)
    assert loss.weights == {"energy": 1.0, "forces": 10.0}  # what validation weighs with

    common = ("train.epochs=6", "model.name=schnet", "train.ema_decay=0")
    run_training(config(ethanol_file, *common), tmp_path / "one")
    staged = ("train.stage_two_fraction=0.5", "train.stage_two_energy_weight=100")
    run_training(config(ethanol_file, *common, *staged), tmp_path / "two")
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    for a, b in zip(one[:3], two[:3], strict=True):
        assert a["train_loss"] == b["train_loss"]
    assert float(two[3]["train_loss"]) > float(one[3]["train_loss"])
    with pytest.raises(ConfigError, match="stage_two_fraction must be in"):
        config(ethanol_file, "train.stage_two_fraction=1.5")
