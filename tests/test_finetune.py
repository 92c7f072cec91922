"""Fine-tuning: layer groups, energy offsets, the three strategies, resume, pretrained starts."""

from __future__ import annotations

import csv
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read, write
from conftest import SHARED_DATA, labelled_molecules

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.cli.main import main
from trustpot.data.reader import read_structures
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError, DataError
from trustpot.finetune import FinetuneOptions, run_finetune, strategy_rates
from trustpot.io.checkpoint import load_model, read_checkpoint
from trustpot.models.build import build_potential
from trustpot.models.contract import Model
from trustpot.models.finetuned import FineTuned, fit_energy_offsets
from trustpot.models.pretrained import package_available
from trustpot.registry import lookup, names

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
POTENTIAL = FIXTURES / "potential.ckpt"
ZEOLITE = SHARED_DATA / "sio2_zeolites" / "train_topology_EDI.xyz.gz"


def check_partition(model: Model) -> list[str]:
    """Every trainable parameter in exactly one group, nothing foreign; returns the names."""
    groups = model.layer_groups()
    ids = [id(p) for _, params in groups for p in params]
    assert len(ids) == len(set(ids)), f"{model.kind}: a parameter is in two groups"
    owned = {id(p) for p in model.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) <= owned, f"{model.kind}: a group holds a foreign tensor"
    assert trainable <= set(ids), f"{model.kind}: a trainable parameter is in no group"
    assert all(params for _, params in groups), f"{model.kind}: an empty group"
    return [name for name, _ in groups]


@pytest.mark.parametrize("backbone", ["schnet", "painn", "egnn", "deepset-moe", "ace"])
def test_potential_layer_groups(backbone: str, ethanol_structures: list[Structure]) -> None:
    hypers = {"cutoff": 4.0, "n_features": 8, "n_layers": 3}
    model = build_potential(backbone, hypers, ethanol_structures[:4])
    got = check_partition(model)
    assert got == ["embedding", "interaction_0", "interaction_1", "interaction_2", "head"]
    assert len(check_partition(FineTuned(model))) == 6


@pytest.mark.parametrize("kind", [k for k in names("model") if not k.startswith("pretrained")])
def test_every_stored_kind_partitions(kind: str) -> None:
    check_partition(load_model(FIXTURES / f"{kind.replace(':', '-')}.ckpt"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chgnet", ["embedding", *(f"interaction_{k}" for k in range(4)), "readout"]),
        ("sevennet-0", ["embedding", *(f"interaction_{k}" for k in range(5)), "readout"]),
    ],
)
def test_pretrained_layer_groups(name: str, expected: list[str]) -> None:
    entry = lookup("pretrained", name)
    if not package_available(entry.package):
        pytest.skip(f"{entry.package} not installed")
    assert check_partition(load_model(name)) == expected


def test_offsets_reproduce_a_known_shift(tmp_path: Path) -> None:
    """Labels = base model + a per-element shift: least squares recovers the shift, and the
    wrapped model reproduces the labels' energies with the base's forces."""
    frames = [
        a for mol in ("CH3CH2OH", "CH3OH", "H2O", "CH4") for a in labelled_molecules(3, 1, mol)
    ]
    write(tmp_path / "mix.xyz", frames, format="extxyz")
    structures = read_structures(tmp_path / "mix.xyz", use_cache=False)
    base = load_model(POTENTIAL)
    shift = {1: -13.6, 6: -1030.0, 8: -2040.5}
    predicted = Predictor(base).predict_structures(structures)
    shifted = [
        dataclasses.replace(s, energy=float(p[K.ENERGY]) + sum(shift[int(z)] for z in s.numbers))
        for s, p in zip(structures, predicted)
    ]
    fitted, before, after = fit_energy_offsets(base, shifted)
    for z, value in shift.items():
        assert fitted[z] == pytest.approx(value, abs=1e-6)
    assert before > 100.0 and after < 1e-6
    model = FineTuned(base)
    with torch.no_grad():
        for z, value in fitted.items():
            model.offsets[z] = value
    again = Predictor(model).predict_structures(shifted)
    for s, p, q in zip(shifted, again, predicted):
        assert float(p[K.ENERGY]) == pytest.approx(s.energy, abs=1e-6)
        np.testing.assert_array_equal(p[K.FORCES], q[K.FORCES])


