"""The router step of ``trustpot scales run``: a warm start on oracle scales, training on the
calibration frames (:func:`trustpot.bench.scales.router.train_router`), evaluation on the test
frames."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustpot.bench.scales.analysis import (
    FrameSet,
    collect,
    total_mae,
)
from trustpot.bench.scales.options import (
    ScalesOptions,
)
from trustpot.bench.scales.oracle import oracle_scale_mae
from trustpot.bench.scales.router import (
    pretrain_router,
    router_features,
    router_mixture,
    train_router,
)
from trustpot.data.dataset import GraphDataset
from trustpot.models.mixture import ScaleMixturePotential


def warm_start(
    router: ScaleMixturePotential,
    calib: FrameSet,
    calib_ds: GraphDataset,
    init: float,
    opts: ScalesOptions,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Fit the router to the oracle scales of the calibration frames (per atom, or per structure
    for a structure-level router) on frozen features; keep it only if the mixture's own
    calibration force MAE beats the fixed scale ``init``."""
    assert router.router is not None
    per_structure = router.meta.router_level == "structure"
    targets, weights = [], []
    for a, b, r in zip(calib.short, calib.long, calib.reference):
        if per_structure:
            targets.append(np.array([oracle_scale_mae(a, b, r)]))
            weights.append(np.array([np.abs(b - a).sum()]))
        else:
            targets.append(oracle_scale_mae(a, b, r, per_atom=True))
            weights.append(np.abs(b - a).sum(axis=1))
    before = copy.deepcopy(router.router.state_dict())
    features = router_features(router, calib_ds, 2 * opts.batch_size)
    if per_structure:
        sizes = [len(r) for r in calib.reference]
        features = torch.stack([f.mean(dim=0) for f in torch.split(features, sizes)])
    bce = pretrain_router(
        router,
        features,
        torch.as_tensor(np.concatenate(targets)),
        torch.as_tensor(np.concatenate(weights)),
    )
    start = total_mae(calib, calib.mixed(init))
    warmed = collect(router, calib_ds, 2 * opts.batch_size, opts.device, with_model_forces=True)
    after = total_mae(calib, warmed.forces)
    kept = after < start
    if not kept:
        router.router.load_state_dict(before)
    log(
        f"{router.meta.router_level} router warm start on oracle scales: calibration MAE "
        f"{start:.5f} -> {after:.5f} eV/Å ({'kept' if kept else 'discarded'})"
    )
    return {
        "bce": bce,
        "calibration_mae_before": start,
        "calibration_mae_after": after,
        "kept": kept,
    }


def fit_router(
    level: str,
    mixture: ScaleMixturePotential,
    calib: FrameSet,
    calib_ds: GraphDataset,
    test_ds: GraphDataset,
    init: float,
    path: Path,
    opts: ScalesOptions,
    log: Callable[[str], None],
) -> tuple[FrameSet, dict[str, Any], float, float]:
    """Train (or reuse) the router of ``level`` and evaluate it on the test frames.

    Returns the test frames with the router mixture's forces and scales, its training summary,
    and the training and evaluation seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    start = router_mixture(mixture, init=init, hidden=opts.router_hidden, level=level)
    router, summary = train_router(
        start,
        calib_ds,
        path,
        epochs=opts.router_epochs,
        max_minutes=opts.router_minutes,
        lr=opts.router_lr,
        batch_size=opts.batch_size,
        seed=opts.seed,
        device=opts.device,
        log=lambda m: log(f"{level} {m}"),
        notes={"level": level},
        warm_start=lambda model: warm_start(model, calib, calib_ds, init, opts, log),
    )
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    log(f"evaluating the {level}-level router mixture on the test frames")
    routed = collect(
        router, test_ds, 2 * opts.batch_size, opts.device, with_model_forces=True, log=log
    )
    return routed, summary, t_train, time.perf_counter() - t0
