"""The command line end to end on tiny data, and its one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read, write
from conftest import labelled_molecules

from trustpot.cli.main import main
from trustpot.io.checkpoint import checkpoint_digest

TINY = ["-o", "model.hypers.n_features=8", "-o", "model.hypers.n_layers=1", "-o", "train.threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    data = folder / "train.xyz"
    write(data, labelled_molecules(20, seed=5), format="extxyz")
    run = folder / "run"
    code = main(
        [
            "train",
            "--train",
            str(data),
            "--model",
            "schnet",
            "--epochs",
            "3",
            "--valid-fraction",
            "0.2",
            "--seed",
            "3",
            "--out",
            str(run),
            *TINY,
        ]
    )
    assert code == 0
    return data, run


@pytest.mark.integration
def test_train_eval_md(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, run = trained
    assert (run / "best.ckpt").is_file() and (run / "metrics.csv").is_file()
    assert main(["eval", str(run / "best.ckpt"), str(data), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in (
        "energy_mae",
        "energy_rmse",
        "energy_mae_per_atom",
        "forces_mae",
        "forces_rmse",
        "forces_cosine",
        "forces_magnitude_mae",
        "forces_tail_share",
        "n_structures",
    ):
        assert key in metrics, key
    assert metrics["n_structures"] == 20
    assert set(metrics["per_config_type"]) == {"even", "odd"}
    assert (tmp_path / "ev" / "parity.png").stat().st_size > 1000
    traj = tmp_path / "md.xyz"
    assert (
        main(
            [
                "md",
                str(run / "best.ckpt"),
                str(data),
                "--steps",
                "20",
                "--temperature",
                "300",
                "--interval",
                "5",
                "--out",
                str(traj),
            ]
        )
        == 0
    )
    frames = read(traj, ":")
    assert len(frames) == 5
    assert np.all(np.isfinite(frames[-1].positions))


@pytest.mark.integration
def test_md_compile_flag_compiles_the_potential(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trustpot md --compile`` (``always``) evaluates through torch.compile (recorded here:
    the compiled function is the potential's ``node_energies``); by default (``auto``) a
    4-step run is too short to compile, and ``--compile never`` never compiles."""
    import torch

    data, run = trained
    compiled: list[str] = []
    real = torch.compile

    def recording(fn, **kw):  # type: ignore[no-untyped-def]
        compiled.append(fn.__name__)
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", recording)
    argv = ["md", str(run / "best.ckpt"), str(data), "--steps", "4", "--temperature", "300",
            "--interval", "2"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a.xyz")]) == 0
    assert main([*argv, "--out", str(tmp_path / "n.xyz"), "--compile", "never"]) == 0
    assert compiled == []
    assert main([*argv, "--out", str(tmp_path / "b.xyz"), "--compile"]) == 0
    assert compiled == ["node_energies"]
    a, b = read(tmp_path / "a.xyz", ":"), read(tmp_path / "b.xyz", ":")
    assert len(a) == len(b) == 3  # steps 0, 2 and 4
    assert not np.allclose(a[0].positions, a[-1].positions)
    np.testing.assert_allclose(a[-1].positions, b[-1].positions, rtol=0, atol=1e-5)


def test_config_show(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "forces_weight" in out and "max_minutes" in out


def run_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_error_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = run_error(
        ["train", "--train", str(tmp_path / "none.xyz"), "--out", str(tmp_path / "r")], capsys
    )
    assert "none.xyz: no such file" in err
    assert (tmp_path / "r" / "error.log").is_file()


def test_error_missing_energies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames = labelled_molecules(4)
    frames[2].calc = None
    write(tmp_path / "d.xyz", frames, format="extxyz")
    err = run_error(
        ["train", "--train", str(tmp_path / "d.xyz"), "--out", str(tmp_path / "r")], capsys
    )
    assert "d.xyz: frame 2: field 'energy': label missing" in err


def test_error_nan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames = labelled_molecules(4)
    write(tmp_path / "d.xyz", frames, format="extxyz")
    lines = (tmp_path / "d.xyz").read_text().splitlines()
    lines[11 * 3 + 2] = lines[11 * 3 + 2].rsplit(" ", 1)[0] + " NaN"
    (tmp_path / "d.xyz").write_text("\n".join(lines) + "\n")
    err = run_error(
        ["train", "--train", str(tmp_path / "d.xyz"), "--out", str(tmp_path / "r")], capsys
    )
    assert "frame 3: field 'forces': contains NaN" in err


def test_error_overlap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames = labelled_molecules(4)
    frames[1].positions[1] = frames[1].positions[0] + 0.01
    write(tmp_path / "d.xyz", frames, format="extxyz")
    err = run_error(
        ["train", "--train", str(tmp_path / "d.xyz"), "--out", str(tmp_path / "r")], capsys
    )
    assert "frame 1: field 'positions': atoms 0 and 1" in err


def test_error_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "d.xyz").write_text("3\n\nC 0 0 0\nH 1 0\n")
    err = run_error(
        ["train", "--train", str(tmp_path / "d.xyz"), "--out", str(tmp_path / "r")], capsys
    )
    assert "d.xyz: frame 0: cannot parse frame" in err


def test_error_empty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "d.xyz").write_text("")
    err = run_error(
        ["train", "--train", str(tmp_path / "d.xyz"), "--out", str(tmp_path / "r")], capsys
    )
    assert "empty dataset" in err


def test_error_unknown_element(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, run = trained
    write(tmp_path / "nh3.xyz", labelled_molecules(2, name="NH3"), format="extxyz")
    err = run_error(
        ["eval", str(run / "best.ckpt"), str(tmp_path / "nh3.xyz"), "--out", str(tmp_path / "e")],
        capsys,
    )
    assert "nh3.xyz: frame 0: field 'numbers': element(s) N not in the model" in err


def test_error_other_version(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, run = trained
    data = torch.load(run / "best.ckpt", weights_only=True)
    data["version"] = 99
    data.pop("digest")
    data["digest"] = checkpoint_digest(data)
    torch.save(data, tmp_path / "v99.ckpt")
    err = run_error(
        ["eval", str(tmp_path / "v99.ckpt"), str(trained[0]), "--out", str(tmp_path / "e")], capsys
    )
    assert "checkpoint version 99 was written by a newer trustpot" in err


def test_error_tampered(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, run = trained
    raw = bytearray((run / "best.ckpt").read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 64] = b"\x00" * 64
    (tmp_path / "bad.ckpt").write_bytes(bytes(raw))
    err = run_error(
        ["eval", str(tmp_path / "bad.ckpt"), str(trained[0]), "--out", str(tmp_path / "e")], capsys
    )
    assert "bad.ckpt" in err and ("not a loadable checkpoint" in err or "digest" in err)


def test_error_bad_override(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, _ = trained
    err = run_error(
        ["train", "--train", str(data), "--out", str(tmp_path / "r"), "-o", "train.lr=fast"], capsys
    )
    assert "train.lr expects float" in err
