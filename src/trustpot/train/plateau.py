"""Has a run reached its plateau? The one measure every benchmark reports.

``tail_gain``: how much the best validation value still fell over the last quarter of a
run's minutes (0.02: 2% better at the end than at 75% of the run). Small means more of the
same schedule would not have changed the comparison; large means the run was cut short and
a comparison with it is partly a floor effect.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: share of a run's minutes at its end over which the plateau is judged
PLATEAU_TAIL = 0.25


def tail_gain(curve: Sequence[dict[str, float]], key: str = "val_forces_mae") -> float:
    """Relative drop of the best ``key`` over the last :data:`PLATEAU_TAIL` of the run's
    minutes; NaN for a curve too short to judge.

    Args:
        curve: rows in time order, each with ``minutes`` and ``key``.
        key: the validation column (lower is better).
    """
    if len(curve) < 2:
        return math.nan
    end = curve[-1]["minutes"]
    best: list[float] = []
    for row in curve:
        best.append(row[key] if not best else min(best[-1], row[key]))
    before = [b for r, b in zip(curve, best) if r["minutes"] <= (1 - PLATEAU_TAIL) * end]
    if not before or before[-1] == 0:
        return math.nan
    return float((before[-1] - best[-1]) / before[-1])


def _read_rows(metrics_csv: str | Path) -> list[dict[str, str]]:
    with open(metrics_csv, newline="") as handle:
        return list(csv.DictReader(handle))


def _curve(rows: Sequence[dict[str, str]], keys: Sequence[str]) -> list[dict[str, float]]:
    return [
        {
            "epoch": int(r["epoch"]) + 1,
            "minutes": float(r["elapsed_s"]) / 60.0,
            **{k: float(r[k]) for k in keys},
        }
        for r in rows
        if all(r.get(k) not in (None, "") for k in keys)
    ]


def learning_curve(metrics_csv: str | Path, keys: Sequence[str]) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` that have every column of ``keys``, as
    ``{"epoch": 1-based, "minutes": wall clock at the epoch's end, key: value...}``."""
    return _curve(_read_rows(metrics_csv), keys)


def run_plateau(metrics_csv: str | Path, key: str = "val_loss") -> dict[str, Any]:
    """A trained run's length and plateau from its ``metrics.csv``.

    Returns:
        ``epochs``, ``minutes`` (wall clock of the last epoch), ``best`` (lowest ``key``) and
        ``tail_gain`` (see :func:`tail_gain`); NaN values when the file has no ``key`` column
        or fewer than two epochs.
    """
    rows = _read_rows(metrics_csv)
    curve = _curve(rows, [key])
    return {
        "epochs": len(rows),
        "minutes": curve[-1]["minutes"] if curve else math.nan,
        "best": min((r[key] for r in curve), default=math.nan),
        "tail_gain": tail_gain(curve, key),
    }
