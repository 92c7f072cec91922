"""Uncertainty metrics of a collected dataset, and the plots of ``trustpot uq eval``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trustpot.data.structures import Structure
from trustpot.metrics import uncertainty as M
from trustpot.metrics.accuracy import mae
from trustpot.uq.collect import Collected

MIN_STD = 1e-9


def _nanmean(a: np.ndarray) -> float:
    ok = np.isfinite(a)
    return float(a[ok].mean()) if ok.any() else float("nan")


def _ranking(score: np.ndarray, error: np.ndarray, top_fraction: float) -> dict[str, float]:
    """Spearman, Pearson, AUROC/AUPRC of the top-``top_fraction`` errors, AURC and its bounds."""
    ok = np.isfinite(score) & np.isfinite(error)
    s, e = score[ok], error[ok]
    out: dict[str, float] = {"n": int(ok.sum())}
    if len(e) < 3:
        return out
    positive = M.high_error_labels(e, top_fraction)
    out["spearman"] = M.spearman(s, e) if np.ptp(s) > 0 else float("nan")
    out["pearson"] = M.pearson(s, e) if np.ptp(s) > 0 else float("nan")
    if 0 < positive.sum() < len(e):
        out["auroc"] = M.auroc(s, positive)
        out["auprc"] = M.auprc(s, positive)
        out["positive_rate"] = float(positive.mean())
    out["aurc"] = M.aurc(s, e)
    out["aurc_oracle"] = M.aurc(e, e)
    out["aurc_random"] = float(e.mean())
    return out


def _gaussian(
    mean: np.ndarray, std: np.ndarray, target: np.ndarray, samples: np.ndarray | None
) -> dict[str, float]:
    """CRPS (fair ensemble CRPS when samples exist, else Gaussian), NLL, calibration."""
    ok = np.isfinite(target)
    if ok.sum() < 2:
        return {}
    mu, y = mean[ok], target[ok]
    sd = np.maximum(std[ok], MIN_STD)
    out = {
        "crps_gaussian": float(M.gaussian_crps(mu, sd, y).mean()),
        "nll": float(M.gaussian_nll(mu, sd, y).mean()),
        "miscalibration_area": M.miscalibration_area(mu, sd, y),
        "coverage_68": M.interval_coverage(mu, sd, y, 1.0),
        "coverage_95": M.interval_coverage(mu, sd, y, 1.959964),
        "mae": mae(mu - y),
        "mean_std": float(sd.mean()),
    }
    if samples is not None:
        out["crps"] = float(M.ensemble_crps(samples[ok], y).mean())
    else:
        out["crps"] = out["crps_gaussian"]
    return out


def uq_metrics(data: Collected, top_fraction: float = 0.2) -> dict[str, Any]:
    """All metrics of ``data``: per-structure ranking by std and by reliability, per-atom
    ranking, and Gaussian scores of force components and energies (units eV, eV/Å)."""
    out: dict[str, Any] = {
        "n_structures": data.n_structures,
        "n_atoms": int(data["n_atoms"].sum()),
        "forces_mae": _nanmean(np.abs(data["comp_pred"] - data["comp_ref"])),
        "seconds": data.seconds,
        "top_fraction": top_fraction,
    }
    err = data["force_mae"]
    e_ref = data["energy_ref"]
    if np.isfinite(e_ref).any():
        per_atom = np.abs(data["energy"] - e_ref) / data["n_atoms"]
        out["energy_mae_per_atom"] = _nanmean(per_atom)

    # rankings use the method's own (raw) std: recalibration is monotone and only calibrates
    def raw_or(key: str) -> str:
        return f"{key}_raw" if data.has(f"{key}_raw") else key

    scores: dict[str, np.ndarray] = {}
    if data.has("force_std_mean"):
        scores["forces_std"] = data[raw_or("force_std_mean")]
    if data.has("reliability"):
        scores["reliability"] = 1.0 - data["reliability"]
    if np.isfinite(err).any():
        out["structure"] = {name: _ranking(sc, err, top_fraction) for name, sc in scores.items()}
    if data.has("reliability"):
        out["mean_reliability"] = float(np.mean(data["reliability"]))
    if np.isfinite(e_ref).any():
        # energy errors per atom, ranked by the energy std and by the reliability
        e_err = np.abs(data["energy"] - e_ref) / data["n_atoms"]
        e_scores = {k: v for k, v in scores.items() if k == "reliability"}
        if data.has("energy_std"):
            e_scores["energy_std"] = data[raw_or("energy_std")] / data["n_atoms"]
        out["structure_energy"] = {
            name: _ranking(sc, e_err, top_fraction) for name, sc in e_scores.items()
        }
    if data.has("atom_force_std"):
        atom_std = data[raw_or("atom_force_std")]
        out["atom"] = _ranking(atom_std, data["atom_force_error"], top_fraction)
    if data.has("comp_std"):
        samples = data["comp_samples"] if data.has("comp_samples") else None
        out["forces_gaussian"] = _gaussian(
            data["comp_pred"], data["comp_std"], data["comp_ref"], samples
        )
    if data.has("energy_std"):
        samples = data["energy_samples"] if data.has("energy_samples") else None
        out["energy_gaussian"] = _gaussian(data["energy"], data["energy_std"], e_ref, samples)
    return out


def force_label_notes(structures: Sequence[Structure]) -> list[str]:
    """What the metrics leave out because frames have no force labels (energy-only scans,
    reaction paths): force metrics are computed on the frames that have forces only."""
    missing = sum(s.forces is None for s in structures)
    if missing == len(structures):
        return [
            "no frame has force labels (energy-only data): force metrics (force MAE ranking, "
            "per-atom ranking, force CRPS/NLL/calibration) are skipped; energy error vs "
            "energy_std and the reliability listing are reported"
        ]
    if missing:
        return [
            f"{missing} of {len(structures)} frames have no force labels: force metrics "
            "use the other frames"
        ]
    return []


def frame_listing(data: Collected) -> list[dict[str, float | int]]:
    """One row per structure: index, energy error per atom (eV/atom, NaN without a label),
    force MAE (eV/Å, NaN without force labels) and the method's ``energy_std`` (eV) and
    ``reliability`` where it has them."""
    rows: list[dict[str, float | int]] = []
    e_err = np.abs(data["energy"] - data["energy_ref"]) / data["n_atoms"]
    for k in range(data.n_structures):
        row: dict[str, float | int] = {
            "frame": k,
            "energy_error_per_atom": float(e_err[k]),
            "force_mae": float(data["force_mae"][k]),
        }
        for key in ("energy_std", "reliability"):
            if data.has(key):
                row[key] = float(data[key][k])
        rows.append(row)
    return rows


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The benchmark's columns: ranking by the method's main score, then Gaussian scores.

    The main score is the force std when the method has one, else ``1 - reliability``; it is
    ranked against the per-structure force MAE, or, for energy-only data, against the energy
    error per atom (ranked by the energy std, or ``1 - reliability``).
    """
    structure = metrics.get("structure", {})
    main = structure.get("forces_std") or structure.get("reliability")
    if main is None:
        by_energy = metrics.get("structure_energy", {})
        main = by_energy.get("energy_std") or by_energy.get("reliability") or {}
    gauss = metrics.get("forces_gaussian") or metrics.get("energy_gaussian") or {}
    nan = float("nan")
    return {
        "spearman": main.get("spearman", nan),
        "auroc": main.get("auroc", nan),
        "aurc": main.get("aurc", nan),
        "aurc_oracle": main.get("aurc_oracle", nan),
        "aurc_random": main.get("aurc_random", nan),
        "crps": gauss.get("crps", nan),
        "nll": gauss.get("nll", nan),
        "miscalibration_area": gauss.get("miscalibration_area", nan),
        "forces_mae": metrics.get("forces_mae", nan),
    }
