"""Command-line flags generated from options dataclasses, one flag per field.

A field declared with :func:`option` carries its help text (with the unit) and, optionally, its
flag spelling; :func:`add_flags` adds one argparse argument per field and :func:`from_args`
builds the dataclass back from the parsed namespace. Flags default to ``argparse.SUPPRESS`` so
the namespace holds only what the user typed and the dataclass keeps the only copy of each
default (shown in ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

from trustpot.options import flag_of, option

T = TypeVar("T")

__all__ = ["add_flags", "flag_of", "from_args", "option"]


def _scalar(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_sequence, is_optional) of an annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def add_flags(parser: argparse.ArgumentParser, cls: type, exclude: Iterable[str] = ()) -> list[str]:
    """Add one argument per field of ``cls`` (except ``exclude``); returns the flags added."""
    hints = typing.get_type_hints(cls)
    added = []
    for field in dataclasses.fields(cls):
        if field.name in exclude or "help" not in field.metadata:
            continue
        meta = field.metadata
        elem, seq, _ = _scalar(hints[field.name])
        kwargs: dict[str, Any] = {"help": meta["help"]}
        default = field.default
        if elem is bool and not seq:
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            kwargs["type"] = elem
            if seq:
                kwargs["nargs"] = meta.get("nargs", "+")
            for key in ("choices", "metavar", "action", "const"):
                if key in meta:
                    kwargs[key] = meta[key]
            if not seq and "nargs" in meta:  # e.g. "?" with a const: a bare flag means const
                kwargs["nargs"] = meta["nargs"]
            if default not in (None, (), "", False) and "default" not in kwargs["help"]:
                kwargs["help"] += f" (default {default})"
        if meta.get("action") == "append":
            kwargs.pop("nargs", None)
        flag = flag_of(field)
        if meta.get("positional"):
            parser.add_argument(field.name, **kwargs)
        else:
            names = [meta["short"], flag] if "short" in meta else [flag]
            kwargs["dest"] = field.name
            kwargs["default"] = argparse.SUPPRESS
            if meta.get("required"):
                kwargs["required"] = True
            parser.add_argument(*names, **kwargs)
        added.append(flag)
    return added


def from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The options that ``args`` describe: every field the user gave, defaults for the rest;
    sequences become tuples."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    values.update(extra)
    return cls(**values)
