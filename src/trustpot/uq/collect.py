"""Run a reliability wrapper over labelled structures and gather errors beside uncertainties."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from trustpot import keys as K
from trustpot.data.graph import collate, structure_to_graph, to_device
from trustpot.data.structures import Structure, check_species
from trustpot.errors import DataError
from trustpot.metrics.accuracy import per_structure_force_mae
from trustpot.uq.base import UQModel


@dataclass
class Collected:
    """Predictions, labels and uncertainties of one dataset, flattened for the metrics.

    Per structure ([n_structures]): ``n_atoms``, ``energy``/``energy_ref`` (eV, NaN where the
    label is missing), ``energy_std`` (eV), ``force_mae`` (eV/Å, mean |ΔF| over atoms and
    components; NaN without force labels), ``force_std_mean`` (eV/Å, mean per-atom std),
    ``reliability``. Per atom ([n_atoms_total]): ``atom_force_error`` (|ΔF| norm, eV/Å),
    ``atom_force_std`` (eV/Å), ``atom_importance``, ``atom_structure`` (index of the structure).
    ``*_raw`` arrays (``energy_std_raw``, ``force_std_mean_raw``, ``atom_force_std_raw``): the
    same standard deviations before recalibration.
    Per force component ([3 n_atoms_total]): ``comp_pred``, ``comp_ref``, ``comp_std``.
    Samples: ``energy_samples`` [n_structures, M], ``comp_samples`` [3 n_atoms_total, M].
    Arrays a method does not provide are absent from :attr:`arrays`.
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = ""

    def has(self, key: str) -> bool:
        return key in self.arrays

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def n_structures(self) -> int:
        return len(self.arrays["n_atoms"])


def per_structure_mean(per_atom: np.ndarray, owner: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """[n_structures] mean of a per-atom array [n_atoms_total] over each structure's atoms
    (``owner``: structure index of each atom; ``n_atoms``: atoms per structure)."""
    means: np.ndarray = np.bincount(owner, weights=per_atom, minlength=len(n_atoms)) / n_atoms
    return means


def collect(
    model: UQModel,
    structures: Sequence[Structure],
    batch_size: int = 16,
    source: str = "data",
    progress: bool = True,
    want_samples: bool = True,
) -> Collected:
    """Evaluate ``model`` on every structure (means, std, reliability, samples, importance).

    Args:
        model: the wrapper (put in eval mode here).
        structures: labelled structures; energies and/or forces may be missing per frame.
        batch_size: structures per call.
        source: name used in errors and in the progress bar.
        want_samples: also keep samples (for the fair CRPS) when the method has them.
    """
    if not structures:
        raise DataError(source, "no structures (empty dataset)")
    check_species(list(structures), model.species, source)
    model.eval()
    provided = model.supported_outputs()
    wanted = {K.ENERGY, K.FORCES} | (
        provided & {K.ENERGY_STD, K.FORCES_STD, K.RELIABILITY, K.ATOM_IMPORTANCE}
        | provided & {K.ENERGY_STD_RAW, K.FORCES_STD_RAW}
    )
    if want_samples:
        wanted |= provided & {K.ENERGY_SAMPLES, K.FORCES_SAMPLES}
    device = next(model.parameters()).device
    specs = model.neighbor_lists()
    parts: dict[str, list[np.ndarray]] = {}

    def add(key: str, value: np.ndarray) -> None:
        parts.setdefault(key, []).append(value)

    t0 = time.perf_counter()
    bar = tqdm(total=len(structures), desc=f"uq {source}", unit="frame", disable=not progress)
    offset = 0
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        g = to_device(collate([structure_to_graph(s, specs, model.dtype) for s in chunk]), device)
        pred = {k: v.detach().double().cpu().numpy() for k, v in model(g, wanted).items()}
        n_atoms = np.array([s.n_atoms for s in chunk])
        owner = np.repeat(np.arange(len(chunk)), n_atoms)
        add("n_atoms", n_atoms)
        add("energy", pred[K.ENERGY])
        add("energy_ref", np.array([np.nan if s.energy is None else s.energy for s in chunk]))
        f_ref = np.concatenate(
            [np.full((s.n_atoms, 3), np.nan) if s.forces is None else s.forces for s in chunk]
        )
        per_structure = np.split(pred[K.FORCES], np.cumsum(n_atoms)[:-1])
        add("force_mae", per_structure_force_mae(chunk, [{K.FORCES: f} for f in per_structure]))
        add("atom_force_error", np.linalg.norm(pred[K.FORCES] - f_ref, axis=1))
        add("atom_structure", owner + offset)
        add("comp_pred", pred[K.FORCES].ravel())
        add("comp_ref", f_ref.ravel())
        if K.ENERGY_STD in pred:
            add("energy_std", pred[K.ENERGY_STD])
        if K.FORCES_STD in pred:
            fs = pred[K.FORCES_STD]
            add("atom_force_std", fs)
            add("comp_std", np.repeat(fs, 3))
            add("force_std_mean", per_structure_mean(fs, owner, n_atoms))
        if K.FORCES_STD_RAW in pred:
            raw = pred[K.FORCES_STD_RAW]
            add("atom_force_std_raw", raw)
            add("force_std_mean_raw", per_structure_mean(raw, owner, n_atoms))
        if K.ENERGY_STD_RAW in pred:
            add("energy_std_raw", pred[K.ENERGY_STD_RAW])
        if K.RELIABILITY in pred:
            add("reliability", pred[K.RELIABILITY])
        if K.ATOM_IMPORTANCE in pred:
            add("atom_importance", pred[K.ATOM_IMPORTANCE])
        if K.ENERGY_SAMPLES in pred:
            add("energy_samples", pred[K.ENERGY_SAMPLES])
        if K.FORCES_SAMPLES in pred:
            fsmp = pred[K.FORCES_SAMPLES]  # [n_atoms, M, 3]
            add("comp_samples", fsmp.transpose(0, 2, 1).reshape(-1, fsmp.shape[1]))
        offset += len(chunk)
        bar.update(len(chunk))
    bar.close()
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return Collected(arrays, time.perf_counter() - t0, source)
