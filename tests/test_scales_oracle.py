"""Oracle routing and interpolation against brute force; pool refinement and the differentiable
scale on synthetic losses."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from trustpot.bench.scales import (
    BranchForces,
    optimise_scale,
    oracle_gain_recovered,
    oracle_scale_l2,
    oracle_scale_mae,
    oracle_summary,
    refine_scale_pool,
    route_atoms,
    route_structure,
)
from trustpot.bench.scales.oracle import mixed_forces
from trustpot.errors import ConfigError
from trustpot.metrics.accuracy import force_mae
from trustpot.models.mixture import DifferentiableScale

GRID = np.linspace(0.0, 1.0, 20001)  # brute-force search step 5e-5


def three_forces(seed: int, n: int = 12, offset: float = 0.0) -> tuple[np.ndarray, ...]:
    """Reference forces and two branches with different errors; ``offset`` pushes the optimum
    out of [0, 1] (then the clipped answer is an end point)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 3))
    short = ref + rng.normal(scale=0.5, size=(n, 3))
    long = ref + rng.normal(scale=0.7, size=(n, 3)) + offset * (short - ref)
    return short, long, ref


def brute(f_short: np.ndarray, f_long: np.ndarray, f_ref: np.ndarray, kind: str) -> np.ndarray:
    """Loss at every grid s."""
    mixed = (1 - GRID)[:, None, None] * f_short + GRID[:, None, None] * f_long - f_ref
    if kind == "l2":
        return (mixed**2).sum(axis=(1, 2))
    return np.abs(mixed).mean(axis=(1, 2))


@pytest.mark.parametrize("seed, offset", [(0, 0.0), (1, 0.0), (2, 3.0), (3, -4.0), (4, 0.0)])
def test_closed_form_l2_oracle_matches_brute_force(seed: int, offset: float) -> None:
    fs, fl, fr = three_forces(seed, offset=offset)
    s = oracle_scale_l2(fs, fl, fr)
    losses = brute(fs, fl, fr, "l2")
    assert s == pytest.approx(GRID[np.argmin(losses)], abs=1e-4)
    value = float(((mixed_forces(fs, fl, s) - fr) ** 2).sum())
    assert value <= losses.min() + 1e-9


@pytest.mark.parametrize("oracle", [oracle_scale_l2, oracle_scale_mae])
def test_oracles_clip_to_the_end_points(oracle: Callable[..., float]) -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 3))
    err = rng.normal(size=(8, 3))
    # long errs twice as much in the same direction: the unconstrained optimum is s = -1
    assert oracle(ref + err, ref + 2 * err, ref) == 0.0
    assert oracle(ref + 2 * err, ref + err, ref) == 1.0  # and here s = 2
    assert oracle(ref + err, ref - err, ref) == pytest.approx(0.5)  # errors cancel at s = 1/2


@pytest.mark.parametrize("seed, offset", [(0, 0.0), (1, 0.0), (2, 3.0), (3, -4.0), (5, 0.5)])
def test_exact_mae_oracle_matches_brute_force(seed: int, offset: float) -> None:
    fs, fl, fr = three_forces(seed, offset=offset)
    s = oracle_scale_mae(fs, fl, fr)
    losses = brute(fs, fl, fr, "mae")
    # the minimum value is what matters (flat stretches may have several minimisers)
    assert force_mae(mixed_forces(fs, fl, s), fr) <= losses.min() + 1e-12
    assert force_mae(mixed_forces(fs, fl, s), fr) == pytest.approx(losses.min(), abs=1e-6)


def test_per_atom_oracles_match_brute_force() -> None:
    fs, fl, fr = three_forces(7, n=6)
    s_l2 = oracle_scale_l2(fs, fl, fr, per_atom=True)
    s_mae = oracle_scale_mae(fs, fl, fr, per_atom=True)
    assert isinstance(s_l2, np.ndarray) and s_l2.shape == (6,)
    for i in range(6):
        a, b, c = fs[i : i + 1], fl[i : i + 1], fr[i : i + 1]
        assert s_l2[i] == pytest.approx(GRID[np.argmin(brute(a, b, c, "l2"))], abs=1e-4)
        assert force_mae(mixed_forces(a, b, s_mae[i]), c) <= brute(a, b, c, "mae").min() + 1e-12


def test_identical_branches_give_scale_zero() -> None:
    fs, _, fr = three_forces(0)
    assert oracle_scale_l2(fs, fs, fr) == 0.0
    assert oracle_scale_mae(fs, fs, fr) == 0.0


def test_hard_routing() -> None:
    ref = np.zeros((3, 3))
    short = np.array([[0.1, 0, 0], [1.0, 0, 0], [0.2, 0, 0]])
    long = np.array([[0.5, 0, 0], [0.1, 0, 0], [0.2, 0, 0]])
    assert list(route_atoms(short, long, ref)) == [0, 1, 0]  # tie -> short
    assert route_structure(short, long, ref) == 1  # 1.3 / 9 vs 0.8 / 9
    assert route_structure(long, short, ref) == 0
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        route_structure(short, long[:2], ref)


