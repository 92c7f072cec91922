"""Exploration: short Langevin MD with the round's model, every visited frame scored.

Each walker starts from a labelled seed frame, draws Maxwell-Boltzmann velocities at the
temperature (seeded), and runs ASE's Langevin dynamics with the round's model as the
calculator (:class:`~trustpot.calculator.TrustpotCalculator`, so a reliability wrapper's
``forces_std`` and ``reliability`` come with every step's forces). Every ``interval`` steps the
frame is kept as a candidate with the uncertainty the calculator computed for it; the loop
scores the candidates afterwards, in batches (:func:`trustpot.learn.rounds.explore`).

A walker stops early at a frame that is not physical: non-finite positions or forces, or two
atoms closer than ``min_distance`` times the sum of their covalent radii (ASE's table); and,
with ``halt_std``, at a frame whose largest calibrated per-atom ``forces_std`` (eV/Å) exceeds
it: the model knows too little there for the trajectory to mean anything, and what follows
would drift further from the conditions the model is learning (DP-GEN's upper trust level).
A stopped walker restarts from its seed frame with new velocities until its MD steps are spent
(:func:`walk`). This is the loop's own small harvesting step; the trust policies of the
calculator can take its place.

Candidates carry their provenance in ``atoms.info``: ``al_walker``, ``al_segment`` and
``al_source_step`` (MD step from the seed frame in that segment), ``al_halt`` (the frame that
stopped its segment), ``al_seed_frame`` (the ``al_id`` of the seed), ``al_max_forces_std``
(calibrated, eV/Å) and ``al_reliability`` where the model gives them, and what the seed frame
carried for the engine (:attr:`trustpot.learn.engines.Oracle.carry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.data import covalent_radii
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation

from trustpot.calculator import Predictor, TrustpotCalculator


@dataclass(frozen=True)
class Walk:
    """One exploration trajectory's settings.

    Attributes:
        steps: MD steps.
        interval: steps between kept frames.
        temperature: K.
        timestep: fs.
        friction: Langevin friction, 1/fs.
        min_distance: share of the covalent-radius sum below which a pair is unphysical.
        halt_std: eV/Å; stop at a frame whose largest calibrated per-atom ``forces_std`` is
            above it (``None``: no such stop).
    """

    steps: int
    interval: int
    temperature: float
    timestep: float
    friction: float
    min_distance: float
    halt_std: float | None = None


def too_close(atoms: Atoms, share: float) -> tuple[int, int] | None:
    """The first pair of atoms closer than ``share`` times their covalent-radius sum, or None
    (minimum image for periodic directions)."""
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    r = covalent_radii[atoms.numbers]
    limit = share * (r[:, None] + r[None, :])
    np.fill_diagonal(d, np.inf)
    bad = np.argwhere(d < limit)
    return None if len(bad) == 0 else (int(bad[0][0]), int(bad[0][1]))


def _thermalize(atoms: Atoms, temperature: float, rng: np.random.Generator) -> None:
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29 deprecates the older name
        vd.thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)


def walk(
    predictor: Predictor,
    seed_frame: Atoms,
    settings: Walk,
    seed: int,
    carry: Sequence[str] = (),
    walker: int = 0,
) -> tuple[list[Atoms], dict[str, Any]]:
    """Run one walker for ``settings.steps`` MD steps; returns its candidates and a summary.

    A stop (module docstring) ends a segment; the walker then restarts from the seed frame with
    new velocities until its steps are spent. A segment stopped by ``halt_std`` keeps its last
    frame as a candidate (``al_halt``): the first frame the model knows too little about, the
    one on-the-fly learning labels; an unphysical frame is never kept.

    Args:
        predictor: the round's model.
        seed_frame: the starting structure (its ``info["al_id"]`` is recorded).
        settings: what to run.
        seed: seed of the velocities and the thermostat.
        carry: ``info`` keys copied from the seed frame to every candidate.
        walker: the walker's number (recorded).

    Returns:
        ``(frames, summary)``: the kept frames (no calculator attached; ``al_source_step`` is
        the MD step within segment ``al_segment``) and ``{"steps": run, "segments": n,
        "stops": [reason, ...], "frames": kept}``.
    """
    calc = TrustpotCalculator(predictor)
    rng = np.random.default_rng(seed)
    base = {key: seed_frame.info[key] for key in carry if key in seed_frame.info}
    base.update(
        al_walker=walker,
        al_seed_frame=str(seed_frame.info.get("al_id", "")),
        al_temperature=settings.temperature,
    )
    frames: list[Atoms] = []
    stops: list[str] = []
    done = segment = 0
    while done < settings.steps:
        atoms = Atoms(
            numbers=seed_frame.numbers,
            positions=seed_frame.positions,
            cell=seed_frame.cell,
            pbc=seed_frame.pbc,
        )
        atoms.calc = calc
        _thermalize(atoms, settings.temperature, rng)
        dyn = Langevin(
            atoms,
            settings.timestep * units.fs,
            temperature_K=settings.temperature,
            friction=settings.friction / units.fs,
            rng=rng,
            fixcm=False,
        )
        step = 0
        while done < settings.steps:
            n = min(settings.interval, settings.steps - done)
            with np.errstate(all="ignore"):
                dyn.run(n)
            done, step = done + n, step + n
            res = calc.results
            finite = np.all(np.isfinite(atoms.positions)) and np.all(np.isfinite(res["forces"]))
            pair = too_close(atoms, settings.min_distance) if finite else None
            if not finite or pair is not None:
                what = "non-finite positions or forces" if not finite else f"atoms {pair} too close"
                stops.append(f"segment {segment} step {step}: {what}")
                break
            frame = Atoms(
                numbers=atoms.numbers,
                positions=atoms.positions.copy(),
                cell=atoms.cell,
                pbc=atoms.pbc,
            )
            frame.info.update(base, al_segment=segment, al_source_step=step)
            top = float(np.max(res["forces_std"])) if "forces_std" in res else None
            if top is not None:
                frame.info["al_max_forces_std"] = top
            if "reliability" in res:
                frame.info["al_reliability"] = float(res["reliability"])
            frames.append(frame)
            if settings.halt_std is not None and top is not None and top > settings.halt_std:
                frame.info["al_halt"] = True
                stops.append(
                    f"segment {segment} step {step}: forces_std {top:.3g} eV/Å > "
                    f"{settings.halt_std:.3g}"
                )
                break
        segment += 1
    return frames, {"steps": done, "segments": segment, "stops": stops, "frames": len(frames)}
