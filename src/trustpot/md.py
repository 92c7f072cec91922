"""Molecular dynamics with a trustpot potential through ASE."""

from __future__ import annotations

import time
from collections.abc import Callable
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
from trustpot.md_compile import AutoCompileMD
from trustpot.monitor import TrustHalt, TrustMonitor
from trustpot.policy import TrustPolicy

#: values of ``run_md``'s ``compile`` (``trustpot md --compile``)
COMPILE_MODES = ("auto", "always", "never")


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
    policy: TrustPolicy | None = None,
    harvest_file: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    compile: str = "auto",
) -> dict[str, float]:
    """Run ``steps`` of MD at ``temperature`` K, writing every ``interval``-th frame to ``out``.

    A :class:`~trustpot.monitor.TrustMonitor` applies ``policy`` (default: no rules) before
    each frame is written: halt rules and the non-finite check at every step, warn and harvest
    rules on the written frames' steps. A halt raises :class:`~trustpot.monitor.TrustHalt`
    (with ``stats`` filled in) after closing ``out``, which keeps every frame written before.
    With a reliability wrapper (``trustpot uq fit``) every written frame's ``reliability``,
    ``energy_std`` and largest per-atom ``forces_std`` go to ``OUT.reliability.csv``.

    Args:
        thermostat: ``langevin`` (NVT) or ``nve`` (velocity Verlet after Maxwell-Boltzmann
            initialisation).
        out: trajectory file; ``.traj`` writes an ASE trajectory, anything else extended XYZ.
        policy: trust rules (checked against the calculator first: ConfigError).
        harvest_file: extxyz file for harvested frames (started afresh, like ``out``).
        log: where warnings and the compile decision go (default: standard error).
        compile: ``auto`` (compile the calculator mid-run when the run is long enough and the
            compiled step proves faster, :mod:`trustpot.md_compile`; a calculator made with
            ``compile=True`` stays compiled), ``always`` (compiled from the first step) or
            ``never`` (eager: forces to the last bit of the plain path).

    Returns:
        ``steps`` (done), ``seconds``, ``steps_per_second``, ``final_temperature`` (K),
        ``max_energy_drift`` (eV/atom, total-energy drift relative to step 0), ``frames``
        (written), ``warnings`` and ``harvested`` (events) and, with a reliability output,
        ``min_reliability``.

    Raises:
        TrustHalt: when a halt rule fires or a value is not finite.
    """
    if steps < 1:
        raise ConfigError(f"--steps must be positive, got {steps}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be non-negative, got {temperature}")
    if interval < 1:
        raise ConfigError(f"--interval must be positive, got {interval}")
    if compile not in COMPILE_MODES:
        raise ConfigError(f"--compile must be one of {COMPILE_MODES}, got '{compile}'")
    if compile != "auto":
        calculator.set_compiled(compile == "always")
    monitor_reliability = "reliability" in calculator.implemented_properties
    atoms = atoms.copy()
    atoms.calc = calculator
    out = Path(out)
    monitor = TrustMonitor(
        policy or TrustPolicy(), atoms, None, harvest_file, log, interval, source=out.name
    )
    rng = np.random.default_rng(seed)
    _thermalize(atoms, temperature, rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    dyn = _integrator(atoms, thermostat, timestep_fs, temperature, friction, rng)
    monitor.dyn = dyn
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (out, None if harvest_file is None else Path(harvest_file)):
        if path is not None and path.exists():
            path.unlink()
    traj = Trajectory(str(out), "w", atoms) if out.suffix == ".traj" else None
    e0 = atoms.get_total_energy()
    drift = 0.0
    frames = 0
    log_path = out.with_name(out.name + ".reliability.csv")
    reliabilities: list[float] = []
    if monitor_reliability:
        log_path.write_text("step,time_fs,reliability,energy_std_eV,max_forces_std_eV_per_A\n")

    def record() -> None:
        nonlocal drift, frames
        drift = max(drift, abs(atoms.get_total_energy() - e0) / len(atoms))
        if traj is not None:
            traj.write()
        else:
            write(str(out), atoms, format="extxyz", append=True)
        frames += 1
        if monitor_reliability:
            res = calculator.results
            step = dyn.nsteps
            reliabilities.append(float(res["reliability"]))
            with open(log_path, "a") as handle:
                handle.write(
                    f"{step},{step * timestep_fs:g},{res['reliability']:.6g},"
                    f"{res.get('energy_std', float('nan')):.6g},"
                    f"{float(np.max(res.get('forces_std', [np.nan]))):.6g}\n"
                )

    dyn.attach(monitor, interval=1)  # first: a halted or non-finite frame is never written
    dyn.attach(record, interval=interval)
    if compile == "auto":
        dyn.attach(AutoCompileMD(calculator, atoms, steps, monitor.log), interval=1)
    start = time.perf_counter()

    def statistics() -> dict[str, float]:
        seconds = time.perf_counter() - start
        done = int(dyn.nsteps)
        stats = {
            "steps": float(done),
            "seconds": seconds,
            "steps_per_second": done / seconds if seconds > 0 else 0.0,
            "final_temperature": float(atoms.get_temperature()),
            "max_energy_drift": drift,
            "frames": float(frames),
            "warnings": float(monitor.counts["warn"]),
            "harvested": float(monitor.counts["harvest"]),
            "neighbor_list_builds": float(calculator.neighbors.builds),
        }
        if monitor_reliability:
            stats["min_reliability"] = min(reliabilities) if reliabilities else float("nan")
        return stats

    try:
        dyn.run(steps)
    except TrustHalt as halt:
        halt.stats = statistics()
        raise
    finally:
        if traj is not None:
            traj.close()
    return statistics()
