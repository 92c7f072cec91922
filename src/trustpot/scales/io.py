"""Saving and loading scale mixtures (kind ``"scale-mixture"``) through the one checkpoint
module, :mod:`trustpot.io.checkpoint`; a mixture writes and reads its own fields
(:meth:`ScaleMixturePotential.payload` / ``from_payload``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustpot.errors import CheckpointError
from trustpot.io.checkpoint import load_model, save_model
from trustpot.scales.mixture import ScaleMixturePotential


def save_scale_mixture(
    model: ScaleMixturePotential, path: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write ``model`` atomically to ``path`` (with an optional ``extra`` payload)."""
    if extra is None:
        save_model(model, path)
    else:
        save_model(model, path, extra=extra)


def load_scale_mixture(path: str | Path) -> ScaleMixturePotential:
    """The scale mixture stored at ``path``, in eval mode; any other kind is an error."""
    model = load_model(path)
    if not isinstance(model, ScaleMixturePotential):
        raise CheckpointError(f"{path}: holds a '{model.kind}' model, not a scale mixture")
    return model
