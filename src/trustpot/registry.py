"""The one registry: backbones, model kinds and reliability methods, by stable names.

Three kinds of entry:

- ``"backbone"``: :class:`~trustpot.models.base.Backbone` subclasses (``model.name`` in a run
  config, ``meta.backbone`` in a checkpoint);
- ``"model"``: classes implementing :class:`~trustpot.models.contract.Model`, keyed by the
  ``kind`` a checkpoint stores (``potential``, ``scale-mixture``, ``finetuned``,
  ``uq:ensemble``...);
  :func:`trustpot.io.checkpoint.load_model` dispatches on it;
- ``"uq"``: reliability methods (the wrapper class of ``trustpot uq fit METHOD``);
- ``"pretrained"``: pretrained models by name (``sevennet-0``), each a
  :class:`~trustpot.models.pretrained.Pretrained` that describes and loads an adapter.

Names are case-normalised (lower case, ``_`` read as ``-``) both when registered and when
looked up, so ``PaiNN``, ``painn`` and ``PAINN`` are one name.

Built-in entries are named by ``module:attribute`` strings and imported on first use, the way
Python entry points are: the registry imports no model module at import time, so no module that
registers or looks up a name forms an import cycle with it. Third-party plug-ins declare entry
points in the group ``trustpot.plugins``; each entry point is a callable taking no argument that
calls :func:`register` (``[project.entry-points."trustpot.plugins"] mine = "pkg.mod:setup"``).
Plug-ins never hide built-ins: built-ins are always present, and a plug-in that registers an
existing name of the same kind is an error unless it passes ``replace=True``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any, Final, Literal, TypeVar

from trustpot.errors import ConfigError

T = TypeVar("T")
Kind = Literal["backbone", "model", "uq", "pretrained"]
KINDS: Final[tuple[str, ...]] = ("backbone", "model", "uq", "pretrained")
PLUGIN_GROUP: Final = "trustpot.plugins"

#: Built-in entries: kind -> name -> "module:attribute" (imported lazily) and aliases.
_BUILTIN: Final[dict[str, dict[str, str]]] = {
    "backbone": {
        "schnet": "trustpot.models.schnet:SchNet",
        "painn": "trustpot.models.painn:PaiNN",
        "egnn": "trustpot.models.egnn:EGNN",
        "ace": "trustpot.models.ace:Ace",
        "deepset-moe": "trustpot.models.deepset_moe:DeepSetMoE",
    },
    "model": {
        "potential": "trustpot.models.potential:Potential",
        "scale-mixture": "trustpot.models.mixture:ScaleMixturePotential",
        "finetuned": "trustpot.models.finetuned:FineTuned",
        "uq:ensemble": "trustpot.uq.ensemble:DeepEnsemble",
        "uq:mc-dropout": "trustpot.uq.ensemble:MCDropout",
        "uq:probe": "trustpot.uq.probe:Probe",
        "uq:perturb": "trustpot.uq.perturb:PerturbedPotential",
        "uq:llpr": "trustpot.uq.lastlayer:LLPR",
        "uq:shallow-ensemble": "trustpot.uq.shallow:ShallowEnsemble",
        "pretrained:chgnet": "trustpot.models.pretrained.chgnet:CHGNetAdapter",
        "pretrained:sevennet": "trustpot.models.pretrained.sevennet:SevenNetAdapter",
    },
    "pretrained": {
        "chgnet": "trustpot.models.pretrained.chgnet:CHGNET",
        "sevennet-0": "trustpot.models.pretrained.sevennet:SEVENNET_0",
        "trustpot-mol": "trustpot.models.pretrained.trustpot_mol:TRUSTPOT_MOL",
    },
}
#: a reliability method is the wrapper kind ``uq:<method>`` under its method name
_BUILTIN["uq"] = {k[3:]: v for k, v in _BUILTIN["model"].items() if k.startswith("uq:")}
_BUILTIN_ALIASES: Final[dict[str, dict[str, str]]] = {
    "backbone": {"egnn-e": "egnn", "en-gnn": "egnn", "deepsetmoe": "deepset-moe"},
    "model": {},
    "uq": {"mc_dropout": "mc-dropout", "dropout": "mc-dropout", "perturbation": "perturb"},
    "pretrained": {},
}

_registered: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
_plugins_loaded = False


def normalise(name: str) -> str:
    """The registry spelling of ``name``: stripped, lower case, ``_`` as ``-``."""
    return name.strip().lower().replace("_", "-")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown registry kind '{kind}'; kinds: {', '.join(KINDS)}")


def register(
    kind: str, name: str, aliases: tuple[str, ...] = (), replace: bool = False
) -> Callable[[T], T]:
    """Class decorator: make ``cls`` known as ``name`` (and its aliases) of ``kind``.

    Raises:
        ConfigError: unknown kind, or ``name`` already taken (built-in or registered) and
            ``replace`` is false.
    """
    _check_kind(kind)
    key = normalise(name)

    def wrap(cls: T) -> T:
        taken = key in _registered[kind] or key in _BUILTIN[kind]
        if taken and not replace and _registered[kind].get(key) is not cls:
            raise ConfigError(
                f"{kind} '{key}' is already registered; pass replace=True to override it"
            )
        _registered[kind][key] = cls
        for alias in aliases:
            _aliases[kind][normalise(alias)] = key
        return cls

    return wrap


def _load_plugins() -> None:
    """Call every ``trustpot.plugins`` entry point once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            setup = entry.load()
            setup()
        except Exception as err:  # a broken plug-in is named, never silently skipped
            raise ConfigError(
                f"trustpot plug-in '{entry.name}' ({entry.value}) failed to load: {err}"
            ) from err


def canonical_name(kind: str, name: str) -> str:
    """The registered name behind ``name`` (an alias or another spelling)."""
    _check_kind(kind)
    _load_plugins()
    key = normalise(name)
    return _aliases[kind].get(key) or _BUILTIN_ALIASES[kind].get(key) or key


def lookup(kind: str, name: str) -> Any:
    """The object registered as ``name`` (or an alias) of ``kind``.

    Raises:
        ConfigError: no such name; the message lists the known names.
    """
    key = canonical_name(kind, name)
    if key in _registered[kind]:
        return _registered[kind][key]
    if key in _BUILTIN[kind]:
        module, _, attribute = _BUILTIN[kind][key].partition(":")
        return getattr(importlib.import_module(module), attribute)
    raise ConfigError(f"unknown {kind} '{name}'; known: {', '.join(names(kind))}")


def names(kind: str) -> list[str]:
    """Every registered name of ``kind`` (built-ins and plug-ins), sorted."""
    _check_kind(kind)
    _load_plugins()
    return sorted(set(_BUILTIN[kind]) | set(_registered[kind]))
