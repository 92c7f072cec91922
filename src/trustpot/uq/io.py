"""Saving and loading reliability wrappers as versioned, digest-checked checkpoints.

A wrapper checkpoint is an ordinary trustpot checkpoint (:mod:`trustpot.io.checkpoint`) whose
``kind`` is ``uq:<method>``; ``meta``/``model`` hold the base potential and ``extra`` the
method's own hyper-parameters, weights and :class:`~trustpot.uq.base.Recalibration`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustpot.errors import CheckpointError
from trustpot.io.checkpoint import read_checkpoint, save_checkpoint
from trustpot.uq.base import UQModel

KIND_PREFIX = "uq:"


def uq_methods() -> dict[str, type[UQModel]]:
    """Method name -> wrapper class, for every built-in reliability method."""
    from trustpot.uq.ensemble import DeepEnsemble, MCDropout
    from trustpot.uq.perturb import PerturbedPotential
    from trustpot.uq.probe import Probe

    return {cls.kind: cls for cls in (DeepEnsemble, MCDropout, Probe, PerturbedPotential)}


def save_uq(model: UQModel, path: str | Path) -> None:
    """Write ``model`` atomically to ``path``."""
    payload = model.payload()
    payload["kind"] = KIND_PREFIX + model.kind
    save_checkpoint(payload, path)


def uq_from_checkpoint_dict(data: dict[str, Any], path: str | Path) -> UQModel:
    """Rebuild a wrapper from a validated checkpoint dict."""
    kind = str(data["kind"])
    if not kind.startswith(KIND_PREFIX):
        raise CheckpointError(
            f"{path}: holds a '{kind}' model, not a reliability wrapper (trustpot uq fit ...)"
        )
    methods = uq_methods()
    name = kind[len(KIND_PREFIX) :]
    if name not in methods:
        raise CheckpointError(f"{path}: unknown reliability method '{name}'")
    extra = data.get("extra")
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: wrapper checkpoint lacks its 'extra' payload")
    return methods[name].from_payload(data, str(path)).eval()


def load_uq(path: str | Path) -> UQModel:
    """The wrapper stored at ``path`` (read with ``weights_only=True``), in eval mode."""
    return uq_from_checkpoint_dict(read_checkpoint(path), path)