def test_strategy_rates_follow_the_shapes() -> None:
    names5 = ["embedding", "interaction_0", "interaction_1", "interaction_2", "head"]
    lr = 1e-3

    def rates(**kw: object) -> list[float]:
        return [r for _, r, _ in strategy_rates(names5, FinetuneOptions("a", "b", lr=lr, **kw))]  # type: ignore[arg-type]

    assert rates() == [lr] * 5
    decay = rates(strategy="llrd", llrd_decay=0.5)
    assert decay == pytest.approx([lr * 0.5**4, lr * 0.5**3, lr * 0.25, lr * 0.5, lr])
    u = rates(strategy="llrd", llrd_decay=0.5, llrd_shape="u")
    assert u == pytest.approx([lr, lr * 0.5, lr * 0.25, lr * 0.5, lr])
    assert rates(strategy="llrd") == pytest.approx([lr * 0.7 ** (4 - k) for k in range(5)])
    frozen = [f for *_, f in strategy_rates(names5, FinetuneOptions("a", "b", strategy="freeze"))]
    assert frozen == [True, True, True, True, False]
    two = FinetuneOptions("a", "b", strategy="freeze", freeze_layers=2)
    assert [f for *_, f in strategy_rates(names5, two)] == [True, True, False, False, False]
    with pytest.raises(ConfigError, match="--freeze-layers 9"):
        strategy_rates(names5, FinetuneOptions("a", "b", strategy="freeze", freeze_layers=9))
    with pytest.raises(ConfigError, match="--llrd-decay"):
        FinetuneOptions("a", "b", llrd_decay=0.5)
    with pytest.raises(ConfigError, match="--freeze-layers"):
        FinetuneOptions("a", "b", strategy="llrd", freeze_layers=1)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(read_checkpoint(path)["training"]["raw_model"])


@pytest.mark.parametrize(
    ("strategy", "extra", "still"),
    [
        ("full", {}, set()),
        ("freeze", {}, {"embedding", "interaction_0"}),
        ("freeze", {"freeze_layers": 1}, {"embedding"}),
        ("llrd", {"llrd_shape": "u"}, set()),
    ],
)
def test_strategy_trains_only_its_groups(
    strategy: str, extra: dict[str, int | str], still: set[str], ethanol_file: Path, tmp_path: Path
) -> None:
    opts = FinetuneOptions(
        str(POTENTIAL), str(ethanol_file), strategy=strategy, epochs=2, batch_size=4,
        threads=1, lr=1e-2, valid_fraction=0.25, **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    result = run_finetune(opts, tmp_path / "run")
    assert result.epochs == 2
    start = FineTuned(load_model(POTENTIAL))
    before = {k: v.clone() for k, v in start.state_dict().items()}
    after = _weights(tmp_path / "run" / "last.ckpt")
    names_of = {id(p): name for name, params in start.layer_groups() for p in params}
    group_of = {key: names_of[id(p)] for key, p in start.named_parameters()}
    for key, group in group_of.items():
        same = torch.equal(before[key], after[key])
        assert same == (group in still), f"{strategy}: {key} ({group}) changed={not same}"
    summary = json.loads((tmp_path / "run" / "finetune.json").read_text())
    lrs = {g["name"]: g["lr"] for g in summary["groups"]}
    assert {n for n, g in lrs.items() if g == 0.0} == still
    if strategy == "llrd":
        assert lrs["interaction_0"] == pytest.approx(0.7 * lrs["head"])
        assert lrs["embedding"] == lrs["head"]
    best = load_model(tmp_path / "run" / "best.ckpt")
    assert isinstance(best, FineTuned) and best.kind == "finetuned"
    assert best.offsets_by_element()  # fitted before the first step
    for name in ("config.resolved.yaml", "metrics.csv", "best.ckpt", "last.ckpt", "log.txt"):
        assert (tmp_path / "run" / name).is_file()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["drift"]) == len(start.base.embedding_widths())
    for row in report["drift"]:
        assert set(row["w1_per_element"]) == {"1", "6", "8"}
        assert row["davies_bouldin_before"] > 0 and row["davies_bouldin_after"] > 0
        assert 0 < row["cka"] <= 1 + 1e-9
    assert report["forgetting"]["forces_mae_vs_pretrained"] > 0
    assert report["verdict"].startswith(("FORGOT", "kept"))


