"""``trustpot uq fit {ensemble,mc-dropout,probe,perturb,llpr,shallow-ensemble}``, ``uq eval``.

Each method is its own subcommand whose flags are generated from its options dataclass
(:mod:`trustpot.uq.options`): a flag another method uses is an argparse error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from trustpot.cli.flags import add_flags, from_args, option
from trustpot.errors import ConfigError
from trustpot.uq.options import METHOD_OPTIONS, CalibrationSetOptions, UQOptions

METHODS = tuple(METHOD_OPTIONS)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


#: method -> (one-line help, description)
METHOD_HELP = {
    "ensemble": (
        "deep ensemble: train --n-models potentials with different seeds (or combine --members)",
        "Train --n-models potentials that differ only in seed (initialisation, shuffling, "
        "validation split), or combine trained --members; the spread of their predictions is "
        "the uncertainty.",
    ),
    "mc-dropout": (
        "MC dropout: one potential with dropout in its energy head, sampled at inference",
        "Train one potential with --dropout in its energy head (or wrap one trained with "
        "dropout, --from); --n-samples dropout masks per prediction give the uncertainty.",
    ),
    "probe": (
        "PROBE: a classifier on a trained potential's frozen embeddings that predicts reliability",
        "Train a small attention-pooling classifier on the frozen per-layer embeddings of --from "
        "to predict whether a structure's force MAE exceeds the tolerance, on --calibration data "
        "the potential did not train on; its probability is temperature-scaled on a held-out "
        "share of that data.",
    ),
    "perturb": (
        "learned perturbations: noise-driven shifts of hidden features, fine-tuned with the CRPS",
        "Add noise-conditioned scale-and-shift perturbations to the hidden features of --from "
        "and fine-tune them (and the backbone unless --freeze-backbone) on --train with the "
        "fair ensemble CRPS; --n-samples perturbations per prediction give the uncertainty.",
    ),
    "llpr": (
        "LLPR: last-layer prediction rigidity, a Bayesian last layer at about one model's cost",
        "Treat the last linear layer of --from's energy head as a Bayesian linear regression on "
        "the features below it, from one pass over --train (the potential's training data; no "
        "training): the energy std is exact, the force std comes from --n-samples last layers "
        "drawn from the posterior, all from one backbone pass.",
    ),
    "shallow-ensemble": (
        "shallow ensemble: --n-heads last layers on one backbone, fine-tuned with a likelihood",
        "Replace the last linear layer of --from's energy head by --n-heads heads on the same "
        "features and fine-tune them (and the backbone unless --freeze-backbone) on --train "
        "with the Gaussian NLL (or the CRPS) of the heads' mean and variance; the heads' "
        "spread is the uncertainty, all heads from one backbone pass.",
    ),
}


def add_uq_commands(sub: argparse._SubParsersAction[Any]) -> None:
    uq = sub.add_parser(
        "uq",
        help="reliability: fit and evaluate uncertainty wrappers",
        description="Fit a reliability method around a potential, or evaluate one.",
    )
    uq_sub = uq.add_subparsers(dest="uq_command", required=True)

    fit = uq_sub.add_parser(
        "fit",
        help="fit a reliability wrapper; writes OUT/uq.ckpt",
        description="Fit one reliability method (each takes only its own options; see "
        "'trustpot uq fit METHOD --help'). --calibration data fits the std rescaling and the "
        "reliability map.",
    )
    methods = fit.add_subparsers(dest="method", required=True)
    for method, cls in METHOD_OPTIONS.items():
        short, long = METHOD_HELP[method]
        p = methods.add_parser(method, help=short, description=long)
        add_flags(p, cls)
        p.add_argument("--out", required=True, help="output folder (uq.ckpt, fit.json, models)")
        p.set_defaults(resolve=_resolve_fit, run=_run_fit, out_dir=lambda a: a.out)

    cal = uq_sub.add_parser(
        "calibration-set",
        help="label every training frame with the force error of a model that did not see it",
        description="Cut --train into --folds parts, train a potential (with the training "
        "flags given) on all but one part and predict it: every frame gets an out-of-fold "
        "force MAE (oof_forces_mae, eV/Å). Writes OUT/oof.xyz for "
        "'trustpot uq fit probe --calibration OUT/oof.xyz --errors-key oof_forces_mae'.",
    )
    add_flags(cal, CalibrationSetOptions)
    cal.add_argument("--out", required=True, help="output folder (oof.xyz, oof.json, folds)")
    cal.set_defaults(resolve=_resolve_calibration, run=_run_calibration, out_dir=lambda a: a.out)

    ev = uq_sub.add_parser(
        "eval",
        help="evaluate a reliability wrapper on labelled data",
        description="Write DIR/uq_metrics.json and plots (error vs uncertainty, calibration, "
        "risk-coverage; per-atom importance for PROBE). Energy-only data (a scan, a reaction "
        "path) gets the energy metrics; force metrics are skipped with a note.",
    )
    add_flags(ev, UQEvalOptions)
    ev.set_defaults(resolve=_resolve_eval, run=_run_eval, out_dir=lambda a: a.out)


@dataclasses.dataclass(frozen=True)
class FitRequest:
    """``trustpot uq fit METHOD``: the method, its options and the output folder."""

    method: str
    options: UQOptions
    out: str


@dataclasses.dataclass(frozen=True)
class UQEvalOptions:
    """``trustpot uq eval``."""

    checkpoint: str = option("", "reliability wrapper (uq.ckpt)", positional=True)
    data: str = option("", "labelled data (file or split.json:SUBSET)", positional=True)
    out: str = option("", "output folder", required=True)
    batch_size: int = option(16, "structures per call")
    top_fraction: float = option(0.2, "share of the largest errors that rankings must flag")


def _resolve_fit(args: argparse.Namespace) -> FitRequest:
    options = from_args(METHOD_OPTIONS[args.method], args)
    options.validate()
    return FitRequest(args.method, options, args.out)


def _run_fit(req: FitRequest) -> int:
    from trustpot.uq.fit import fit_uq

    fit_uq(req.method, req.options, Path(req.out), _log)
    return 0


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    """``trustpot uq calibration-set``: its options and the output folder."""

    options: CalibrationSetOptions
    out: str


def _resolve_calibration(args: argparse.Namespace) -> CalibrationRequest:
    options = from_args(CalibrationSetOptions, args)
    options.validate()
    return CalibrationRequest(options, args.out)


def _run_calibration(req: CalibrationRequest) -> int:
    from trustpot.uq.calibration import out_of_fold

    out_of_fold(req.options, Path(req.out), _log)
    return 0


def _resolve_eval(args: argparse.Namespace) -> UQEvalOptions:
    opts = from_args(UQEvalOptions, args)
    if not 0 < opts.top_fraction < 1:
        raise ConfigError(f"--top-fraction must be in (0, 1), got {opts.top_fraction}")
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {opts.batch_size}")
    return opts


def _run_eval(args: UQEvalOptions) -> int:
    import numpy as np

    from trustpot.data.splits import read_data
    from trustpot.errors import DataError
    from trustpot.io.checkpoint import load_model
    from trustpot.uq.base import UQModel
    from trustpot.uq.collect import collect
    from trustpot.uq.plots import write_plots
    from trustpot.uq.report import (
        force_label_notes,
        frame_listing,
        headline,
        uq_metrics,
    )

    model = load_model(args.checkpoint, UQModel)
    structures = read_data(args.data, require=())
    for k, s in enumerate(structures):
        if s.energy is None and s.forces is None:
            raise DataError(str(args.data), "no energy and no forces label", k, "energy")
    data = collect(model, structures, args.batch_size, source=args.data)
    metrics = uq_metrics(data, args.top_fraction)
    metrics["frames"] = frame_listing(data)
    notes = force_label_notes(structures)
    if notes:
        metrics["notes"] = notes
        for note in notes:
            print(f"note: {note}", flush=True)
    metrics["method"] = model.method
    metrics["checkpoint"] = str(args.checkpoint)
    metrics["data"] = str(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(data, out, f"{model.method} on {Path(str(args.data)).name}")
    if data.has("atom_importance") and data.has("reliability"):
        from trustpot.uq.plots import plot_atom_importance

        k = int(np.argmin(data["reliability"]))
        atoms = data["atom_structure"] == k
        path = out / "atom_importance.png"
        plot_atom_importance(
            structures[k],
            data["atom_importance"][atoms],
            path,
            title=f"least reliable frame {k}: reliability {data['reliability'][k]:.2f}",
        )
        plots.append(path)
    metrics["plots"] = [p.name for p in plots]
    (out / "uq_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({"method": model.method, **headline(metrics)}, indent=1))
    return 0
