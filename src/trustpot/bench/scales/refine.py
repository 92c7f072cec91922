"""Loss-guided refinement of a pool of scales, and a differentiable scale.

Pool refinement (seed 000): start from the anchors {0, 1}; every round evaluate ``loss(s)`` at
each new pool member (e.g. the validation force MAE of the mixture with the fixed scale ``s``),
then insert midpoints chosen by a rule. Stop when the best loss improves by less than ``tol``
(``patience`` rounds in a row; one by default, as in the seed), after ``max_rounds`` insertion
rounds, or when no interval is wide enough to split (midpoints closer than ``min_spacing`` to a
member are not inserted). The pool after every round is kept.

Rules:

``"neighbors"`` (default, bracketing): insert the midpoints of the (one or two) intervals adjacent
    to the current best member. For a unimodal loss sampled on the pool, the minimiser lies
    between the best member's neighbours, so these two intervals are exactly the bracket that
    contains it; each round halves the bracket. One or two evaluations per round. On the loss
    (s - 0.3)^2 it reproduces the seed's trajectory {0, 1} -> {0, 0.5, 1} -> {0, 0.25, 0.5, 0.75, 1}
    -> {0, 0.125, 0.25, 0.375, 0.5, 0.75, 1}, then stops (no improvement).
``"greedy"``: evaluate the midpoint of every interval (cached, so only new intervals cost an
    evaluation) and insert the single midpoint with the lowest loss; it stops without inserting
    when that loss does not beat the pool's best by ``tol``. Robust to multi-modal losses, at
    the cost of one evaluation per new interval.

Losses are cached by scale: a member is never evaluated twice. Midpoints of dyadic intervals are
exact binary fractions, so the cache keys are exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trustpot.errors import ConfigError
from trustpot.models.mixture import DifferentiableScale

RULES = ("neighbors", "greedy")


@dataclass
class RefinementRound:
    """One round: the pool it evaluated and what it decided.

    Attributes:
        index: round number (0 evaluates the initial pool).
        pool: sorted scales in the pool during this round.
        losses: loss of every pool member (same order as ``pool``).
        best_scale: the member with the lowest loss (the smallest scale on ties).
        best_loss: its loss.
        improvement: previous round's best loss minus this one (inf in round 0).
        inserted: scales inserted after this round (empty in the last round).
    """

    index: int
    pool: list[float]
    losses: list[float]
    best_scale: float
    best_loss: float
    improvement: float
    inserted: list[float] = field(default_factory=list)


@dataclass
class RefinementResult:
    """Outcome of :func:`refine_scale_pool`.

    Attributes:
        rounds: every round, in order; ``rounds[k].pool`` is the pool after k insertions.
        pool: the final pool (sorted).
        losses: loss of every scale evaluated (pool members and greedy candidates).
        best_scale: member with the lowest loss.
        best_loss: its loss.
        stop_reason: ``"tolerance"``, ``"max_rounds"`` or ``"min_spacing"``.
    """

    rounds: list[RefinementRound]
    pool: list[float]
    losses: dict[float, float]
    best_scale: float
    best_loss: float
    stop_reason: str

    @property
    def n_evaluations(self) -> int:
        """Number of distinct scales at which the loss was evaluated."""
        return len(self.losses)

    def trajectory(self) -> list[list[float]]:
        """The pool of every round."""
        return [list(r.pool) for r in self.rounds]


def _best(pool: Sequence[float], losses: dict[float, float]) -> tuple[float, float]:
    best = min(pool, key=lambda s: (losses[s], s))
    return best, losses[best]


def refine_scale_pool(
    loss: Callable[[float], float],
    pool: Sequence[float] = (0.0, 1.0),
    tol: float = 1e-3,
    max_rounds: int = 10,
    min_spacing: float = 1.0 / 64,
    rule: str = "neighbors",
    patience: int = 1,
    log: Callable[[str], None] | None = None,
) -> RefinementResult:
    """Grow a pool of scales in [0, 1] by inserting midpoints where the loss is lowest.

    Args:
        loss: ``loss(s) -> float``, lower is better (e.g. validation force MAE at fixed s).
        pool: initial members (at least two, in [0, 1]).
        tol: stop when the best loss improves by less than this (loss units).
        max_rounds: at most this many insertion rounds.
        min_spacing: never insert a midpoint closer than this to an existing member.
        rule: ``"neighbors"`` or ``"greedy"`` (see the module docstring).
        patience: stop after this many consecutive rounds improving by less than ``tol``
            (1, the seed's rule: stop at the first round that does not pay off).
        log: called with one line per round (the pool and its best member).

    Returns:
        The rounds, the final pool and every loss evaluated.
    """
    if rule not in RULES:
        raise ConfigError(f"refinement rule must be one of {RULES}, got {rule!r}")
    members = sorted({float(s) for s in pool})
    if len(members) < 2 or members[0] < 0.0 or members[-1] > 1.0:
        raise ConfigError(f"the initial pool needs two or more scales in [0, 1], got {pool}")
    if tol < 0 or min_spacing <= 0 or max_rounds < 0 or patience < 1:
        raise ConfigError("need tol >= 0, min_spacing > 0, max_rounds >= 0 and patience >= 1")
    losses: dict[float, float] = {}

    def evaluate(s: float) -> float:
        if s not in losses:
            value = float(loss(s))
            if not math.isfinite(value):
                raise ValueError(f"loss({s}) is not finite: {value}")
            losses[s] = value
        return losses[s]

    rounds: list[RefinementRound] = []
    previous = math.inf
    stalled = 0
    stop_reason = "max_rounds"
    for index in range(max_rounds + 1):
        for s in members:
            evaluate(s)
        best, best_loss = _best(members, losses)
        record = RefinementRound(
            index,
            list(members),
            [losses[s] for s in members],
            best,
            best_loss,
            previous - best_loss,
        )
        rounds.append(record)
        if log is not None:
            log(
                f"round {index}: pool {members} best s={best:g} loss={best_loss:.6g} "
                f"(improvement {record.improvement:.3g})"
            )
        stalled = stalled + 1 if index > 0 and record.improvement < tol else 0
        if stalled >= patience:
            stop_reason = "tolerance"
            break
        if index == max_rounds:
            break
        wide = [(a, b) for a, b in itertools.pairwise(members) if (b - a) / 2.0 >= min_spacing]
        if rule == "neighbors":
            inserted = [(a + b) / 2.0 for a, b in wide if best in (a, b)]
        else:
            candidates = [(a + b) / 2.0 for a, b in wide]
            for s in candidates:
                evaluate(s)
            inserted = []
            if candidates:
                pick = min(candidates, key=lambda s: (losses[s], s))
                if best_loss - losses[pick] < tol and stalled + 1 >= patience:
                    stop_reason = "tolerance"
                    break
                inserted = [pick]
        if not inserted:
            stop_reason = "min_spacing"
            break
        record.inserted = inserted
        members = sorted(set(members) | set(inserted))
        previous = best_loss
    best, best_loss = _best(members, losses)
    return RefinementResult(rounds, members, dict(losses), best, best_loss, stop_reason)


def _dyadic_inside(a: float, b: float, min_spacing: float) -> list[float]:
    """Points strictly inside (a, b) reached by repeated halving, coarsest first, while the
    half-width stays at least ``min_spacing``."""
    points: list[float] = []
    parts = 2
    while (b - a) / parts >= min_spacing:
        step = (b - a) / parts
        points += [a + k * step for k in range(1, parts, 2)]
        parts *= 2
    return points


def refine_pool(
    pool_loss: Callable[[Sequence[float]], float],
    pool: Sequence[float] = (0.0, 1.0),
    tol: float = 1e-4,
    relative: bool = True,
    max_rounds: int = 10,
    min_spacing: float = 1.0 / 64,
    lookahead: bool = False,
    log: Callable[[str], None] | None = None,
) -> RefinementResult:
    """Loss-guided refinement of a *pool* whose loss depends on all its members.

    ``pool_loss(pool)`` scores a whole pool, e.g. the force MAE when every structure uses the
    best member of the pool (a pool used for routing). Each round scores every interval wider
    than ``2 * min_spacing`` by how much refining it lowers the loss, inserts the midpoint of the
    best interval, and stops when that gain is below the tolerance (``tol`` times the current loss
    when ``relative``, else ``tol`` in loss units), after ``max_rounds`` insertions, or when no
    interval can be split.

    The gain of refining an interval is, by default, the gain of inserting its midpoint. With
    ``lookahead`` it is the largest gain of inserting any point that repeated halving of the
    interval reaches (down to ``min_spacing``): an interval whose midpoint does not help yet but
    which holds a useful scale deeper down is still refined (its midpoint is inserted, on the way
    to that scale). Without look-ahead a loss that only pays off below the first midpoint stops at
    once.

    Returns:
        A :class:`RefinementResult`; ``rounds[k]`` holds the pool after k insertions, its loss
        (``best_loss``), ``losses`` the loss of the pool after inserting each candidate midpoint
        tried that round (in interval order), and ``best_scale`` the inserted midpoint (NaN in the
        last round). The result's ``losses`` maps each member to the pool loss right after it
        joined (the anchors to the initial loss), ``best_loss`` is the final pool's loss and
        ``best_scale`` is NaN (a pool, not one scale).
    """
    members = sorted({float(s) for s in pool})
    if len(members) < 2 or members[0] < 0.0 or members[-1] > 1.0:
        raise ConfigError(f"the initial pool needs two or more scales in [0, 1], got {pool}")
    if tol < 0 or min_spacing <= 0 or max_rounds < 0:
        raise ConfigError("need tol >= 0, min_spacing > 0 and max_rounds >= 0")

    def score(candidate: Sequence[float]) -> float:
        value = float(pool_loss(sorted(candidate)))
        if not math.isfinite(value):
            raise ValueError(f"pool loss of {sorted(candidate)} is not finite: {value}")
        return value

    current = score(members)
    history: dict[float, float] = {s: current for s in members}
    rounds: list[RefinementRound] = []
    previous = math.inf
    stop_reason = "max_rounds"
    for index in range(max_rounds + 1):
        record = RefinementRound(index, list(members), [], math.nan, current, previous - current)
        rounds.append(record)
        if log is not None:
            log(f"round {index}: pool {members} loss={current:.6g}")
        if index == max_rounds:
            break
        wide = [(a, b) for a, b in itertools.pairwise(members) if (b - a) / 2.0 >= min_spacing]
        if not wide:
            stop_reason = "min_spacing"
            break
        candidates = [(a + b) / 2.0 for a, b in wide]
        trial = [score([*members, m]) for m in candidates]
        record.losses = trial
        gains = [current - t for t in trial]
        if lookahead:
            gains = [
                max(
                    [g]
                    + [
                        current - score([*members, p])
                        for p in _dyadic_inside(a, b, min_spacing)[1:]
                    ]
                )
                for g, (a, b) in zip(gains, wide)
            ]
        k = max(range(len(gains)), key=lambda i: (gains[i], -candidates[i]))
        gain = gains[k]
        threshold = tol * abs(current) if relative else tol
        if gain < threshold or gain <= 0:
            stop_reason = "tolerance"
            if log is not None:
                log(
                    f"stop: refining around {candidates[k]:g} gains {gain:.3g} "
                    f"< tolerance {threshold:.3g}"
                )
            break
        record.inserted = [candidates[k]]
        record.best_scale = candidates[k]
        members = sorted([*members, candidates[k]])
        previous, current = current, trial[k]
        history[candidates[k]] = current
    return RefinementResult(rounds, members, history, math.nan, current, stop_reason)


@dataclass
class ScaleOptimisation:
    """Outcome of :func:`optimise_scale`.

    Attributes:
        scale: final s.
        loss: loss at the final s.
        history: (s, loss) at every step.
        converged: the step size in s fell below the tolerance before ``steps`` ran out.
    """

    scale: float
    loss: float
    history: list[tuple[float, float]]
    converged: bool


def optimise_scale(
    loss: Callable[[Tensor], Tensor],
    init: float = 0.5,
    steps: int = 300,
    lr: float = 0.05,
    tol: float = 1e-6,
    scale: DifferentiableScale | None = None,
    run_dir: str | Path | None = None,
) -> ScaleOptimisation:
    """Differentiable scale update: Adam on theta of s = sigmoid(theta) minimising ``loss(s)``.

    Args:
        loss: differentiable ``loss(s: 0-d Tensor) -> 0-d Tensor`` (e.g. the force loss of a
            mixture evaluated with ``scale=s`` on a batch).
        init: initial s (ignored when ``scale`` is given).
        steps: at most this many Adam steps.
        lr: Adam learning rate on theta.
        tol: converged when |Δs| stays below ``tol`` for 10 consecutive steps.
        scale: an existing :class:`DifferentiableScale` to optimise in place.
        run_dir: run folder of the optimisation (it runs on the trainer, one full-batch step
            per epoch: :func:`trustpot.train.full_batch.minimise`); ``None``: temporary.

    Returns:
        The final scale, its loss and the trajectory.
    """
    from trustpot.train.full_batch import minimise

    module = scale if scale is not None else DifferentiableScale(init)
    start = module.value

    def on_epoch(trainer: Any, row: dict[str, Any]) -> str | None:
        # kept in the trainer's user state, so a resumed run continues the same trajectory
        state = trainer.user_state
        before = float(state.get("s", start))
        state.setdefault("history", []).append([before, float(row["train_loss"])])
        state["s"] = module.value
        quiet = int(state.get("quiet", 0))
        state["quiet"] = quiet + 1 if abs(module.value - before) < tol else 0
        return "converged" if state["quiet"] >= 10 else None

    result, trainer = minimise(
        module, lambda m: loss(m()), steps, lr, on_epoch=on_epoch, run_dir=run_dir, desc="scale"
    )
    history = [(float(a), float(b)) for a, b in trainer.user_state.get("history", [])]
    converged = result.stopped_by == "converged"
    with torch.no_grad():
        final = float(loss(module()).detach())
    return ScaleOptimisation(module.value, final, history, converged)
