"""A charged N-body system with exact energies and forces (no extra package needed).

``n`` point charges, alternately +1 e and -1 e (particle 0 is +1; an odd ``n`` has net charge
+1 e), interact in vacuum through Coulomb's law plus a soft inverse-power (Born-Landé) repulsion::

    E = sum_{i<j} [ K q_i q_j / r_ij + B / r_ij^9 ],    B = K r0^8 / 9

with ``K = e^2 / (4 pi eps0) = 14.3996 eV Å`` (:data:`trustpot.units.COULOMB_EV_A`) and ``r0``
(Å, default 2.8) the separation at which a +/- pair has its energy minimum. Energies are in eV,
forces ``-dE/dr`` in eV/Å, both analytic.
Positive particles are written as Na, negative ones as Cl (chemical symbols only: nothing else of
those elements is used). Not periodic.

Configurations are sampled by Metropolis Monte Carlo at a temperature (single-particle moves,
uniform in a cube of half-width ``step``), restricted to a cubic box of edge ``box`` Å: a move
leaving the box is rejected. The box only limits sampling; it is not part of the energy, which is
invariant to translations, rotations and permutations of like charges. Each chain starts from
random positions (no pair closer than 2 Å), runs ``equilibration`` sweeps (one sweep = ``n`` move
attempts), then keeps one frame every ``interval`` sweeps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import units

from trustpot.engines.labelling import (
    FrameRecord,
    RunSummary,
    Task,
    chunked_ids,
    run_tasks,
    stable_seed,
    trustpot_version,
)
from trustpot.errors import ConfigError
from trustpot.parallel import Workers
from trustpot.units import COULOMB_EV_A

#: Chemical symbols standing for the positive and the negative particles.
POSITIVE, NEGATIVE = "Na", "Cl"
#: Version of the functional form (goes into provenance).
MODEL_VERSION = "nbody-coulomb-r9 v1"


def charges_of(n: int) -> np.ndarray:
    """Charges (e) of ``n`` particles: +1, -1, +1, ..."""
    return np.where(np.arange(n) % 2 == 0, 1.0, -1.0)


def energy_forces(
    positions: np.ndarray, charges: np.ndarray, r0: float = 2.8
) -> tuple[float, np.ndarray]:
    """Exact energy (eV) and forces (eV/Å) of point charges with inverse-power repulsion.

    Args:
        positions: [n, 3] Å.
        charges: [n] e.
        r0: Å, energy minimum of a +1/-1 pair.
    """
    b = COULOMB_EV_A * r0**8 / 9.0
    diff = positions[:, None, :] - positions[None, :, :]
    r = np.linalg.norm(diff, axis=-1)
    n = len(positions)
    iu = np.triu_indices(n, 1)
    qq = COULOMB_EV_A * charges[:, None] * charges[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(r > 0, 1.0 / r, 0.0)
    energy = float(np.sum((qq * inv + b * inv**9)[iu]))
    de_dr = -qq * inv**2 - 9.0 * b * inv**10  # dE/dr for each pair, zero on the diagonal
    forces = -np.sum((de_dr * inv)[:, :, None] * diff, axis=1)
    return energy, forces


def _pair_energy(
    positions: np.ndarray, charges: np.ndarray, i: int, x: np.ndarray, b: float
) -> float:
    others = np.arange(len(positions)) != i
    r = np.linalg.norm(positions[others] - x, axis=1)
    return float(np.sum(COULOMB_EV_A * charges[i] * charges[others] / r + b / r**9))


@dataclass(frozen=True)
class MCOptions:
    """Metropolis settings.

    Attributes:
        box: Å, edge of the cube the sampling is restricted to.
        step: Å, half-width of a trial move.
        r0: Å, energy minimum of a +/- pair.
        equilibration: sweeps before the first kept frame of a chain.
        interval: sweeps between kept frames.
        chunk: frames per independent chain.
    """

    box: float = 10.0
    step: float = 0.4
    r0: float = 2.8
    equilibration: int = 200
    interval: int = 20
    chunk: int = 20

    def check(self, n: int) -> None:
        for name in ("box", "step", "r0"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.equilibration < 0:
            raise ConfigError(f"--equilibration must be >= 0, got {self.equilibration}")
        for name in ("interval", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        # random start with 2 Å spacing must be feasible: keep the packing fraction small
        if n * (4 / 3) * np.pi * 1.0**3 > 0.3 * self.box**3:
            raise ConfigError(f"--box {self.box} Å is too small for {n} particles")


def _initial(n: int, box: float, rng: np.random.Generator) -> np.ndarray:
    pos = np.zeros((0, 3))
    while len(pos) < n:
        x = rng.uniform(0, box, 3)
        if len(pos) == 0 or np.min(np.linalg.norm(pos - x, axis=1)) >= 2.0:
            pos = np.vstack([pos, x])
    return pos


def _mc_task(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """One Metropolis chain; yields its kept frames (task function)."""
    opts = MCOptions(**payload["mc"])
    n, temperature, seed = payload["particles"], payload["temperature"], payload["seed"]
    rng = np.random.default_rng(seed)
    q = charges_of(n)
    b = COULOMB_EV_A * opts.r0**8 / 9.0
    beta = 1.0 / (units.kB * temperature)
    pos = _initial(n, opts.box, rng)
    numbers = np.array([11 if c > 0 else 17 for c in q])
    accepted = attempted = 0

    def sweeps(count: int) -> None:
        nonlocal accepted, attempted
        for _ in range(count * n):
            i = int(rng.integers(n))
            x = pos[i] + rng.uniform(-opts.step, opts.step, 3)
            attempted += 1
            if np.any(x < 0) or np.any(x > opts.box):
                continue
            delta = _pair_energy(pos, q, i, x, b) - _pair_energy(pos, q, i, pos[i], b)
            if delta <= 0 or rng.random() < np.exp(-beta * delta):
                pos[i] = x
                accepted += 1

    sweeps(opts.equilibration)
    for k, frame_id in enumerate(payload["frame_ids"]):
        sweeps(opts.interval)
        if frame_id not in needed:
            continue
        energy, forces = energy_forces(pos, q, opts.r0)
        info = {
            "engine": "trustpot-nbody",
            "engine_version": MODEL_VERSION,
            "method": f"coulomb+r^-9 (r0={opts.r0:g} A)",
            "temperature": float(temperature),
            "seed": int(seed),
            "run_seed": int(payload["run_seed"]),
            "particles": n,
            "total_charge": float(q.sum()),
            "mc_sweep": opts.equilibration + (k + 1) * opts.interval,
            "mc_acceptance": accepted / max(attempted, 1),
            "trustpot_version": trustpot_version(),
            "config_type": f"nbody{n}@{temperature:g}K",
        }
        yield frame_id, FrameRecord(numbers, pos.copy(), energy, forces, info=info)


def generate_nbody(
    particles: Sequence[int],
    frames: int,
    out: str | Path,
    temperatures: Sequence[float] = (1000.0,),
    seed: int = 0,
    workers: Workers = 1,
    mc: MCOptions = MCOptions(),
    progress: bool = True,
) -> RunSummary:
    """Sample charged N-body configurations; ``frames`` per (particle count, temperature).

    Args:
        particles: particle counts, each >= 2.
        frames: frames per (particle count, temperature).
        out: extended XYZ output (resumable).
        temperatures: K, each > 0.
        seed: run seed; each chain's seed is derived from it.
        workers: worker processes, or a Dask cluster (:data:`trustpot.parallel.Workers`).
        mc: Metropolis settings.

    Raises:
        ConfigError: bad options, before any work.
    """
    if frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {frames}")
    if not particles or any(n < 2 for n in particles):
        raise ConfigError(f"--particles must be >= 2, got {list(particles)}")
    if len(set(particles)) != len(particles):
        raise ConfigError("--particles lists a count more than once")
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ConfigError(f"temperatures must be > 0 K, got {list(temperatures)}")
    for n in particles:
        mc.check(n)
    tasks = []
    for n in particles:
        for t in temperatures:
            prefix = f"nbody{n}@{t:g}K"
            for c, ids in chunked_ids(prefix, frames, mc.chunk):
                payload = {
                    "particles": n,
                    "temperature": float(t),
                    "seed": stable_seed(seed, "nbody", n, float(t), c),
                    "run_seed": seed,
                    "mc": asdict(mc),
                    "frame_ids": ids,
                }
                tasks.append(Task(f"{prefix}/chain{c}", ids, payload))
    params = {
        "engine": "nbody",
        "particles": list(particles),
        "temperatures": [float(t) for t in temperatures],
        "frames": frames,
        "seed": seed,
        "mc": asdict(mc),
    }
    return run_tasks(tasks, _mc_task, out, params, workers, desc="N-body MC", progress=progress)
