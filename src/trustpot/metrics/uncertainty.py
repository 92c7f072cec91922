"""Metrics of how well an uncertainty (or reliability) tracks the error it should predict.

All functions take NumPy arrays and return floats or arrays; each is tested against a case
computed by hand (``tests/test_uq_metrics.py``). Conventions:

- ``error`` is a non-negative error per item (structure or atom), e.g. force MAE in eV/Å;
- ``uncertainty`` is any score that should be larger when the error is larger (a standard
  deviation, ``1 - reliability``...);
- ``mean``/``std`` are a predictive Gaussian's parameters and ``target`` the reference value.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from scipy.optimize import minimize
from scipy.special import ndtri

SQRT_PI = math.sqrt(math.pi)


def _as_float(a: np.ndarray | list[float]) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def spearman(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation between uncertainty and error (ties get average ranks)."""
    return float(stats.spearmanr(_as_float(uncertainty), _as_float(error)).statistic)


def pearson(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Pearson correlation between uncertainty and error."""
    return float(stats.pearsonr(_as_float(uncertainty), _as_float(error)).statistic)


def high_error_labels(error: np.ndarray, top_fraction: float = 0.2) -> np.ndarray:
    """True for the items whose error is among the ``top_fraction`` largest (at least one)."""
    e = _as_float(error)
    k = max(1, math.ceil(top_fraction * len(e)))
    threshold = np.sort(e)[-k]
    labels: np.ndarray = e >= threshold
    return labels


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` labels.

    Equals the probability that a random positive scores higher than a random negative, ties
    counting one half (Mann-Whitney U with average ranks).
    """
    s, y = _as_float(score), np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative items")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(score: np.ndarray, positive: np.ndarray) -> float:
    """Average precision: sum over positives (by decreasing score) of precision at that rank.

    Ties are broken against the positives (the pessimistic order), so a constant score gets the
    base rate, not better.
    """
    s, y = _as_float(score), np.asarray(positive, dtype=bool).ravel()
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("AUPRC needs at least one positive item")
    order = np.lexsort((y, -s))  # by score descending; within ties negatives first
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / n_pos)


def risk_coverage(uncertainty: np.ndarray, error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective prediction: keep the k most certain items, k = 1..n.

    Returns:
        coverage [n] (k / n) and risk [n] (mean error of the kept items).
    """
    u, e = _as_float(uncertainty), _as_float(error)
    order = np.lexsort((-e, u))  # most certain first; ties broken pessimistically
    kept = np.cumsum(e[order])
    k = np.arange(1, len(e) + 1)
    return k / len(e), kept / k


def aurc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean of the risks at k = 1..n); lower is better."""
    _, risk = risk_coverage(uncertainty, error)
    return float(risk.mean())


def gaussian_crps(mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> np.ndarray:
    """CRPS of N(mean, std^2) at ``target``: std [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)]."""
    mu, sigma, y = _as_float(mean), _as_float(std), _as_float(target)
    z = (y - mu) / sigma
    crps: np.ndarray = sigma * (
        z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / SQRT_PI
    )
    return crps


def ensemble_crps(samples: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Fair ensemble CRPS, E|X - y| - 1/2 E|X - X'| with the unbiased M(M-1) pair average.

    Args:
        samples: [n, M] M >= 2 samples per item.
        target: [n] reference values.
    """
    x = np.asarray(samples, dtype=np.float64)
    y = _as_float(target)
    m = x.shape[1]
    if m < 2:
        raise ValueError("the fair CRPS needs at least two samples")
    skill: np.ndarray = np.abs(x - y[:, None]).mean(axis=1)
    spread: np.ndarray = np.abs(x[:, :, None] - x[:, None, :]).sum(axis=(1, 2)) / (m * (m - 1))
    return skill - 0.5 * spread


def gaussian_nll(mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``target`` under N(mean, std^2)."""
    mu, sigma, y = _as_float(mean), _as_float(std), _as_float(target)
    nll: np.ndarray = 0.5 * np.log(2 * np.pi * sigma**2) + (y - mu) ** 2 / (2 * sigma**2)
    return nll


def interval_coverage(
    mean: np.ndarray, std: np.ndarray, target: np.ndarray, n_sigma: float
) -> float:
    """Fraction of targets within ``n_sigma`` standard deviations of the mean."""
    mu, sigma, y = _as_float(mean), _as_float(std), _as_float(target)
    return float(np.mean(np.abs(y - mu) <= n_sigma * sigma))


def calibration_curve(
    mean: np.ndarray, std: np.ndarray, target: np.ndarray, n_levels: int = 19
) -> tuple[np.ndarray, np.ndarray]:
    """Expected vs observed coverage of central Gaussian intervals.

    Returns:
        expected [n_levels] (0.05, 0.10, ..., 0.95 by default) and observed [n_levels]: the
        fraction of targets inside the central interval of that probability.
    """
    mu, sigma, y = _as_float(mean), _as_float(std), _as_float(target)
    expected = np.linspace(0, 1, n_levels + 2)[1:-1]
    half_width = ndtri(0.5 + expected / 2)  # in units of sigma
    z = np.abs(y - mu) / sigma
    observed = (z[None, :] <= half_width[:, None]).mean(axis=1)
    return expected, observed


def miscalibration_area(
    mean: np.ndarray, std: np.ndarray, target: np.ndarray, n_levels: int = 99
) -> float:
    """Mean |observed - expected| coverage over a fine grid of levels (0 is perfect)."""
    expected, observed = calibration_curve(mean, std, target, n_levels)
    return float(np.abs(observed - expected).mean())


def fit_std_scale_floor(
    mean: np.ndarray, std: np.ndarray, target: np.ndarray
) -> tuple[float, float]:
    """Scale ``a`` and floor ``b`` minimising the Gaussian NLL of N(mean, a^2 std^2 + b^2).

    The scale-only fit (:func:`fit_std_scale`) starts the search and is returned unchanged when
    a floor does not lower the NLL, so the floor is 0 unless the data ask for one: typically
    when some errors are large where the predicted std is near zero.

    Returns:
        ``(a, b)``, ``b`` in the unit of ``std``.
    """
    mu, sigma, y = _as_float(mean), _as_float(std), _as_float(target)
    r2 = (y - mu) ** 2
    a0 = fit_std_scale(mu, sigma, y)
    s2 = sigma**2

    def nll(params: np.ndarray) -> float:
        var = np.exp(2 * params[0]) * s2 + np.exp(2 * params[1])
        return float(np.mean(0.5 * np.log(2 * np.pi * var) + r2 / (2 * var)))

    base = nll(np.array([np.log(a0), -np.inf]))  # no floor: exp(-inf) = 0
    rms = float(np.sqrt(np.mean(r2))) or 1.0
    best: tuple[float, float, float] = (base, a0, 0.0)
    for a_start in (a0, 1.0):  # the floor can absorb what inflated the scale-only fit
        start = np.array([np.log(a_start), np.log(0.1 * rms)])
        res = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
        if res.fun < best[0]:
            best = (float(res.fun), float(np.exp(res.x[0])), float(np.exp(res.x[1])))
    return best[1], best[2]


def fit_std_scale(mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> float:
    """Factor s minimising the Gaussian NLL of N(mean, (s std)^2): s^2 = mean(((y-mu)/std)^2).

    Fit on validation data, then multiply every predicted std by it (stored with the model).
    """
    mu, sigma, y = _as_float(mean), _as_float(std), _as_float(target)
    return float(np.sqrt(np.mean(((y - mu) / sigma) ** 2)))