def test_finetuned_checkpoint_works_everywhere(ethanol_file: Path, tmp_path: Path) -> None:
    """eval, md and a PROBE fit all take a fine-tuned best.ckpt."""
    run = tmp_path / "run"
    argv = ["finetune", "--from", str(POTENTIAL), "--train", str(ethanol_file), "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--batch-size", "8", "--threads", "1"]) == 0
    assert main([*argv, "--epochs", "1"]) == 2  # the run exists: --resume or another --out
    best = str(run / "best.ckpt")
    assert main(["eval", best, str(ethanol_file), "--out", str(tmp_path / "e")]) == 0
    md = ["md", best, str(ethanol_file), "--steps", "2", "--temperature", "300"]
    assert main([*md, "--out", str(tmp_path / "md.xyz")]) == 0
    probe = ["uq", "fit", "probe", "--from", best, "--calibration", str(ethanol_file)]
    assert main([*probe, "--epochs", "2", "--out", str(tmp_path / "probe")]) == 0
    assert load_model(tmp_path / "probe" / "uq.ckpt").kind == "uq:probe"


RESUMED = ["--epochs", "40", "--batch-size", "2", "--threads", "1", "--strategy", "llrd",
           "--lr", "0.005"]  # fmt: skip


def _cmd(train: Path, out: Path, *extra: str) -> list[str]:
    argv = ["finetune", "--from", str(POTENTIAL), "--train", str(train), "--out", str(out)]
    return [sys.executable, "-m", "trustpot", *argv, *RESUMED, *extra]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_resume_after_kill_matches_uninterrupted(ethanol_file: Path, tmp_path: Path) -> None:
    """A run killed mid-way and resumed ends where an uninterrupted run (in this process, same
    options) ends; resuming with other options is refused, naming them."""
    full = tmp_path / "full"
    argv = ["finetune", "--from", str(POTENTIAL), "--train", str(ethanol_file), "--out"]
    assert main([*argv, str(full), *RESUMED]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(ethanol_file, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "last.ckpt").exists() and len(_rows(killed)) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = read_checkpoint(killed / "last.ckpt")["training"]["epoch"]
    assert 0 < done_before < 40
    assert not (killed / "report.md").exists()
    subprocess.run(_cmd(ethanol_file, killed, "--resume"), check=True, capture_output=True)
    assert "report:" in (killed / "log.txt").read_text().splitlines()[-1]  # the verdict, last
    assert (killed / "report.md").is_file()
    assert [int(r["epoch"]) for r in _rows(killed)] == list(range(40)), "epochs lost or repeated"
    a, b = read_checkpoint(full / "last.ckpt"), read_checkpoint(killed / "last.ckpt")
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], rtol=0, atol=1e-12), key
    with pytest.raises(ConfigError, match="seed"):
        opts = FinetuneOptions(str(POTENTIAL), str(ethanol_file), epochs=40, seed=3)
        run_finetune(opts, killed, resume=True)


