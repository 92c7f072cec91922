"""``trustpot uq fit {ensemble,mc-dropout,probe,perturb}`` and ``trustpot uq eval``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trustpot.cli.trainargs import add_training_flags, config_from_args
from trustpot.errors import ConfigError

METHODS = ("ensemble", "mc-dropout", "probe", "perturb")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def add_uq_commands(sub: argparse._SubParsersAction) -> None:
    uq = sub.add_parser(
        "uq",
        help="reliability: fit and evaluate uncertainty wrappers",
        description="Fit a reliability method around a potential, or evaluate one.",
    )
    uq_sub = uq.add_subparsers(dest="uq_command", required=True)

    fit = uq_sub.add_parser(
        "fit",
        help="fit a reliability wrapper; writes OUT/uq.ckpt",
        description=(
            "ensemble: train --n-models potentials (or wrap --members); mc-dropout: train one "
            "potential with dropout (or wrap --from); probe: classifier on the frozen embeddings "
            "of --from, trained on --calibration data the model did not train on; perturb: "
            "learned functional perturbations fine-tuned from --from with the CRPS on --train. "
            "--calibration data also fits the std rescaling and the reliability map."
        ),
    )
    fit.add_argument("method", choices=METHODS)
    add_training_flags(fit, with_config=False)
    fit.add_argument("--out", required=True, help="output folder (uq.ckpt, fit.json, members)")
    fit.add_argument("--from", dest="base", help="trained potential checkpoint to wrap")
    fit.add_argument("--members", nargs="+", help="ensemble: trained checkpoints to combine")
    fit.add_argument("--n-models", type=int, default=5, help="ensemble size (default 5)")
    fit.add_argument("--dropout", type=float, default=0.1, help="mc-dropout rate (default 0.1)")
    fit.add_argument(
        "--n-samples", type=int, help="samples per prediction (mc-dropout 16, perturb 8)"
    )
    fit.add_argument("--calibration", help="held-out labelled data (file or split.json:SUBSET)")
    fit.add_argument("--tolerance", type=float, help="force MAE (eV/Å) of a reliable structure")
    fit.add_argument(
        "--top-fraction",
        type=float,
        default=0.2,
        help="default tolerance: this top share of calibration errors is unreliable",
    )
    fit.add_argument("--fit-epochs", type=int, default=200, help="probe/perturb epochs")
    fit.add_argument("--fit-minutes", type=float, default=0.0, help="probe/perturb budget")
    fit.add_argument(
        "--fit-lr",
        type=float,
        default=1e-2,
        help="perturb: learning rate of the perturbation layers (backbone: 1e-4)",
    )
    fit.add_argument(
        "--freeze-backbone", action="store_true", help="perturb: train only the perturbations"
    )
    fit.set_defaults(func=_fit, out_dir=lambda a: a.out)

    ev = uq_sub.add_parser(
        "eval",
        help="evaluate a reliability wrapper on labelled data",
        description="Write DIR/uq_metrics.json and plots (error vs uncertainty, calibration, "
        "risk-coverage; per-atom importance for PROBE).",
    )
    ev.add_argument("checkpoint")
    ev.add_argument("data", help="labelled data (file or split.json:SUBSET)")
    ev.add_argument("--out", required=True)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--top-fraction", type=float, default=0.2)
    ev.set_defaults(func=_eval, out_dir=lambda a: a.out)


FLAG_NAMES = {"base": "--from"}


def _need(args: argparse.Namespace, name: str, why: str) -> str:
    value = getattr(args, name)
    if not value:
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        raise ConfigError(f"uq fit {args.method}: {flag} is required ({why})")
    return str(value)


def _fit(args: argparse.Namespace) -> int:
    from trustpot.data.splits import read_data
    from trustpot.io.checkpoint import load_potential
    from trustpot.uq import fit as F

    out = Path(args.out)
    t0 = time.perf_counter()
    calibration = read_data(args.calibration, require=("forces",)) if args.calibration else None
    report: dict[str, object] = {"method": args.method}
    if args.method == "ensemble":
        if args.members:
            model = F.ensemble_from_checkpoints(args.members)
            report["members"] = list(args.members)
        else:
            _need(args, "train", "or give --members")
            paths = F.train_ensemble_members(config_from_args(args), out, args.n_models, _log)
            model = F.ensemble_from_checkpoints(paths)
            report["members"] = [str(p) for p in paths]
    elif args.method == "mc-dropout":
        n = args.n_samples or 16
        if args.base:
            from trustpot.uq.ensemble import MCDropout

            model = MCDropout(load_potential(args.base), n)
        else:
            _need(args, "train", "or give --from a potential trained with dropout")
            model = F.train_mc_dropout(config_from_args(args), out, args.dropout, n, _log)
    elif args.method == "probe":
        from trustpot.uq.probe import fit_probe

        base = load_potential(_need(args, "base", "the potential to probe"))
        data = calibration or read_data(_need(args, "calibration", "held-out labels"))
        model = fit_probe(
            base,
            data,
            tolerance=args.tolerance,
            top_fraction=args.top_fraction,
            epochs=args.fit_epochs,
            max_minutes=args.fit_minutes,
            seed=args.seed or 0,
            log=_log,
            source=args.calibration,
        )
        calibration = None  # the probe's own temperature scaling used held-out calibration data
    else:
        from trustpot.train.run import split_train_valid
        from trustpot.uq.perturb import fit_perturbation

        base = load_potential(_need(args, "base", "the potential to perturb"))
        structures = read_data(_need(args, "train", "data for the CRPS fine-tuning"))
        if args.valid:
            train, valid = structures, read_data(args.valid)
        else:
            t_idx, v_idx = split_train_valid(structures, args.valid_fraction or 0.1, args.seed or 0)
            train, valid = [structures[i] for i in t_idx], [structures[i] for i in v_idx]
        model = fit_perturbation(
            base,
            train,
            valid,
            epochs=args.fit_epochs,
            max_minutes=args.fit_minutes,
            finetune_backbone=not args.freeze_backbone,
            lr=args.fit_lr,
            seed=args.seed or 0,
            log=_log,
        )
        if args.n_samples:
            model.n_samples = args.n_samples
    report["fit_s"] = time.perf_counter() - t0
    F.finish(
        model,
        out,
        calibration,
        str(args.calibration),
        report,
        args.tolerance,
        args.top_fraction,
        _log,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from trustpot.data.splits import read_data
    from trustpot.uq.collect import collect
    from trustpot.uq.io import load_uq
    from trustpot.uq.plots import write_plots
    from trustpot.uq.report import headline, uq_metrics

    model = load_uq(args.checkpoint)
    structures = read_data(args.data, require=("forces",))
    data = collect(model, structures, args.batch_size, source=args.data)
    metrics = uq_metrics(data, args.top_fraction)
    metrics["method"] = model.kind
    metrics["checkpoint"] = str(args.checkpoint)
    metrics["data"] = str(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(data, out, f"{model.kind} on {Path(str(args.data)).name}")
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
    print(json.dumps({"method": model.kind, **headline(metrics)}, indent=1))
    return 0
