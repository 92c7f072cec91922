"""The plateau measure every benchmark reports (trustpot.train.plateau)."""

from __future__ import annotations

import math
from pathlib import Path

from trustpot.train.metrics_log import MetricsLog
from trustpot.train.plateau import learning_curve, run_plateau, tail_gain


def _curve(values: list[float]) -> list[dict[str, float]]:
    return [{"minutes": float(k + 1), "val_loss": v} for k, v in enumerate(values)]


def test_a_flat_end_is_a_plateau_and_a_falling_end_is_not() -> None:
    flat = _curve([4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    falling = _curve([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    assert tail_gain(flat, "val_loss") == 0.0
    # best at 75% of 8 minutes (minute 6) is 3.0, at the end 1.0: two thirds lower
    assert math.isclose(tail_gain(falling, "val_loss"), 2.0 / 3.0)


def test_the_best_so_far_counts_not_the_last_value() -> None:
    noisy = _curve([4.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    assert tail_gain(noisy, "val_loss") == 0.0


def test_too_short_a_curve_is_nan() -> None:
    assert math.isnan(tail_gain(_curve([1.0]), "val_loss"))


def test_run_plateau_reads_metrics_csv(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.csv")
    for epoch, loss in enumerate([5.0, 3.0, 2.0, 1.5]):
        log.append({"epoch": epoch, "elapsed_s": 60.0 * (epoch + 1), "val_loss": loss})
    out = run_plateau(tmp_path / "metrics.csv", "val_loss")
    assert out["epochs"] == 4 and out["best"] == 1.5 and out["minutes"] == 4.0
    assert math.isclose(out["tail_gain"], 0.5 / 2.0)  # 2.0 at minute 3, 1.5 at minute 4
    missing = run_plateau(tmp_path / "metrics.csv", "val_forces_mae")
    assert missing["epochs"] == 4 and math.isnan(missing["best"])
    curve = learning_curve(tmp_path / "metrics.csv", ["val_loss"])
    assert [r["epoch"] for r in curve] == [1, 2, 3, 4] and curve[-1]["minutes"] == 4.0
    assert learning_curve(tmp_path / "metrics.csv", ["val_forces_mae"]) == []
