"""GFN2-xTB molecules: RDKit builds them from SMILES, Langevin MD samples them, tblite labels them.

Needs the ``xtb`` extra (``tblite``, ``rdkit``)::

    trustpot data molecules --smiles CCO --temperatures 300 600 --frames 100 --out mols.xyz
    trustpot data label in.xyz --method GFN2-xTB --out labelled.xyz

``--frames`` is per (SMILES, temperature): the example writes 200 frames. The frames of one
(SMILES, temperature) come from independent trajectories of ``chunk`` frames each; trajectory
``c`` embeds its own RDKit conformer (seed derived from the run seed, SMILES, temperature and
``c``), relaxes it with MMFF (UFF when MMFF has no parameters), draws Maxwell-Boltzmann
velocities, runs ``equilibration`` Langevin steps, then keeps one frame every ``interval`` steps.
A trajectory is the unit of resume: a rerun reruns only trajectories with missing frames and
writes only the missing frames.

With ``properties=True`` (:func:`generate_molecules`) every frame also carries what the same
GFN2-xTB single point computed, read from tblite's ``Result`` and converted from atomic units:
``atoms.info["homo_lumo_gap"]`` (eV, from ``orbital-energies`` in Hartree and
``orbital-occupations``), ``atoms.info["xtb_dipole"]`` ([3] e·Å, from ``dipole`` in e·Bohr) and
``atoms.arrays["xtb_charges"]`` ([n_atoms] Mulliken partial charges, e). The names avoid ASE's
calculator property names (``charges``, ``dipole``), which the extended XYZ reader would move
into a calculator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
from trustpot.errors import ConfigError, DataError
from trustpot.parallel import Workers

#: Methods ``tblite`` provides.
METHODS = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")
#: GFN2-xTB is parametrised for H to Rn.
MAX_Z = 86
#: Å per Bohr and eV per Hartree (CODATA 2018, the values ASE uses).
BOHR_ANGSTROM = 0.529177210903
HARTREE_EV = 27.211386245988
#: Keys of the per-frame properties recorded with ``properties=True``.
GAP_KEY, DIPOLE_KEY, CHARGES_KEY = "homo_lumo_gap", "xtb_dipole", "xtb_charges"


def require_xtb() -> None:
    """Raise :class:`ConfigError` when the ``xtb`` extra is not installed."""
    from importlib.util import find_spec

    # look, do not import: tblite loads an OpenMP runtime, which reads OMP_NUM_THREADS only once
    missing = [module for module in ("tblite", "rdkit") if find_spec(module) is None]
    if missing:
        raise ConfigError(
            f"the xTB engine needs {' and '.join(missing)}: pip install 'trustpot[xtb]' "
            "(or pip install tblite rdkit)"
        )


def tblite_version() -> str:
    from importlib.metadata import version

    return f"tblite {version('tblite')}"


@dataclass(frozen=True)
class MDOptions:
    """Langevin sampling settings.

    Attributes:
        timestep: fs.
        friction: Langevin friction, 1/fs.
        equilibration: steps before the first kept frame of each trajectory.
        interval: steps between kept frames.
        chunk: frames per independent trajectory.
    """

    timestep: float = 0.5
    friction: float = 0.01
    equilibration: int = 400
    interval: int = 40
    chunk: int = 10

    def check(self) -> None:
        for name in ("timestep", "friction"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.equilibration < 0:
            raise ConfigError(f"--equilibration must be >= 0, got {self.equilibration}")
        for name in ("interval", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown xTB method '{method}'; known: {', '.join(METHODS)}")


def _mol_from_smiles(smiles: str) -> Any:
    from rdkit import Chem
    from rdkit.rdBase import DisableLog

    DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ConfigError(f"invalid SMILES '{smiles}': RDKit cannot parse it")
    return Chem.AddHs(mol)


def charge_and_uhf(mol: Any) -> tuple[int, int]:
    """Total formal charge (e) and number of unpaired electrons of an RDKit molecule."""
    from rdkit import Chem

    return int(Chem.GetFormalCharge(mol)), int(
        sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    )


def embed(smiles: str, seed: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A 3D conformer with hydrogens: ``(numbers, positions [Å], charge, uhf)``.

    Raises:
        ConfigError: invalid SMILES, or RDKit cannot embed it.
    """
    # the modules that define these (``rdkit.Chem.AllChem`` re-exports them)
    from rdkit.Chem import rdDistGeom, rdForceFieldHelpers

    mol = _mol_from_smiles(smiles)
    params = rdDistGeom.ETKDGv3()
    # rdkit-stubs type these Boost.Python property setters as taking EmbedParameters
    params.randomSeed = int(seed)  # type: ignore[assignment]
    if rdDistGeom.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True  # type: ignore[assignment]
        if rdDistGeom.EmbedMolecule(mol, params) != 0:
            raise ConfigError(f"SMILES '{smiles}': RDKit cannot embed a 3D conformer")
    if rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol):
        rdForceFieldHelpers.MMFFOptimizeMolecule(mol, maxIters=500)
    elif rdForceFieldHelpers.UFFHasAllMoleculeParams(mol):
        rdForceFieldHelpers.UFFOptimizeMolecule(mol, maxIters=500)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    positions = np.array(mol.GetConformer().GetPositions(), dtype=np.float64)
    charge, uhf = charge_and_uhf(mol)
    return numbers, positions, charge, uhf


