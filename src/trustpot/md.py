"""Molecular dynamics with a trustpot potential through ASE."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import Trajectory, write
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
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


def _integrator(
    atoms: Atoms,
    thermostat: str,
    timestep_fs: float,
    temperature: float,
    friction: float,
    rng: np.random.Generator,
) -> MolecularDynamics:
    """Langevin (``friction`` in 1/fs, ``temperature`` in K) or velocity Verlet (``nve``)."""
    dt = timestep_fs * units.fs
    if thermostat == "langevin":
        return Langevin(
            atoms, dt, temperature_K=temperature, friction=friction / units.fs, rng=rng, fixcm=False
        )
    if thermostat == "nve":
        return VelocityVerlet(atoms, dt)
    raise ConfigError(f"thermostat must be 'langevin' or 'nve', got '{thermostat}'")


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
    stop_below: float | None = None,
) -> dict[str, float]:
    """Run ``steps`` of MD at ``temperature`` K, writing every ``interval``-th frame to ``out``.

    With a reliability wrapper (``trustpot uq fit``) every written frame's ``reliability``,
    ``energy_std`` and largest per-atom ``forces_std`` go to ``OUT.reliability.csv``, and the
    run stops at the first written frame whose reliability is below ``stop_below``.

    Args:
        thermostat: ``langevin`` (NVT) or ``nve`` (velocity Verlet after Maxwell-Boltzmann
            initialisation).
        out: trajectory file; ``.traj`` writes an ASE trajectory, anything else extended XYZ.
        stop_below: reliability threshold in [0, 1] (needs a calibrated wrapper).

    Returns:
        ``steps`` (done), ``seconds``, ``steps_per_second``, ``final_temperature`` (K),
        ``max_energy_drift`` (eV/atom, total-energy drift relative to step 0) and, with a
        wrapper, ``min_reliability`` and ``stopped_at_step`` (-1 when it ran to the end).
    """
    if steps < 1:
        raise ConfigError(f"--steps must be positive, got {steps}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be non-negative, got {temperature}")
    monitor = "reliability" in calculator.implemented_properties
    if stop_below is not None and not monitor:
        raise ConfigError(
            "--stop-below needs a checkpoint that gives reliability "
            "(trustpot uq fit ... --calibration DATA)"
        )
    if interval < 1:
        raise ConfigError(f"--interval must be positive, got {interval}")
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    _thermalize(atoms, temperature, rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    dyn = _integrator(atoms, thermostat, timestep_fs, temperature, friction, rng)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    traj = Trajectory(str(out), "w", atoms) if out.suffix == ".traj" else None
    e0 = atoms.get_total_energy()
    drift = 0.0
    log_path = out.with_name(out.name + ".reliability.csv")
    reliabilities: list[float] = []
    if monitor:
        log_path.write_text("step,time_fs,reliability,energy_std_eV,max_forces_std_eV_per_A\n")

    def record() -> None:
        nonlocal drift
        drift = max(drift, abs(atoms.get_total_energy() - e0) / len(atoms))
        if traj is not None:
            traj.write()
        else:
            write(str(out), atoms, format="extxyz", append=True)
        if monitor:
            res = calculator.results
            step = dyn.nsteps
            reliabilities.append(float(res["reliability"]))
            with open(log_path, "a") as handle:
                handle.write(
                    f"{step},{step * timestep_fs:g},{res['reliability']:.6g},"
                    f"{res.get('energy_std', float('nan')):.6g},"
                    f"{float(np.max(res.get('forces_std', [np.nan]))):.6g}\n"
                )

    dyn.attach(record, interval=interval)
    start = time.perf_counter()
    stopped_at = -1
    done = 0
    while done < steps:
        chunk = min(interval, steps - done)
        dyn.run(chunk)
        done += chunk
        if stop_below is not None and reliabilities and reliabilities[-1] < stop_below:
            stopped_at = done
            break
    seconds = time.perf_counter() - start
    if traj is not None:
        traj.close()
    stats = {
        "steps": float(done),
        "seconds": seconds,
        "steps_per_second": done / seconds,
        "final_temperature": float(atoms.get_temperature()),
        "max_energy_drift": drift,
    }
    if monitor:
        stats["min_reliability"] = min(reliabilities) if reliabilities else float("nan")
        stats["stopped_at_step"] = float(stopped_at)
    return stats
