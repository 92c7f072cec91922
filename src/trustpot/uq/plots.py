"""Plots of ``trustpot uq eval``: error vs uncertainty, calibration, risk-coverage, and
PROBE's per-atom importance drawn on the molecule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trustpot.data.structures import Structure
from trustpot.metrics import uncertainty as M
from trustpot.uq.collect import Collected

MIN_STD = 1e-9


def write_plots(data: Collected, out: Path, title: str) -> list[Path]:
    """Error vs uncertainty, calibration curve and risk-coverage PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    err = data["force_mae"]
    score_name, score = "", None
    if data.has("force_std_mean"):
        score_name, score = "mean per-atom force std (eV/Å)", data["force_std_mean"]
    elif data.has("reliability"):
        score_name, score = "1 - reliability", 1.0 - data["reliability"]
    if score is not None and np.isfinite(err).any():
        ok = np.isfinite(err)
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(score[ok], err[ok], s=6, alpha=0.6)
        lo, hi = np.nanmin(score[ok]), np.nanmax(score[ok])
        if score_name.startswith("mean") and lo > 0:
            ax.set_xscale("log")
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="error = std")
            ax.legend(fontsize=8)
        if np.nanmin(err[ok]) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(score_name)
        ax.set_ylabel("force MAE per structure (eV/Å)")
        rho = M.spearman(score[ok], err[ok]) if np.ptp(score[ok]) > 0 else math.nan
        ax.set_title(f"{title}\nSpearman {rho:.3f}", fontsize=9)
        fig.tight_layout()
        written.append(out / "error_vs_uncertainty.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

        cov, risk = M.risk_coverage(score[ok], err[ok])
        cov_o, risk_o = M.risk_coverage(err[ok], err[ok])
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot(cov, risk, label=f"by {score_name.split(' (')[0]}")
        ax.plot(cov_o, risk_o, "k--", lw=0.8, label="oracle (by error)")
        ax.axhline(err[ok].mean(), color="gray", lw=0.8, ls=":", label="random")
        ax.set_xlabel("coverage (fraction of structures kept)")
        ax.set_ylabel("mean force MAE of kept (eV/Å)")
        ax.set_title(f"{title}: risk-coverage", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "risk_coverage.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if not np.isfinite(err).any() and np.isfinite(data["energy_ref"]).any():
        written += _energy_plot(data, out, title)
    if data.has("comp_std") and np.isfinite(data["comp_ref"]).any():
        ok = np.isfinite(data["comp_ref"])
        expected, observed = M.calibration_curve(
            data["comp_pred"][ok], np.maximum(data["comp_std"][ok], MIN_STD), data["comp_ref"][ok]
        )
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
        ax.plot(expected, observed, "o-", ms=3, label="force components")
        ax.set_xlabel("expected coverage of central interval")
        ax.set_ylabel("observed coverage")
        ax.set_title(f"{title}: calibration", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "calibration.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def _energy_plot(data: Collected, out: Path, title: str) -> list[Path]:
    """Energy-only data: energy error per atom against the energy std per atom (or
    ``1 - reliability``)."""
    import matplotlib.pyplot as plt

    if data.has("energy_std"):
        name, score = "energy std per atom (eV/atom)", data["energy_std"] / data["n_atoms"]
    elif data.has("reliability"):
        name, score = "1 - reliability", 1.0 - data["reliability"]
    else:
        return []
    error = np.abs(data["energy"] - data["energy_ref"]) / data["n_atoms"]
    ok = np.isfinite(error) & np.isfinite(score)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(score[ok], error[ok], s=6, alpha=0.6)
    ax.set_xlabel(name)
    ax.set_ylabel("energy error per atom (eV/atom)")
    rho = M.spearman(score[ok], error[ok]) if ok.sum() > 2 and np.ptp(score[ok]) > 0 else math.nan
    ax.set_title(f"{title}\nSpearman {rho:.3f} (energy-only data)", fontsize=9)
    fig.tight_layout()
    path = out / "energy_error_vs_uncertainty.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_atom_importance(
    structure: Structure,
    importance: np.ndarray | Sequence[float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Write a PNG of the structure on its two principal axes, atoms coloured by importance.

    Atom discs scale with the covalent radius; bonds join atoms closer than 1.2 x the sum of
    their covalent radii (no periodic images). Front atoms (third principal axis) are drawn last.

    Args:
        structure: the structure (positions in Å).
        importance: [n_atoms] per-atom importance (PROBE's ``atom_importance``).
        path: output PNG path (parent folders are created).
        title: figure title.
    """
    from ase.data import chemical_symbols, covalent_radii
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from scipy.spatial import cKDTree

    weight = np.asarray(importance, dtype=np.float64).ravel()
    n = structure.n_atoms
    if weight.shape[0] != n:
        raise ValueError(f"importance has {weight.shape[0]} values for {n} atoms")
    xyz = structure.positions - structure.positions.mean(0)
    axes = np.linalg.svd(xyz, full_matrices=False)[2] if n >= 3 else np.eye(3)
    if axes.shape[0] < 3:
        axes = np.eye(3)
    proj = xyz @ axes.T  # [n, 3]: principal coordinates
    radii = covalent_radii[structure.numbers]
    tree = cKDTree(structure.positions)
    pairs = np.array(sorted(tree.query_pairs(2.4 * float(radii.max()))), dtype=int).reshape(-1, 2)
    if len(pairs):
        dist = np.linalg.norm(
            structure.positions[pairs[:, 0]] - structure.positions[pairs[:, 1]], axis=1
        )
        pairs = pairs[dist < 1.2 * (radii[pairs[:, 0]] + radii[pairs[:, 1]])]
    fig = Figure(figsize=(6.0, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(pairs):
        segments = proj[pairs][:, :, :2]
        ax.add_collection(LineCollection(segments, colors="0.55", linewidths=1.5, zorder=1))
    order = np.argsort(proj[:, 2])
    size = (radii / radii.max()) ** 2 * float(np.clip(6000.0 / n, 20.0, 600.0))
    dots = ax.scatter(
        proj[order, 0],
        proj[order, 1],
        s=size[order],
        c=weight[order],
        cmap="viridis",
        vmin=0.0,
        vmax=max(float(weight.max()), 1e-12),
        edgecolors="black",
        linewidths=0.6,
        zorder=2,
    )
    if n <= 40:  # element symbols, black on light colours and white on dark ones
        for k in order:
            r, g, b, _ = dots.cmap(dots.norm(weight[k]))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            symbol = chemical_symbols[structure.numbers[k]]
            ax.annotate(symbol, proj[k, :2], ha="center", va="center", fontsize=7, color=ink)
    fig.colorbar(dots, ax=ax, label="atom importance (attention weight)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.margins(0.12)
    ax.set_xlabel("principal axis 1 (Å)")
    ax.set_ylabel("principal axis 2 (Å)")
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path
