"""Options of ``trustpot scales run``, the seed's numbers, and the check that a rerun in the same
folder uses the same training settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trustpot.bench.scales.contacts import CONTACT_THRESHOLD
from trustpot.bench.scales.testbeds import FORCE_CAP
from trustpot.errors import ConfigError
from trustpot.options import option
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


#: Where the DFT files live relative to the repository (``../shared/data/nacl_water``).
DEFAULT_DFT_DIR = str(Path("..") / "shared" / "data" / "nacl_water")
#: Subset caps of the DFT testbed in quick mode (train, valid, test).
QUICK_DFT_CAPS = (48, 16, 24)


@dataclasses.dataclass(frozen=True)
class FileData:
    """Data given as files or ``split.json:SUBSET`` specifications (no ``--testbed``)."""

    train: tuple[str, ...] = option((), "training data (files or manifests)")
    valid: tuple[str, ...] = option((), "calibration data (default: hold out a share of train)")
    test: tuple[str, ...] = option((), "test data")

    def validate(self) -> None:
        """Raise :class:`ConfigError` when training or test data are missing."""
        if not self.train or not self.test:
            raise ConfigError("give --train and --test data, or --testbed dft|openmm")


@dataclasses.dataclass(frozen=True)
class DFTTestbedOptions:
    """The revPBE0-D3 testbed (:func:`trustpot.bench.scales.testbeds.prepare_dft`). Caps of 0 keep
    every frame; unset caps are 0, or 48/16/24 with ``--quick``."""

    data_dir: str = option(DEFAULT_DFT_DIR, "folder of the revPBE0-D3 files")
    max_train: int | None = option(None, "cap on training frames (0: all; quick 48)")
    max_valid: int | None = option(None, "cap on calibration frames (0: all; quick 16)")
    max_test: int | None = option(None, "cap on test frames (0: all; quick 24)")
    force_cap: float = option(
        FORCE_CAP, "exclude frames with a force component above this, eV/Å (0: off)"
    )

    def caps(self, quick: bool) -> tuple[int, int, int]:
        """(train, valid, test) caps, 0 meaning all."""
        given = (self.max_train, self.max_valid, self.max_test)
        return tuple(  # type: ignore[return-value]
            (q if quick else 0) if v is None else v for v, q in zip(given, QUICK_DFT_CAPS)
        )

    def validate(self) -> None:
        for name in ("max_train", "max_valid", "max_test", "force_cap"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class OpenMMTestbedOptions:
    """The OpenMM NaCl(aq) testbed (:func:`trustpot.bench.scales.testbeds.prepare_openmm`)."""

    frames: int | None = option(None, "frames per ion-pair count (full 120, quick 8)")

    def validate(self) -> None:
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"--frames must be >= 1, got {self.frames}")


#: ``--testbed`` value (``files`` when none is given) -> options of that data source
DATA_MODES: dict[str, type[Any]] = {
    "files": FileData,
    "dft": DFTTestbedOptions,
    "openmm": OpenMMTestbedOptions,
}
