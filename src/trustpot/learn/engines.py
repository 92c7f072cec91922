"""The reference engines as oracles of ``trustpot learn``: sample labelled frames, label frames.

An :class:`Oracle` wraps one engine of :mod:`trustpot.engines` behind two calls, each a plain
function of (inputs -> files) that resumes after a kill
(:func:`trustpot.engines.labelling.run_tasks`):

- :meth:`Oracle.sample`: labelled frames sampled by the engine's own dynamics at a temperature
  (the starting frames and the held-out test frames);
- :meth:`Oracle.label`: energies and forces of the frames of a file (the selected frames).

``xtb``: GFN2-xTB molecules from SMILES (:mod:`trustpot.engines.xtb`; total charge and unpaired
electrons travel in ``atoms.info`` from the seed frame to the explored frames). ``nbody``: the
charged N-body system (:mod:`trustpot.engines.nbody`, exact energies and forces, no extra
package; particle ``k`` has charge +1 e for even ``k``, -1 e for odd ``k``, so explored frames
keep the atom order of their seed). ``nacl-water``: OpenMM NaCl(aq) boxes
(:mod:`trustpot.engines.nacl_water`; a frame is labelled with the engine's own topology for its
ion-pair count, rebuilt from the atom order Na..., Cl..., then O H H per water, which explored
frames keep). Adding an engine means one class with these two calls.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from trustpot.engines.labelling import FrameRecord, RunSummary, Task, run_tasks, trustpot_version
from trustpot.errors import ConfigError, DataError
from trustpot.parallel import Workers


class Oracle(abc.ABC):
    """A reference engine seen by the active-learning loop."""

    #: ``--engine`` name.
    name: ClassVar[str]
    #: ``atoms.info`` keys an explored frame inherits from its seed frame (what labelling
    #: needs to know beyond the atoms, e.g. total charge).
    carry: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """What shapes the labels (engine, method, systems): JSON data for step configs."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`ConfigError` when the engine cannot run here (missing extra) or a
        given system is bad, before any work (no systems: the frames come in files)."""

    @abc.abstractmethod
    def sample(
        self,
        out: Path,
        frames: int,
        temperature: float,
        seed: int,
        workers: Workers,
        progress: bool,
    ) -> RunSummary:
        """Write ``frames`` labelled frames per system, sampled at ``temperature`` K, to ``out``."""

    @abc.abstractmethod
    def label(self, source: Path, out: Path, workers: Workers, progress: bool) -> RunSummary:
        """Write every frame of ``source`` with the engine's energy (eV) and forces (eV/Å) to
        ``out``; frame ``k`` gets ``frame_id`` ``frame-k``, its info kept."""


@dataclasses.dataclass(frozen=True)
class XTBOracle(Oracle):
    """GFN2-xTB (tblite) on molecules built from SMILES by RDKit."""

    smiles: tuple[str, ...]
    method: str = "GFN2-xTB"
    name: ClassVar[str] = "xtb"
    carry: ClassVar[tuple[str, ...]] = ("smiles", "charge", "uhf")

    def params(self) -> dict[str, Any]:
        return {"engine": self.name, "method": self.method, "smiles": list(self.smiles)}

    def check(self) -> None:
        from trustpot.engines.xtb import check_smiles, require_xtb

        require_xtb()
        if self.smiles:
            check_smiles(self.smiles)

    def sample(
        self,
        out: Path,
        frames: int,
        temperature: float,
        seed: int,
        workers: Workers,
        progress: bool,
    ) -> RunSummary:
        from trustpot.engines.xtb import generate_molecules

        return generate_molecules(
            self.smiles, [temperature], frames, out, seed, workers, self.method, progress=progress
        )

    def label(self, source: Path, out: Path, workers: Workers, progress: bool) -> RunSummary:
        from trustpot.engines.xtb import label_file

        return label_file(source, out, self.method, workers, progress=progress)


def _nbody_label_task(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """Exact N-body energies and forces of a few frames (task function, runs in a worker)."""
    from trustpot.engines.nbody import MODEL_VERSION, charges_of, energy_forces

    for frame_id, s in zip(payload["frame_ids"], payload["structures"]):
        if frame_id not in needed:
            continue
        positions = np.asarray(s["positions"], dtype=np.float64)
        energy, forces = energy_forces(positions, charges_of(len(positions)), payload["r0"])
        info = dict(
            s["info"],
            engine="trustpot-nbody",
            engine_version=MODEL_VERSION,
            method=f"coulomb+r^-9 (r0={payload['r0']:g} A)",
            source=payload["source"],
            source_frame=s["index"],
            trustpot_version=trustpot_version(),
        )
        yield frame_id, FrameRecord(np.asarray(s["numbers"]), positions, energy, forces, info=info)


@dataclasses.dataclass(frozen=True)
class NBodyOracle(Oracle):
    """The charged N-body system: ``particles`` gives the particle counts (systems)."""

    particles: tuple[int, ...]
    name: ClassVar[str] = "nbody"
    carry: ClassVar[tuple[str, ...]] = ("particles",)

    def _mc(self) -> Any:
        from trustpot.engines.nbody import MCOptions

        return MCOptions()

    def params(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "particles": list(self.particles),
            "mc": dataclasses.asdict(self._mc()),
        }

    def check(self) -> None:
        if any(n < 2 for n in self.particles):
            raise ConfigError(f"--particles must be >= 2, got {list(self.particles)}")
        if len(set(self.particles)) != len(self.particles):
            raise ConfigError("--particles lists a count more than once")
        for n in self.particles:
            self._mc().check(n)

    def sample(
        self,
        out: Path,
        frames: int,
        temperature: float,
        seed: int,
        workers: Workers,
        progress: bool,
    ) -> RunSummary:
        from trustpot.engines.nbody import generate_nbody

        return generate_nbody(
            self.particles, frames, out, [temperature], seed, workers, self._mc(), progress
        )

    def label(self, source: Path, out: Path, workers: Workers, progress: bool) -> RunSummary:
        from ase.data import atomic_numbers

        from trustpot.data.reader import file_sha256, read_structures
        from trustpot.engines.nbody import NEGATIVE, POSITIVE

        structures = read_structures(source, require=(), use_cache=False)
        want = {0: POSITIVE, 1: NEGATIVE}
        items = []
        for k, s in enumerate(structures):
            expected = [atomic_numbers[want[i % 2]] for i in range(s.n_atoms)]
            if list(s.numbers) != expected:
                raise DataError(
                    str(source), "N-body frames alternate Na (+1 e) and Cl (-1 e)", k, "numbers"
                )
            info = {key: v for key, v in s.info.items() if key != "frame_id"}
            items.append({"numbers": s.numbers, "positions": s.positions, "info": info, "index": k})
        per_task = 16
        tasks = []
        for start in range(0, len(items), per_task):
            chunk = items[start : start + per_task]
            ids = tuple(f"frame-{it['index']}" for it in chunk)
            payload = {
                "structures": chunk,
                "frame_ids": ids,
                "r0": self._mc().r0,
                "source": source.name,
            }
            tasks.append(Task(f"frames{start}-{start + len(chunk) - 1}", ids, payload))
        params = {
            "engine": "nbody-label",
            "r0": self._mc().r0,
            "source_sha256": file_sha256(source),
        }
        return run_tasks(
            tasks, _nbody_label_task, out, params, workers, desc="N-body label", progress=progress
        )


def _nacl_label_task(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """OpenMM single points of NaCl(aq) frames (task function, runs in a worker)."""
    import openmm as mm
    import openmm.app as app
    import openmm.unit as u

    from trustpot.engines.nacl_water import FORCE_FIELD, NM_TO_A, build_box
    from trustpot.units import KJ_PER_MOL_PER_NM_TO_EV_PER_A, KJ_PER_MOL_TO_EV

    ff = app.ForceField(FORCE_FIELD)
    platform = mm.Platform.getPlatformByName("CPU")
    for frame_id, s in zip(payload["frame_ids"], payload["structures"]):
        if frame_id not in needed:
            continue
        # the engine's own topology for this many ion pairs and lattice sites (atom order: Na,
        # Cl, then O H H per water); its random placement is not used, only its bonds
        top, _, _ = build_box(s["pairs"], s["grid"], np.random.default_rng(0))
        system = ff.createSystem(
            top,
            nonbondedMethod=app.PME,
            constraints=None,
            nonbondedCutoff=payload["cutoff"] * u.nanometer,
            rigidWater=False,
        )
        context = mm.Context(system, mm.VerletIntegrator(0.001), platform, {"Threads": "1"})
        context.setPositions(np.asarray(s["positions"]) / NM_TO_A * u.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) * KJ_PER_MOL_TO_EV
        forces = (
            np.asarray(
                state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
            )
            * KJ_PER_MOL_PER_NM_TO_EV_PER_A
        )
        info = dict(
            s["info"],
            engine="openmm",
            engine_version=f"openmm {mm.__version__}",
            method=payload["method"],
            source=payload["source"],
            source_frame=s["index"],
            trustpot_version=trustpot_version(),
        )
        yield (
            frame_id,
            FrameRecord(
                np.asarray(s["numbers"]),
                np.asarray(s["positions"]),
                float(energy),
                forces,
                np.asarray(s["cell"]),
                np.ones(3, dtype=bool),
                info,
            ),
        )


@dataclasses.dataclass(frozen=True)
class NaClWaterOracle(Oracle):
    """OpenMM NaCl(aq) (:mod:`trustpot.engines.nacl_water`): ``pairs`` gives the ion-pair counts
    (systems), in the engine's default box (125 lattice sites, flexible TIP3P, PME)."""

    pairs: tuple[int, ...]
    name: ClassVar[str] = "nacl-water"
    carry: ClassVar[tuple[str, ...]] = ("n_pairs",)

    def _box(self) -> Any:
        from trustpot.engines.nacl_water import BoxOptions

        return BoxOptions()

    def params(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "pairs": list(self.pairs),
            "box": dataclasses.asdict(self._box()),
        }

    def check(self) -> None:
        from trustpot.engines.nacl_water import require_openmm

        require_openmm()
        if any(n < 1 for n in self.pairs):
            raise ConfigError(f"--pairs must be >= 1, got {list(self.pairs)}")
        if len(set(self.pairs)) != len(self.pairs):
            raise ConfigError("--pairs lists a count more than once")
        self._box().check(max(self.pairs, default=1))

    def sample(
        self,
        out: Path,
        frames: int,
        temperature: float,
        seed: int,
        workers: Workers,
        progress: bool,
    ) -> RunSummary:
        from trustpot.engines.nacl_water import generate_nacl_water

        return generate_nacl_water(
            self.pairs, frames, out, [temperature], seed, workers, self._box(), progress
        )

    def label(self, source: Path, out: Path, workers: Workers, progress: bool) -> RunSummary:
        from trustpot.data.reader import file_sha256, read_structures
        from trustpot.engines.nacl_water import FORCE_FIELD, NM_TO_A

        box = self._box()
        structures = read_structures(source, require=(), use_cache=False)
        items = []
        for k, s in enumerate(structures):
            pairs = int((s.numbers == 11).sum())
            waters = (s.n_atoms - 2 * pairs) // 3
            grid = round((2 * pairs + waters) ** (1 / 3))
            expected = [11] * pairs + [17] * pairs + [8, 1, 1] * waters
            if list(s.numbers) != expected or grid**3 != 2 * pairs + waters:
                raise DataError(
                    str(source),
                    "not a NaCl(aq) frame of the engine (Na..., Cl..., "
                    "then O H H per water, on a cubic lattice of sites)",
                    k,
                    "numbers",
                )
            edge = dataclasses.replace(box, grid=grid).edge_nm * NM_TO_A
            if not (s.pbc.all() and np.allclose(s.cell, np.eye(3) * edge, atol=1e-6)):
                raise DataError(
                    str(source),
                    f"the engine's cubic periodic cell of edge {edge:.4f} Å is needed",
                    k,
                    "cell",
                )
            info = {key: v for key, v in s.info.items() if key != "frame_id"}
            items.append(
                {
                    "numbers": s.numbers,
                    "positions": s.positions,
                    "cell": s.cell,
                    "pairs": pairs,
                    "grid": grid,
                    "info": info,
                    "index": k,
                }
            )
        method = (
            f"{FORCE_FIELD} (flexible TIP3P, Joung-Cheatham ions), PME cutoff {box.cutoff:g} nm"
        )
        tasks = []
        for start in range(0, len(items), 4):
            chunk = items[start : start + 4]
            ids = tuple(f"frame-{it['index']}" for it in chunk)
            payload = {
                "structures": chunk,
                "frame_ids": ids,
                "cutoff": box.cutoff,
                "method": method,
                "source": source.name,
            }
            tasks.append(Task(f"frames{start}-{start + len(chunk) - 1}", ids, payload))
        params = {
            "engine": "nacl-water-label",
            "box": dataclasses.asdict(box),
            "source_sha256": file_sha256(source),
        }
        return run_tasks(
            tasks, _nacl_label_task, out, params, workers, desc="OpenMM label", progress=progress
        )


#: ``--engine`` -> oracle class.
ORACLES: dict[str, type[Oracle]] = {
    "xtb": XTBOracle,
    "nbody": NBodyOracle,
    "nacl-water": NaClWaterOracle,
}
