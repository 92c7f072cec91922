"""Evaluate a potential on labelled data: metrics (overall and per ``config_type``, from
:mod:`trustpot.metrics.accuracy`), parity plots and predictions on disk."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.data.structures import Structure
from trustpot.metrics.accuracy import accuracy_metrics, grouped_metrics, mae

#: ``accuracy_metrics`` and ``grouped_metrics`` live in :mod:`trustpot.metrics.accuracy`; they
#: stay importable from here.
__all__ = ["accuracy_metrics", "evaluate_file", "grouped_metrics", "parity_plot"]


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
        err = mae(pred - ref)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(f"MAE {1000 * err:.3g} {unit}, {len(ref)} points")
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

    A model with a property head (``property:<name>`` outputs) is also scored on the frames
    that store ``<name>`` (:func:`~trustpot.metrics.accuracy.property_metrics`).

    Returns the metrics dict, with ``per_config_type`` when frames carry ``config_type``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = predictor.scored_outputs()
    preds = predictor.predict_structures(structures, outputs, source=source)
    specs = predictor.model.output_specs()
    units = {"energy": "eV", "forces": "eV/Å", **{k: specs[k].unit for k in outputs[2:]}}
    metrics: dict[str, Any] = {"data": str(source), "units": units}
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
