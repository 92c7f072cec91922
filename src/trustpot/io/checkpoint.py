"""Checkpoint files: the format, its versions and migrations, and dispatch to model kinds.

A checkpoint is a plain dict of tensors and builtins, loaded with
``torch.load(weights_only=True)`` so that opening a file cannot run code. Layout (version 2)::

    format: "trustpot-checkpoint"
    version: int                  # CHECKPOINT_VERSION when written
    digest: str                   # SHA-256 of every other field
    trustpot_version: str
    kind: str                     # registry name of the model kind ("potential", "uq:probe"...)
    meta: {...}                   # what the kind needs to rebuild the model
    model: state_dict             # inference weights (EMA weights when EMA is on)
    summary: {...}                # version 2: species, neighbour lists and outputs declared by
                                  # the model contract when saved; checked after loading
    training: {...} | absent      # optimizer, schedule, epoch, rng: only in last.ckpt
    extra: {...} | absent         # kind-specific payload

The digest is stored inside the file, so it detects corruption (a truncated or bit-flipped
file), not deliberate edits: whoever can edit the file can recompute it. Older versions are
upgraded by ``MIGRATIONS[v]`` (v -> v + 1) in order. Which class rebuilds a checkpoint is the
registry's business (kind ``"model"``): this module names no model class.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import torch

from trustpot.errors import CheckpointError
from trustpot.models.contract import Model
from trustpot.models.potential import Potential
from trustpot.registry import canonical_name, lookup, names
from trustpot.version import __version__

M = TypeVar("M", bound=Model)

CHECKPOINT_FORMAT = "trustpot-checkpoint"
CHECKPOINT_VERSION = 2


def _migrate_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had no ``summary``: mark it unknown (nothing to check it against)."""
    data = dict(data)
    data["summary"] = None
    return data


#: MIGRATIONS[v] turns a version-v dict into a version-(v+1) dict.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _migrate_1_to_2}


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
    """Write checkpoint fields (plus format, version and digest) atomically to ``path``.

    Most callers want :func:`save_model`; this is for payloads with extra fields
    (``training``) such as the trainer's ``last.ckpt``.

    The file is written to ``path.tmp`` and renamed, so a kill never leaves a half-written
    checkpoint under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data["format"] = CHECKPOINT_FORMAT
    data["version"] = CHECKPOINT_VERSION
    data["trustpot_version"] = __version__
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
        CheckpointError: missing file, not a trustpot checkpoint, corrupted or truncated file,
            or a version this trustpot cannot read.
    """
    path = Path(path)
    if not path.is_file():
        pretrained = names("pretrained")
        hint = f" (nor a pretrained model: {', '.join(pretrained)})" if pretrained else ""
        raise CheckpointError(f"{path}: no such checkpoint{hint}")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
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
            f"(corrupted, truncated or not a trustpot file): {first}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a trustpot checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    digest = data.pop("digest", None)
    if digest is None or checkpoint_digest(data) != digest:
        raise CheckpointError(
            f"{path}: content does not match its SHA-256 digest (corrupted or edited file)"
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
    checked: dict[str, Any] = data
    return checked


def model_summary(model: Model) -> dict[str, Any]:
    """What the model contract declares: kind, species, neighbour lists and outputs."""
    return {
        "kind": model.kind,
        "species": [int(z) for z in model.species],
        "neighbor_lists": {spec.name: float(spec.cutoff) for spec in model.neighbor_lists()},
        "outputs": sorted(model.supported_outputs()),
    }


def model_from_checkpoint_dict(data: dict[str, Any], path: str | Path = "checkpoint") -> Model:
    """Rebuild the model of a validated checkpoint dict through the registry, in eval mode.

    Raises:
        CheckpointError: unknown kind, malformed fields, weights that do not fit, or a model
            whose declared species, neighbour lists or outputs differ from those saved.
    """
    kind = str(data["kind"])
    if kind not in names("model"):
        raise CheckpointError(
            f"{path}: unknown model kind '{kind}'; known: {', '.join(names('model'))} "
            "(a plug-in kind needs its package installed)"
        )
    cls = lookup("model", kind)
    model: Model = cls.from_payload(data, str(path))
    saved = data.get("summary")
    if isinstance(saved, dict):
        now = model_summary(model)
        diff = sorted(k for k in now if k in saved and saved[k] != now[k])
        if diff:
            raise CheckpointError(
                f"{path}: the model rebuilt by this trustpot differs from the one saved in "
                + "; ".join(f"{k}: saved {saved[k]}, now {now[k]}" for k in diff)
            )
    return model.eval()


@overload
def load_model(path: str | Path) -> Model: ...


@overload
def load_model(path: str | Path, expect: type[M]) -> M: ...


def load_model(path: str | Path, expect: type[Model] = Model) -> Model:
    """The model stored at ``path``, in eval mode: the one loader for every kind.

    Read with ``weights_only=True``; every tensor's name and shape is checked. A pretrained
    model's name (``trustpot pretrained list``) works wherever a path does.

    Args:
        path: a checkpoint file, or the name of a pretrained model.
        expect: the class the caller needs (``Potential``, ``UQModel``,
            ``ScaleMixturePotential``...); another kind is a :class:`CheckpointError`. By
            default any :class:`~trustpot.models.contract.Model`.
    """
    if not Path(path).is_file() and canonical_name("pretrained", str(path)) in names("pretrained"):
        model = lookup("pretrained", str(path)).load()
    else:
        model = model_from_checkpoint_dict(read_checkpoint(path), path)
    if not isinstance(model, expect):
        raise CheckpointError(
            f"{path}: holds a '{model.kind}' model, not a {expect.__name__} "
            f"(kinds: {', '.join(names('model'))})"
        )
    return model


def save_model(model: Model, path: str | Path, **fields: Any) -> None:
    """Write ``model`` (its :meth:`~trustpot.models.contract.Model.payload` and summary, plus
    any extra checkpoint ``fields`` such as ``extra``) atomically to ``path``."""
    payload = model.payload()
    payload["summary"] = model_summary(model)
    payload.update(fields)
    save_checkpoint(payload, path)


def load_potential(path: str | Path) -> Potential:
    """The plain potential stored at ``path`` (shorthand for ``load_model(path, Potential)``)."""
    return load_model(path, Potential)