def check_smiles(smiles: Sequence[str], seed: int = 0) -> dict[str, int]:
    """Validate every SMILES before any work: parse, elements, embedding. Returns atom counts.

    Raises:
        ConfigError: naming the first bad SMILES and what is wrong with it.
    """
    from ase.data import chemical_symbols

    if not smiles:
        raise ConfigError("--smiles needs at least one SMILES string")
    if len(set(smiles)) != len(smiles):
        raise ConfigError("--smiles lists a SMILES more than once")
    sizes = {}
    for s in smiles:
        mol = _mol_from_smiles(s)
        bad = sorted(
            {a.GetAtomicNum() for a in mol.GetAtoms() if not 1 <= a.GetAtomicNum() <= MAX_Z}
        )
        if bad:
            names = ", ".join(chemical_symbols[z] if z > 0 else "*" for z in bad)
            raise ConfigError(f"SMILES '{s}': element(s) {names} not supported by GFN2-xTB (H-Rn)")
        numbers, *_ = embed(s, stable_seed(seed, s, "check"))
        sizes[s] = len(numbers)
    return sizes


@dataclass
class PropertyFrameRecord(FrameRecord):
    """A :class:`FrameRecord` with per-atom arrays too.

    Attributes:
        arrays: per-atom data written to ``atoms.arrays`` (each [n_atoms, ...]).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_atoms(self) -> Any:
        atoms = super().to_atoms()
        for key, value in self.arrays.items():
            atoms.new_array(key, np.asarray(value))
        return atoms


def homo_lumo_gap(energies: np.ndarray, occupations: np.ndarray) -> float:
    """HOMO-LUMO gap (eV) from tblite's orbital energies (Hartree) and occupations (e).

    Args:
        energies: [n_orbitals] (restricted) or [2, n_orbitals] (one row per spin) Hartree.
        occupations: same shape; a restricted orbital holds up to 2 electrons, a spin orbital 1.
            Fractional (Fermi-smeared) occupations are counted by their total per channel.

    Returns:
        ``min(LUMO) - max(HOMO)`` over the spin channels, eV; NaN when a channel has no
        occupied or no empty orbital.
    """
    e = np.atleast_2d(np.asarray(energies, dtype=np.float64))
    occ = np.atleast_2d(np.asarray(occupations, dtype=np.float64))
    per_orbital = 2.0 if e.shape[0] == 1 else 1.0
    homo, lumo = -np.inf, np.inf
    for channel in range(e.shape[0]):
        levels = np.sort(e[channel])
        n_occupied = int(np.ceil(occ[channel].sum() / per_orbital - 1e-6))
        if n_occupied < 1 or n_occupied >= levels.size:
            return float("nan")
        homo = max(homo, float(levels[n_occupied - 1]))
        lumo = min(lumo, float(levels[n_occupied]))
    return (lumo - homo) * HARTREE_EV


def xtb_properties(calc: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Gap, dipole and partial charges of the last single point of a tblite ASE calculator.

    Returns:
        ``(info, arrays)``: ``{GAP_KEY: eV, DIPOLE_KEY: [3] e·Å}`` and ``{CHARGES_KEY:
        [n_atoms] e}``, read from tblite's ``Result`` (atomic units) and converted.
    """
    result = calc._res  # tblite.interface.Result of the last calculate()
    gap = homo_lumo_gap(result.get("orbital-energies"), result.get("orbital-occupations"))
    dipole = np.asarray(result.get("dipole"), dtype=np.float64) * BOHR_ANGSTROM
    charges = np.asarray(result.get("charges"), dtype=np.float64)
    return {GAP_KEY: gap, DIPOLE_KEY: dipole}, {CHARGES_KEY: charges}


