"""Explicit registry of backbones, with aliases, so checkpoints name models by a stable string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from trustpot.errors import ConfigError

T = TypeVar("T")

_REGISTRY: dict[str, dict[str, Any]] = {"backbone": {}}
_ALIASES: dict[str, dict[str, str]] = {"backbone": {}}


def register(kind: str, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
    """Class decorator: make ``cls`` buildable as ``name`` (and its aliases) of ``kind``."""

    def wrap(cls: T) -> T:
        _REGISTRY.setdefault(kind, {})[name] = cls
        for alias in aliases:
            _ALIASES.setdefault(kind, {})[alias] = name
        return cls

    return wrap


def lookup(kind: str, name: str) -> Any:
    """The class registered as ``name`` (or an alias) of ``kind``."""
    _ensure_builtin()
    table = _REGISTRY.get(kind, {})
    canonical = _ALIASES.get(kind, {}).get(name.lower(), name.lower())
    if canonical not in table:
        raise ConfigError(f"unknown {kind} '{name}'; known: {', '.join(sorted(table))}")
    return table[canonical]


def canonical_name(kind: str, name: str) -> str:
    """Registered name behind ``name``."""
    _ensure_builtin()
    return _ALIASES.get(kind, {}).get(name.lower(), name.lower())


def names(kind: str) -> list[str]:
    """Registered names of ``kind``."""
    _ensure_builtin()
    return sorted(_REGISTRY.get(kind, {}))


def _ensure_builtin() -> None:
    if _REGISTRY["backbone"]:
        return
    from trustpot.models.deepset_moe import DeepSetMoE
    from trustpot.models.egnn import EGNN
    from trustpot.models.painn import PaiNN
    from trustpot.models.schnet import SchNet

    register("backbone", "schnet")(SchNet)
    register("backbone", "painn")(PaiNN)
    register("backbone", "egnn", aliases=("egnn-e", "en-gnn"))(EGNN)
    register("backbone", "deepset-moe", aliases=("deepset_moe", "deepsetmoe"))(DeepSetMoE)