@pytest.mark.parametrize("name", ["chgnet", "sevennet-0"])
def test_finetune_pretrained_on_zeolite_frames(name: str, tmp_path: Path) -> None:
    entry = lookup("pretrained", name)
    if not package_available(entry.package):
        pytest.skip(f"{entry.package} not installed: pip install 'trustpot[{entry.extra}]'")
    if not ZEOLITE.is_file():
        pytest.skip(f"shared data absent: {ZEOLITE}")
    data = tmp_path / "edi.xyz"
    write(data, read(ZEOLITE, index=":4"), format="extxyz")
    run = tmp_path / "run"
    argv = ["finetune", "--from", name, "--train", str(data), "--out", str(run), "--epochs", "1"]
    assert main([*argv, "--batch-size", "2", "--threads", "1", "--valid-fraction", "0.25"]) == 0
    best = load_model(run / "best.ckpt")
    assert isinstance(best, FineTuned) and best.base.kind == entry.kind
    assert set(best.offsets_by_element()) == {8, 14}
    assert main(["eval", str(run / "best.ckpt"), str(data), "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert np.isfinite(metrics["forces_mae"])


def test_mft_trains_on_pseudo_labelled_replay(ethanol_file: Path, tmp_path: Path) -> None:
    """--strategy mft adds the pretraining force objective on --replay frames whose labels are
    the starting model's own forces (computed once, cached), with its own validation columns;
    the report has the downstream errors in and out of domain (--test-ood), report.md and the
    t-SNE maps."""
    replay = tmp_path / "replay.xyz"
    write(replay, labelled_molecules(6, seed=11, scale=0.05), format="extxyz")
    ood = tmp_path / "methanol.xyz"
    write(ood, labelled_molecules(3, seed=5, name="CH3OH"), format="extxyz")
    opts = FinetuneOptions(
        str(POTENTIAL), str(ethanol_file), strategy="mft", replay=str(replay), epochs=2,
        batch_size=4, threads=1, lr=1e-2, valid_fraction=0.25, replay_weight=2.0,
        replay_labels="pseudo", test_ood=str(ood),
    )  # fmt: skip
    run_finetune(opts, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["replay_labels"] == "pseudo"
    cached = read_structures(tmp_path / "run" / "replay_pseudo.xyz", use_cache=False)
    start = load_model(POTENTIAL)
    expected = Predictor(start).predict_structures(read_structures(replay, use_cache=False))
    for s, p in zip(cached, expected):
        assert s.forces is not None
        np.testing.assert_allclose(s.forces, p[K.FORCES], atol=1e-6)
    header = _rows(tmp_path / "run")[0].keys()
    assert "replay_val_forces_mae" in header and "main_val_forces_mae" in header
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["frames"] == str(replay)
    assert report["forgetting"]["labels"] == "pseudo"
    assert report["forgetting"]["pretrained"]["forces_mae"] == pytest.approx(0.0, abs=1e-9)
    down = report["downstream"]
    assert down["out_of_domain"]["frames"] == str(ood)
    assert down["out_of_domain"]["n_structures"] == 3
    assert down["in_domain"]["n_structures"] == 6
    for name in ("in_domain", "out_of_domain"):
        for model in ("pretrained", "finetuned"):
            m = down[name][model]
            keys = ("energy_mae_per_atom", "forces_mae", "forces_rmse")
            assert all(np.isfinite(m[k]) and m[k] > 0 for k in keys), (name, model, m)
    assert {"C(C1H3)", "O(C1H1)", "H(C1)"} <= set(report["environments"])
    for row in report["drift"]:
        assert row["davies_bouldin_env_before"] > 0 and row["davies_bouldin_env_after"] > 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert report["verdict"] in md and "Out of domain" in md and "pseudo-labels" in md
    assert report["maps"]["n_atoms"] == 54
    for png in ("tsne_element.png", "tsne_environment.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in md
    with pytest.raises(ConfigError, match="--replay-weight applies to --strategy mft"):
        FinetuneOptions(str(POTENTIAL), str(ethanol_file), replay_weight=1.0)
    with pytest.raises(ConfigError, match="--strategy mft needs --replay"):
        FinetuneOptions(str(POTENTIAL), str(ethanol_file), strategy="mft")
    with pytest.raises(ConfigError, match="--replay-labels needs --replay"):
        FinetuneOptions(str(POTENTIAL), str(ethanol_file), replay_labels="given")
    with pytest.raises(ConfigError, match="--compile takes force-field objectives only"):
        FinetuneOptions(str(POTENTIAL), str(ethanol_file), compile=True, ewc_weight=1.0)


def _unlabelled(frames: list[Atoms], keep: frozenset[int] = frozenset()) -> list[Atoms]:
    """Copies of ``frames`` without labels, except those at the indices ``keep``."""
    return [a if k in keep else Atoms(a.numbers, a.positions) for k, a in enumerate(frames)]


def test_replay_labels_given_auto_and_pseudo(ethanol_file: Path, tmp_path: Path) -> None:
    """auto trains the replay objective on the frames' own forces when every frame has them
    (no pseudo-labels) and pseudo-labels otherwise; given refuses a frame without forces,
    naming the file and the frame; the report's forgetting follows the same labels."""
    labelled, bare = tmp_path / "labelled.xyz", tmp_path / "bare.xyz"
    frames = labelled_molecules(4, seed=11, scale=0.05)
    write(labelled, frames, format="extxyz")
    write(bare, _unlabelled(frames, keep=frozenset({0, 1})), format="extxyz")
    common = dict(strategy="mft", epochs=1, batch_size=4, threads=1, valid_fraction=0.25)

    def run(replay: Path, out: str, **kw: str) -> dict[str, Any]:
        opts = FinetuneOptions(
            str(POTENTIAL), str(ethanol_file), replay=str(replay), **common, **kw
        )  # type: ignore[arg-type]
        run_finetune(opts, tmp_path / out)
        assert json.loads((tmp_path / out / "finetune.json").read_text())["replay_labels"] == (
            "given" if out == "given" else "pseudo"
        )
        return dict(json.loads((tmp_path / out / "report.json").read_text())["forgetting"])

    given = run(labelled, "given")  # auto: every frame has forces
    assert not (tmp_path / "given" / "replay_pseudo.xyz").exists()
    assert given["labels"] == "given"
    assert given["forces_mae_pretrained"] > 0 and given["forces_mae_finetuned"] > 0
    assert "given force labels" in (tmp_path / "given" / "log.txt").read_text()
    pseudo = run(bare, "auto")  # auto: two frames lack forces
    assert (tmp_path / "auto" / "replay_pseudo.xyz").is_file()
    assert pseudo["labels"] == "pseudo" and "forces_mae_pretrained" not in pseudo
    with pytest.raises(DataError, match=r"bare\.xyz: frame 2: field 'forces'"):
        run(bare, "refused", replay_labels="given")
    assert not (tmp_path / "refused" / "last.ckpt").exists()  # refused before training


def test_ewc_holds_the_weights_near_the_start(ethanol_file: Path, tmp_path: Path) -> None:
    """A strong EWC pull keeps the base weights closer to the starting ones than no pull, and
    the penalty is an objective with its own metrics column."""

    def moved(ewc: float, out: Path) -> float:
        opts = FinetuneOptions(
            str(POTENTIAL), str(ethanol_file), epochs=3, batch_size=4, threads=1, lr=1e-2,
            valid_fraction=0.25, ewc_weight=ewc,
        )  # fmt: skip
        run_finetune(opts, out)
        start = FineTuned(load_model(POTENTIAL)).state_dict()
        after = _weights(out / "last.ckpt")
        keys = [k for k in start if k.startswith("base.") and start[k].is_floating_point()]
        return float(sum(((after[k] - start[k]) ** 2).sum() for k in keys))

    free = moved(0.0, tmp_path / "free")
    held = moved(1e7, tmp_path / "held")
    assert held < 0.5 * free
    assert "ewc_val_loss" in _rows(tmp_path / "held")[0]
    with pytest.raises(ConfigError, match="--ewc-weight does not apply to --strategy freeze"):
        FinetuneOptions(str(POTENTIAL), str(ethanol_file), strategy="freeze", ewc_weight=1.0)
