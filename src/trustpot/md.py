"""Molecular dynamics with a trustpot potential through ASE."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import Trajectory, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from trustpot.calculator import TrustpotCalculator
from trustpot.errors import ConfigError


def _thermalize(atoms: Atoms, temperature: float, rng: np.random.Generator) -> None:
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29; the older name is deprecated there
        vd.thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)


def run_md(
    calculator: TrustpotCalculator,
    atoms: Atoms,
    steps: int,
    temperature: float,
    out: str | Path,
    timestep_fs: float = 0.5,
    friction: float = 0.01,
    thermostat: str = "langevin",
    interval: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Run ``steps`` of MD at ``temperature`` K, writing every ``interval``-th frame to ``out``.

    Args:
        thermostat: ``langevin`` (NVT) or ``nve`` (velocity Verlet after Maxwell-Boltzmann
            initialisation).
        out: trajectory file; ``.traj`` writes an ASE trajectory, anything else extended XYZ.

    Returns:
        ``steps``, ``seconds``, ``steps_per_second``, ``final_temperature`` (K) and
        ``max_energy_drift`` (eV/atom, total-energy drift relative to step 0).
    """
    if steps < 1:
        raise ConfigError(f"--steps must be positive, got {steps}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be non-negative, got {temperature}")
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    _thermalize(atoms, temperature, rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    dt = timestep_fs * units.fs
    if thermostat == "langevin":
        dyn = Langevin(
            atoms, dt, temperature_K=temperature, friction=friction / units.fs, rng=rng, fixcm=False
        )
    elif thermostat == "nve":
        dyn = VelocityVerlet(atoms, dt)
    else:
        raise ConfigError(f"thermostat must be 'langevin' or 'nve', got '{thermostat}'")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    traj = Trajectory(str(out), "w", atoms) if out.suffix == ".traj" else None
    e0 = atoms.get_total_energy()
    drift = 0.0

    def record() -> None:
        nonlocal drift
        drift = max(drift, abs(atoms.get_total_energy() - e0) / len(atoms))
        if traj is not None:
            traj.write()
        else:
            write(str(out), atoms, format="extxyz", append=True)

    dyn.attach(record, interval=interval)
    start = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - start
    if traj is not None:
        traj.close()
    return {
        "steps": float(steps),
        "seconds": seconds,
        "steps_per_second": steps / seconds,
        "final_temperature": float(atoms.get_temperature()),
        "max_energy_drift": drift,
    }
