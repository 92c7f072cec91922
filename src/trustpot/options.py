"""Declaring an option once: a dataclass field with its help text, unit and flag spelling.

Library options classes (``uq fit`` methods, split rules, scale testbeds) declare their fields
with :func:`option`; the command line (:mod:`trustpot.cli.flags`) generates one flag per field
from that declaration, so the default, the help and the flag live in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with command-line metadata.

    Args:
        default: the default value (immutable: use tuples for sequences).
        help: what the option does, with its unit.
        meta: ``flag`` (spelling, default ``--field-name``), ``short`` (e.g. ``-o``),
            ``positional`` (bool), ``choices``, ``metavar``, ``required`` (bool), ``action``
            (``append`` for repeatable flags), ``nargs`` and ``const`` (``"?"`` with a const:
            the value of the bare flag).
    """
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag_of(field: dataclasses.Field[Any]) -> str:
    """The command-line spelling of a field (``--from`` for ``base``)."""
    if field.metadata.get("positional"):
        return field.name.upper()
    return str(field.metadata.get("flag", "--" + field.name.replace("_", "-")))
