"""Fit a wrapper's :class:`~trustpot.uq.base.Recalibration` on held-out labelled data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trustpot import keys as K
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.metrics import uncertainty as M
from trustpot.uq.base import Recalibration, UQModel, fit_logistic, recalibrated_std
from trustpot.uq.collect import collect

MIN_STD = 1e-9  # eV or eV/Å: floor for standard deviations before dividing by them


def recalibrate(
    model: UQModel,
    structures: Sequence[Structure],
    tolerance: float | None = None,
    top_fraction: float = 0.2,
    source: str = "calibration data",
    batch_size: int = 16,
) -> dict[str, Any]:
    """Fit std scale factors and the reliability map of ``model`` in place.

    The structures must not have been used to train the model. Standard deviations are
    mapped to ``sqrt((a std)^2 + b^2)`` with the scale ``a`` and floor ``b`` that minimise the
    Gaussian NLL (energies per structure, forces per component; ``b`` = 0 unless it helps); the
    tolerance defaults to the ``1 - top_fraction`` quantile of the per-structure force MAE; the
    reliability map of standard-deviation methods is a logistic regression of "force MAE >
    tolerance" on ``log(mean raw forces_std)``.

    Returns:
        a report with the fitted values and the NLL before and after rescaling.
    """
    model.recalibration = Recalibration()
    data = collect(model, structures, batch_size, source, progress=False, want_samples=False)
    force_mae = data["force_mae"]
    has_forces = np.isfinite(force_mae)
    if has_forces.sum() < 2:
        raise ConfigError(f"{source}: recalibration needs at least 2 structures with forces")
    cal = Recalibration(fitted_on=f"{source} ({len(structures)} structures)")
    report: dict[str, Any] = {"n_structures": len(structures)}
    if data.has("energy_std"):
        ok = np.isfinite(data["energy_ref"])
        if ok.sum() >= 2:
            mu, ref = data["energy"][ok], data["energy_ref"][ok]
            std = np.maximum(data["energy_std"][ok], MIN_STD)
            cal.energy_std_scale, cal.energy_std_floor = M.fit_std_scale_floor(mu, std, ref)
            after = recalibrated_std(std, cal.energy_std_scale, cal.energy_std_floor)
            report["energy_nll_before"] = float(M.gaussian_nll(mu, std, ref).mean())
            report["energy_nll_after"] = float(M.gaussian_nll(mu, after, ref).mean())
    if data.has("comp_std"):
        ok = np.isfinite(data["comp_ref"])
        mu, ref = data["comp_pred"][ok], data["comp_ref"][ok]
        std = np.maximum(data["comp_std"][ok], MIN_STD)
        cal.forces_std_scale, cal.forces_std_floor = M.fit_std_scale_floor(mu, std, ref)
        after = recalibrated_std(std, cal.forces_std_scale, cal.forces_std_floor)
        report["forces_nll_before"] = float(M.gaussian_nll(mu, std, ref).mean())
        report["forces_nll_after"] = float(M.gaussian_nll(mu, after, ref).mean())
    tol = (
        float(np.quantile(force_mae[has_forces], 1 - top_fraction))
        if tolerance is None
        else float(tolerance)
    )
    if K.RELIABILITY not in model.provides and data.has("force_std_mean"):
        score = data["force_std_mean_raw"][has_forces]
        cal.logistic_a, cal.logistic_b = fit_logistic(score, force_mae[has_forces] > tol)
        cal.tolerance = tol
    elif K.RELIABILITY in model.provides:
        cal.tolerance = float(getattr(model, "tolerance", tol))
    report.update(cal.to_dict())
    model.recalibration = cal
    return report
