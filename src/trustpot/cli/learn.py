"""``trustpot learn``: active learning with a reference engine (:mod:`trustpot.learn`)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from trustpot.cli.flags import add_flags, from_args

DESCRIPTION = (
    "Active learning with a reference engine as the oracle. From a few labelled frames, each "
    "round trains the model and its --uq reliability wrapper (warm-started from the last "
    "round), explores by short Langevin MD at --temperature, scores every visited frame, "
    "selects --per-round frames by score with farthest-point sampling in embedding space, "
    "labels them with the --engine and repeats until --rounds, --target-mae or --budget. "
    "Writes OUT/data.xyz (every labelled frame, with its provenance), OUT/rounds/, "
    "OUT/report.json, OUT/report.md and OUT/learning_curve.png. A rerun resumes a killed run."
)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _resolve(args: argparse.Namespace) -> Any:
    from trustpot.learn.options import LearnOptions, quick_values

    opts = from_args(LearnOptions, args)
    if not opts.quick:
        return opts
    given = {
        name: getattr(args, name)
        for name in vars(args)
        if name in LearnOptions.__dataclass_fields__ and name != "quick"
    }
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return LearnOptions(**quick_values(given))


def _run(opts: Any) -> int:
    from trustpot.learn.loop import run_learn

    report = run_learn(opts, log=_log)
    for name, c in report["comparison"]["strategies"].items():
        print(
            f"{name}: {c['final_labels']} labels, test force MAE "
            f"{1000 * c['final_forces_mae']:.1f} meV/Å"
        )
    return 0


def add_learn_command(sub: argparse._SubParsersAction[Any]) -> None:
    from trustpot.learn.options import LearnOptions

    p = sub.add_parser(
        "learn",
        help="active learning: train, explore by MD, select uncertain frames, label, repeat",
        description=DESCRIPTION,
    )
    add_flags(p, LearnOptions)
    p.set_defaults(resolve=_resolve, run=_run, out_dir=lambda a: a.out)