def _calculator(method: str, charge: int, uhf: int) -> Any:
    from tblite.ase import TBLite

    return TBLite(method=method, charge=charge, multiplicity=uhf + 1, verbosity=0)


def _md_task(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """One Langevin trajectory; yields its kept frames (task function, runs in a worker)."""
    from ase import Atoms, units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    opts = MDOptions(**payload["md"])
    seed, temperature, smiles = payload["seed"], payload["temperature"], payload["smiles"]
    numbers, positions, charge, uhf = embed(smiles, seed)
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = _calculator(payload["method"], charge, uhf)
    rng = np.random.default_rng(seed)
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29 deprecates the older name
        vd.thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())  # sampling only: labels are the unconstrained forces
    dyn = Langevin(
        atoms,
        timestep=opts.timestep * units.fs,
        temperature_K=temperature,
        friction=opts.friction / units.fs,
        fixcm=False,
        rng=rng,
    )
    if opts.equilibration:
        dyn.run(opts.equilibration)
    base = {
        "engine": "tblite",
        "engine_version": tblite_version(),
        "method": payload["method"],
        "smiles": smiles,
        "temperature": float(temperature),
        "seed": int(seed),
        "run_seed": int(payload["run_seed"]),
        "charge": charge,
        "uhf": uhf,
        "trustpot_version": trustpot_version(),
        "config_type": f"{smiles}@{temperature:g}K",
    }
    for k, frame_id in enumerate(payload["frame_ids"]):
        dyn.run(opts.interval)
        if frame_id not in needed:
            continue
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces(apply_constraint=False))
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
            yield frame_id, Failure("non-finite energy or forces")
            continue
        info = dict(base, md_step=opts.equilibration + (k + 1) * opts.interval)
        if not payload.get("properties"):
            yield (
                frame_id,
                FrameRecord(
                    atoms.numbers.copy(), atoms.positions.copy(), energy, forces, info=info
                ),
            )
            continue
        extra, arrays = xtb_properties(atoms.calc)
        info.update(extra)
        record = PropertyFrameRecord(
            atoms.numbers.copy(), atoms.positions.copy(), energy, forces, info=info, arrays=arrays
        )
        yield frame_id, record


def molecule_tasks(
    smiles: Sequence[str],
    temperatures: Sequence[float],
    frames: int,
    seed: int,
    method: str,
    md: MDOptions,
    properties: bool = False,
) -> list[Task]:
    """Tasks of a run: ``ceil(frames / chunk)`` trajectories per (SMILES, temperature).

    ``properties`` adds gap, dipole and partial charges to every frame (module docstring)."""
    tasks = []
    for s in smiles:
        for t in temperatures:
            prefix = f"{s}@{t:g}K"
            for c, ids in chunked_ids(prefix, frames, md.chunk):
                payload = {
                    "smiles": s,
                    "temperature": float(t),
                    "seed": stable_seed(seed, s, float(t), c),
                    "run_seed": seed,
                    "method": method,
                    "md": asdict(md),
                    "frame_ids": ids,
                }
                if properties:
                    payload["properties"] = True
                tasks.append(Task(f"{prefix}/traj{c}", ids, payload))
    return tasks


