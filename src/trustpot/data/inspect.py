"""``trustpot data stats``: what a dataset holds, and which frames look wrong.

Outliers are frames whose largest force, or whose energy per atom after removing fitted
per-element reference energies, lies far from the bulk of the file: more than ``k`` robust
standard deviations (1.4826 x median absolute deviation) from the median. Such frames are
often real (a rare event) but are worth a look before training.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from trustpot.data.neighbors import neighbor_pairs
from trustpot.data.stats import fit_reference_energies
from trustpot.data.structures import Structure


def _robust_z(values: np.ndarray) -> np.ndarray:
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    scale = mad if mad > 1e-12 else (np.std(values) or 1.0)
    z: np.ndarray = (values - med) / scale
    return z


def shortest_distance(s: Structure, search: float = 3.0) -> float:
    """Shortest interatomic distance (Å, periodic images included); inf if none below ``search``."""
    *_, d = neighbor_pairs(s.positions, s.cell, s.pbc, search, with_distances=True)
    return float(d.min()) if len(d) else float("inf")


def dataset_stats(structures: Sequence[Structure], k: float = 8.0) -> dict[str, Any]:
    """Summary statistics and outliers of ``structures``.

    Returns a JSON-ready dict: ``n_frames``, ``elements`` (atom counts), ``atoms_per_frame``,
    ``periodic_frames``, ``energy_per_atom`` and ``residual_energy_per_atom`` summaries (eV),
    ``force_component`` and ``max_force`` summaries (eV/Å), ``shortest_distance`` summary (Å),
    ``info_keys`` and ``outliers`` (frame, reason, value, robust z).
    """
    counts: Counter[str] = Counter()
    for s in structures:
        counts.update(chemical_symbols[int(z)] for z in s.numbers)
    n_atoms = np.array([s.n_atoms for s in structures])
    out: dict[str, Any] = {
        "n_frames": len(structures),
        "elements": dict(sorted(counts.items())),
        "atoms_per_frame": _summary(n_atoms),
        "periodic_frames": int(sum(s.is_periodic for s in structures)),
        "info_keys": sorted({key for s in structures for key in s.info}),
    }
    outliers: list[dict[str, Any]] = []
    energies = {k_: s.energy for k_, s in enumerate(structures) if s.energy is not None}
    labelled = list(energies)
    if labelled:
        species = sorted({int(z) for s in structures for z in s.numbers})
        e0 = fit_reference_energies(structures, species)
        epa = np.array([energies[i] / structures[i].n_atoms for i in labelled])
        resid = np.array(
            [
                (energies[i] - sum(e0[int(z)] for z in structures[i].numbers))
                / structures[i].n_atoms
                for i in labelled
            ]
        )
        out["energy_per_atom"] = _summary(epa)
        out["residual_energy_per_atom"] = _summary(resid)
        for i, value, z in zip(labelled, resid, _robust_z(resid)):
            if abs(z) > k:
                outliers.append(
                    {"frame": i, "reason": "energy per atom", "value": float(value), "z": float(z)}
                )
    forces = {k_: s.forces for k_, s in enumerate(structures) if s.forces is not None}
    with_forces = list(forces)
    if with_forces:
        comps = np.concatenate([forces[i].ravel() for i in with_forces])
        fmax = np.array([np.linalg.norm(forces[i], axis=1).max() for i in with_forces])
        out["force_component"] = _summary(comps)
        out["max_force"] = _summary(fmax)
        for i, value, z in zip(with_forces, fmax, _robust_z(fmax)):
            if z > k:
                outliers.append(
                    {"frame": i, "reason": "largest force", "value": float(value), "z": float(z)}
                )
    dmin = np.array([shortest_distance(s) for s in structures])
    finite = dmin[np.isfinite(dmin)]
    out["shortest_distance"] = _summary(finite) if len(finite) else None
    out["outliers"] = sorted(outliers, key=lambda o: -abs(o["z"]))
    return out


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
    }


def stats_report(
    structures: Sequence[Structure], source: str, out_dir: str | Path, k: float = 8.0
) -> dict[str, Any]:
    """Write ``stats.json`` and ``stats.png`` (histograms) into ``out_dir``; return the stats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = dataset_stats(structures, k)
    stats["source"] = source
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    e = [s.energy / s.n_atoms for s in structures if s.energy is not None]
    f = [np.linalg.norm(s.forces, axis=1).max() for s in structures if s.forces is not None]
    d = [x for x in (shortest_distance(s) for s in structures) if np.isfinite(x)]
    for ax, values, label in (
        (axes[0], e, "energy per atom (eV)"),
        (axes[1], f, "largest force per frame (eV/Å)"),
        (axes[2], d, "shortest distance (Å)"),
    ):
        if values:
            ax.hist(values, bins=60)
        ax.set_xlabel(label)
        ax.set_ylabel("frames")
    axes[1].set_yscale("log")
    fig.suptitle(
        f"{Path(source).name}: {len(structures)} frames, {len(stats['outliers'])} outliers"
    )
    fig.tight_layout()
    fig.savefig(out_dir / "stats.png", dpi=110)
    plt.close(fig)
    return stats
