"""Oracle analysis of two experts from their force predictions (pure NumPy functions).

Inputs per structure: ``f_short`` and ``f_long`` [n, 3] (forces of the short-scale and long-range
branch, eV/Å) and the reference ``f_ref`` [n, 3]. The oracles use the labels, so they are upper
bounds on what a router can reach, not deployable models.

- Hard routing per structure: the branch with the lower force MAE on that structure.
- Hard routing per atom: per atom, the branch with the lower mean absolute force error.
- Continuous interpolation: the s in [0, 1] minimising the error of (1 - s) F_short + s F_long,
  in closed form for the squared error, s* = clip(<F - F_s, F_l - F_s> / ||F_l - F_s||², 0, 1),
  and exactly for the absolute error: sum_k |a_k + s b_k| = sum_k |b_k| |s - t_k| with
  t_k = -a_k / b_k is convex and piecewise linear, minimised by the |b|-weighted median of the t_k
  (then clipped to [0, 1], which is exact for a 1-D convex function).

What a conservative mixture can realise: with one scale s per structure (constant over its atoms,
not a function of the positions) the mixture energy is (1 - s) E_short + s E_long, so its forces
are exactly (1 - s) F_short + s F_long: the per-structure oracles (hard and continuous) are
attainable by the model with that s. With per-atom scales s_i the forces are
F_i = -d/dr_i sum_j [(1 - s_j) e_j^short + s_j e_j^long], which mixes the per-atom energies of the
neighbours of i with *their* scales; it is not (1 - s_i) F_i^short + s_i F_i^long. The per-atom
oracles below combine branch *forces* atom by atom, so they are an analysis upper bound on the
branch forces, not the forces of any conservative model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np

from trustpot.metrics.accuracy import as_float_array, force_mae, pooled_mae

ArrayLike = Any


def _check(f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike) -> tuple[np.ndarray, ...]:
    a, b, c = as_float_array(f_short), as_float_array(f_long), as_float_array(f_ref)
    if not (a.shape == b.shape == c.shape) or a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"forces must all be [n, 3]; got {a.shape}, {b.shape}, {c.shape}")
    return a, b, c


def mixed_forces(f_short: ArrayLike, f_long: ArrayLike, s: float | ArrayLike) -> np.ndarray:
    """(1 - s) F_short + s F_long; ``s`` a scalar or [n] per atom. -> [n, 3] eV/Å."""
    a, b = as_float_array(f_short), as_float_array(f_long)
    w = np.asarray(s, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    return (1.0 - w) * a + w * b


def route_structure(f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike) -> int:
    """Hard oracle for one structure: 0 (short) or 1 (long), the lower force MAE; ties -> 0."""
    a, b, c = _check(f_short, f_long, f_ref)
    return int(force_mae(b, c) < force_mae(a, c))


def route_atoms(f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike) -> np.ndarray:
    """Hard oracle per atom: [n] int, 1 where the long branch's mean |ΔF| is lower; ties -> 0.

    An analysis upper bound on the branch forces (see the module docstring).
    """
    a, b, c = _check(f_short, f_long, f_ref)
    longer: np.ndarray = np.abs(b - c).mean(axis=1) < np.abs(a - c).mean(axis=1)
    return longer.astype(np.int64)


@overload
def oracle_scale_l2(
    f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike, per_atom: Literal[False] = False
) -> float: ...
@overload
def oracle_scale_l2(
    f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike, per_atom: Literal[True]
) -> np.ndarray: ...
def oracle_scale_l2(
    f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike, per_atom: bool = False
) -> float | np.ndarray:
    """s in [0, 1] minimising ||(1 - s) F_short + s F_long - F||² (closed form).

    Args:
        f_short, f_long, f_ref: [n, 3] eV/Å.
        per_atom: one s per atom ([n]) instead of one per structure.

    Returns:
        s* (float) or [n] array; 0 where the branches agree exactly.
    """
    a, b, c = _check(f_short, f_long, f_ref)
    d, r = b - a, c - a
    axis = 1 if per_atom else None
    num, den = np.sum(r * d, axis=axis), np.sum(d * d, axis=axis)
    s = np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 0), 0.0, 1.0)
    return s if per_atom else float(s)


def _weighted_median_scale(a: np.ndarray, b: np.ndarray) -> float:
    """argmin over s in [0, 1] of sum_k |a_k + s b_k| (smallest minimiser; 0 when b == 0)."""
    keep = b != 0
    if not np.any(keep):
        return 0.0
    t = -a[keep] / b[keep]
    w = np.abs(b[keep])
    order = np.argsort(t, kind="stable")
    t, w = t[order], w[order]
    cum = np.cumsum(w)
    k = int(np.searchsorted(cum, 0.5 * cum[-1], side="left"))
    return float(np.clip(t[min(k, len(t) - 1)], 0.0, 1.0))


@overload
def oracle_scale_mae(
    f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike, per_atom: Literal[False] = False
) -> float: ...
@overload
def oracle_scale_mae(
    f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike, per_atom: Literal[True]
) -> np.ndarray: ...
def oracle_scale_mae(
    f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike, per_atom: bool = False
) -> float | np.ndarray:
    """s in [0, 1] minimising the force MAE of (1 - s) F_short + s F_long (exact, weighted
    median of the kinks of the piecewise-linear convex MAE(s)).

    Args:
        f_short, f_long, f_ref: [n, 3] eV/Å.
        per_atom: one s per atom ([n]) instead of one per structure.
    """
    a, b, c = _check(f_short, f_long, f_ref)
    diff0, slope = a - c, b - a
    if not per_atom:
        return _weighted_median_scale(diff0.ravel(), slope.ravel())
    return np.array([_weighted_median_scale(diff0[i], slope[i]) for i in range(len(a))])


@dataclass(frozen=True)
class BranchForces:
    """Forces of both branches and the reference on one structure (all [n, 3] eV/Å)."""

    short: np.ndarray
    long: np.ndarray
    reference: np.ndarray

    @classmethod
    def of(cls, f_short: ArrayLike, f_long: ArrayLike, f_ref: ArrayLike) -> BranchForces:
        return cls(*_check(f_short, f_long, f_ref))


def _total_mae(predictions: Iterable[np.ndarray], frames: Sequence[BranchForces]) -> float:
    """MAE over all force components of all frames (every component weighs the same)."""
    return pooled_mae(pred - frame.reference for pred, frame in zip(predictions, frames))


@dataclass(frozen=True)
class OracleSummary:
    """Force MAEs (eV/Å) of fixed scales and oracles over a set of structures.

    Attributes:
        fixed: MAE at each fixed scale asked for (scale -> MAE).
        hard_structure: per-structure hard routing.
        hard_atom: per-atom hard routing (analysis bound on branch forces).
        continuous_l2: per-structure s from the squared-error closed form.
        continuous_mae: per-structure s minimising the MAE (exact).
        continuous_atom: per-atom s minimising each atom's absolute error (analysis bound).
        best_fixed_scale: the fixed scale with the lowest MAE.
        structure_choice: [n_frames] 1 where the long branch was picked.
        structure_scales: [n_frames] the continuous (MAE) oracle's s per structure.
        atom_long_fraction: fraction of atoms routed to the long branch.
    """

    fixed: dict[float, float]
    hard_structure: float
    hard_atom: float
    continuous_l2: float
    continuous_mae: float
    continuous_atom: float
    best_fixed_scale: float
    structure_choice: np.ndarray
    structure_scales: np.ndarray
    atom_long_fraction: float


def oracle_summary(
    frames: Sequence[BranchForces], fixed_scales: Sequence[float] = (0.0, 1.0)
) -> OracleSummary:
    """Every oracle of the module on ``frames`` (MAE over all force components)."""
    if not frames:
        raise ValueError("no structures to analyse")
    fixed = {
        float(s): _total_mae((mixed_forces(f.short, f.long, s) for f in frames), frames)
        for s in fixed_scales
    }
    choice = np.array([route_structure(f.short, f.long, f.reference) for f in frames])
    hard_s = _total_mae(((f.long if k else f.short) for f, k in zip(frames, choice)), frames)
    atoms = [route_atoms(f.short, f.long, f.reference) for f in frames]
    hard_a = _total_mae((mixed_forces(f.short, f.long, k) for f, k in zip(frames, atoms)), frames)
    s_l2 = [oracle_scale_l2(f.short, f.long, f.reference) for f in frames]
    s_mae = np.array([oracle_scale_mae(f.short, f.long, f.reference) for f in frames])
    s_atom = [oracle_scale_mae(f.short, f.long, f.reference, per_atom=True) for f in frames]
    n_atoms = sum(len(k) for k in atoms)
    return OracleSummary(
        fixed=fixed,
        hard_structure=hard_s,
        hard_atom=hard_a,
        continuous_l2=_total_mae(
            (mixed_forces(f.short, f.long, s) for f, s in zip(frames, s_l2)), frames
        ),
        continuous_mae=_total_mae(
            (mixed_forces(f.short, f.long, s) for f, s in zip(frames, s_mae)), frames
        ),
        continuous_atom=_total_mae(
            (mixed_forces(f.short, f.long, s) for f, s in zip(frames, s_atom)), frames
        ),
        best_fixed_scale=min(fixed, key=lambda s: (fixed[s], s)),
        structure_choice=choice,
        structure_scales=s_mae,
        atom_long_fraction=float(sum(int(k.sum()) for k in atoms)) / max(n_atoms, 1),
    )


def oracle_gain_recovered(baseline: float, oracle: float, achieved: float) -> float:
    """Fraction of the oracle's gain a method recovers: (baseline - achieved) / (baseline -
    oracle). 1 means the oracle's error, 0 the baseline's; NaN when the oracle gains nothing."""
    gain = baseline - oracle
    if gain <= 0:
        return float("nan")
    return (baseline - achieved) / gain
