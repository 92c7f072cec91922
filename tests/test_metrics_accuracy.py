"""Accuracy metrics against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trustpot import keys as K
from trustpot.data.structures import Structure
from trustpot.metrics import accuracy as A


def _structure(forces: list[list[float]] | None, energy: float | None, **info: str) -> Structure:
    n = 2 if forces is None else len(forces)
    return Structure(
        numbers=np.full(n, 1),
        positions=np.arange(3 * n, dtype=float).reshape(n, 3),
        cell=np.zeros((3, 3)),
        pbc=np.zeros(3, dtype=bool),
        energy=energy,
        forces=None if forces is None else np.array(forces, dtype=float),
        info=dict(info),
    )


def test_mae_rmse_hand_case() -> None:
    e = np.array([1.0, -2.0, 2.0])
    assert A.mae(e) == pytest.approx(5.0 / 3.0)  # (1 + 2 + 2) / 3
    assert A.rmse(e) == pytest.approx(math.sqrt(9.0 / 3.0))  # sqrt((1 + 4 + 4) / 3)
    assert math.isnan(A.mae([])) and math.isnan(A.rmse(np.zeros((0, 3))))


def test_force_mae_one_structure() -> None:
    pred = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    ref = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    # |diff| = 1, 0, 0, 0, 2, 3 -> 6 / 6 components
    assert A.force_mae(pred, ref) == pytest.approx(1.0)
    assert A.force_mae(torch.tensor(pred, requires_grad=True), ref) == pytest.approx(1.0)


def test_pooled_mae_weighs_components_not_structures() -> None:
    errors = [np.full((1, 3), 3.0), np.zeros((3, 3))]
    # 9 / 12 components (the mean of the two structure MAEs would be 1.5)
    assert A.pooled_mae(errors) == pytest.approx(0.75)
    assert math.isnan(A.pooled_mae([]))


def test_per_structure_force_mae_nan_without_labels() -> None:
    structures = [
        _structure([[0.0, 0.0, 0.0]], None),
        _structure(None, None),
        _structure([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], None),
    ]
    preds = [
        {K.FORCES: np.array([[3.0, 0.0, 0.0]])},  # 3 / 3 = 1
        {K.FORCES: np.zeros((2, 3))},
        {K.FORCES: np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.5]])},  # 0.5 / 6
    ]
    out = A.per_structure_force_mae(structures, preds)
    assert out.shape == (3,)
    assert out[0] == pytest.approx(1.0)
    assert math.isnan(out[1])
    assert out[2] == pytest.approx(0.5 / 6.0)
    with pytest.raises(ValueError, match="2 structures but 3 predictions"):
        A.per_structure_force_mae(structures[:2], preds)


def test_force_cosines_and_magnitudes() -> None:
    pred = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    ref = np.array([[1.0, 1.0, 0.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    # atom 0: 1 / sqrt(2); atom 1: -1; atom 2 has no predicted direction and is left out
    assert A.force_cosines(pred, ref) == pytest.approx([1 / math.sqrt(2), -1.0])
    # | |pred| - |ref| |: |1 - sqrt 2|, |2 - 1|, |0 - 1|
    assert A.force_magnitude_errors(pred, ref) == pytest.approx([math.sqrt(2) - 1, 1.0, 1.0])


def test_accuracy_metrics_hand_case() -> None:
    structures = [
        _structure([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], energy=-1.0),
        _structure([[0.0, 0.0, 2.0]], energy=None),
        _structure(None, energy=2.0),
    ]
    preds = [
        {K.ENERGY: np.array(-0.5), K.FORCES: np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])},
        {K.ENERGY: np.array(0.0), K.FORCES: np.array([[0.0, 0.0, -2.0]])},
        {K.ENERGY: np.array(1.0), K.FORCES: np.zeros((2, 3))},
    ]
    m = A.accuracy_metrics(structures, preds)
    assert m["n_structures"] == 3 and m["n_atoms"] == 5
    # energy errors +0.5 (2 atoms) and -1.0 (2 atoms)
    assert m["energy_mae"] == pytest.approx(0.75)
    assert m["energy_rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 2))
    assert m["energy_mae_per_atom"] == pytest.approx(0.375)
    assert m["energy_rmse_per_atom"] == pytest.approx(math.sqrt((0.0625 + 0.25) / 2))
    # force component errors: 1, 0, 0, 0, 0, 0 and 0, 0, -4 -> 5 / 9
    assert m["forces_mae"] == pytest.approx(5.0 / 9.0)
    assert m["forces_rmse"] == pytest.approx(math.sqrt(17.0 / 9.0))
    assert m["forces_cosine"] == pytest.approx((1.0 + 1.0 - 1.0) / 3)
    assert m["forces_magnitude_mae"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    # squared force errors per structure: 1 and 16; the worst 5% is one structure
    assert m["forces_tail_share"] == pytest.approx(16.0 / 17.0)


def test_tail_share_tells_spread_errors_from_a_few_bad_frames() -> None:
    even = np.ones(100)
    assert A.tail_share(even) == pytest.approx(0.05)
    spiked = np.ones(100)
    spiked[[3, 50]] = 96.0  # two frames carry 192 of 290
    assert A.tail_share(spiked) == pytest.approx((2 * 96.0 + 3.0) / 290.0)
    assert A.tail_share(np.ones(3)) == pytest.approx(1.0 / 3.0)  # at least one entry
    assert math.isnan(A.tail_share(np.zeros(4))) and math.isnan(A.tail_share(np.array([])))


def test_accuracy_metrics_without_labels_has_counts_only() -> None:
    m = A.accuracy_metrics([_structure(None, None)], [{K.ENERGY: np.array(0.0)}])
    assert m == {"n_structures": 1, "n_atoms": 2}


def test_grouped_metrics_by_config_type() -> None:
    structures = [
        _structure([[1.0, 0.0, 0.0]], 0.0, config_type="b"),
        _structure([[0.0, 0.0, 0.0]], 0.0),
        _structure([[0.0, 0.0, 0.0]], 0.0, config_type="a"),
    ]
    preds = [{K.ENERGY: np.array(1.0), K.FORCES: np.zeros((1, 3))} for _ in structures]
    groups = A.grouped_metrics(structures, preds)
    assert list(groups) == ["a", "b"]
    assert groups["a"]["forces_mae"] == pytest.approx(0.0)
    assert groups["b"]["forces_mae"] == pytest.approx(1.0 / 3.0)
    assert groups["b"]["n_structures"] == 1
    assert A.grouped_metrics(structures, preds, key="temperature") == {}


def test_evaluate_keeps_the_old_names() -> None:
    from trustpot import evaluate

    assert evaluate.accuracy_metrics is A.accuracy_metrics
    assert evaluate.grouped_metrics is A.grouped_metrics


def test_forces_cosine_is_nan_when_every_force_vanishes() -> None:
    m = A.accuracy_metrics([_structure([[0.0, 0.0, 0.0]], None)], [{K.FORCES: np.zeros((1, 3))}])
    assert m["forces_mae"] == 0.0 and math.isnan(m["forces_cosine"])
