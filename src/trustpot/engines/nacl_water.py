"""NaCl in water with OpenMM: a small periodic box of flexible TIP3P water with 1 to 8 ion pairs.

Needs the ``openmm`` extra::

    trustpot data nacl-water --pairs 1 2 4 8 --frames 50 --out nacl.xyz

Force field: OpenMM's bundled ``amber14/tip3p.xml``, i.e. TIP3P water with its Amber bond and angle
terms (flexible water) and the Joung-Cheatham ion parameters fitted for TIP3P. Electrostatics by
PME (real-space cutoff ``cutoff`` nm, default 0.7, Ewald tolerance 5e-4), Lennard-Jones cut at the
same distance. No constraints: the sampled system is the labelled one, so every frame's forces are
the full force-field forces on every atom (bonds and angles included).

Box: ``grid``^3 sites (default 5^3 = 125) on a cubic lattice at the density of water (33.3
molecules/nm^3; 1.55 nm edge); ``2 n`` random sites hold the ions, the rest randomly oriented
waters (~340-370 atoms). Each trajectory builds its own box (its own ion sites and orientations),
minimises it, runs ``equilibration`` Langevin steps (NVT, LangevinMiddle integrator), then keeps one
frame every ``interval`` steps. ``--frames`` is per (pairs, temperature).

Close contacts: with ``contact_fraction`` > 0 that share of trajectories (drawn per trajectory from
its own seed) places its first Cl on a lattice site next to its first Na (a contact ion pair at
the start, ~3.1 Å apart before minimisation); the other ions stay on random sites. This biases the
sampled *configurations* towards close contacts; the force field and the labels are unchanged.
Frames record it in ``info["contact_start"]``.

Units: OpenMM works in nm, kJ/mol and kJ/mol/nm; frames are written in Å, eV and eV/Å with
:data:`trustpot.units.KJ_PER_MOL_TO_EV` and
:data:`trustpot.units.KJ_PER_MOL_PER_NM_TO_EV_PER_A`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from trustpot.engines.labelling import (
    Failure,
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
from trustpot.units import KJ_PER_MOL_PER_NM_TO_EV_PER_A, KJ_PER_MOL_TO_EV

#: 1 nm in Å.
NM_TO_A: Final[float] = 10.0
#: Number density of liquid water at 300 K, molecules per nm^3.
WATER_PER_NM3: Final[float] = 33.3
#: Force field file shipped with OpenMM (TIP3P + Joung-Cheatham ions).
FORCE_FIELD: Final[str] = "amber14/tip3p.xml"
#: TIP3P geometry: O-H length (Å) and H-O-H angle (degrees).
OH_LENGTH, HOH_ANGLE = 0.9572, 104.52


def require_openmm() -> None:
    """Raise :class:`ConfigError` when the ``openmm`` extra is not installed."""
    try:
        import openmm  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the NaCl-water engine needs openmm: pip install 'trustpot[openmm]' "
            "(or pip install openmm)"
        ) from None


@dataclass(frozen=True)
class BoxOptions:
    """Box and sampling settings.

    Attributes:
        grid: lattice sites per edge (grid^3 molecules + ions).
        cutoff: nm, real-space cutoff of PME and Lennard-Jones (< half the box edge).
        timestep: fs.
        friction: 1/ps.
        equilibration: steps after minimisation before the first kept frame.
        interval: steps between kept frames.
        chunk: frames per independent trajectory.
        contact_fraction: share of trajectories starting with a contact ion pair (0 to 1).
    """

    grid: int = 5
    cutoff: float = 0.7
    timestep: float = 0.5
    friction: float = 1.0
    equilibration: int = 2000
    interval: int = 200
    chunk: int = 20
    contact_fraction: float = 0.0

    @property
    def edge_nm(self) -> float:
        """Box edge, nm."""
        return float((self.grid**3 / WATER_PER_NM3) ** (1 / 3))

    def check(self, max_pairs: int) -> None:
        for name in ("cutoff", "timestep", "friction"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.grid < 3:
            raise ConfigError(f"--grid must be >= 3, got {self.grid}")
        if self.cutoff >= self.edge_nm / 2:
            raise ConfigError(
                f"--cutoff {self.cutoff} nm must be below half the box edge "
                f"({self.edge_nm / 2:.3f} nm for --grid {self.grid})"
            )
        if 2 * max_pairs > self.grid**3 // 2:
            raise ConfigError(
                f"{max_pairs} ion pairs do not fit in {self.grid}^3 sites; raise --grid"
            )
        if self.equilibration < 0:
            raise ConfigError(f"--equilibration must be >= 0, got {self.equilibration}")
        if not 0.0 <= self.contact_fraction <= 1.0:
            raise ConfigError(f"--contact-fraction must lie in [0, 1], got {self.contact_fraction}")
        for name in ("interval", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def _contact_order(grid: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the grid^3 sites whose first Na site (0) and first Cl site (n_pairs)
    are lattice neighbours (periodic), the rest random."""
    n = grid**3
    first = int(rng.integers(n))
    ijk = np.array(np.unravel_index(first, (grid, grid, grid)))
    step = np.zeros(3, dtype=np.int64)
    step[int(rng.integers(3))] = 1 if rng.random() < 0.5 else -1
    partner = int(np.ravel_multi_index(tuple((ijk + step) % grid), (grid, grid, grid)))
    rest = rng.permutation(np.setdiff1d(np.arange(n), [first, partner]))
    na_rest, others = rest[: n_pairs - 1], rest[n_pairs - 1 :]
    return np.concatenate([[first], na_rest, [partner], others]).astype(np.int64)


