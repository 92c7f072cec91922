"""Loading reliability wrappers with their type checked.

A wrapper checkpoint is an ordinary trustpot checkpoint whose ``kind`` is ``uq:<method>``
(``meta``/``model`` the base potential, ``extra`` the method's own settings, weights and
:class:`~trustpot.uq.base.Recalibration`); it is written with
:func:`trustpot.io.checkpoint.save_model` and read with
:func:`trustpot.io.checkpoint.load_model`, like every other model kind.
"""

from __future__ import annotations

from pathlib import Path

from trustpot.errors import CheckpointError
from trustpot.io.checkpoint import load_model, save_model
from trustpot.uq.base import UQModel

__all__ = ["load_uq", "save_uq"]

#: a wrapper is saved like any model
save_uq = save_model


def load_uq(path: str | Path) -> UQModel:
    """The wrapper stored at ``path`` (read with ``weights_only=True``), in eval mode."""
    model = load_model(path)
    if not isinstance(model, UQModel):
        raise CheckpointError(
            f"{path}: holds a '{model.kind}' model, not a reliability wrapper (trustpot uq fit)"
        )
    return model
