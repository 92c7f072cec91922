"""Training the two experts of a scale mixture separately, with trustpot's Trainer.

Decision (docs/scales.md): the short-scale and long-range branches are trained *separately*, on the
same training data with the same budget (epochs and minutes), each on its own energy and force
loss; the mixture's scale plays no part in their training. This keeps each branch an honest
expert of its own scale (a mixture trained at one fixed s would make the branches co-adapt to that
s, and the oracle analysis would then measure the co-adaptation, not the scales).

:class:`BranchModel` exposes one branch of a mixture with the interface the Trainer needs
(``forward``, ``energy_scale``, ``payload``); the other branch is neither evaluated nor trained.
Its checkpoints are whole ``"scale-mixture"`` checkpoints, so ``best.ckpt`` of a branch run is a
loadable model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor, nn

from trustpot.config import TrainConfig
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.io.checkpoint import load_model
from trustpot.models.base import Embedding
from trustpot.models.mixture import LONG, SHORT, ScaleMixturePotential, graph_for_list
from trustpot.models.potential import DEFAULT_OUTPUTS, compute_outputs
from trustpot.train.losses import LossWeights
from trustpot.train.plateau import run_plateau
from trustpot.train.reuse import run_step
from trustpot.train.trainer import Objective, Trainer, TrainResult

BRANCHES: Final = (SHORT, LONG)
_PREFIX: Final = "mixture."


def branch_parameter_names(which: str) -> tuple[str, ...]:
    """Prefixes of the mixture parameters that belong to branch ``which``."""
    if which == SHORT:
        return ("short.",)
    if which == LONG:
        return ("long.", "charges.", "electrostatics.")
    raise ValueError(f"branch must be one of {BRANCHES}, got {which!r}")


class BranchModel(nn.Module):
    """One branch of ``mixture`` as a stand-alone potential (for training).

    Only that branch's parameters require gradients (the others are frozen in place; call
    :meth:`release` to unfreeze everything). The energy is the branch's full energy
    (``energy_short`` or ``energy_long`` of the mixture, Coulomb included for the long branch).
    """

    def __init__(self, mixture: ScaleMixturePotential, which: str) -> None:
        super().__init__()
        prefixes = branch_parameter_names(which)
        self.mixture = mixture
        self.which = which
        for name, p in mixture.named_parameters():
            p.requires_grad_(name.startswith(prefixes))

    @property
    def energy_scale(self) -> Tensor:
        return self.mixture.energy_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.mixture.dtype

    def neighbor_lists(self) -> list[NeighborListSpec]:
        """The one list this branch reads (``"short"`` or ``"long"``)."""
        return [spec for spec in self.mixture.neighbor_lists() if spec.name == self.which]

    def release(self) -> None:
        """Make every parameter of the mixture trainable again."""
        for p in self.mixture.parameters():
            p.requires_grad_(True)

    def node_energies(self, g: Graph) -> tuple[Tensor, Embedding]:
        """[n_atoms] per-atom energies of the branch (eV, float64) and its embedding."""
        if self.which == SHORT:
            return self.mixture.short.node_energies(graph_for_list(g, SHORT))
        e_long, _, _, emb = self.mixture.long_parts(g)
        return e_long, emb

    def forward(
        self,
        g: Graph,
        outputs: Iterable[str] = DEFAULT_OUTPUTS,
        create_graph: bool | None = None,
    ) -> dict[str, Tensor]:
        """``energy`` [n_graphs] eV, ``forces`` [n_atoms, 3] eV/Å (and stress/virial) of the
        branch alone."""
        create = self.training if create_graph is None else create_graph
        return compute_outputs(self.node_energies, g, frozenset(outputs), create)

    def payload(self, state: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """A ``"scale-mixture"`` checkpoint of the whole mixture (weights from ``state``)."""
        inner = None
        if state is not None:
            inner = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
        return self.mixture.payload(inner)


def copy_branch(source: ScaleMixturePotential, target: ScaleMixturePotential, which: str) -> None:
    """Copy the weights of branch ``which`` from ``source`` into ``target`` (same metadata)."""
    prefixes = branch_parameter_names(which)
    src = source.state_dict()
    own = {k: v for k, v in src.items() if k.startswith(prefixes)}
    target.load_state_dict({**target.state_dict(), **own}, strict=True)


def train_branch(
    mixture: ScaleMixturePotential,
    which: str,
    train: GraphDataset,
    valid: GraphDataset,
    cfg: TrainConfig,
    out: str | Path,
    weights: LossWeights | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train branch ``which`` of ``mixture`` in place: a step under the one reuse rule
    (:func:`trustpot.train.reuse.run_step`) in the folder ``out``.

    Writes ``out/best.ckpt`` and ``out/last.ckpt`` (scale-mixture checkpoints), ``metrics.csv``
    and ``out/state.json``. A finished step with the same options is not retrained: its weights
    are read from ``best.ckpt``. An unfinished one (a killed run) continues from ``last.ckpt``.
    One with other options (or data sizes) is a ConfigError naming them.

    Args:
        train, valid: datasets holding the branch's neighbour list (and any other).
        cfg: training options (epochs, minutes, learning rate...).

    Returns:
        The summary stored in ``state.json`` (epochs, best epoch, minutes, validation metrics)
        and ``val_loss_tail_gain``: how much the best validation loss still fell over the last
        quarter of the run (:func:`trustpot.train.plateau.tail_gain`).
    """
    out = Path(out)
    best = out / "best.ckpt"
    weights = weights or LossWeights()
    config = {
        "branch": which,
        "train": dataclasses.asdict(cfg),
        "weights": dataclasses.asdict(weights),
        "n_train": len(train),
        "n_valid": len(valid),
    }
    train_options = config["train"]
    assert isinstance(train_options, dict)
    for key in ("threads", "device"):  # where it runs does not change what is trained
        train_options.pop(key, None)

    def work(folder: Path, resuming: bool) -> dict[str, Any]:
        model = BranchModel(mixture, which)
        try:
            trainer = Trainer(model, [Objective("main", "main", weights)], cfg)
            last = folder / "last.ckpt"
            if last.is_file():
                trainer.load_training_state(last)
                log(f"{which} branch: resuming at epoch {trainer.epoch}")
            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log(
                f"{which} branch: training {n_params} parameters on {len(train)} structures "
                f"(at most {cfg.epochs} epochs, {cfg.max_minutes:g} min)"
            )
            result: TrainResult = trainer.fit({"main": train}, {"main": valid}, folder, log=log)
        finally:
            model.release()
        return {
            "branch": which,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "minutes": result.elapsed_s / 60.0,
            "stopped_by": result.stopped_by,
            "best_metrics": result.best_metrics,
        }

    summary = run_step(out, config, work)
    # how far from its plateau the branch stopped (the one plateau measure of the benchmarks)
    gain = run_plateau(out / "metrics.csv", "val_loss")["tail_gain"]
    summary["val_loss_tail_gain"] = gain if math.isfinite(gain) else None
    copy_branch(load_model(best, ScaleMixturePotential), mixture, which)
    if summary.get("reused"):
        log(f"{which} branch: reusing {best} (trained before: {summary.get('epochs')} epochs)")
    return summary


__all__ = [
    "BRANCHES",
    "BranchModel",
    "branch_parameter_names",
    "copy_branch",
    "train_branch",
]
