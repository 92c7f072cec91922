"""Metrics: accuracy of predictions against labels, and how well uncertainties track errors.

- :mod:`~trustpot.metrics.accuracy`: energy/force MAE and RMSE, force cosine and magnitude
  errors, per-structure force MAE, per-``config_type`` breakdown;
- :mod:`~trustpot.metrics.uncertainty`: ranking (Spearman, AUROC, AURC...), Gaussian and
  ensemble scores (CRPS, NLL), calibration curves and recalibration fits.
"""

from trustpot.metrics.accuracy import (
    accuracy_metrics,
    force_cosines,
    force_mae,
    force_magnitude_errors,
    grouped_metrics,
    mae,
    per_structure_force_mae,
    pooled_mae,
    rmse,
)

__all__ = [
    "accuracy_metrics",
    "force_cosines",
    "force_mae",
    "force_magnitude_errors",
    "grouped_metrics",
    "mae",
    "per_structure_force_mae",
    "pooled_mae",
    "rmse",
]
