"""Versioned checkpoints, written atomically and read as untrusted input.

A checkpoint is a plain dict of tensors and builtins, loaded with
``torch.load(weights_only=True)`` so a tampered file cannot run code. Layout (version 1)::

    format: "trustpot-checkpoint"
    version: int                  # CHECKPOINT_VERSION when written
    digest: str                   # SHA-256 of every other field: edits are detected
    trustpot_version: str
    kind: "potential" | <wrapper kind>
    meta: ModelMeta.to_dict()
    model: state_dict             # inference weights (EMA weights when EMA is on)
    training: {...} | absent      # optimizer, schedule, epoch, rng: only in last.ckpt
    extra: {...}                  # wrapper-specific payload

Older versions are upgraded by ``MIGRATIONS[v]`` (v -> v + 1) in order.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trustpot.errors import CheckpointError
from trustpot.models.build import potential_from_meta
from trustpot.models.potential import ModelMeta, Potential

CHECKPOINT_FORMAT = "trustpot-checkpoint"
CHECKPOINT_VERSION = 1
#: MIGRATIONS[v] turns a version-v dict into a version-(v+1) dict.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _package_version() -> str:
    from trustpot import __version__

    return __version__


def checkpoint_digest(value: Any, h: Any | None = None) -> Any:
    """SHA-256 over a nested structure of dicts, lists, tensors and builtins (keys sorted)."""
    top = h is None
    h = hashlib.sha256() if h is None else h
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"D")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            checkpoint_digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(b"L")
        for item in value:
            checkpoint_digest(item, h)
    else:
        h.update(repr(value).encode())
    return h.hexdigest() if top else h


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` (plus format and version fields) atomically to ``path``.

    The file is written to ``path.tmp`` and renamed, so a kill never leaves a half-written
    checkpoint under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data["format"] = CHECKPOINT_FORMAT
    data["version"] = CHECKPOINT_VERSION
    data["trustpot_version"] = _package_version()
    data.pop("digest", None)
    data["digest"] = checkpoint_digest(data)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint dict (no model is built).

    Raises:
        CheckpointError: missing file, not a trustpot checkpoint, tampered or truncated file,
            or a version this trustpot cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
    ) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a loadable checkpoint "
            f"(tampered, truncated or not a trustpot file): {first}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a trustpot checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    digest = data.pop("digest", None)
    if digest is None or checkpoint_digest(data) != digest:
        raise CheckpointError(
            f"{path}: content does not match its SHA-256 digest (tampered or corrupted file)"
        )
    version = data.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: checkpoint has no integer version")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {version} was written by a newer trustpot "
            f"({data.get('trustpot_version')}); this one reads up to {CHECKPOINT_VERSION}"
        )
    while version < CHECKPOINT_VERSION:
        if version not in MIGRATIONS:
            raise CheckpointError(
                f"{path}: checkpoint version {version} (trustpot {data.get('trustpot_version')}) "
                f"has no migration to version {CHECKPOINT_VERSION}"
            )
        data = MIGRATIONS[version](data)
        version += 1
        data["version"] = version
    for key in ("meta", "model", "kind"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks the '{key}' field")
    return data


def potential_from_checkpoint_dict(
    data: dict[str, Any], path: str | Path = "checkpoint"
) -> Potential:
    """Rebuild the potential stored in a checkpoint dict and check every tensor's shape."""
    try:
        meta = ModelMeta.from_dict(data["meta"])
        model = potential_from_meta(meta)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed model metadata: {err}") from None
    state = data["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model' is not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not fit the model they claim to be: {' '.join(first[:2])}"
        ) from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor '{name}' holds NaN or inf")
    return model


def load_potential(path: str | Path) -> Potential:
    """The potential stored at ``path``, in eval mode."""
    data = read_checkpoint(path)
    if data["kind"] != "potential":
        raise CheckpointError(f"{path}: holds a '{data['kind']}' model, not a plain potential")
    return potential_from_checkpoint_dict(data, path).eval()


def potential_payload(model: Potential, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checkpoint fields of a plain potential (weights from ``state`` when given)."""
    return {
        "kind": "potential",
        "meta": model.meta.to_dict(),
        "model": state if state is not None else model.state_dict(),
    }