def build_box(
    n_pairs: int, grid: int, rng: np.random.Generator, contact: bool = False
) -> tuple[Any, np.ndarray, float]:
    """OpenMM topology, positions (Å) and box edge (Å): ions first (Na..., Cl...), then waters.

    With ``contact`` the first Na and the first Cl sit on neighbouring lattice sites.
    """
    import openmm.app as app

    edge = (grid**3 / WATER_PER_NM3) ** (1 / 3) * NM_TO_A
    spacing = edge / grid
    idx = np.arange(grid)
    sites = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3)
    sites = (sites + 0.5) * spacing
    order = _contact_order(grid, n_pairs, rng) if contact else rng.permutation(len(sites))
    ion_sites, water_sites = order[: 2 * n_pairs], order[2 * n_pairs :]
    top = app.Topology()
    chain = top.addChain()
    positions = []
    for k, site in enumerate(ion_sites):
        name, symbol = ("NA", "Na") if k < n_pairs else ("CL", "Cl")
        residue = top.addResidue(name, chain)
        top.addAtom(name, app.Element.getBySymbol(symbol), residue)
        positions.append(sites[site])
    theta = np.radians(HOH_ANGLE)
    local = np.array(
        [[0, 0, 0], [OH_LENGTH, 0, 0], [OH_LENGTH * np.cos(theta), OH_LENGTH * np.sin(theta), 0]]
    )
    oxygen, hydrogen = app.Element.getBySymbol("O"), app.Element.getBySymbol("H")
    for site in water_sites:
        residue = top.addResidue("HOH", chain)
        o = top.addAtom("O", oxygen, residue)
        h1 = top.addAtom("H1", hydrogen, residue)
        h2 = top.addAtom("H2", hydrogen, residue)
        top.addBond(o, h1)
        top.addBond(o, h2)
        positions.extend(sites[site] + local @ _random_rotation(rng).T)
    top.setUnitCellDimensions(np.array([edge, edge, edge]) / NM_TO_A)
    return top, np.array(positions), float(edge)


def nearest_cation_anion(positions: np.ndarray, numbers: np.ndarray, edge: float) -> float:
    """Shortest Na-Cl distance (Å) in a cubic periodic box of edge ``edge`` Å (minimum image)."""
    na, cl = positions[numbers == 11], positions[numbers == 17]
    d = na[:, None, :] - cl[None, :, :]
    d -= edge * np.round(d / edge)
    return float(np.linalg.norm(d, axis=-1).min())


