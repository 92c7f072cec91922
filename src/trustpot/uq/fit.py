"""Fitting reliability wrappers: train what a method needs, recalibrate, save ``uq.ckpt``.

Every step writes to the output folder and a rerun skips what is finished: ensemble members
that completed are not retrained, a killed member resumes from its ``last.ckpt``
(:func:`train_once`, the one place that decides reuse).

:func:`fit_uq` is the entry point of ``trustpot uq fit``: one method, its options dataclass
(:mod:`trustpot.uq.options`), an output folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trustpot.config import RunConfig, config_to_dict
from trustpot.data.structures import Structure, info_values
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import load_model, load_potential, save_model
from trustpot.parallel import DaskCluster, Workers, map_tasks, workers_from_flags
from trustpot.train.reuse import run_step
from trustpot.train.run import run_training
from trustpot.uq.base import UQModel
from trustpot.uq.calibrate import recalibrate
from trustpot.uq.ensemble import DeepEnsemble, MCDropout
from trustpot.uq.options import (
    METHOD_OPTIONS,
    EnsembleOptions,
    LLPROptions,
    MCDropoutOptions,
    PerturbOptions,
    ProbeOptions,
    ShallowEnsembleOptions,
    UQOptions,
)

Log = Callable[[str], None]


def train_once(cfg: RunConfig, run_dir: Path, log: Log) -> Path:
    """Train one potential in ``run_dir`` under the one reuse rule
    (:func:`trustpot.train.reuse.run_step`): reused when done with the same resolved config,
    resumed from ``last.ckpt`` when interrupted, refused when the config differs. Returns its
    ``best.ckpt``."""
    config = config_to_dict(cfg)
    for key in ("threads", "device"):  # where it runs does not change what is trained
        config["train"].pop(key, None)

    def work(folder: Path, resuming: bool) -> dict[str, Any]:
        resume = resuming and (folder / "last.ckpt").is_file()
        return dataclasses.asdict(run_training(cfg, folder, resume=resume))

    run_step(run_dir, config, work, log)
    return run_dir / "best.ckpt"


def _quiet(message: str) -> None:
    """Log of a training run on a Dask worker (its progress is in the run folder)."""


def _train_task(cfg: RunConfig, run_dir: Path) -> Path:  # pragma: no cover - on a worker
    return train_once(cfg, run_dir, _quiet)


def train_many(
    runs: Sequence[tuple[RunConfig, Path]], workers: Workers = 0, log: Log = print
) -> list[Path]:
    """Train independent potentials (ensemble members), each under :func:`train_once`.

    Args:
        runs: ``(config, run folder)`` per potential.
        workers: an ``int`` trains them here one after another; a
            :class:`trustpot.parallel.DaskCluster` trains each as a Dask task (a killed
            worker's run resumes from its ``last.ckpt`` on another worker; finished runs are
            reused by the reuse rule).

    Returns:
        Each run's ``best.ckpt``, in the order of ``runs``.
    """
    if isinstance(workers, DaskCluster):
        log(f"training {len(runs)} potentials as tasks on {workers.describe()}")
        return map_tasks(workers, _train_task, [tuple(r) for r in runs], "train")
    return [train_once(cfg, run_dir, log) for cfg, run_dir in runs]


def train_ensemble_members(
    cfg: RunConfig, out: Path, n_members: int, log: Log = print, workers: Workers = 0
) -> list[Path]:
    """Train ``n_members`` potentials with seeds ``seed, seed + 1, ...`` in ``out/member_k``
    (here, or as tasks on a Dask cluster: :func:`train_many`).

    Members differ in initialisation, shuffling and validation split (all seeded).
    """
    if n_members < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {n_members}")
    runs = []
    for k in range(n_members):
        member = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k)
        )
        log(f"ensemble member {k + 1}/{n_members} (seed {member.train.seed})")
        runs.append((member, out / f"member_{k}"))
    return train_many(runs, workers, log)


def ensemble_from_checkpoints(paths: Sequence[str | Path]) -> DeepEnsemble:
    """An ensemble of already trained potentials."""
    return DeepEnsemble([load_model(p) for p in paths])  # members of any model kind


def train_mc_dropout(
    cfg: RunConfig, out: Path, dropout: float, n_samples: int, log: Log = print
) -> MCDropout:
    """Train one potential with dropout ``dropout`` in its energy head, wrap it for MC dropout."""
    if not 0 < dropout < 1:
        raise ConfigError(f"dropout must be in (0, 1), got {dropout}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head_dropout=dropout))
    best = train_once(cfg, out / "model", log)
    return MCDropout(load_potential(best), n_samples)


def finish(
    model: UQModel,
    out: Path,
    calibration: Sequence[Structure] | None,
    calibration_name: str,
    fit_report: dict[str, Any],
    tolerance: float | None = None,
    top_fraction: float = 0.2,
    log: Log = print,
    calibrated_by_fit: str | None = None,
) -> Path:
    """Recalibrate on held-out data (when given), save ``out/uq.ckpt`` and ``out/fit.json``.

    ``calibrated_by_fit`` names the data a method already calibrated itself on while fitting
    (PROBE's temperature scaling): there is then nothing left to recalibrate here.
    """
    t0 = time.perf_counter()
    report = dict(fit_report)
    if calibrated_by_fit:
        if calibration:
            raise ConfigError("a model calibrated by its fit cannot be recalibrated again")
        log(f"reliability calibrated during the fit on {calibrated_by_fit} (no std to rescale)")
    elif calibration:
        report["recalibration"] = recalibrate(
            model, calibration, tolerance, top_fraction, calibration_name
        )
        cal = model.recalibration
        log(
            f"recalibrated on {calibration_name}: energy std x{cal.energy_std_scale:.3g}, "
            f"force std x{cal.forces_std_scale:.3g} (floor {cal.forces_std_floor:.3g} eV/Å), "
            f"tolerance {cal.tolerance:.4g} eV/Å"
        )
    else:
        log("no --calibration data: standard deviations are uncalibrated and no reliability map")
    report["recalibration_s"] = time.perf_counter() - t0
    model.fit_report = {  # the method's own report, plus how the fit went here
        **model.fit_report,
        **{k: v for k, v in report.items() if isinstance(v, (int, float, str))},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "uq.ckpt"
    save_model(model, path)
    (out / "fit.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {path}")
    return path


def _fit_ensemble(opts: EnsembleOptions, out: Path, log: Log) -> tuple[UQModel, dict[str, Any]]:
    if opts.members:
        return ensemble_from_checkpoints(opts.members), {"members": list(opts.members)}
    workers: Workers = 0
    if opts.dask:
        workers = workers_from_flags(opts.n_models, opts.dask, workers_given=False)
    paths = train_ensemble_members(opts.run_config(), out, opts.n_models, log, workers)
    return ensemble_from_checkpoints(paths), {"members": [str(p) for p in paths]}


def _fit_mc_dropout(opts: MCDropoutOptions, out: Path, log: Log) -> UQModel:
    if opts.base:
        return MCDropout(load_potential(opts.base), opts.n_samples)
    return train_mc_dropout(opts.run_config(), out, opts.dropout, opts.n_samples, log)


def _fit_probe(opts: ProbeOptions, data: Sequence[Structure], log: Log) -> UQModel:
    from trustpot.uq.probe import fit_probe

    assert opts.base is not None
    return fit_probe(
        load_model(opts.base),  # any model kind: a potential, a pretrained name, a mixture
        data,
        tolerance=opts.tolerance,
        top_fraction=opts.top_fraction,
        epochs=opts.epochs,
        max_minutes=opts.max_minutes,
        batch_size=opts.batch_size,
        temperature_fraction=opts.holdout_fraction,
        seed=opts.seed,
        log=log,
        source=str(opts.calibration),
        errors=None
        if opts.errors_key is None
        else info_values(list(data), opts.errors_key, str(opts.calibration)),
    )


def _fit_llpr(opts: LLPROptions, calibration: Sequence[Structure] | None, log: Log) -> UQModel:
    from trustpot.data.splits import read_data
    from trustpot.uq.lastlayer import fit_llpr

    assert opts.base is not None and opts.train is not None
    return fit_llpr(
        load_potential(opts.base),
        read_data(opts.train, require=("energy",)),
        calibration,
        regularizer=opts.regularizer,
        n_samples=opts.n_samples,
        seed=opts.seed,
        batch_size=opts.batch_size,
        force_std=opts.force_std,
        log=log,
    )


def _train_valid(
    opts: PerturbOptions | ShallowEnsembleOptions,
) -> tuple[list[Structure], list[Structure]]:
    """``--train`` less the held-out share (or ``--valid``), and the validation structures."""
    from trustpot.data.splits import read_data
    from trustpot.train.run import train_and_valid

    assert opts.train is not None
    structures = read_data(opts.train)
    given = read_data(opts.valid) if opts.valid else None
    t_idx, _, valid = train_and_valid(structures, given, opts.valid_fraction, opts.seed)
    return [structures[i] for i in t_idx], list(valid)


def _fit_shallow(opts: ShallowEnsembleOptions, log: Log) -> UQModel:
    from trustpot.uq.shallow import fit_shallow_ensemble

    assert opts.base is not None
    train, valid = _train_valid(opts)
    return fit_shallow_ensemble(
        load_potential(opts.base),
        train,
        valid,
        n_heads=opts.n_heads,
        loss=opts.loss,
        epochs=opts.epochs,
        max_minutes=opts.max_minutes,
        lr=opts.lr,
        backbone_lr=opts.backbone_lr,
        finetune_backbone=not opts.freeze_backbone,
        batch_size=opts.batch_size,
        seed=opts.seed,
        log=log,
    )


def _fit_perturb(opts: PerturbOptions, log: Log) -> UQModel:
    from trustpot.uq.perturb import fit_perturbation

    assert opts.base is not None
    train, valid = _train_valid(opts)
    return fit_perturbation(
        load_model(opts.base),
        train,
        valid,
        n_samples_train=opts.n_samples_train,
        epochs=opts.epochs,
        max_minutes=opts.max_minutes,
        lr=opts.lr,
        backbone_lr=opts.backbone_lr,
        finetune_backbone=not opts.freeze_backbone,
        batch_size=opts.batch_size,
        seed=opts.seed,
        n_samples=opts.n_samples,
        log=log,
    )


def fit_uq(method: str, options: UQOptions, out: Path, log: Log = print) -> UQModel:
    """Fit reliability method ``method`` with its ``options``, recalibrate on
    ``options.calibration`` and save ``out/uq.ckpt`` and ``out/fit.json``.

    Raises:
        ConfigError: unknown method, options of another method, or invalid options.
    """
    from trustpot.data.splits import read_data

    if method not in METHOD_OPTIONS:
        raise ConfigError(f"unknown uq method '{method}'; known: {', '.join(METHOD_OPTIONS)}")
    if type(options) is not METHOD_OPTIONS[method]:
        raise ConfigError(
            f"uq method '{method}' takes {METHOD_OPTIONS[method].__name__}, "
            f"got {type(options).__name__}"
        )
    options.validate()
    out = Path(out)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"method": method, "options": dataclasses.asdict(options)}
    calibration = (
        read_data(options.calibration, require=("forces",)) if options.calibration else None
    )
    model: UQModel
    if isinstance(options, EnsembleOptions):
        model, extra = _fit_ensemble(options, out, log)
        report.update(extra)
    elif isinstance(options, MCDropoutOptions):
        model = _fit_mc_dropout(options, out, log)
    elif isinstance(options, ProbeOptions):
        assert calibration is not None  # validate() requires it
        model = _fit_probe(options, calibration, log)
    elif isinstance(options, LLPROptions):
        model = _fit_llpr(options, calibration, log)
    elif isinstance(options, ShallowEnsembleOptions):
        model = _fit_shallow(options, log)
    else:
        model = _fit_perturb(options, log)
    report["fit_s"] = time.perf_counter() - t0
    probe = isinstance(options, ProbeOptions)
    finish(
        model,
        out,
        None if probe else calibration,
        str(options.calibration),
        report,
        options.tolerance,
        options.top_fraction,
        log,
        calibrated_by_fit=str(options.calibration) if probe else None,
    )
    return model
