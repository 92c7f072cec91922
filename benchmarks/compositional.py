"""Compositional out-of-domain benchmark (GMD-26 protocol): the README table.

Four tasks (fragment duplication, combination, size extrapolation, fragment hold-out), each
with GFN2-xTB MD data built here; every model trained with the same wall-clock budget, data and
seed on one CPU thread; in-domain and out-of-domain errors, OOD/ID ratios, energy offsets, kNN
embedding distances and DeepSet-MoE routing diagnostics. Two variants beside the four models
isolate design choices: DeepSet-MoE with mean instead of sum aggregation, and SchNet with one
interaction layer (a 5 Å receptive field instead of 15 Å). Rerunning reuses built data, trained
models and evaluations. Same as ``trustpot bench compositional`` with these settings.

    python benchmarks/compositional.py --quick --out /tmp/compositional-quick   # minutes
    python benchmarks/compositional.py --out benchmarks/results/compositional    # ~55 min, 1 core
"""

from __future__ import annotations

import argparse

from trustpot.bench.compositional import BenchOptions, run_compositional

MODELS = (
    "schnet",
    "painn",
    "egnn",
    "deepset-moe",
    "deepset-moe:aggregation=mean",
    "schnet:n_layers=1",
)
MINUTES = 2.0  # per model and task (quick: the mode's default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="+", default=["all"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--seed", type=int, default=0, help="seed of data, splits and training")
    parser.add_argument(
        "--reference-energies",
        choices=("isolated", "fit"),
        default="isolated",
        help="E0 per element: the free atoms' GFN2-xTB energies, or least squares on training",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    minutes = args.minutes if args.minutes is not None else (None if args.quick else MINUTES)
    opts = BenchOptions(
        tasks=args.tasks,
        models=args.models,
        mode="quick" if args.quick else "full",
        minutes=minutes,
        seed=args.seed,
        reference_energies=args.reference_energies,
        threads=args.threads,
        workers=args.workers,
    )
    run_compositional(args.out, opts)


if __name__ == "__main__":
    main()
