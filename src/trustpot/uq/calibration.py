"""Many calibration examples cheaply: out-of-fold force errors.

PROBE learns "how wrong is the model here" from labelled examples the model did not train on;
holding frames out of training to get them costs accuracy. Out-of-fold errors give every
training frame such a label: the frames are cut into ``k`` folds (seeded), a potential trained
(with the same options) on the other ``k - 1`` folds predicts each fold, and a frame's label is
that prediction's force MAE. Each fold model is a step under the one reuse rule, so a killed
run resumes and a rerun reuses finished folds.

The labels describe models *like* the final one (trained on 1 - 1/k of the data), not the
final model itself: they are slightly pessimistic, as cross-validation errors are.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ase.io import write

from trustpot.calculator import Predictor
from trustpot.data.splits import read_data
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.metrics.accuracy import per_structure_force_mae
from trustpot.uq.fit import train_once
from trustpot.uq.options import CalibrationSetOptions

#: info key of the out-of-fold force MAE (eV/Å) and of the fold index
OOF_KEY = "oof_forces_mae"
FOLD_KEY = "oof_fold"


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """[n] fold index of each frame: a seeded permutation cut into ``folds`` near-equal parts."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    for k, part in enumerate(np.array_split(order, folds)):
        out[part] = k
    return out


def out_of_fold(
    opts: CalibrationSetOptions, out: Path, log: Callable[[str], None] = print
) -> list[Structure]:
    """Train ``opts.folds`` potentials and label every training frame with the force MAE
    (eV/Å) of the one that did not see it.

    Writes ``out/oof.xyz`` (the frames with their labels and ``oof_forces_mae`` /
    ``oof_fold`` in their info), ``out/oof.json`` (per-fold counts and mean errors) and the
    fold runs ``out/fold_k``. Returns the labelled frames in their original order.
    """
    opts.validate()
    cfg = opts.run_config()
    assert opts.train is not None
    frames = read_data(opts.train)
    if len(frames) < 2 * opts.folds:
        raise ConfigError(f"{opts.train}: {len(frames)} frames are too few for {opts.folds} folds")
    fold = fold_of(len(frames), opts.folds, cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    errors = np.full(len(frames), np.nan)
    summary: dict[str, Any] = {"train": opts.train, "folds": opts.folds, "per_fold": []}
    for k in range(opts.folds):
        held = np.flatnonzero(fold == k)
        kept = np.flatnonzero(fold != k)
        data_file = out / f"fold_{k}.train.xyz"
        write(data_file, [frames[i].to_atoms() for i in kept], format="extxyz")
        fold_cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, train=str(data_file), valid="")
        )
        log(f"fold {k + 1}/{opts.folds}: training on {len(kept)} frames, predicting {len(held)}")
        best = train_once(fold_cfg, out / f"fold_{k}", log)
        predictor = Predictor.from_checkpoint(best)
        part = [frames[i] for i in held]
        errors[held] = per_structure_force_mae(part, predictor.predict_structures(part))
        summary["per_fold"].append(
            {"fold": k, "n_train": len(kept), "n_predicted": len(held),
             "mean_forces_mae": float(np.nanmean(errors[held]))}
        )  # fmt: skip
    labelled = []
    for i, s in enumerate(frames):
        info = {**s.info, OOF_KEY: float(errors[i]), FOLD_KEY: int(fold[i])}
        labelled.append(dataclasses.replace(s, info=info))
    write(out / "oof.xyz", [s.to_atoms() for s in labelled], format="extxyz")
    summary["mean_forces_mae"] = float(np.nanmean(errors))
    (out / "oof.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {out / 'oof.xyz'}: {len(labelled)} frames, mean out-of-fold force MAE "
        f"{summary['mean_forces_mae']:.4g} eV/Å")  # fmt: skip
    return labelled
