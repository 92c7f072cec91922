"""Checkpoints are untrusted input: versions, tampering, truncation, wrong shapes."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from trustpot.errors import CheckpointError
from trustpot.io import checkpoint as ckpt
from trustpot.models import build_potential


def resave(data: dict, path: Path) -> None:
    """Write an edited checkpoint with a matching digest (as another trustpot version would)."""
    data.pop("digest", None)
    data["digest"] = ckpt.checkpoint_digest(data)
    torch.save(data, path)


@pytest.fixture()
def saved(ethanol_structures: list, tmp_path: Path) -> Path:
    model = build_potential("schnet", {"n_features": 8, "n_layers": 1}, ethanol_structures)
    path = tmp_path / "m.ckpt"
    ckpt.save_model(model, path)
    return path


def test_round_trip_and_no_temp_file_left(saved: Path) -> None:
    model = ckpt.load_potential(saved)
    assert model.meta.backbone == "schnet"
    assert not saved.with_name(saved.name + ".tmp").exists()


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.load_potential(tmp_path / "none.ckpt")


def test_newer_version_refused(saved: Path) -> None:
    data = torch.load(saved, weights_only=True)
    data["version"] = ckpt.CHECKPOINT_VERSION + 1
    resave(data, saved)
    with pytest.raises(CheckpointError, match="written by a newer trustpot"):
        ckpt.load_potential(saved)


def test_older_version_without_migration_refused(saved: Path) -> None:
    data = torch.load(saved, weights_only=True)
    data["version"] = 0
    resave(data, saved)
    with pytest.raises(CheckpointError, match="has no migration"):
        ckpt.load_potential(saved)


def test_migration_chain_is_applied(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = torch.load(saved, weights_only=True)
    data["version"] = 0
    data["old_meta"] = data.pop("meta")
    resave(data, saved)

    def upgrade(d: dict) -> dict:
        d["meta"] = d.pop("old_meta")
        return d

    monkeypatch.setitem(ckpt.MIGRATIONS, 0, upgrade)
    assert ckpt.load_potential(saved).meta.backbone == "schnet"


class Payload:  # an arbitrary class: weights_only loading must refuse to build it
    def __reduce__(self) -> tuple:
        return (print, ("this code must never run",))


def test_pickled_code_is_refused(saved: Path) -> None:
    data = torch.load(saved, weights_only=True)
    data["extra"] = Payload()
    resave(data, saved)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        ckpt.load_potential(saved)


def test_truncated_file(saved: Path) -> None:
    raw = saved.read_bytes()
    saved.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        ckpt.load_potential(saved)


def test_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a trustpot checkpoint"):
        ckpt.load_potential(path)


def test_wrong_shapes_refused(saved: Path) -> None:
    data = torch.load(saved, weights_only=True)
    key = next(k for k, v in data["model"].items() if v.ndim == 2)
    data["model"] = collections.OrderedDict(data["model"])
    data["model"][key] = torch.zeros(3, 3)
    resave(data, saved)
    with pytest.raises(CheckpointError, match="do not fit"):
        ckpt.load_potential(saved)


def test_nan_weights_refused(saved: Path) -> None:
    data = torch.load(saved, weights_only=True)
    key = next(k for k, v in data["model"].items() if v.ndim == 2)
    data["model"][key] = torch.full_like(data["model"][key], float("nan"))
    resave(data, saved)
    with pytest.raises(CheckpointError, match="NaN"):
        ckpt.load_potential(saved)


def test_edited_weights_are_detected(saved: Path) -> None:
    data = torch.load(saved, weights_only=True)
    key = next(k for k, v in data["model"].items() if v.ndim == 2)
    data["model"][key] = data["model"][key] + 1e-3
    torch.save(data, saved)  # not re-signed: a silent edit
    with pytest.raises(CheckpointError, match="does not match its SHA-256 digest"):
        ckpt.load_potential(saved)
