"""The drift metrics of the fine-tuning report, against hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from trustpot.finetune_report import davies_bouldin, linear_cka, scaled_w1, verdict


def test_identical_representations_have_no_drift() -> None:
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert scaled_w1(x, x) == pytest.approx(0.0)
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)


def test_w1_of_a_shift_is_the_shift_in_stds() -> None:
    x = np.random.default_rng(0).normal(size=(5000, 3))
    assert scaled_w1(x, x + 0.5 * x.std(0)) == pytest.approx(0.5, rel=1e-6)


def test_davies_bouldin_by_hand() -> None:
    # two groups on a line: centres 0 and 10, mean distance to centre 1 in each
    x = np.array([[-1.0], [1.0], [9.0], [11.0]])
    labels = np.array([1, 1, 8, 8])
    assert davies_bouldin(x, labels) == pytest.approx((1 + 1) / 10)
    # collapsing the groups onto each other raises it
    assert davies_bouldin(x * np.array([[1.0]]) / 5 + np.array([[0.0]]), labels) == pytest.approx(
        0.2
    )
    assert davies_bouldin(np.array([[-1.0], [1.0], [0.0], [2.0]]), labels) > 1
    assert np.isnan(davies_bouldin(x, np.ones(4)))


def test_verdict_names_forgetting_and_collapse() -> None:
    report = {
        "frames": "replay.xyz",
        "forgetting": {"forces_mae_vs_pretrained": 0.3},
        "drift": [
            {"layer": 0, "cka": 0.9, "davies_bouldin_before": 1.0, "davies_bouldin_after": 1.1},
            {"layer": 1, "cka": 0.2, "davies_bouldin_before": 1.0, "davies_bouldin_after": 3.0},
        ],
    }
    line = verdict(report)
    assert line.startswith("FORGOT") and "COLLAPSED in layer(s) [1]" in line
    report["forgetting"]["forces_mae_vs_pretrained"] = 0.01
    report["drift"] = report["drift"][:1]
    assert verdict(report).startswith("kept") and "no layer collapsed" in verdict(report)
