"""Fitting reliability wrappers: train what a method needs, recalibrate, save ``uq.ckpt``.

Every step writes to the output folder and a rerun skips what is finished: ensemble members
that completed are not retrained, a killed member resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trustpot.config import RunConfig
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import load_potential
from trustpot.train.run import run_training
from trustpot.uq.base import UQModel
from trustpot.uq.calibrate import recalibrate
from trustpot.uq.ensemble import DeepEnsemble, MCDropout
from trustpot.uq.io import save_uq

Log = Callable[[str], None]


def train_once(cfg: RunConfig, run_dir: Path, log: Log) -> Path:
    """Train (or finish training) one potential in ``run_dir``; returns its ``best.ckpt``."""
    done = run_dir / "done.json"
    if done.is_file():
        log(f"{run_dir}: already trained")
    else:
        resume = (run_dir / "last.ckpt").is_file()
        result = run_training(cfg, run_dir, resume=resume)
        done.write_text(json.dumps(dataclasses.asdict(result), indent=1))
    return run_dir / "best.ckpt"


def train_ensemble_members(
    cfg: RunConfig, out: Path, n_members: int, log: Log = print
) -> list[Path]:
    """Train ``n_members`` potentials with seeds ``seed, seed + 1, ...`` in ``out/member_k``.

    Members differ in initialisation, shuffling and validation split (all seeded).
    """
    if n_members < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {n_members}")
    paths = []
    for k in range(n_members):
        member = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k)
        )
        log(f"ensemble member {k + 1}/{n_members} (seed {member.train.seed})")
        paths.append(train_once(member, out / f"member_{k}", log))
    return paths


def ensemble_from_checkpoints(paths: Sequence[str | Path]) -> DeepEnsemble:
    """An ensemble of already trained potentials."""
    return DeepEnsemble([load_potential(p) for p in paths])


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
) -> Path:
    """Recalibrate on held-out data (when given), save ``out/uq.ckpt`` and ``out/fit.json``."""
    t0 = time.perf_counter()
    report = dict(fit_report)
    if calibration:
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
    if hasattr(model, "fit_report"):
        model.fit_report = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "uq.ckpt"
    save_uq(model, path)
    (out / "fit.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {path}")
    return path
