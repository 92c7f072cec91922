"""``trustpot pretrained list``: the pretrained models a name can stand for."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from trustpot.cli.flags import add_flags, from_args
from trustpot.options import option


@dataclasses.dataclass(frozen=True)
class ListOptions:
    """``trustpot pretrained list``."""

    json: bool = option(False, "print JSON instead of a table", action="store_true")


def _list(opts: ListOptions) -> int:
    from trustpot.models.pretrained import PretrainedInfo
    from trustpot.registry import lookup, names

    infos: list[PretrainedInfo] = [
        lookup("pretrained", name).info() for name in names("pretrained")
    ]
    if opts.json:
        print(json.dumps([info.to_dict() for info in infos], indent=1))
        return 0
    header = ["name", "package", "version", "parameters", "elements", "cutoff Å", "reference"]
    rows = [
        [
            i.name,
            i.package,
            i.package_version,
            f"{i.n_parameters:,}" if i.n_parameters else "-",
            str(len(i.elements)),
            f"{i.cutoff:g}",
            i.reference,
        ]
        for i in infos
    ]
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    for i in infos:
        note = "" if i.n_parameters else f'; install with pip install "trustpot[{i.extra}]"'
        print(f"{i.name}: licence {i.licence}{note}")
    return 0


def add_pretrained_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``trustpot pretrained list``."""
    p = sub.add_parser("pretrained", help="pretrained foundation models usable by name")
    p_sub = p.add_subparsers(dest="pretrained_command", required=True)
    lst = p_sub.add_parser(
        "list",
        help="list the pretrained models (name, package, version, parameters, elements, cutoff, "
        "reference method, licence)",
        description="A listed name works wherever a checkpoint path does "
        "(trustpot eval sevennet-0 DATA --out DIR).",
    )
    add_flags(lst, ListOptions)
    lst.set_defaults(resolve=lambda a: from_args(ListOptions, a), run=_list)
