"""``trustpot scales run``: train both experts, run every mode of the seed, write the report.

Steps (each logged with a time stamp; the expensive ones are reused on a rerun in the same
``out`` folder):

1. read the training, calibration (``valid``) and test frames (files or manifest subsets);
2. build the mixture and train the short branch, then the long branch, separately with the same
   budget (``out/short``, ``out/long``; steps reused when their ``state.json`` is done);
3. evaluate both branches on the calibration and test frames;
4. choose on calibration frames: the best fixed endpoint (the baseline), the best fixed scale
   (bisection), the refined pool (loss: the calibration force MAE when each frame uses its best
   pool member), the differentiable scale and pool;
5. train the router on the calibration frames (``out/router.ckpt``, a reused step);
6. report on the test frames: every row in eV/Å and kJ/mol/nm, overall and in close contact,
   MAE against ion distance, the pool trajectory, the router's s against ion distance
   (``out/scales.json``, ``out/report.md``, PNGs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustpot.bench.scales.analysis import (
    FrameSet,
    PoolScorer,
    collect,
    fit_differentiable_pool,
    fit_differentiable_scale,
    gain_recovered,
    make_row,
    oracle_frame_scales,
    oracle_predictions,
    pool_loss,
    pool_selection,
    reduction_percent,
    total_mae,
)
from trustpot.bench.scales.branches import train_branch
from trustpot.bench.scales.contacts import binned_errors, distance_edges
from trustpot.bench.scales.options import (
    ROUTER_INIT_MARGIN,
    SEED,
    ScalesOptions,
    check_settings,
    mark_done,
)
from trustpot.bench.scales.refine import refine_pool, refine_scale_pool
from trustpot.bench.scales.routing import fit_router
from trustpot.config import TrainConfig
from trustpot.data.dataset import GraphDataset
from trustpot.data.splits import read_data
from trustpot.data.structures import Structure, check_species
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import save_model
from trustpot.metrics.accuracy import pooled_mae
from trustpot.models.build import build_scale_mixture
from trustpot.models.electrostatics import ElectrostaticsConfig
from trustpot.models.mixture import LONG, SHORT, ScaleMixturePotential
from trustpot.units import EV_PER_A_IN_KJ_PER_MOL_PER_NM


def _stamp(log_path: Path | None) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        if log_path is not None:
            with open(log_path, "a") as handle:
                handle.write(line + "\n")

    return log


def _read(specs: Sequence[str], sizes: list[int] | None = None) -> list[Structure]:
    """The frames of every spec, in order (``sizes`` receives each spec's frame count)."""
    out: list[Structure] = []
    for spec in specs:
        frames = read_data(spec)
        out += frames
        if sizes is not None:
            sizes.append(len(frames))
    return out


def _branch_config(opts: ScalesOptions) -> TrainConfig:
    return TrainConfig(
        epochs=opts.epochs,
        max_minutes=opts.branch_minutes,
        batch_size=opts.batch_size,
        lr=opts.lr,
        warmup_epochs=1 if opts.quick else 2,
        seed=opts.seed,
        device=opts.device,
    )


def _train_mixture(
    train: list[Structure],
    valid: list[Structure],
    out: Path,
    opts: ScalesOptions,
    log: Callable[[str], None],
) -> tuple[ScaleMixturePotential, dict[str, Any]]:
    path = out / "mixture.ckpt"

    def hypers(backbone: str, cutoff: float) -> dict[str, Any]:
        h: dict[str, Any] = {"n_features": opts.n_features, "n_layers": opts.n_layers}
        if backbone == "schnet":
            h.update(n_rbf=opts.schnet_rbf, n_filters=opts.schnet_filters)
        return {**h, "cutoff": cutoff}

    mixture = build_scale_mixture(
        train,
        short_backbone=opts.short_backbone,
        short_hypers=hypers(opts.short_backbone, opts.short_cutoff),
        long_backbone=opts.long_backbone,
        long_hypers=hypers(opts.long_backbone, opts.long_cutoff),
        seed=opts.seed,
        electrostatics=ElectrostaticsConfig(method=opts.electrostatics),
        router_hidden=opts.router_hidden,
    )
    check_species(valid, mixture.species, "calibration data")
    try:
        mixture = mixture.to(torch.device(opts.device))
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"device '{opts.device}' is not usable here: {err}") from None
    summaries: dict[str, Any] = {}
    cfg = _branch_config(opts)
    # the long branch first: if its time cap stops it early, the short branch gets exactly as
    # many epochs (the same budget in passes over the same data)
    for which in (LONG, SHORT):
        specs = [s for s in mixture.neighbor_lists() if s.name == which]
        train_ds = GraphDataset(train, specs, mixture.dtype, "train")
        valid_ds = GraphDataset(valid, specs, mixture.dtype, "calibration")
        summaries[which] = train_branch(
            mixture, which, train_ds, valid_ds, cfg, out / which, log=log
        )
        if which == LONG:
            epochs = max(1, min(cfg.epochs, int(summaries[LONG]["epochs"])))
            cfg = dataclasses.replace(cfg, epochs=epochs)
    save_model(mixture, path, extra={"branches": summaries})
    return mixture, summaries


