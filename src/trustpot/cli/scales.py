"""``trustpot scales run``: short/long experts, oracles, router, pool refinement, report."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from trustpot.bench.scales.options import (
    DATA_MODES,
    DEFAULT_DFT_DIR,
    DFTTestbedOptions,
    FileData,
    OpenMMTestbedOptions,
    ScalesOptions,
)
from trustpot.cli.data import add_mode_flags, reject_foreign
from trustpot.cli.flags import from_args
from trustpot.errors import ConfigError

__all__ = ["DEFAULT_DFT_DIR", "add_scales_commands"]

#: field -> data sources (``--testbed`` values, ``files``) that use it
SCALES_FIELDS: dict[str, set[str]] = {}
SCALES_LABELS = {
    "files": "file data (no --testbed)",
    "dft": "--testbed dft",
    "openmm": "--testbed openmm",
}


def add_scales_commands(sub: argparse._SubParsersAction[Any]) -> None:
    scales = sub.add_parser(
        "scales",
        help="adaptive scale refinement: short/long experts, routing, pool refinement",
        description="Two-expert scale mixtures on NaCl in water: a short-range and a "
        "long-range potential mixed per structure or per atom by a scale in [0, 1].",
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
    SCALES_FIELDS.update(add_mode_flags(p, DATA_MODES, SCALES_LABELS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny models and budgets (CI)")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: default)")
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
    p.set_defaults(resolve=_resolve_run, run=_run, out_dir=lambda a: a.out)

    r = scales_sub.add_parser(
        "report",
        help="rewrite report.md and the PNGs of finished runs from their scales.json",
        description="Rebuild DIR/report.md and plots from DIR/scales.json (no model is run).",
    )
    r.add_argument("dirs", nargs="+", help="run folders holding scales.json")
    r.set_defaults(resolve=lambda a: tuple(a.dirs), run=_report, out_dir=lambda a: a.dirs[0])


def _report(dirs: tuple[str, ...]) -> int:
    import json

    from trustpot.bench.scales.report import write_report

    for folder in dirs:
        path = Path(folder) / "scales.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: run 'trustpot scales run --out {folder}' first")
        print(f"report: {write_report(json.loads(path.read_text()), folder)}")
    return 0


#: ScalesOptions fields set by a flag of the same name
TRAINING_FLAGS = (
    "seed", "threads", "device", "n_features", "n_layers", "short_backbone", "long_backbone",
    "short_cutoff", "long_cutoff", "electrostatics", "epochs", "branch_minutes", "batch_size",
    "router_epochs", "router_minutes", "threshold", "tol",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ScalesRun:
    """``trustpot scales run``: the run's options, its data source and the output folder."""

    options: ScalesOptions
    data: FileData | DFTTestbedOptions | OpenMMTestbedOptions
    out: str


def _resolve_run(args: argparse.Namespace) -> ScalesRun:
    mode = args.testbed or "files"
    reject_foreign(args, SCALES_FIELDS, mode, SCALES_LABELS)
    overrides = {name: getattr(args, name) for name in TRAINING_FLAGS}
    make = ScalesOptions.quick_defaults if args.quick else ScalesOptions.full_defaults
    data = from_args(DATA_MODES[mode], args)
    data.validate()
    return ScalesRun(make(**overrides), data, args.out)


def _run(req: ScalesRun) -> int:
    from dataclasses import replace

    from trustpot.bench.scales.pipeline import run_scales
    from trustpot.bench.scales.testbeds import OpenMMPlan, prepare_dft, prepare_openmm

    opts, data = req.options, req.data
    if opts.threads > 0:
        import torch

        torch.set_num_threads(opts.threads)
    testbed = None
    if isinstance(data, FileData):
        train, valid, test = list(data.train), list(data.valid), list(data.test)
    else:
        if isinstance(data, DFTTestbedOptions):
            if not Path(data.data_dir).is_dir():
                raise ConfigError(
                    f"DFT data folder {data.data_dir} not found; pass --data-dir "
                    "(the nacl_water folder of the shared data)"
                )
            max_train, max_valid, max_test = data.caps(opts.quick)
            bed = prepare_dft(
                data.data_dir,
                req.out,
                force_cap=data.force_cap,
                seed=opts.seed,
                max_train=max_train,
                max_valid=max_valid,
                max_test=max_test,
            )
        else:
            plan = OpenMMPlan.quick() if opts.quick else OpenMMPlan()
            if data.frames is not None:
                plan = replace(plan, frames=data.frames)
            bed = prepare_openmm(req.out, plan, seed=opts.seed)
        train, valid, test = bed.train, bed.valid, bed.test
        testbed = {"name": bed.name, **bed.info}
    run_scales(train, test, req.out, opts, valid_specs=valid, testbed=testbed)
    print(f"report: {Path(req.out) / 'report.md'}")
    return 0
