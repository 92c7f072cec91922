"""``trustpot data ...``: dataset tooling (splits)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trustpot.errors import ConfigError


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} '{item}' must look like NAME=VALUE")
        name, value = item.split("=", 1)
        out[name] = value
    return out


def _split(args: argparse.Namespace) -> int:
    from trustpot.data.reader import read_structures
    from trustpot.data.splits import make_split, write_manifest

    structures = read_structures(args.file, require=())
    sizes = {k: float(v) for k, v in _pairs(args.sizes, "--sizes").items()}
    assign = {k: v.split(",") for k, v in _pairs(args.assign, "--assign").items()}
    subsets = make_split(
        structures,
        args.rule,
        args.seed,
        sizes=sizes,
        key=args.key,
        assign=assign,
        rest=None if args.rest == "none" else args.rest,
        threshold=args.threshold,
    )
    params = {
        "sizes": sizes,
        "key": args.key,
        "assign": assign,
        "rest": args.rest,
        "threshold": args.threshold,
    }
    manifest = write_manifest(args.file, subsets, args.rule, args.seed, params, args.out)
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in manifest["sizes"].items()))
    return 0


def _stats(args: argparse.Namespace) -> int:
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


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tooling (split, stats)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    st = data_sub.add_parser("stats", help="elements, distributions, shortest distances, outliers")
    st.add_argument("file")
    st.add_argument("--out", default="stats", help="folder for stats.json and stats.png")
    st.add_argument("--k", type=float, default=8.0, help="outlier threshold in robust z units")
    st.set_defaults(func=_stats, out_dir=lambda a: a.out)
    p = data_sub.add_parser("split", help="write a split manifest (indices + data SHA-256)")
    p.add_argument("file")
    p.add_argument(
        "--rule", required=True, choices=["random", "info-key", "composition", "temperature"]
    )
    p.add_argument(
        "--sizes",
        nargs="*",
        default=[],
        metavar="SUBSET=N",
        help="random: counts or fractions, e.g. train=400 test=100",
    )
    p.add_argument(
        "--assign",
        nargs="*",
        default=[],
        metavar="SUBSET=V1,V2",
        help="info-key / composition: values going to each subset",
    )
    p.add_argument("--key", default="config_type", help="atoms.info key (info-key, temperature)")
    p.add_argument("--rest", default="train", help="subset for unassigned frames ('none' drops)")
    p.add_argument("--threshold", type=float, help="temperature rule: train <= T < test (K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="manifest JSON")
    p.set_defaults(func=_split, out_dir=lambda a: str(Path(a.out).parent))
    from trustpot.cli.engines import add_engine_commands

    add_engine_commands(data_sub)