def _fixed_grid(calib: FrameSet, test: FrameSet, n: int = 16) -> dict[str, list[float]]:
    grid = [k / n for k in range(n + 1)]
    return {
        "scale": grid,
        "calibration_mae": [total_mae(calib, calib.mixed(s)) for s in grid],
        "test_mae": [total_mae(test, test.mixed(s)) for s in grid],
    }


def run_scales(
    train_specs: Sequence[str],
    test_specs: Sequence[str],
    out: str | Path,
    opts: ScalesOptions,
    valid_specs: Sequence[str] = (),
    testbed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole analysis; writes ``out/scales.json`` and ``out/report.md``.

    Args:
        train_specs: training data (files or ``manifest.json:subset``).
        test_specs: test data.
        valid_specs: calibration data; when empty, ``opts.valid_fraction`` of the training frames
            (random, seeded) is held out.
        testbed: description of the testbed, stored in ``scales.json``.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _stamp(out / "log.txt")
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    if not train_specs or not test_specs:
        raise ConfigError("scales run needs --train and --test data (or --testbed)")
    train = _read(train_specs)
    test_sizes: list[int] = []
    test = _read(test_specs, test_sizes)
    if valid_specs:
        valid = _read(valid_specs)
    else:
        order = np.random.default_rng(opts.seed).permutation(len(train))
        n_valid = max(1, round(opts.valid_fraction * len(train)))
        if len(train) - n_valid < 1:
            raise ConfigError(f"{len(train)} training frames are too few to hold out calibration")
        valid = [train[int(k)] for k in order[:n_valid]]
        train = [train[int(k)] for k in sorted(order[n_valid:])]
    log(
        f"data: {len(train)} training, {len(valid)} calibration, {len(test)} test frames; "
        f"threads {torch.get_num_threads()}"
    )
    settings = check_settings(out, opts, train_specs, valid_specs, len(train), len(valid))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    mixture, branches = _train_mixture(train, valid, out, opts, log)
    check_species(test, mixture.species, "test data")
    timings["branches_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    specs = mixture.neighbor_lists()
    calib_ds = GraphDataset(valid, specs, mixture.dtype, "calibration")
    test_ds = GraphDataset(test, specs, mixture.dtype, "test")
    log("evaluating both branches on the calibration frames")
    calib = collect(mixture, calib_ds, 2 * opts.batch_size, opts.device, log=log)
    log("evaluating both branches on the test frames")
    test_set = collect(mixture, test_ds, 2 * opts.batch_size, opts.device, log=log)
    timings["branch_eval_s"] = time.perf_counter() - t0

    # -- choices on calibration frames ----------------------------------------------------
    t0 = time.perf_counter()
    ends = {s: total_mae(calib, calib.mixed(s)) for s in (0.0, 1.0)}
    baseline_s = min(ends, key=lambda s: (ends[s], s))
    log(
        f"calibration MAE: s=0 {ends[0.0]:.5f}, s=1 {ends[1.0]:.5f} eV/Å "
        f"-> baseline s={baseline_s:g}"
    )
    bisect = refine_scale_pool(
        lambda s: total_mae(calib, calib.mixed(s)),
        tol=0.0,
        max_rounds=opts.max_rounds,
        min_spacing=opts.min_spacing,
        log=lambda m: log(f"fixed-scale bisection {m}"),
    )
    best_fixed = bisect.best_scale
    pool_run = refine_pool(
        PoolScorer(calib),
        tol=opts.tol,
        relative=True,
        lookahead=True,
        max_rounds=opts.max_rounds,
        min_spacing=opts.min_spacing,
        log=lambda m: log(f"pool refinement {m}"),
    )
    final_pool = pool_run.pool
    diff_scale = fit_differentiable_scale(calib, init=0.5)
    diff_pool = fit_differentiable_pool(calib, final_pool)
    log(
        f"differentiable scale s={diff_scale['scale']:.4f}; differentiable pool "
        f"{[round(s, 4) for s in diff_pool['pool']]}"
    )
    timings["calibration_choices_s"] = time.perf_counter() - t0

    # -- routers --------------------------------------------------------------------------
    # start near the best fixed scale, kept off the end points where the sigmoid saturates
    router_init = min(max(best_fixed, ROUTER_INIT_MARGIN), 1.0 - ROUTER_INIT_MARGIN)
    routed, router_summary, timings["router_train_s"], timings["router_eval_s"] = fit_router(
        "atom", mixture, calib, calib_ds, test_ds, router_init, out / "router.ckpt", opts, log
    )
    (
        routed_s,
        router_s_summary,
        timings["router_structure_train_s"],
        timings["router_structure_eval_s"],
    ) = fit_router(
        "structure",
        mixture,
        calib,
        calib_ds,
        test_ds,
        router_init,
        out / "router_structure.ckpt",
        opts,
        log,
    )

    # -- rows on the test frames ----------------------------------------------------------
    th = opts.threshold
    t = test_set
    oracles = oracle_predictions(t)
    rows_predictions = {
        "fixed_0": t.mixed(0.0),
        "fixed_1": t.mixed(1.0),
        "fixed_baseline": t.mixed(baseline_s),
        "oracle_continuous_structure": oracles["oracle_continuous_structure"],
        "router": routed.forces,
        "router_structure": routed_s.forces,
    }
    rows = [
        make_row("fixed_0", "Fixed scale s = 0 (short branch)", t, t.mixed(0.0), True, th),
        make_row("fixed_1", "Fixed scale s = 1 (long branch)", t, t.mixed(1.0), True, th),
        make_row(
            "fixed_baseline",
            f"Fixed scale baseline: the better end point on calibration (s = {baseline_s:g})",
            t,
            t.mixed(baseline_s),
            True,
            th,
            seed=SEED["fixed"],
            seed_contact=SEED["contact_fixed"],
        ),
        make_row(
            "fixed_best",
            f"Best fixed scale by bisection on calibration (s = {best_fixed:g})",
            t,
            t.mixed(best_fixed),
            True,
            th,
        ),
        make_row(
            "oracle_hard_structure",
            "Oracle hard routing per structure",
            t,
            oracles["oracle_hard_structure"],
            False,
            th,
            seed=SEED["oracle_hard_structure"],
        ),
        make_row(
            "oracle_hard_atom",
            "Oracle hard routing per atom (bound on branch forces)",
            t,
            oracles["oracle_hard_atom"],
            False,
            th,
        ),
        make_row(
            "oracle_continuous_structure",
            "Continuous oracle interpolation per structure (exact MAE minimiser)",
            t,
            oracles["oracle_continuous_structure"],
            False,
            th,
            seed=SEED["oracle_continuous_structure"],
            seed_contact=SEED["contact_adaptive"],
        ),
        make_row(
            "oracle_continuous_structure_l2",
            "Continuous oracle per structure (closed-form L2 minimiser)",
            t,
            oracles["oracle_continuous_structure_l2"],
            False,
            th,
        ),
        make_row(
            "oracle_continuous_atom",
            "Continuous oracle per atom (bound on branch forces)",
            t,
            oracles["oracle_continuous_atom"],
            False,
            th,
        ),
        make_row(
            "pool_refined",
            f"Refined pool {_fmt_pool(final_pool)}, oracle selection per structure",
            t,
            t.mixed(pool_selection(t, final_pool).tolist()),
            False,
            th,
            seed=SEED["pool"],
        ),
        make_row(
            "pool_differentiable",
            f"Differentiable pool {_fmt_pool(diff_pool['pool'])}, oracle selection",
            t,
            t.mixed(pool_selection(t, diff_pool["pool"]).tolist()),
            False,
            th,
        ),
        make_row(
            "differentiable_scale",
            f"Differentiable scale (trained s = {diff_scale['scale']:.4f})",
            t,
            t.mixed(diff_scale["scale"]),
            True,
            th,
        ),
        make_row(
            "router", "Learned router, per atom (s_i from the local environment)", t,
            routed.forces, True, th,
        ),
        make_row(
            "router_structure", "Learned router, per structure (s from the mean environment)",
            t, routed_s.forces, True, th,
        ),
    ]  # fmt: skip
    by_key = {r.key: r for r in rows}
    by_source = _by_source(t, test_specs, test_sizes, rows_predictions)
    base = by_key["fixed_baseline"].errors
    cont = by_key["oracle_continuous_structure"].errors
    hard = by_key["oracle_hard_structure"].errors
    rout = by_key["router"].errors

    def gains(key: str) -> dict[str, float]:
        e = by_key[key].errors
        return {
            "gain_recovered_continuous": gain_recovered(base.overall, cont.overall, e.overall),
            "gain_recovered_hard": gain_recovered(base.overall, hard.overall, e.overall),
            "gain_recovered_contact_frames": gain_recovered(
                base.contact_frames, cont.contact_frames, e.contact_frames
            ),
        }

    router_block = {
        "training": router_summary,
        "init_scale": router_init,
        **gains("router"),
        "structure": {
            "training": router_s_summary,
            **gains("router_structure"),
            "frame_scale": [float(np.mean(s)) for s in routed_s.scale],
        },
        "mean_scale": float(np.mean(np.concatenate(routed.scale))),
        "frame_mean_scale": [float(np.mean(s)) for s in routed.scale],
        "frame_distance": [float(d) for d in t.frame_d],
        "oracle_frame_scale": [float(s) for s in oracle_frame_scales(t)],
        "ion_scale": [float(x) for s, d in zip(routed.scale, t.atom_d) for x in s[np.isfinite(d)]],
        "ion_distance": [float(x) for d in t.atom_d for x in d[np.isfinite(d)]],
    }
    contact = {
        key: {
            "baseline_contact_frames_ev_a": base.contact_frames,
            "contact_frames_ev_a": by_key[key].errors.contact_frames,
            "reduction_frames_pct": reduction_percent(
                base.contact_frames, by_key[key].errors.contact_frames
            ),
            "reduction_atoms_pct": reduction_percent(
                base.contact_atoms, by_key[key].errors.contact_atoms
            ),
            "reduction_overall_pct": reduction_percent(base.overall, by_key[key].errors.overall),
        }
        for key in by_key
        if key != "fixed_baseline"
    }
    edges_f = distance_edges(t.frame_d)
    edges_a = distance_edges(np.concatenate(t.atom_d))
    binned: dict[str, Any] = {}
    for key, preds in rows_predictions.items():
        errs = t.errors(preds)
        binned[key] = {
            "frames": binned_errors(errs, t.frame_d, edges_f, per_frame=True).to_dict(),
            "atoms": binned_errors(errs, t.atom_d, edges_a, per_frame=False).to_dict(),
        }
    pool_block = {
        "loss": "calibration force MAE (eV/Å) when every frame uses its best pool member",
        "rule": "insert the midpoint of the interval whose refinement (any point reached by "
        "halving it, down to min_spacing) lowers the loss most",
        "tolerance_relative": opts.tol,
        "min_spacing": opts.min_spacing,
        "stop_reason": pool_run.stop_reason,
        "final": final_pool,
        "rounds": [
            {
                "round": r.index,
                "pool": r.pool,
                "calibration_loss_ev_a": r.best_loss,
                "test_loss_ev_a": pool_loss(t, r.pool),
                "inserted": r.inserted,
                "candidate_losses": r.losses,
            }
            for r in pool_run.rounds
        ],
        "seed_final": SEED["pool_members"],
        "differentiable": diff_pool,
    }
    result = {
        "testbed": testbed or {"name": "files"},
        "data": {
            "train": list(train_specs),
            "valid": list(valid_specs) or f"{opts.valid_fraction:g} of train (seed {opts.seed})",
            "test": list(test_specs),
            "n_train": len(train),
            "n_calibration": len(valid),
            "n_test": len(test),
            "n_test_contact_frames": int(np.sum(t.frame_d < th)),
        },
        "options": dataclasses.asdict(opts),
        "units": {
            "force": f"eV/Å and kJ/mol/nm (1 eV/Å = {EV_PER_A_IN_KJ_PER_MOL_PER_NM:.4f} kJ/mol/nm)",
            "distance": "Å",
        },
        "seed_paper": SEED,
        "branches": branches,
        "calibration": {
            "endpoint_mae_ev_a": {str(k): v for k, v in ends.items()},
            "baseline_scale": baseline_s,
            "bisection": {
                "best_scale": best_fixed,
                "losses": {str(k): v for k, v in bisect.losses.items()},
            },
            "differentiable_scale": diff_scale,
        },
        "fixed_grid": _fixed_grid(calib, t),
        "rows": [r.to_dict() for r in rows],
        "pool": pool_block,
        "router": router_block,
        "close_contact": contact,
        "binned": binned,
        "by_test_source": by_source,
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    (out / "scales.json").write_text(json.dumps(result, indent=1, default=_json_default))
    from trustpot.bench.scales.report import write_report

    write_report(result, out)
    mark_done(out, settings, {"report": "report.md", "scales": "scales.json"})
    log(
        f"done in {(time.perf_counter() - t_start) / 60:.1f} min: test MAE baseline "
        f"{base.overall:.4f}, router per atom {rout.overall:.4f}, per structure "
        f"{by_key['router_structure'].errors.overall:.4f}, continuous oracle "
        f"{cont.overall:.4f} eV/Å; report {out / 'report.md'}"
    )
    return result


def _by_source(
    t: FrameSet,
    specs: Sequence[str],
    sizes: Sequence[int],
    predictions: dict[str, list[np.ndarray]],
) -> list[dict[str, Any]]:
    """Test MAE (eV/Å) of a few modes on the frames of each test file or manifest subset."""
    out, start = [], 0
    for spec, n in zip(specs, sizes):
        part = slice(start, start + n)
        start += n
        entry: dict[str, Any] = {"source": spec, "frames": n}
        for key, preds in predictions.items():
            entry[key] = pooled_mae(p - r for p, r in zip(preds[part], t.reference[part]))
        out.append(entry)
    return out


def _fmt_pool(pool: Sequence[float]) -> str:
    return "{" + ", ".join(f"{s:.4g}" for s in pool) + "}"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


__all__ = ["SEED", "ScalesOptions", "run_scales"]
