"""Helpers of loops that run on the trainer inside a library function (PROBE, perturbations,
the scale router...): a run folder (temporary when none is given), a checkpoint payload of
plain weights, and the best weights of a finished run."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from trustpot.errors import CheckpointError
from trustpot.io.checkpoint import read_checkpoint

if TYPE_CHECKING:
    from trustpot.train.trainer import Trainer


@contextmanager
def run_folder(run_dir: str | Path | None) -> Iterator[Path]:
    """``run_dir`` (created), or a temporary folder removed afterwards when it is ``None``."""
    if run_dir is not None:
        folder = Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="trustpot-run-") as tmp:
        yield Path(tmp)


def state_payload(kind: str) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """Checkpoint fields holding only a state dict: ``kind`` names the loop that wrote it.
    Such checkpoints resume a loop; they are not models to load with ``load_potential``."""

    def payload(state: dict[str, Tensor]) -> dict[str, Any]:
        return {"kind": kind, "meta": {"loop": kind}, "model": dict(state)}

    return payload


def best_weights(trainer: Trainer, folder: Path) -> dict[str, Tensor]:
    """Inference weights of the best epoch: in memory, else (after a resume that did not
    improve) from ``folder/best.ckpt``."""
    state = trainer.best_state()
    if state is not None:
        return state
    path = Path(folder) / "best.ckpt"
    if not path.is_file():
        raise CheckpointError(f"{folder}: the run finished without a best.ckpt")
    weights: dict[str, Tensor] = read_checkpoint(path)["model"]
    return weights