def test_oracle_summary_orders_the_bounds() -> None:
    frames = [BranchForces.of(*three_forces(seed, n=5 + seed)) for seed in range(6)]
    summary = oracle_summary(frames, fixed_scales=(0.0, 0.5, 1.0))
    best_fixed = min(summary.fixed.values())
    endpoints = min(summary.fixed[0.0], summary.fixed[1.0])
    assert summary.hard_structure <= endpoints + 1e-12
    assert summary.hard_atom <= summary.hard_structure + 1e-12
    assert summary.continuous_mae <= min(summary.hard_structure, best_fixed) + 1e-12
    assert summary.continuous_mae <= summary.continuous_l2 + 1e-12
    assert summary.continuous_atom <= min(summary.continuous_mae, summary.hard_atom) + 1e-12
    assert summary.fixed[summary.best_fixed_scale] == best_fixed
    assert summary.structure_choice.shape == (6,) and summary.structure_scales.shape == (6,)
    # the per-structure hard oracle by hand
    by_hand = []
    for f, k in zip(frames, summary.structure_choice):
        by_hand.append(np.abs((f.long if k else f.short) - f.reference).ravel())
    assert summary.hard_structure == pytest.approx(float(np.concatenate(by_hand).mean()))
    assert 0.0 <= summary.atom_long_fraction <= 1.0


def test_oracle_gain_recovered() -> None:
    assert oracle_gain_recovered(400.0, 380.0, 385.0) == pytest.approx(0.75)
    assert oracle_gain_recovered(400.0, 380.0, 400.0) == 0.0
    assert np.isnan(oracle_gain_recovered(400.0, 400.0, 390.0))


# -- pool refinement ------------------------------------------------------------------------------
def quadratic(s: float) -> float:
    return (s - 0.3) ** 2


def test_refinement_inserts_the_seed_midpoints_and_stops_on_tolerance() -> None:
    calls: list[float] = []

    def loss(s: float) -> float:
        calls.append(s)
        return quadratic(s)

    lines: list[str] = []
    result = refine_scale_pool(loss, tol=1e-4, log=lines.append)
    assert result.trajectory() == [
        [0.0, 1.0],
        [0.0, 0.5, 1.0],
        [0.0, 0.25, 0.5, 0.75, 1.0],
        [0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0],
    ]
    assert [r.inserted for r in result.rounds] == [[0.5], [0.25, 0.75], [0.125, 0.375], []]
    assert [r.best_scale for r in result.rounds] == [0.0, 0.5, 0.25, 0.25]
    assert result.stop_reason == "tolerance"
    assert result.pool == [0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0]
    assert result.best_scale == 0.25 and result.best_loss == pytest.approx(0.0025)
    assert sorted(calls) == result.pool and result.n_evaluations == 7  # no repeated evaluation
    assert len(lines) == 4 and "round 3" in lines[-1]


def test_refinement_other_stops() -> None:
    result = refine_scale_pool(quadratic, tol=0.0, max_rounds=2)
    assert result.stop_reason == "max_rounds" and len(result.rounds) == 3
    assert result.pool == [0.0, 0.25, 0.5, 0.75, 1.0]
    result = refine_scale_pool(quadratic, tol=0.0, max_rounds=50, min_spacing=0.1)
    assert result.stop_reason == "min_spacing"
    assert min(np.diff(result.pool)) >= 0.1 - 1e-12
    # a very small tolerance keeps refining towards the minimum
    # patience lets it go on past a round that does not improve (0.375 after 0.25)
    result = refine_scale_pool(quadratic, tol=1e-9, max_rounds=50, min_spacing=1e-3, patience=3)
    assert abs(result.best_scale - 0.3) < 2e-3


def test_greedy_rule_inserts_the_best_midpoint() -> None:
    result = refine_scale_pool(quadratic, tol=1e-4, rule="greedy")
    assert result.trajectory() == [[0.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 1.0]]
    assert result.stop_reason == "tolerance"
    assert result.best_scale == 0.25
    assert 0.375 in result.losses  # evaluated as a candidate, not inserted


def test_refinement_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        refine_scale_pool(quadratic, pool=(0.5,))
    with pytest.raises(ConfigError):
        refine_scale_pool(quadratic, rule="bisect")
    with pytest.raises(ValueError, match="not finite"):
        refine_scale_pool(lambda s: float("nan"))


# -- differentiable scale -------------------------------------------------------------------------
def test_differentiable_scale_converges_to_the_minimum() -> None:
    result = optimise_scale(lambda s: (s - 0.3) ** 2, init=0.9, steps=600, lr=0.05)
    assert result.scale == pytest.approx(0.3, abs=2e-3)
    assert result.loss < 1e-5
    assert result.history[0][0] == pytest.approx(0.9)
    scale = DifferentiableScale(0.2)
    optimise_scale(lambda s: torch.abs(s - 0.7), scale=scale, steps=400, lr=0.05)
    assert scale.value == pytest.approx(0.7, abs=0.02)
