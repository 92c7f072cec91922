"""``trustpot data ...``: dataset tooling (splits)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustpot.cli.flags import add_flags, from_args, option
from trustpot.errors import ConfigError

if TYPE_CHECKING:
    from trustpot.data.splits import SplitOptions


@dataclasses.dataclass(frozen=True)
class SplitRequest:
    """``trustpot data split``: the data file, the rule, its options, the manifest path."""

    file: str
    rule: str
    options: SplitOptions
    out: Path


def add_mode_flags(
    parser: argparse.ArgumentParser, modes: Mapping[str, type], labels: Mapping[str, str]
) -> dict[str, set[str]]:
    """Add the flags of every mode's options class once, each help naming the modes that use
    it; returns field name -> modes."""
    users: dict[str, set[str]] = {}
    for mode, cls in modes.items():
        for field in dataclasses.fields(cls):
            users.setdefault(field.name, set()).add(mode)
    done: set[str] = set()
    for cls in modes.values():
        names = [f.name for f in dataclasses.fields(cls) if f.name not in done]
        sub = argparse.ArgumentParser(add_help=False)
        add_flags(sub, cls, exclude=[f.name for f in dataclasses.fields(cls) if f.name in done])
        for action in sub._actions:
            who = sorted(users[action.dest])
            action.help = f"{action.help} [{'; '.join(labels[m] for m in who)}]"
            parser._add_action(action)
        done.update(names)
    return users


def reject_foreign(
    args: argparse.Namespace,
    parser_fields: Mapping[str, set[str]],
    mode: str,
    labels: Mapping[str, str],
) -> None:
    """Raise :class:`ConfigError` naming every flag given that ``mode`` does not use
    (``labels``: how each mode is selected on the command line)."""
    foreign = []
    for name, modes in parser_fields.items():
        if hasattr(args, name) and mode not in modes:
            users = " or ".join(labels[m] for m in sorted(modes))
            foreign.append(f"{'--' + name.replace('_', '-')} (only of {users})")
    if foreign:
        raise ConfigError(f"not options of {labels[mode]}: {', '.join(foreign)}")


#: field -> split rules that use it (filled when the parser is built)
SPLIT_FIELDS: dict[str, set[str]] = {}
SPLIT_LABELS = {r: f"--rule {r}" for r in ("random", "info-key", "composition", "temperature")}


def _resolve_split(args: argparse.Namespace) -> SplitRequest:
    from trustpot.data.splits import RULE_OPTIONS

    reject_foreign(args, SPLIT_FIELDS, args.rule, SPLIT_LABELS)
    options = from_args(RULE_OPTIONS[args.rule], args)
    options.validate()
    return SplitRequest(args.file, args.rule, options, args.out)


def _split(req: SplitRequest) -> int:
    from trustpot.data.reader import read_structures
    from trustpot.data.splits import RandomSplit, split_by_rule, write_manifest

    structures = read_structures(req.file, require=())
    subsets = split_by_rule(structures, req.rule, req.options)
    seed = req.options.seed if isinstance(req.options, RandomSplit) else None
    params = req.options.params()
    params.pop("seed", None)
    manifest = write_manifest(req.file, subsets, req.rule, seed, params, req.out)
    print(f"{req.out}: " + ", ".join(f"{k} {v}" for k, v in manifest["sizes"].items()))
    return 0


@dataclasses.dataclass(frozen=True)
class StatsOptions:
    """``trustpot data stats``."""

    file: str = option("", "data file (any ASE format)", positional=True)
    out: str = option("stats", "folder for stats.json and stats.png")
    k: float = option(8.0, "outlier threshold in robust z units")


def _resolve_stats(args: argparse.Namespace) -> StatsOptions:
    opts = from_args(StatsOptions, args)
    if not opts.k > 0:
        raise ConfigError(f"--k must be > 0, got {opts.k}")
    return opts


def _stats(args: StatsOptions) -> int:
    from trustpot.data.inspect import stats_report
    from trustpot.data.reader import read_structures

    structures = read_structures(args.file, require=())
    stats = stats_report(structures, args.file, args.out, args.k)
    print(f"{args.file}: {stats['n_frames']} frames; elements {stats['elements']}")
    for key in ("energy_per_atom", "max_force", "shortest_distance"):
        if stats.get(key):
            s = stats[key]
            print(f"  {key}: min {s['min']:.4g}  median {s['median']:.4g}  max {s['max']:.4g}")
    print(f"  outliers ({len(stats['outliers'])}, robust z > {args.k}):")
    for o in stats["outliers"][:20]:
        print(f"    frame {o['frame']}: {o['reason']} {o['value']:.4g} (z {o['z']:.1f})")
    print(f"  written: {Path(args.out) / 'stats.json'}, {Path(args.out) / 'stats.png'}")
    return 0


def add_data_commands(sub: argparse._SubParsersAction[Any]) -> None:
    data = sub.add_parser("data", help="dataset tooling (split, stats)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    st = data_sub.add_parser("stats", help="elements, distributions, shortest distances, outliers")
    add_flags(st, StatsOptions)
    st.set_defaults(resolve=_resolve_stats, run=_stats, out_dir=lambda a: getattr(a, "out", "."))
    from trustpot.data.splits import RULE_OPTIONS

    p = data_sub.add_parser(
        "split",
        help="write a split manifest (indices + data SHA-256)",
        description="Each rule takes only its own flags (named in brackets); the manifest's "
        "params record exactly those.",
    )
    p.add_argument("file")
    p.add_argument("--rule", required=True, choices=list(RULE_OPTIONS))
    SPLIT_FIELDS.update(add_mode_flags(p, RULE_OPTIONS, SPLIT_LABELS))
    p.add_argument("--out", required=True, type=Path, help="manifest JSON")
    p.set_defaults(resolve=_resolve_split, run=_split, out_dir=lambda a: str(Path(a.out).parent))
    from trustpot.cli.engines import add_engine_commands

    add_engine_commands(data_sub)