def generate_molecules(
    smiles: Sequence[str],
    temperatures: Sequence[float],
    frames: int,
    out: str | Path,
    seed: int = 0,
    workers: Workers = 1,
    method: str = "GFN2-xTB",
    md: MDOptions = MDOptions(),
    progress: bool = True,
    properties: bool = False,
) -> RunSummary:
    """Sample molecules from SMILES by Langevin MD with xTB forces; write the frames to ``out``.

    Args:
        smiles: one or more SMILES (hydrogens are added).
        temperatures: K, each > 0.
        frames: frames per (SMILES, temperature).
        out: extended XYZ output (appended to and resumed, see :mod:`trustpot.engines.labelling`).
        seed: run seed; every trajectory's seed is derived from it.
        workers: worker processes, or a Dask cluster (:data:`trustpot.parallel.Workers`).
        method: xTB method.
        md: Langevin settings.
        progress: show a progress bar.
        properties: also record the HOMO-LUMO gap, dipole and partial charges of every frame
            (module docstring); part of the run's options (a run without them is not resumed
            with them).

    Raises:
        ConfigError: bad options, invalid SMILES, unsupported elements, missing extra; all
            checked before any work starts.
    """
    require_xtb()
    check_method(method)
    md.check()
    if frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {frames}")
    if not temperatures:
        raise ConfigError("--temperatures needs at least one temperature")
    for t in temperatures:
        if not t > 0:
            raise ConfigError(f"temperatures must be > 0 K, got {t}")
    check_smiles(smiles, seed)
    tasks = molecule_tasks(smiles, temperatures, frames, seed, method, md, properties)
    params: dict[str, Any] = {
        "engine": "xtb-md",
        "smiles": list(smiles),
        "temperatures": [float(t) for t in temperatures],
        "frames": frames,
        "seed": seed,
        "method": method,
        "md": asdict(md),
    }
    if properties:  # absent otherwise: runs written before this option still resume
        params["properties"] = True
    return run_tasks(tasks, _md_task, out, params, workers, desc="xTB MD", progress=progress)


