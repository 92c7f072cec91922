"""What a :class:`~trustpot.train.trainer.Trainer` saves in ``last.ckpt`` and reads back to
resume a run bit-identically: raw weights, optimiser, schedule, EMA, counters, best metrics,
the losses' own state and what hooks kept in ``user_state``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import Tensor

from trustpot.errors import TrainingError
from trustpot.io.checkpoint import model_summary, read_checkpoint, save_checkpoint
from trustpot.models.contract import Model

# ``t`` below is a trustpot.train.trainer.Trainer (not imported here: the trainer imports this)
Trainer = Any


def state_of(t: Trainer) -> dict[str, Any]:
    """The training state of ``t`` (tensors are not copied)."""
    return {
        "raw_model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "schedule": dict(t.schedule.state),
        "ema": t.ema.state_dict() if t.ema is not None else None,
        "epoch": t.epoch,
        "step": t.step,
        "elapsed": t.elapsed,
        "best_val": t.best_val,
        "best_epoch": t.best_epoch,
        "bad_epochs": t.bad_epochs,
        "best_metrics": dict(t.best_metrics),
        "config": t.run_config,
        "losses": {o.name: o.kind.state_dict() for o in t.objectives},
        "user": copy.deepcopy(t.user_state),
    }


def restore_state(t: Trainer, path: Path) -> None:
    """Load the training state saved in the checkpoint ``path`` into ``t``.

    Raises:
        TrainingError: the checkpoint holds no training state.
    """
    data = read_checkpoint(path)
    state = data.get("training")
    if not isinstance(state, dict):
        raise TrainingError(f"{path}: holds no training state to resume from")
    t.model.load_state_dict(state["raw_model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.schedule.state = dict(state["schedule"])
    if t.ema is not None and state["ema"] is not None:
        t.ema.load_state_dict(state["ema"])
    t.epoch = int(state["epoch"])
    t.step = int(state["step"])
    t.elapsed = float(state["elapsed"])
    t.best_val = float(state["best_val"])
    t.best_epoch = int(state["best_epoch"])
    t.bad_epochs = int(state["bad_epochs"])
    t.best_metrics = {k: float(v) for k, v in state["best_metrics"].items()}
    for obj in t.objectives:
        obj.kind.load_state_dict(state.get("losses", {}).get(obj.name, {}))
    t.user_state = copy.deepcopy(state.get("user", {}))


def checkpoint_payload(t: Trainer, state: dict[str, Tensor], with_training: bool) -> dict[str, Any]:
    """What a checkpoint of ``t`` holds with the weights ``state``: the model's payload
    (``payload_fn``, else the model's own ``payload``), its summary, the training state when
    ``with_training`` (``last.ckpt``) and the ``extra_payload``."""
    if t.payload_fn is not None:
        payload: dict[str, Any] = t.payload_fn(state)
    elif callable(own := getattr(type(t.model), "payload", None)):
        payload = own(t.model, state)  # each model (or a view of one) knows its kind
    else:
        raise TrainingError(
            f"{type(t.model).__name__} has no payload(): pass payload_fn to say what its "
            "checkpoints hold"
        )
    if isinstance(t.model, Model) and payload.get("kind") == t.model.kind:
        payload.setdefault("summary", model_summary(t.model))
    if with_training:
        payload["training"] = state_of(t)
    if t.extra_payload is not None:
        payload["extra"] = t.extra_payload()
    return payload


def write_checkpoints(t: Trainer, run_dir: Path) -> None:
    """``best.ckpt`` (if it changed) and ``last.ckpt`` of ``t``, each atomically, best first."""
    if t._best_dirty and t._best_state is not None:
        save_checkpoint(checkpoint_payload(t, t._best_state, False), run_dir / "best.ckpt")
        t._best_dirty = False
    save_checkpoint(checkpoint_payload(t, t.inference_state(), True), run_dir / "last.ckpt")
