"""Options of ``trustpot learn``: one frozen dataclass, one flag per field.

Options that only one engine or one reliability method uses default to ``None`` and are an
error, naming the flag, with another engine or method (:meth:`LearnOptions.validate`), so no
flag is silently ignored. ``--quick`` is a preset (:func:`quick_values`): it fills in small
values for every option the user did not set, never overriding one that was set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from trustpot.config import RunConfig, load_config
from trustpot.errors import ConfigError
from trustpot.learn.engines import ORACLES, NaClWaterOracle, NBodyOracle, Oracle, XTBOracle
from trustpot.learn.select import SCORES
from trustpot.options import flag_of, option
from trustpot.parallel import Workers, workers_from_flags

#: ``--uq`` choices: the reliability methods of :mod:`trustpot.uq`, and random selection.
UQ_METHODS = ("ensemble", "mc-dropout", "probe", "perturb", "random")
#: Defaults of the options that only some engines or methods use (``None`` in the dataclass).
DEFAULTS: dict[str, Any] = {
    "n_models": 3,
    "uq_minutes": 0.5,
    "calibration_fraction": 0.2,
    "pool_factor": 4.0,
    "initial_frames": 8,
    "test_frames": 20,
}
#: Training options of the ``--quick`` preset: a small PaiNN.
QUICK_OVERRIDES = ("model.hypers.n_features=16", "model.hypers.n_layers=2")


@dataclasses.dataclass(frozen=True)
class LearnOptions:
    """What ``trustpot learn`` does; every field is one flag (units in the help)."""

    out: str = option("", "output folder; a rerun resumes what a killed run left", required=True)
    engine: str = option(
        "xtb",
        "reference engine (the oracle): xtb (GFN2-xTB molecules from --smiles), nbody "
        "(charged particles, --particles) or nacl-water (OpenMM NaCl(aq), --pairs)",
        choices=tuple(ORACLES),
    )
    smiles: tuple[str, ...] = option((), "xtb: the molecules, as SMILES", metavar="SMILES")
    particles: tuple[int, ...] = option((), "nbody: particle counts, one system each")
    pairs: tuple[int, ...] = option((), "nacl-water: ion-pair counts, one box each")
    temperature: float = option(
        300.0, "exploration MD temperature, K (and of the sampled starting frames)"
    )
    test_temperature: float | None = option(
        None, "temperature of the sampled test frames, K (default --temperature)"
    )
    initial: str = option(
        "",
        "labelled starting frames (any ASE format; default: "
        "--initial-frames per system sampled by the engine)",
    )
    initial_frames: int | None = option(
        None,
        f"starting frames per system sampled by the engine (default {DEFAULTS['initial_frames']})",
    )
    test: str = option(
        "",
        "held-out labelled test frames (any ASE format; default: "
        "--test-frames per system sampled by the engine)",
    )
    test_frames: int | None = option(
        None, f"test frames per system sampled by the engine (default {DEFAULTS['test_frames']})"
    )
    uq: str = option(
        "ensemble",
        "the reliability method that scores the visited frames, or random (one plain "
        "potential, no uncertainty, frames drawn uniformly)",
        choices=UQ_METHODS,
    )
    n_models: int | None = option(None, f"--uq ensemble: members (default {DEFAULTS['n_models']})")
    uq_minutes: float | None = option(
        None,
        "--uq probe or perturb: budget of the wrapper's fit "
        f"per round, minutes (default {DEFAULTS['uq_minutes']})",
    )
    score: str | None = option(
        None,
        "selection score: max-std (largest per-atom forces_std of the frame before "
        "recalibration, which ranks frames as the calibrated one does, eV/Å), mean-std, or "
        "reliability (1 - reliability); default reliability for probe, max-std otherwise",
        choices=tuple(SCORES),
    )
    pool_factor: float | None = option(
        None,
        "farthest-point sampling in embedding space picks "
        "among the ceil(POOL_FACTOR * --per-round) highest scores "
        "(<= 1: plain top-k; default "
        f"{DEFAULTS['pool_factor']})",
    )
    calibration_fraction: float | None = option(
        None,
        "share of the labels held out of training to calibrate the uncertainty: of the "
        "starting frames (at least 2), and of each round's, drawn at random among the "
        f"visited frames (default {DEFAULTS['calibration_fraction']})",
    )
    baseline: bool = option(
        False,
        "also run, in OUT/baseline, the same loop (same method, models, exploration, "
        "budgets, start and test frames) with the frames drawn uniformly from the visited "
        "ones instead of by score: the learning curve's control",
    )
    rounds: int = option(
        5,
        "labelling rounds (each: train, explore, select, label); the "
        "model is trained once more at the end",
    )
    per_round: int = option(8, "frames labelled per round")
    budget: int = option(0, "most labelled frames in all, starting frames included (0: none)")
    target_mae: float | None = option(None, "stop once the test force MAE is at most this, eV/Å")
    walkers: int = option(2, "exploration trajectories per system and round")
    md_steps: int = option(400, "MD steps per trajectory")
    interval: int = option(10, "MD steps between visited (candidate) frames")
    timestep: float = option(0.5, "MD time step, fs")
    friction: float = option(0.01, "Langevin friction, 1/fs")
    min_distance: float = option(
        0.5,
        "a trajectory stops at a frame with two atoms closer than "
        "this share of their covalent-radius sum (unphysical, never "
        "labelled)",
    )
    halt_std: float | None = option(
        None,
        "a trajectory stops at a frame whose largest calibrated per-atom forces_std exceeds "
        "this, eV/Å; that frame and later ones are not candidates (default: the RMS force "
        "component of the labelled training frames; not with probe or random)",
    )
    cold_start: bool = option(
        False, "train every round from scratch, not from the previous round's weights"
    )
    model: str = option("painn", "backbone: schnet, painn, egnn or deepset-moe")
    max_minutes: float = option(1.0, "training budget per potential and round, minutes")
    epochs: int = option(200, "most epochs per potential and round")
    overrides: tuple[str, ...] = option(
        (),
        "any training option, e.g. -o model.hypers.n_features=32 -o train.lr=1e-3",
        flag="--override",
        short="-o",
        action="append",
        metavar="KEY=VALUE",
    )
    seed: int = option(0, "seed of sampling, training, exploration and selection")
    workers: int = option(
        1, "engine worker processes (0: in this process); with --dask local: LocalCluster workers"
    )
    dask: str = option(
        "",
        "run the labelling and the ensemble members' training as tasks on Dask distributed: "
        "'local' (a LocalCluster of --workers processes) or a running scheduler's address "
        "(tcp://host:8786; its workers must share this file system). Extra: dask",
        metavar="ADDRESS",
    )
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    quiet: bool = option(False, "no progress bars")
    quick: bool = option(
        False,
        "a tiny run in seconds (two small molecules or systems, 2 "
        "rounds, a small model, --baseline); options given still apply",
    )

    def __post_init__(self) -> None:
        self.validate()

    # -- resolved values ------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """An option that defaults to ``None``, with its default (:data:`DEFAULTS`)."""
        value = getattr(self, name)
        return DEFAULTS[name] if value is None else value

    @property
    def score_kind(self) -> str:
        """The selection score (``--score`` or the method's default)."""
        return self.score or ("reliability" if self.uq == "probe" else "max-std")

    @property
    def test_temp(self) -> float:
        return self.temperature if self.test_temperature is None else self.test_temperature

    @property
    def executor(self) -> Workers:
        """Where the labelling and the members' training run (``--workers``, ``--dask``)."""
        return workers_from_flags(self.workers, self.dask)

    def oracle(self) -> Oracle:
        """The engine, from ``--engine`` and its systems."""
        if self.engine == "xtb":
            return XTBOracle(tuple(self.smiles))
        if self.engine == "nbody":
            return NBodyOracle(tuple(self.particles))
        return NaClWaterOracle(tuple(self.pairs))

    def run_config(
        self, train: str, seed: int, init_from: str = "", dropout: float = 0.0
    ) -> RunConfig:
        """A potential's training run: ``train`` data, ``seed``, warm start ``init_from``."""
        base: dict[str, dict[str, Any]] = {
            "data": {"train": train},
            "model": {"name": self.model, "init_from": init_from, "head_dropout": dropout},
            "train": {
                "max_minutes": self.max_minutes,
                "epochs": self.epochs,
                "seed": seed,
                "threads": self.threads,
            },
        }
        return load_config(None, list(self.overrides), base)

    # -- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag of a value that cannot work or would be
        ignored (another engine's or method's option)."""
        flag = {f.name: flag_of(f) for f in dataclasses.fields(self)}

        def foreign(names: tuple[str, ...], owner: str) -> None:
            for name in names:
                if getattr(self, name) not in (None, ()):
                    raise ConfigError(
                        f"{flag[name]} applies to {owner}, not to --engine "
                        f"{self.engine} --uq {self.uq}"
                    )

        if self.engine != "xtb":
            foreign(("smiles",), "--engine xtb")
        if self.engine != "nbody":
            foreign(("particles",), "--engine nbody")
        if self.engine != "nacl-water":
            foreign(("pairs",), "--engine nacl-water")
        if self.uq != "ensemble":
            foreign(("n_models",), "--uq ensemble")
        if self.uq not in ("probe", "perturb"):
            foreign(("uq_minutes",), "--uq probe or perturb")
        if self.uq in ("random", "probe"):
            foreign(("halt_std",), "--uq ensemble, mc-dropout or perturb")
        if self.uq == "random":
            foreign(("score", "pool_factor", "calibration_fraction"), "a reliability method")
            if self.baseline:
                raise ConfigError("--baseline adds random selection; --uq random is it already")
        if self.uq == "probe" and self.score not in (None, "reliability"):
            raise ConfigError(f"--score {self.score}: PROBE gives no forces_std; use reliability")
        if self.initial and self.initial_frames is not None:
            raise ConfigError("--initial-frames would be ignored with --initial (given frames)")
        if self.test and (self.test_frames is not None or self.test_temperature is not None):
            raise ConfigError("--test-frames and --test-temperature would be ignored with --test")
        positive = (
            "temperature",
            "test_temperature",
            "n_models",
            "uq_minutes",
            "pool_factor",
            "per_round",
            "walkers",
            "md_steps",
            "interval",
            "timestep",
            "friction",
            "max_minutes",
            "epochs",
            "halt_std",
            "initial_frames",
            "test_frames",
            "target_mae",
        )
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{flag[name]} must be > 0, got {value}")
        for name in ("rounds", "budget", "workers", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag[name]} must be >= 0, got {getattr(self, name)}")
        if self.n_models is not None and self.n_models < 2:
            raise ConfigError(f"--n-models must be at least 2, got {self.n_models}")
        if self.calibration_fraction is not None and not 0 < self.calibration_fraction < 1:
            raise ConfigError(
                f"--calibration-fraction must be in (0, 1), got {self.calibration_fraction}"
            )
        if not 0 < self.min_distance < 1:
            raise ConfigError(f"--min-distance must be in (0, 1), got {self.min_distance}")
        if self.interval > self.md_steps:
            raise ConfigError(f"--interval {self.interval} exceeds --md-steps {self.md_steps}")
        self.run_config("data.xyz", self.seed)  # the training options, -o included

    def check_systems(self) -> None:
        """Before any work: the engine's systems are given (or come with ``--initial`` and
        ``--test`` files)."""
        systems = {"xtb": "smiles", "nbody": "particles", "nacl-water": "pairs"}[self.engine]
        if not (self.initial and self.test) and not getattr(self, systems):
            raise ConfigError(
                f"--engine {self.engine} needs --{systems} (or both --initial and --test files)"
            )


def quick_values(given: dict[str, Any]) -> dict[str, Any]:
    """The ``--quick`` preset completed by ``given`` (the options the user set, which win).

    Small budgets everywhere; small systems when none are given (methanol and ethane for xtb,
    4 and 5 particles for nbody, one ion pair for nacl-water); for PROBE, enough starting
    frames for its minimum of calibration frames; the engine runs in this process;
    ``--baseline`` unless the method is random. Its training overrides come first, so the
    user's ``-o`` win.
    """
    engine = given.get("engine", "xtb")
    uq = given.get("uq", "ensemble")
    preset: dict[str, Any] = {
        "initial_frames": 6,
        "test_frames": 6,
        "rounds": 2,
        "per_round": 4,
        "walkers": 1,
        "md_steps": 60,
        "interval": 5,
        "max_minutes": 0.2,
        "epochs": 15,
        "workers": 0,
        "threads": 1,
    }
    systems = {
        "xtb": ("smiles", ("CO", "CC")),
        "nbody": ("particles", (4, 5)),
        "nacl-water": ("pairs", (1,)),
    }[engine]
    if not given.get("initial") and not given.get(systems[0]):
        preset[systems[0]] = systems[1]
    if given.get("initial"):
        preset.pop("initial_frames")
    if given.get("test"):
        preset.pop("test_frames")
    if uq == "ensemble":
        preset["n_models"] = 2
    if uq in ("probe", "perturb"):
        preset["uq_minutes"] = 0.05
    if uq == "probe" and "initial_frames" in preset:  # enough calibration frames for PROBE
        from trustpot.uq.probe import MIN_STRUCTURES

        n_systems = len(given.get(systems[0]) or preset.get(systems[0], ()))
        share = given.get("calibration_fraction") or DEFAULTS["calibration_fraction"]
        preset["initial_frames"] = math.ceil(MIN_STRUCTURES / (share * max(n_systems, 1)))
    if uq != "random":
        preset["baseline"] = True
    values = {**preset, **given, "quick": True}
    values["overrides"] = (*QUICK_OVERRIDES, *given.get("overrides", ()))
    return values
