"""Moved to :mod:`trustpot.metrics.uncertainty`; this name stays for the modules that still
import it (``uq/probe.py``) until they import the new home."""

from trustpot.metrics.uncertainty import (
    auprc,
    aurc,
    auroc,
    calibration_curve,
    ensemble_crps,
    fit_std_scale,
    fit_std_scale_floor,
    gaussian_crps,
    gaussian_nll,
    high_error_labels,
    interval_coverage,
    miscalibration_area,
    pearson,
    risk_coverage,
    spearman,
)

__all__ = [
    "auprc",
    "aurc",
    "auroc",
    "calibration_curve",
    "ensemble_crps",
    "fit_std_scale",
    "fit_std_scale_floor",
    "gaussian_crps",
    "gaussian_nll",
    "high_error_labels",
    "interval_coverage",
    "miscalibration_area",
    "pearson",
    "risk_coverage",
    "spearman",
]
