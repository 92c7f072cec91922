"""Checkpoints of scale mixtures (kind ``"scale-mixture"``) in trustpot's checkpoint format.

The payload is the usual one (:mod:`trustpot.io.checkpoint`): ``kind``, ``meta``
(:meth:`ScaleMixtureMeta.to_dict`), ``model`` (state dict) and optional ``extra``. Reading goes
through :func:`~trustpot.io.checkpoint.read_checkpoint` (``weights_only``, digest, version), and
then every tensor's name and shape is checked against a freshly built mixture before loading, so a
mismatch is a :class:`~trustpot.errors.CheckpointError` that names the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import torch

from trustpot.errors import CheckpointError, ConfigError
from trustpot.io.checkpoint import read_checkpoint, save_checkpoint
from trustpot.scales.build import mixture_from_meta
from trustpot.scales.mixture import ScaleMixtureMeta, ScaleMixturePotential

MIXTURE_KIND: Final = "scale-mixture"


def mixture_payload(
    model: ScaleMixturePotential, state: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Checkpoint fields of a mixture (weights from ``state`` when given, e.g. EMA weights)."""
    return {
        "kind": MIXTURE_KIND,
        "meta": model.meta.to_dict(),
        "model": state if state is not None else model.state_dict(),
    }


def save_scale_mixture(
    model: ScaleMixturePotential, path: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write ``model`` atomically to ``path`` (with an optional ``extra`` payload)."""
    payload = mixture_payload(model)
    if extra is not None:
        payload["extra"] = extra
    save_checkpoint(payload, path)


def mixture_from_checkpoint_dict(
    data: dict[str, Any], path: str | Path = "checkpoint"
) -> ScaleMixturePotential:
    """Rebuild the mixture of a checkpoint dict, checking names, shapes and finiteness."""
    if data.get("kind") != MIXTURE_KIND:
        raise CheckpointError(f"{path}: holds a '{data.get('kind')}' model, not a {MIXTURE_KIND}")
    try:
        meta = ScaleMixtureMeta.from_dict(data["meta"])
        model = mixture_from_meta(meta)
    except (TypeError, KeyError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{path}: malformed scale-mixture metadata: {err}") from None
    state = data["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model' is not a state dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the scale mixture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, tensor in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: '{name}' is not a tensor")
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(value.shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: tensor '{name}' holds NaN or inf")
    model.load_state_dict(state, strict=True)
    return model


def load_scale_mixture(path: str | Path) -> ScaleMixturePotential:
    """The scale mixture stored at ``path``, in eval mode."""
    data = read_checkpoint(path)
    return mixture_from_checkpoint_dict(data, path).eval()
