"""``trustpot scales run``: short/long experts, oracles, router, pool refinement, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from trustpot.errors import ConfigError

#: Where the DFT files live relative to the repository (``../shared/data/nacl_water``).
DEFAULT_DFT_DIR = str(Path("..") / "shared" / "data" / "nacl_water")


def add_scales_commands(sub: argparse._SubParsersAction) -> None:
    scales = sub.add_parser(
        "scales",
        help="adaptive scale refinement: short/long experts, routing, pool refinement",
        description="Two-expert scale mixtures (seed 000) on NaCl in water.",
    )
    scales_sub = scales.add_subparsers(dest="scales_command", required=True)
    p = scales_sub.add_parser(
        "run",
        help="train both branches and run every mode; writes OUT/report.md and OUT/scales.json",
        description=(
            "Train a short-scale and a long-range branch separately (same budget), then report "
            "fixed scales, oracle hard routing (per structure, per atom), continuous oracle "
            "interpolation, a learned router and the share of the oracle gain it recovers, a "
            "differentiable scale and pool, and loss-guided pool refinement from {0, 1}, overall "
            "and in close contact, in eV/Å and kJ/mol/nm. Data: --train/--test (files or "
            "split.json:SUBSET) or --testbed dft|openmm. Rerunning in the same OUT reuses "
            "trained branches and router."
        ),
    )
    p.add_argument("--testbed", choices=["dft", "openmm"], help="prepare a testbed's data")
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DFT_DIR,
        help=f"dft testbed: folder of the revPBE0-D3 files (default {DEFAULT_DFT_DIR})",
    )
    p.add_argument("--train", nargs="+", default=[], help="training data (files or manifests)")
    p.add_argument("--valid", nargs="+", default=[], help="calibration data (default: hold out)")
    p.add_argument("--test", nargs="+", default=[], help="test data")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny models and budgets (CI)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, help="seed of splits and initialisation (default 0)")
    p.add_argument("--n-features", type=int, help="branch width (full 32, quick 8)")
    p.add_argument("--n-layers", type=int, help="branch depth (full 2, quick 1)")
    p.add_argument("--short-backbone", help="short branch backbone (default painn)")
    p.add_argument("--long-backbone", help="long branch backbone (default painn)")
    p.add_argument("--short-cutoff", type=float, help="Å (default 4)")
    p.add_argument("--long-cutoff", type=float, help="Å, also Ewald's real space (default 6)")
    p.add_argument("--electrostatics", choices=["ewald", "pme"], help="default ewald")
    p.add_argument("--epochs", type=int, help="epochs of each branch (full 12, quick 10)")
    p.add_argument(
        "--branch-minutes", type=float, help="time cap per branch, min (full 20, quick 0.4)"
    )
    p.add_argument("--batch-size", type=int, help="frames per step (default 4)")
    p.add_argument("--router-epochs", type=int, help="router epochs (full 50, quick 3)")
    p.add_argument("--router-minutes", type=float, help="router budget (full 4, quick 0.3)")
    p.add_argument("--threshold", type=float, help="close-contact distance, Å (default 6)")
    p.add_argument("--tol", type=float, help="pool refinement tolerance, relative (1e-4)")
    p.add_argument("--max-train", type=int, default=0, help="dft testbed: cap training frames")
    p.add_argument("--max-valid", type=int, default=0, help="dft testbed: cap calibration frames")
    p.add_argument("--max-test", type=int, default=0, help="dft testbed: cap test frames")
    p.add_argument(
        "--force-cap",
        type=float,
        default=None,
        help="dft testbed: exclude frames with a force component above this, eV/Å (15; 0: off)",
    )
    p.add_argument(
        "--frames", type=int, help="openmm testbed: frames per ion-pair count (full 120, quick 8)"
    )
    p.set_defaults(func=_run, out_dir=lambda a: a.out)

    r = scales_sub.add_parser(
        "report",
        help="rewrite report.md and the PNGs of finished runs from their scales.json",
        description="Rebuild DIR/report.md and plots from DIR/scales.json (no model is run).",
    )
    r.add_argument("dirs", nargs="+", help="run folders holding scales.json")
    r.set_defaults(func=_report, out_dir=lambda a: a.dirs[0])


def _report(args: argparse.Namespace) -> int:
    import json

    from trustpot.bench.scales.report import write_report

    for folder in args.dirs:
        path = Path(folder) / "scales.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: run 'trustpot scales run --out {folder}' first")
        print(f"report: {write_report(json.loads(path.read_text()), folder)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from trustpot.bench.scales.pipeline import ScalesOptions, run_scales
    from trustpot.bench.scales.testbeds import FORCE_CAP, OpenMMPlan, prepare_dft, prepare_openmm

    overrides = {
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "n_features": args.n_features,
        "n_layers": args.n_layers,
        "short_backbone": args.short_backbone,
        "long_backbone": args.long_backbone,
        "short_cutoff": args.short_cutoff,
        "long_cutoff": args.long_cutoff,
        "electrostatics": args.electrostatics,
        "epochs": args.epochs,
        "branch_minutes": args.branch_minutes,
        "batch_size": args.batch_size,
        "router_epochs": args.router_epochs,
        "router_minutes": args.router_minutes,
        "threshold": args.threshold,
        "tol": args.tol,
    }
    opts = (
        ScalesOptions.quick_defaults(**overrides)
        if args.quick
        else ScalesOptions.full_defaults(**overrides)
    )
    if opts.threads > 0:
        import torch

        torch.set_num_threads(opts.threads)
    train, valid, test = list(args.train), list(args.valid), list(args.test)
    testbed = None
    if args.testbed:
        if train or valid or test:
            raise ConfigError("--testbed prepares its own data: drop --train/--valid/--test")
        if args.testbed == "dft":
            data_dir = Path(args.data_dir)
            if not data_dir.is_dir():
                raise ConfigError(
                    f"DFT data folder {data_dir} not found; pass --data-dir "
                    "(the nacl_water folder of the shared data)"
                )
            cap = FORCE_CAP if args.force_cap is None else args.force_cap
            quick_caps = (48, 16, 24) if args.quick else (0, 0, 0)
            bed = prepare_dft(
                data_dir,
                args.out,
                force_cap=cap,
                seed=opts.seed,
                max_train=args.max_train or quick_caps[0],
                max_valid=args.max_valid or quick_caps[1],
                max_test=args.max_test or quick_caps[2],
            )
        else:
            plan = OpenMMPlan.quick() if args.quick else OpenMMPlan()
            if args.frames:
                plan = replace(plan, frames=args.frames)
            bed = prepare_openmm(args.out, plan, seed=opts.seed)
        train, valid, test = bed.train, bed.valid, bed.test
        testbed = {"name": bed.name, **bed.info}
    elif not train or not test:
        raise ConfigError("give --train and --test data, or --testbed dft|openmm")
    run_scales(train, test, args.out, opts, valid_specs=valid, testbed=testbed)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
