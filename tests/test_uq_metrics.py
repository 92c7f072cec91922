"""Every uncertainty metric against a case computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trustpot.metrics import uncertainty as M


def test_spearman_and_pearson() -> None:
    u = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1.0, 3.0, 2.0, 4.0])
    # ranks (1,2,3,4) vs (1,3,2,4): d^2 = 0+1+1+0 = 2 -> 1 - 6*2/(4*15) = 0.8
    assert M.spearman(u, e) == pytest.approx(0.8)
    # covariance 1.0 (x -2.5, y -2.5 deviations: 2.25+(-0.5*0.5)+(0.5*-0.5)+2.25 = 4)/var 5
    assert M.pearson(u, e) == pytest.approx(4.0 / 5.0)


def test_high_error_labels_top_20_percent() -> None:
    e = np.arange(10, dtype=float)
    assert M.high_error_labels(e).tolist() == [False] * 8 + [True] * 2


def test_auroc_hand_case() -> None:
    score = np.array([0.1, 0.4, 0.35, 0.8])
    positive = np.array([False, False, True, True])
    # pairs (pos, neg): (0.35,0.1) win, (0.35,0.4) loss, (0.8,0.1) win, (0.8,0.4) win -> 3/4
    assert M.auroc(score, positive) == pytest.approx(0.75)
    assert M.auroc(np.ones(4), positive) == pytest.approx(0.5)  # ties count one half


def test_auprc_hand_case() -> None:
    score = np.array([0.1, 0.4, 0.35, 0.8])
    positive = np.array([False, False, True, True])
    # order: 0.8 (pos, P=1/1), 0.4 (neg), 0.35 (pos, P=2/3), 0.1 -> AP = (1 + 2/3) / 2
    assert M.auprc(score, positive) == pytest.approx((1 + 2 / 3) / 2)
    # constant score: negatives first among ties -> precision at the positives 1/3 and 2/4
    assert M.auprc(np.ones(4), positive) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_risk_coverage_and_aurc() -> None:
    u = np.array([0.3, 0.1, 0.2])
    e = np.array([3.0, 1.0, 2.0])
    coverage, risk = M.risk_coverage(u, e)
    assert coverage.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert risk.tolist() == pytest.approx([1.0, 1.5, 2.0])
    assert M.aurc(u, e) == pytest.approx(1.5)
    assert M.aurc(-u, e) == pytest.approx((3.0 + 2.5 + 2.0) / 3)  # worst ordering


def test_gaussian_crps_closed_form() -> None:
    # at the mean: sigma * (2 phi(0) - 1/sqrt(pi)) = sigma (sqrt(2/pi) - 1/sqrt(pi))
    expected = 2.0 * (math.sqrt(2 / math.pi) - 1 / math.sqrt(math.pi))
    assert M.gaussian_crps(np.array([1.0]), np.array([2.0]), np.array([1.0]))[0] == pytest.approx(
        expected
    )
    # far from the mean CRPS -> |y - mu| - sigma/sqrt(pi)
    far = M.gaussian_crps(np.array([0.0]), np.array([0.1]), np.array([10.0]))[0]
    assert far == pytest.approx(10.0 - 0.1 / math.sqrt(math.pi), rel=1e-6)


def test_ensemble_crps_hand_case() -> None:
    samples = np.array([[0.0, 2.0]])
    # E|X-y| at y=1: (1+1)/2 = 1; pairs |0-2| twice over M(M-1)=2 -> E|X-X'| = 2; CRPS = 1 - 1 = 0
    assert M.ensemble_crps(samples, np.array([1.0]))[0] == pytest.approx(0.0)
    # y = 3: E|X-y| = (3+1)/2 = 2 -> CRPS = 2 - 1 = 1
    assert M.ensemble_crps(samples, np.array([3.0]))[0] == pytest.approx(1.0)


def test_gaussian_nll() -> None:
    value = M.gaussian_nll(np.array([0.0]), np.array([2.0]), np.array([2.0]))[0]
    assert value == pytest.approx(0.5 * math.log(2 * math.pi * 4) + 4 / 8)


def test_coverage_calibration_and_recalibration() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=200_000)
    mu, sigma = np.zeros_like(y), np.ones_like(y)
    assert M.interval_coverage(mu, sigma, y, 1) == pytest.approx(0.6827, abs=0.005)
    assert M.interval_coverage(mu, sigma, y, 2) == pytest.approx(0.9545, abs=0.003)
    expected, observed = M.calibration_curve(mu, sigma, y)
    assert np.allclose(expected, observed, atol=0.005)
    assert M.miscalibration_area(mu, sigma, y) < 0.005
    # overconfident by 2x: the scale fit recovers 2 and the area is large before, small after
    assert M.miscalibration_area(mu, sigma / 2, y) > 0.15
    s = M.fit_std_scale(mu, sigma / 2, y)
    assert s == pytest.approx(2.0, rel=0.01)
    assert M.miscalibration_area(mu, s * sigma / 2, y) < 0.005


def test_small_calibration_hand_case() -> None:
    # |z| = 0.5, 1.5, 2.5 -> inside 1 sigma: 1 of 3; inside 2 sigma: 2 of 3
    y = np.array([0.5, -1.5, 2.5])
    assert M.interval_coverage(np.zeros(3), np.ones(3), y, 1) == pytest.approx(1 / 3)
    assert M.interval_coverage(np.zeros(3), np.ones(3), y, 2) == pytest.approx(2 / 3)
    assert M.fit_std_scale(np.zeros(3), np.ones(3), y) == pytest.approx(
        math.sqrt((0.25 + 2.25 + 6.25) / 3)
    )


def test_scale_and_floor_fit() -> None:
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.05, 1.0, size=40_000)
    # a fifth of the targets where the model's std is (wrongly) zero, with a real error of 0.3
    sigma[:8000] = 0.0
    true_std = np.sqrt((1.5 * sigma) ** 2 + 0.3**2)
    y = rng.normal(size=sigma.size) * true_std
    mu = np.zeros_like(y)
    a, b = M.fit_std_scale_floor(mu, np.maximum(sigma, 1e-9), y)
    assert a == pytest.approx(1.5, rel=0.03)
    assert b == pytest.approx(0.3, rel=0.05)
    # the scale-only fit explodes on the zero-std targets; the floor keeps it calibrated
    assert M.fit_std_scale(mu, np.maximum(sigma, 1e-9), y) > 1e5
    assert M.miscalibration_area(mu, np.hypot(a * sigma, b), y) < 0.01


def test_floor_stays_zero_when_not_needed() -> None:
    rng = np.random.default_rng(4)
    sigma = rng.uniform(0.1, 1.0, size=20_000)
    y = rng.normal(size=sigma.size) * 2.0 * sigma
    a, b = M.fit_std_scale_floor(np.zeros_like(y), sigma, y)
    assert a == pytest.approx(2.0, rel=0.03)
    assert b < 0.05
