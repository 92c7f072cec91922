"""``trustpot bench compositional``: train on some molecular compositions, test on unseen ones."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    from trustpot.bench.compositional import BenchOptions

    opts = BenchOptions(
        tasks=list(args.task),
        models=list(args.models),
        mode="quick" if args.quick else "full",
        minutes=args.minutes,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        reference_energies=args.reference_energies,
    )
    return {"out": args.out, "options": opts}


def _compositional(req: dict[str, Any]) -> int:
    from trustpot.bench.compositional import run_compositional

    summary = run_compositional(req["out"], req["options"])
    print(f"report: {Path(req['out']) / 'report.md'} ({summary['wall_s'] / 60:.1f} min)")
    return 0


def add_bench_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``trustpot bench ...``."""
    from trustpot.bench.compositional import DEFAULT_MODELS, MODES
    from trustpot.engines.compositional import TASKS

    bench = sub.add_parser("bench", help="benchmarks (compositional out-of-domain)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser(
        "compositional",
        help="train models on fragment tasks and test them on unseen compositions",
        description="Build each task's GFN2-xTB data, train every model with the same "
        "wall-clock budget, evaluate in and out of domain, write OUT/compositional.json and "
        "OUT/report.md. Rerunning reuses built data, trained models and evaluations "
        "(needs the [xtb] extra).",
    )
    p.add_argument(
        "--task",
        nargs="+",
        default=["all"],
        metavar="TASK",
        help=f"{', '.join(TASKS)} or all (default all)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        metavar="MODEL",
        help="registry names, optionally with hyper-parameters: deepset-moe:aggregation=mean "
        f"(default {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--minutes",
        type=float,
        help=f"training budget per model (default {MODES['full'].minutes:g}; "
        f"quick {MODES['quick'].minutes:g})",
    )
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--quick", action="store_true", help="small molecules, few frames, tiny budgets")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--workers", type=int, default=1, help="xTB worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, splits and training (0)")
    p.add_argument(
        "--reference-energies",
        choices=("isolated", "fit"),
        default="isolated",
        help="per-element reference energies: isolated (the free atoms with GFN2-xTB, in "
        "their ground-state spin; default) or fit (least squares on the training energies)",
    )
    p.set_defaults(resolve=_resolve, run=_compositional, out_dir=lambda a: a.out)
