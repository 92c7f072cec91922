"""Accuracy metrics of a potential on labelled data, per ``config_type``, with parity plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.data.structures import Structure


def accuracy_metrics(
    structures: Sequence[Structure], predictions: Sequence[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Energy and force errors (eV, eV/Å) over structures that carry the labels.

    Returns ``energy_mae``, ``energy_rmse`` (per structure), ``energy_mae_per_atom``,
    ``energy_rmse_per_atom``, ``forces_mae`` and ``forces_rmse`` (per component),
    ``forces_cosine`` (mean over atoms of the cosine between predicted and reference force),
    ``forces_magnitude_mae`` (per atom), ``n_structures``, ``n_atoms``; force keys are absent
    when no structure has forces, energy keys when none has energies.
    """
    out: dict[str, float] = {"n_structures": len(structures)}
    e_err, e_err_pa, f_err, cos, mag = [], [], [], [], []
    n_atoms = 0
    for s, p in zip(structures, predictions):
        n_atoms += s.n_atoms
        if s.energy is not None:
            e_err.append(float(p[K.ENERGY]) - s.energy)
            e_err_pa.append(e_err[-1] / s.n_atoms)
        if s.forces is not None and K.FORCES in p:
            pf, rf = np.asarray(p[K.FORCES], np.float64), s.forces
            f_err.append((pf - rf).ravel())
            pn, rn = np.linalg.norm(pf, axis=1), np.linalg.norm(rf, axis=1)
            valid = (pn > 1e-12) & (rn > 1e-12)
            cos.append((pf * rf).sum(1)[valid] / (pn[valid] * rn[valid]))
            mag.append(np.abs(pn - rn))
    out["n_atoms"] = n_atoms
    if e_err:
        e, epa = np.array(e_err), np.array(e_err_pa)
        out.update(
            energy_mae=float(np.abs(e).mean()),
            energy_rmse=float(np.sqrt((e**2).mean())),
            energy_mae_per_atom=float(np.abs(epa).mean()),
            energy_rmse_per_atom=float(np.sqrt((epa**2).mean())),
        )
    if f_err:
        f = np.concatenate(f_err)
        out.update(
            forces_mae=float(np.abs(f).mean()),
            forces_rmse=float(np.sqrt((f**2).mean())),
            forces_cosine=float(np.concatenate(cos).mean()),
            forces_magnitude_mae=float(np.concatenate(mag).mean()),
        )
    return out


def grouped_metrics(
    structures: Sequence[Structure],
    predictions: Sequence[dict[str, np.ndarray]],
    key: str = "config_type",
) -> dict[str, dict[str, float]]:
    """:func:`accuracy_metrics` per value of ``info[key]`` (only when some frame has it)."""
    groups: dict[str, list[int]] = {}
    for k, s in enumerate(structures):
        if key in s.info:
            groups.setdefault(str(s.info[key]), []).append(k)
    return {
        name: accuracy_metrics([structures[i] for i in idx], [predictions[i] for i in idx])
        for name, idx in sorted(groups.items())
    }


def parity_plot(
    structures: Sequence[Structure],
    predictions: Sequence[dict[str, np.ndarray]],
    path: str | Path,
    title: str = "",
) -> None:
    """Energy-per-atom and force-component parity plots side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    ref_e = [s.energy / s.n_atoms for s in structures if s.energy is not None]
    pred_e = [
        float(p[K.ENERGY]) / s.n_atoms
        for s, p in zip(structures, predictions)
        if s.energy is not None
    ]
    ref_f = [s.forces.ravel() for s in structures if s.forces is not None]
    pred_f = [
        np.asarray(p[K.FORCES]).ravel()
        for s, p in zip(structures, predictions)
        if s.forces is not None
    ]
    for ax, ref, pred, label, unit in (
        (axes[0], np.array(ref_e), np.array(pred_e), "energy per atom (eV)", "meV/atom"),
        (
            axes[1],
            np.concatenate(ref_f) if ref_f else np.zeros(0),
            np.concatenate(pred_f) if pred_f else np.zeros(0),
            "force component (eV/Å)",
            "meV/Å",
        ),
    ):
        if len(ref) == 0:
            ax.text(0.5, 0.5, "no labels", ha="center", transform=ax.transAxes)
            continue
        ax.scatter(ref, pred, s=3, alpha=0.4, rasterized=True)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        mae = float(np.abs(pred - ref).mean())
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(f"MAE {1000 * mae:.3g} {unit}, {len(ref)} points")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(6))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_file(
    predictor: Predictor,
    structures: Sequence[Structure],
    out_dir: str | Path,
    source: str = "data",
    save_predictions: bool = True,
) -> dict[str, Any]:
    """Predict, compute metrics, write ``metrics.json``, ``parity.png`` (and predictions).

    Returns the metrics dict, with ``per_config_type`` when frames carry ``config_type``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = predictor.predict_structures(structures, (K.ENERGY, K.FORCES), source=source)
    metrics: dict[str, Any] = {"data": str(source), "units": {"energy": "eV", "forces": "eV/Å"}}
    metrics.update(accuracy_metrics(structures, preds))
    groups = grouped_metrics(structures, preds)
    if groups:
        metrics["per_config_type"] = groups
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    parity_plot(structures, preds, out_dir / "parity.png", title=Path(source).name)
    if save_predictions:
        np.savez_compressed(
            out_dir / "predictions.npz",
            energy=np.array([float(p[K.ENERGY]) for p in preds]),
            forces=np.concatenate([p[K.FORCES] for p in preds]),
            n_atoms=np.array([s.n_atoms for s in structures]),
        )
    return metrics
