"""Batched :class:`Predictor` and the ASE :class:`TrustpotCalculator` built on it.

The calculator's ``implemented_properties`` are exactly the properties it returns: a plain
potential gives ``energy``, ``free_energy``, ``forces``, ``energies`` and, for periodic
cells, ``stress``; a reliability wrapper (``trustpot uq fit``) adds what it provides among
``energy_std`` (eV), ``forces_std`` (per atom, eV/Å), ``reliability`` (0 to 1) and
``atom_importance`` (per atom).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import (
    Calculator,
    PropertyNotImplementedError,
    all_changes,
    compare_atoms,
)

from trustpot import keys as K
from trustpot.data.graph import (
    Graph,
    PairSource,
    collate,
    edge_tensors,
    structure_to_graph,
    to_device,
)
from trustpot.data.neighbors import VerletNeighbors
from trustpot.data.reader import atoms_to_structure
from trustpot.data.structures import Structure, check_species
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import load_model
from trustpot.models.contract import Model
from trustpot.models.potential import Potential, compute_outputs

#: ASE names of the properties a model output gives, in the order they are listed.
ASE_PROPERTIES: dict[str, list[str]] = {
    K.ENERGY: ["energy", "free_energy"],
    K.FORCES: ["forces"],
    K.NODE_ENERGY: ["energies"],
    K.STRESS: ["stress"],
    K.ENERGY_STD: ["energy_std"],
    K.FORCES_STD: ["forces_std"],
    K.RELIABILITY: ["reliability"],
    K.ATOM_IMPORTANCE: ["atom_importance"],
}
#: outputs the calculator computes on every call (stress only when asked: it costs extra)
CALCULATOR_OUTPUTS = (
    K.ENERGY,
    K.FORCES,
    K.NODE_ENERGY,
    K.ENERGY_STD,
    K.FORCES_STD,
    K.RELIABILITY,
    K.ATOM_IMPORTANCE,
)


class Predictor:
    """Evaluates a potential, or a reliability wrapper, on many structures in batches.

    Args:
        model: the potential or wrapper (put in eval mode).
        device: torch device.
        batch_size: structures per forward pass.
    """

    def __init__(self, model: Model, device: str = "cpu", batch_size: int = 32) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", batch_size: int = 32
    ) -> Predictor:
        """Predictor of the potential or wrapper stored at ``path`` (``weights_only=True``)."""
        return cls(load_model(path), device, batch_size)

    @property
    def species(self) -> list[int]:
        return self.model.species

    def supported_outputs(self) -> frozenset[str]:
        """Model outputs (keys of :mod:`trustpot.keys`) this predictor can return."""
        return self.model.supported_outputs()

    def scored_outputs(self) -> tuple[str, ...]:
        """``energy``, ``forces`` and every ``property:<name>`` output of the model (a
        property head's): what :func:`~trustpot.metrics.accuracy.accuracy_metrics` scores."""
        props = sorted(k for k in self.supported_outputs() if k.startswith(K.PROPERTY_PREFIX))
        return (K.ENERGY, K.FORCES, *props)

    def implemented_properties(self) -> list[str]:
        """ASE names of everything :meth:`predict` can return."""
        have = self.supported_outputs()
        return [name for key, names in ASE_PROPERTIES.items() if key in have for name in names]

    def predict_structures(
        self,
        structures: Sequence[Structure],
        outputs: Iterable[str] = (K.ENERGY, K.FORCES),
        source: str = "input",
        pairs: PairSource | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Per-structure results as NumPy arrays in eV, Å units.

        Args:
            structures: what to evaluate.
            pairs: where the neighbour pairs come from (default: a fresh list each; the ASE
                calculator passes its :class:`~trustpot.data.neighbors.VerletNeighbors`).
            outputs: subset of :meth:`supported_outputs` (``energy``, ``forces``, ``stress``,
                ``virial``, ``energies`` and, for wrappers, ``energy_std``, ``forces_std``,
                ``reliability``, ``atom_importance``, samples).
            source: name used in errors (file name).

        Returns:
            one dict per structure: ``energy`` float64 scalar, ``forces`` [n_atoms, 3],
            ``stress`` [3, 3], ``energies`` [n_atoms], ``energy_std`` scalar,
            ``forces_std`` [n_atoms], ``reliability`` scalar, ``atom_importance`` [n_atoms].
        """
        check_species(list(structures), self.species, source)
        specs = self.model.neighbor_lists()
        results: list[dict[str, np.ndarray]] = []
        for start in range(0, len(structures), self.batch_size):
            chunk = structures[start : start + self.batch_size]
            g = collate([structure_to_graph(s, specs, self.model.dtype, pairs) for s in chunk])
            results.extend(self.predict_graph(to_device(g, self.device), outputs))
        return results

    def predict_graph(
        self, g: Graph, outputs: Iterable[str] = (K.ENERGY, K.FORCES)
    ) -> list[dict[str, np.ndarray]]:
        """:meth:`predict_structures` of a batch already on :attr:`device` (a graph from
        :func:`~trustpot.data.graph.collate`); one dict per structure, as it returns."""
        pred = self.model(g, frozenset(outputs), create_graph=False)
        return split_batch(pred, g, self.model.output_specs())

    def predict(
        self, atoms: Sequence[Atoms], outputs: Iterable[str] = (K.ENERGY, K.FORCES)
    ) -> list[dict[str, np.ndarray]]:
        """Like :meth:`predict_structures` for ASE ``Atoms``."""
        return self.predict_structures([atoms_to_structure(a) for a in atoms], outputs)


def split_batch(
    pred: dict[str, torch.Tensor], g: dict[str, torch.Tensor], specs: dict[str, K.FieldSpec]
) -> list[dict[str, np.ndarray]]:
    """Cut batched outputs into per-structure NumPy arrays, by the level of each output's
    spec as the model declares it (``graph``: one row per structure; ``node``: its atoms)."""
    n_atoms = g[K.N_ATOMS].tolist()
    bounds = np.concatenate([[0], np.cumsum(n_atoms)])
    out: list[dict[str, np.ndarray]] = []
    for k in range(len(n_atoms)):
        item: dict[str, np.ndarray] = {}
        for key, value in pred.items():
            arr = value.detach().cpu().numpy()
            if specs[key].level == "graph":
                item[key] = arr[k]
            else:
                item[key] = arr[bounds[k] : bounds[k + 1]]
        out.append(item)
    return out


class TrustpotCalculator(Calculator):
    """ASE calculator of a trustpot potential.

    ``stress`` is returned for periodic cells only (asking for it on a molecule raises
    ``PropertyNotImplementedError``, as ASE expects). Neighbour lists are Verlet lists with a
    ``skin`` (:class:`~trustpot.data.neighbors.VerletNeighbors`): built within cutoff + skin,
    reused while no atom has moved more than skin / 2 and the cell is unchanged, filtered to
    the cutoff on every call, so the results equal a fresh list's.

    Between MD steps only positions change: the graph tensors that depend on the atomic
    numbers, cell and periodicity alone are built once and reused while those stay equal
    (positions and edges are new on every call), so each call's input equals the one
    :meth:`Predictor.predict_structures` builds. ASE's change check is answered without
    ``numpy.isclose`` when nothing but the positions can have changed (:func:`system_changes`),
    with the same answer as ASE's.

    Args:
        predictor: what evaluates the model.
        skin: Verlet skin, Å (0: a fresh list on every call).
        compile: evaluate a plain potential's per-atom energies through ``torch.compile``
            (dynamic shapes; the model itself is not changed, so training it still works).
            Faster per step on small molecules (1.25x per MD step for PaiNN on ethanol, one
            CPU thread) but the first call compiles (about 5 s with inductor's on-disk cache,
            45 s without, on a 2-core machine) and results equal the eager ones only to float
            rounding (fused kernels reorder operations: about 1e-7 relative in float32), not
            to the last bit. Off by default here; ``trustpot md`` (``--compile auto``) switches
            it on mid-run when the run is long enough and the compiled step proves faster
            (:mod:`trustpot.md_compile`, :meth:`set_compiled`). A deep ensemble whose members
            stack (:mod:`trustpot.uq.stacked`) compiles its stacked network instead.
    """

    #: per instance: exactly what its predictor returns
    implemented_properties: list[str] = [  # noqa: RUF012 (ASE's attribute, replaced per instance)
        "energy",
        "free_energy",
        "forces",
        "energies",
        "stress",
    ]

    def __init__(
        self, predictor: Predictor, skin: float = 1.0, compile: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]  # ase is untyped
        self.predictor = predictor
        self.implemented_properties = predictor.implemented_properties()
        self.neighbors = VerletNeighbors(skin)
        #: (key of numbers, cell and pbc; the graph built for them), see :meth:`graph`
        self._static: tuple[tuple[bytes, ...], Graph] | None = None
        #: the compiled ``node_energies`` of a plain potential (made on first use), else None
        self._compiled: Any = None
        #: evaluate through the compiled path (``compile=True`` or :meth:`set_compiled`)
        self.compiled = False
        if compile:
            self.set_compiled(True)

    def compile_problem(self) -> str | None:
        """Why this calculator's model has no compiled path, or None when it has one (a plain
        potential, or a deep ensemble whose members stack)."""
        from trustpot.uq.ensemble import DeepEnsemble  # uq.calibration imports this module

        model = self.predictor.model
        if isinstance(model, DeepEnsemble):
            return model.stack_problem()
        if isinstance(model, Potential):
            return None
        return (
            "compile needs a plain potential or a deep ensemble whose members stack, "
            f"got a '{type(model).__name__}'"
        )

    def set_compiled(self, on: bool) -> None:
        """Evaluate through ``torch.compile`` from the next call on (``on``), or eagerly again.

        The first compiled call compiles (seconds); :mod:`trustpot.md_compile` switches on
        when a run shows it pays.

        Raises:
            ConfigError: ``on`` and the model has no compiled path (:meth:`compile_problem`).
        """
        from trustpot.uq.ensemble import DeepEnsemble

        if on and (problem := self.compile_problem()) is not None:
            raise ConfigError(problem)
        model = self.predictor.model
        if isinstance(model, DeepEnsemble):
            model.compile_stacked(on)  # the ensemble compiles its own stacked network
        elif isinstance(model, Potential) and on and self._compiled is None:
            self._compiled = torch.compile(model.node_energies, dynamic=True)
        self.compiled = on

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", skin: float = 1.0, compile: bool = False
    ) -> TrustpotCalculator:
        return cls(Predictor.from_checkpoint(path, device), skin, compile)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        super().calculate(atoms, properties, system_changes)  # type: ignore[no-untyped-call]
        assert self.atoms is not None
        periodic = bool(np.any(self.atoms.pbc))
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a periodic cell")
        # energy, forces, per-atom energies (and a wrapper's uncertainties) come from one call;
        # the strain derivative costs extra, so stress is computed only when asked for
        outputs = set(CALCULATOR_OUTPUTS) & self.predictor.supported_outputs()
        if "stress" in properties:
            outputs.add(K.STRESS)
        g = self.graph(self.atoms)
        if not self.compiled or self._compiled is None:  # eager, or an ensemble's own path
            (res,) = self.predictor.predict_graph(g, outputs)
        else:
            model = self.predictor.model
            pred = compute_outputs(self._compiled, g, model.check_outputs(outputs), False)
            (res,) = split_batch(pred, g, model.output_specs())
        self.results = {
            "energy": float(res[K.ENERGY]),
            "free_energy": float(res[K.ENERGY]),
            "forces": res[K.FORCES].astype(np.float64),
            "energies": res[K.NODE_ENERGY].astype(np.float64),
        }
        for key in (K.ENERGY_STD, K.RELIABILITY):
            if key in res:
                self.results[key] = float(res[key])
        for key in (K.FORCES_STD, K.ATOM_IMPORTANCE):
            if key in res:
                self.results[key] = res[key].astype(np.float64)
        if K.STRESS in outputs:
            s = res[K.STRESS].astype(np.float64)
            self.results["stress"] = np.array(
                [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
            )

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's list of system changes since the last calculation (:func:`system_changes`)."""
        if self.atoms is None or self.ignored_changes:
            changes: list[str] = super().check_state(atoms, tol)  # type: ignore[no-untyped-call]
            return changes
        return system_changes(self.atoms, atoms, tol)

    def graph(self, atoms: Atoms) -> Graph:
        """The model's input for ``atoms`` (a batch of one, on the predictor's device), equal
        to ``collate([structure_to_graph(...)])`` with this calculator's Verlet lists.

        Tensors that depend only on the atomic numbers, cell and periodicity (numbers, cell,
        ``batch``, empty labels...) are reused while those are unchanged; positions [n_atoms,
        3] (model dtype) and edges are new on every call.
        """
        model = self.predictor.model
        specs = model.neighbor_lists()
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        numbers = np.asarray(atoms.numbers, dtype=np.int64)
        key = (numbers.tobytes(), cell.tobytes(), pbc.tobytes())
        if self._static is None or self._static[0] != key:
            structure = atoms_to_structure(atoms)
            check_species([structure], self.predictor.species, "atoms")
            g = collate([structure_to_graph(structure, specs, model.dtype, self.neighbors)])
            g = to_device(g, self.predictor.device)
            self._static = (key, g)
            return dict(g)
        positions = np.asarray(atoms.positions, dtype=np.float64)
        g = dict(self._static[1])
        g[K.POSITIONS] = torch.as_tensor(positions, dtype=model.dtype)
        g.update(edge_tensors(self.neighbors, positions, cell, pbc, specs, model.dtype))
        return to_device(g, self.predictor.device) if self.predictor.device != "cpu" else g


#: what ASE's change check compares besides the cell and periodicity
_ARRAYS_CHECKED = ("positions", "numbers", "initial_charges", "initial_magmoms")


def system_changes(old: Atoms, new: Atoms, tol: float = 1e-15) -> list[str]:
    """ASE's ``compare_atoms(old, new, tol)`` without its per-array ``numpy.isclose`` in the
    case an MD step produces: everything but the positions exactly equal, positions finite.

    Then the answer is ``["positions"]`` when any coordinate moved by more than ``tol`` Å
    (ASE's ``allclose(rtol=0, atol=tol)``), else ``[]``. Any other case (a changed cell,
    periodicity, composition, charges or magnetic moments, a differing set of arrays,
    non-finite positions) is ASE's own comparison.
    """
    same = (
        np.array_equal(old.cell.array, new.cell.array)
        and np.array_equal(old.pbc, new.pbc)
        and old.arrays.keys() & set(_ARRAYS_CHECKED) == new.arrays.keys() & set(_ARRAYS_CHECKED)
        and all(
            np.array_equal(old.arrays[k], new.arrays[k])
            for k in _ARRAYS_CHECKED[1:]
            if k in old.arrays
        )
    )
    a, b = old.arrays["positions"], new.arrays["positions"]
    if same and a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all():
        return ["positions"] if bool((np.abs(a - b) > tol).any()) else []
    changes: list[str] = compare_atoms(old, new, tol=tol)
    return changes