def _md_task(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """One trajectory of one box; yields its kept frames (task function, runs in a worker)."""
    import openmm as mm
    import openmm.app as app
    import openmm.unit as u

    opts = BoxOptions(**payload["box"])
    n_pairs, temperature, seed = payload["pairs"], payload["temperature"], payload["seed"]
    rng = np.random.default_rng(seed)
    contact = bool(opts.contact_fraction > 0 and rng.random() < opts.contact_fraction)
    top, pos_a, edge = build_box(n_pairs, opts.grid, rng, contact)
    ff = app.ForceField(FORCE_FIELD)
    system = ff.createSystem(
        top,
        nonbondedMethod=app.PME,
        nonbondedCutoff=opts.cutoff * u.nanometer,
        constraints=None,
        rigidWater=False,
    )
    integrator = mm.LangevinMiddleIntegrator(
        temperature * u.kelvin, opts.friction / u.picosecond, opts.timestep * u.femtosecond
    )
    integrator.setRandomNumberSeed(seed % 2_000_000_000 + 1)
    platform = mm.Platform.getPlatformByName("CPU")
    threads = str(payload.get("threads", 1))
    context = mm.Context(system, integrator, platform, {"Threads": threads})
    context.setPositions(pos_a / NM_TO_A * u.nanometer)
    mm.LocalEnergyMinimizer.minimize(context, 10.0, 1000)
    context.setVelocitiesToTemperature(temperature * u.kelvin, seed % 2_000_000_000 + 1)
    if opts.equilibration:
        integrator.step(opts.equilibration)
    numbers = np.array([a.element.atomic_number for a in top.atoms()], dtype=np.int64)
    cell = np.eye(3) * edge
    base = {
        "engine": "openmm",
        "engine_version": f"openmm {mm.__version__}",
        "method": f"{FORCE_FIELD} (flexible TIP3P, Joung-Cheatham ions), PME "
        f"cutoff {opts.cutoff:g} nm",
        "temperature": float(temperature),
        "seed": int(seed),
        "run_seed": int(payload["run_seed"]),
        "n_pairs": n_pairs,
        "n_waters": int((numbers == 8).sum()),
        "trustpot_version": trustpot_version(),
        "config_type": f"nacl{n_pairs}@{temperature:g}K",
        "contact_start": contact,
    }
    for k, frame_id in enumerate(payload["frame_ids"]):
        integrator.step(opts.interval)
        if frame_id not in needed:
            continue
        state = context.getState(
            getEnergy=True, getForces=True, getPositions=True, enforcePeriodicBox=True
        )
        energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) * KJ_PER_MOL_TO_EV
        forces = (
            state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
            * KJ_PER_MOL_PER_NM_TO_EV_PER_A
        )
        positions = state.getPositions(asNumpy=True).value_in_unit(u.nanometer) * NM_TO_A
        forces, positions = np.asarray(forces), np.asarray(positions)
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
            yield frame_id, Failure("non-finite energy or forces (the simulation blew up)")
            continue
        info = dict(
            base,
            nearest_cation_anion=nearest_cation_anion(positions, numbers, edge),
            md_step=opts.equilibration + (k + 1) * opts.interval,
        )
        yield (
            frame_id,
            FrameRecord(
                numbers, positions, float(energy), forces, cell, np.ones(3, dtype=bool), info
            ),
        )


def generate_nacl_water(
    pairs: Sequence[int],
    frames: int,
    out: str | Path,
    temperatures: Sequence[float] = (300.0,),
    seed: int = 0,
    workers: Workers = 1,
    box: BoxOptions = BoxOptions(),
    progress: bool = True,
) -> RunSummary:
    """Sample NaCl in water with OpenMM; ``frames`` per (pairs, temperature), written to ``out``.

    Args:
        pairs: ion-pair counts, each 1 to 8 (more needs a larger ``box.grid``).
        frames: frames per (pairs, temperature).
        out: extended XYZ output (resumable).
        temperatures: K, each > 0.
        seed: run seed; each trajectory's seed is derived from it.
        workers: worker processes (one OpenMM CPU thread each), or a Dask cluster.
        box: box and sampling settings.

    Raises:
        ConfigError: bad options or missing extra, before any work.
    """
    require_openmm()
    if frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {frames}")
    if not pairs or any(n < 1 for n in pairs):
        raise ConfigError(f"--pairs must be >= 1, got {list(pairs)}")
    if len(set(pairs)) != len(pairs):
        raise ConfigError("--pairs lists a count more than once")
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ConfigError(f"temperatures must be > 0 K, got {list(temperatures)}")
    box.check(max(pairs))
    tasks = []
    for n in pairs:
        for t in temperatures:
            prefix = f"nacl{n}@{t:g}K"
            for c, ids in chunked_ids(prefix, frames, box.chunk):
                payload = {
                    "pairs": n,
                    "temperature": float(t),
                    "seed": stable_seed(seed, "nacl", n, float(t), c),
                    "run_seed": seed,
                    "box": asdict(box),
                    "frame_ids": ids,
                }
                tasks.append(Task(f"{prefix}/traj{c}", ids, payload))
    params = {
        "engine": "nacl-water",
        "pairs": list(pairs),
        "temperatures": [float(t) for t in temperatures],
        "frames": frames,
        "seed": seed,
        "box": asdict(box),
    }
    return run_tasks(
        tasks, _md_task, out, params, workers, desc="OpenMM NaCl-water", progress=progress
    )