def _label_task(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """Single points of a few structures (task function, runs in a worker)."""
    from ase import Atoms

    for frame_id, s in zip(payload["frame_ids"], payload["structures"]):
        if frame_id not in needed:
            continue
        atoms = Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
        atoms.calc = _calculator(payload["method"], s["charge"], s["uhf"])
        try:
            energy = float(atoms.get_potential_energy())
            forces = np.array(atoms.get_forces())
        except Exception as err:  # tblite raises CalculationFailed / InputError
            yield frame_id, Failure(f"{type(err).__name__}: {err}".strip())
            continue
        info = dict(s["info"])
        info.update(
            engine="tblite",
            engine_version=tblite_version(),
            method=payload["method"],
            charge=s["charge"],
            uhf=s["uhf"],
            source=payload["source"],
            source_frame=s["index"],
            trustpot_version=trustpot_version(),
        )
        yield (
            frame_id,
            FrameRecord(
                atoms.numbers.copy(),
                atoms.positions.copy(),
                energy,
                forces,
                np.array(atoms.cell.array),
                np.array(atoms.pbc),
                info,
            ),
        )


def _charge_spin(info: dict[str, Any], path: str, frame: int) -> tuple[int, int]:
    charge = info.get("charge", 0)
    if "uhf" in info:
        uhf = info["uhf"]
    elif "multiplicity" in info:
        uhf = int(info["multiplicity"]) - 1
    else:
        uhf = 0
    try:
        charge, uhf = int(charge), int(uhf)
    except (TypeError, ValueError):
        raise DataError(path, "charge/spin must be integers", frame, "charge") from None
    if uhf < 0:
        raise DataError(path, f"negative number of unpaired electrons {uhf}", frame, "uhf")
    return charge, uhf


def label_file(
    source: str | Path,
    out: str | Path,
    method: str = "GFN2-xTB",
    workers: Workers = 1,
    per_task: int = 4,
    progress: bool = True,
) -> RunSummary:
    """Label every structure of ``source`` (any ASE format) with xTB energies and forces.

    Total charge and spin come from ``atoms.info``: ``charge`` (e), and ``uhf`` (unpaired
    electrons) or ``multiplicity`` (2S+1); without them a frame is neutral and closed shell.
    Frame ``k`` of the input gets ``frame_id`` ``frame-k`` and ``source_frame`` ``k``.

    Raises:
        DataError: unreadable input, overlapping atoms, or elements beyond Rn, before any work.
        ConfigError: unknown method, missing extra.
    """
    from ase.data import chemical_symbols

    from trustpot.data.reader import file_sha256, read_structures

    require_xtb()
    check_method(method)
    if per_task < 1:
        raise ConfigError(f"per_task must be >= 1, got {per_task}")
    source = Path(source)
    structures = read_structures(source, require=(), use_cache=False)
    items = []
    for k, s in enumerate(structures):
        bad = sorted({int(z) for z in s.numbers if z > MAX_Z})
        if bad:
            names = ", ".join(chemical_symbols[z] for z in bad)
            raise DataError(
                str(source), f"element(s) {names} not supported by {method}", k, "numbers"
            )
        charge, uhf = _charge_spin(s.info, str(source), k)
        info = {key: v for key, v in s.info.items() if key not in ("frame_id",)}
        items.append(
            {
                "numbers": s.numbers,
                "positions": s.positions,
                "cell": s.cell,
                "pbc": s.pbc,
                "charge": charge,
                "uhf": uhf,
                "info": info,
                "index": k,
            }
        )
    tasks = []
    for start in range(0, len(items), per_task):
        chunk = items[start : start + per_task]
        ids = tuple(f"frame-{it['index']}" for it in chunk)
        payload = {"method": method, "source": source.name, "structures": chunk, "frame_ids": ids}
        tasks.append(Task(f"frames{start}-{start + len(chunk) - 1}", ids, payload))
    params = {"engine": "xtb-label", "method": method, "source_sha256": file_sha256(source)}
    return run_tasks(tasks, _label_task, out, params, workers, desc="xTB label", progress=progress)


def ground_state_unpaired(z: int) -> int:
    """Unpaired electrons of the free atom's ground state (Hund's rules), main-group elements.

    Raises:
        ConfigError: a transition metal, lanthanide or actinide (the ground state of the free
            atom is not fixed by the group alone; give the file yourself).
    """
    from ase.data import chemical_symbols

    shells = [2, 8, 8, 18, 18, 32]  # elements per period
    period_start, period = 0, 0
    while z > period_start + shells[period]:
        period_start += shells[period]
        period += 1
    position = z - period_start  # 1-based within the period
    width = shells[period]
    if width == 2:
        return position % 2
    if width == 8:
        group = position
    else:  # periods with d (and f) blocks: only the s and p blocks are main-group
        tail = width - position  # 0 for the noble gas
        if position <= 2:
            group = position
        elif tail < 6:
            group = 8 - tail
        else:
            raise ConfigError(
                f"no fixed ground-state spin for {chemical_symbols[z]} (a d- or f-block "
                "element): label its isolated atom yourself and pass the file"
            )
    return {1: 1, 2: 0, 3: 1, 4: 2, 5: 3, 6: 2, 7: 1, 8: 0}[group]


def isolated_atoms(
    numbers: Sequence[int],
    out: str | Path,
    method: str = "GFN2-xTB",
    workers: Workers = 0,
    progress: bool = True,
) -> RunSummary:
    """Energies of the free atoms of ``numbers`` with xTB, each in its ground-state spin
    (:func:`ground_state_unpaired`), one single-atom frame per element in ``out``: the
    reference energies ``trustpot train --isolated-atoms`` reads.

    Raises:
        ConfigError: an element without a fixed ground-state spin, missing extra.
    """
    from ase import Atoms
    from ase.io import write

    elements = sorted({int(z) for z in numbers})
    frames = []
    for z in elements:
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        atom.info.update(uhf=ground_state_unpaired(z), config_type="IsolatedAtom")
        frames.append(atom)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_name(out.stem + ".atoms.xyz")
    write(source, frames, format="extxyz")
    return label_file(source, out, method, workers, per_task=len(frames), progress=progress)
