"""Options of ``trustpot scales run``, the seed's numbers, and the check that a rerun in the same
folder uses the same training settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trustpot.bench.scales.contacts import CONTACT_THRESHOLD
from trustpot.train.reuse import step_status, write_state

#: The seed's numbers (force MAE; the seed does not state its unit).
SEED = {
    "fixed": 399.65,
    "oracle_hard_structure": 382.67,
    "oracle_continuous_structure": 380.96,
    "pool": 381.23,
    "contact_fixed": 327.22,
    "contact_adaptive": 260.51,
    "pool_members": [0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0],
}


#: The router starts at the best fixed scale clipped to [margin, 1 - margin] (no saturation).
ROUTER_INIT_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class ScalesOptions:
    """Options of a scale run (``quick()`` gives the CI-sized defaults).

    Branch sizes: both branches use ``n_features`` and ``n_layers`` (a SchNet branch also
    ``schnet_rbf`` Gaussians and ``schnet_filters`` filters); the short one reads a
    ``short_cutoff`` neighbour list, the long one ``long_cutoff`` plus learned-charge Ewald (whose
    real-space cutoff is ``long_cutoff``; beyond it the reciprocal sum carries the Coulomb
    energy to any range). By default both are PaiNN, so the branches differ only in scale.
    The budget is the same for both branches: ``epochs`` passes over the same training frames
    (the long branch takes longer per epoch). ``branch_minutes`` caps each branch's time; the long
    branch trains first, and if the cap stops it early the short branch gets the epochs it had.
    """

    short_backbone: str = "painn"
    long_backbone: str = "painn"
    short_cutoff: float = 4.0
    long_cutoff: float = 6.0
    n_features: int = 32
    n_layers: int = 2
    schnet_rbf: int = 16
    schnet_filters: int = 32
    electrostatics: str = "ewald"
    epochs: int = 12
    branch_minutes: float = 20.0
    batch_size: int = 4
    lr: float = 3e-3
    router_epochs: int = 50
    router_minutes: float = 4.0
    router_lr: float = 1e-2
    router_hidden: int = 32
    valid_fraction: float = 0.2
    threshold: float = CONTACT_THRESHOLD
    tol: float = 1e-4
    min_spacing: float = 1.0 / 64
    max_rounds: int = 10
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    quick: bool = False

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> ScalesOptions:
        """Tiny branches and budgets: the whole run in about a minute on 2 cores."""
        base: dict[str, Any] = dict(
            n_features=8,
            n_layers=1,
            epochs=10,
            branch_minutes=0.4,
            batch_size=4,
            lr=1e-2,
            router_epochs=3,
            router_minutes=0.3,
            router_hidden=8,
            max_rounds=4,
            quick=True,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @classmethod
    def full_defaults(cls, **overrides: Any) -> ScalesOptions:
        return cls(**{k: v for k, v in overrides.items() if v is not None})


#: Options that only change the analysis, not what is trained (free to change on a rerun).
ANALYSIS_ONLY = ("threads", "device", "tol", "threshold", "max_rounds", "min_spacing")


def check_settings(
    out: Path,
    opts: ScalesOptions,
    train: Sequence[str],
    valid: Sequence[str],
    n_train: int,
    n_valid: int,
) -> dict[str, Any]:
    """Refuse to reuse checkpoints of ``out`` trained with other settings or data (the test
    data may change: nothing is trained on it).

    The run folder is a step under the one reuse rule (:mod:`trustpot.train.reuse`): its
    ``state.json`` holds these settings; a different config is a ConfigError naming the keys.
    A new folder gets a ``running`` state (see :func:`mark_done`)."""
    settings = {
        **{k: v for k, v in dataclasses.asdict(opts).items() if k not in ANALYSIS_ONLY},
        "train_data": list(train),
        "valid_data": list(valid),
        "n_train": n_train,
        "n_valid": n_valid,
    }
    if step_status(out, settings) == "new":
        write_state(out, {"status": "running", "config": settings, "result": {}})
    return settings


def mark_done(out: Path, settings: dict[str, Any], result: dict[str, Any]) -> None:
    """Record a finished scales run (its trained steps are reused on a rerun; the analysis,
    whose options are free to change, always runs again)."""
    write_state(out, {"status": "done", "config": settings, "result": result})
