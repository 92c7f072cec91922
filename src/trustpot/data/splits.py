"""Splits as data: a JSON manifest of frame indices, tied to its data file by SHA-256.

    trustpot data split data.xyz --rule random --sizes train=400 test=100 --seed 0 --out split.json
    trustpot train --train split.json:train ...
    trustpot eval best.ckpt split.json:test --out eval

A manifest whose data file no longer matches the recorded hash is refused: a split of a file
that changed is not the split that was reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols
from ase.formula import Formula

from trustpot.data.reader import DEFAULT_KEYS, KeyMap, file_sha256, read_structures
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError, DataError
from trustpot.options import option

SPLIT_FORMAT = "trustpot-split"
SPLIT_VERSION = 1
RULES = ("random", "info-key", "composition", "temperature")


def _random(n: int, sizes: Mapping[str, float], seed: int) -> dict[str, list[int]]:
    order = np.random.default_rng(seed).permutation(n)
    counts = {k: round(v * n) if v < 1 else int(v) for k, v in sizes.items()}
    if sum(counts.values()) > n:
        raise ConfigError(
            f"split sizes {counts} need {sum(counts.values())} frames; the file has {n}"
        )
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = sorted(order[start : start + count].tolist())
        start += count
    return out


def _by_value(
    values: Sequence[str], assign: Mapping[str, Sequence[str]], rest: str | None
) -> dict[str, list[int]]:
    lookup = {v: name for name, vs in assign.items() for v in vs}
    out: dict[str, list[int]] = {name: [] for name in assign}
    if rest:
        out.setdefault(rest, [])
    for k, value in enumerate(values):
        name = lookup.get(value, rest)
        if name is not None:
            out[name].append(k)
    return out


def _formula(numbers: np.ndarray) -> str:
    """Reduced Hill formula of a structure (``C2H6O``)."""
    return Formula.from_list([chemical_symbols[int(z)] for z in numbers]).reduce()[0].format("hill")


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} '{item}' must look like NAME=VALUE")
        out[name] = value
    return out


@dataclasses.dataclass(frozen=True)
class RandomSplit:
    """Rule ``random``: a seeded permutation cut into subsets of the given sizes."""

    sizes: tuple[str, ...] = option(
        (), "subset sizes, counts or fractions < 1, e.g. train=400 test=100", metavar="SUBSET=N"
    )
    seed: int = option(0, "seed of the permutation")

    def size_map(self) -> dict[str, float]:
        """``{"train": 400.0, ...}`` from ``--sizes``."""
        out = {}
        for name, value in _pairs(self.sizes, "--sizes").items():
            try:
                out[name] = float(value)
            except ValueError:
                raise ConfigError(f"--sizes {name}={value}: not a number") from None
            if out[name] < 0:
                raise ConfigError(f"--sizes {name}={value}: must be >= 0")
        return out

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag at fault."""
        if not self.size_map():
            raise ConfigError("rule 'random' needs --sizes, e.g. --sizes train=0.8 test=0.2")

    def params(self) -> dict[str, Any]:
        return {"sizes": self.size_map(), "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class _Assigned:
    assign: tuple[str, ...] = option(
        (), "values going to each subset, e.g. test=A,B", metavar="SUBSET=V1,V2"
    )
    rest: str = option("train", "subset of frames no --assign names ('none' drops them)")

    def assign_map(self) -> dict[str, list[str]]:
        return {k: v.split(",") for k, v in _pairs(self.assign, "--assign").items()}

    def validate(self) -> None:
        if not self.assign_map():
            raise ConfigError(f"this rule needs --assign SUBSET=VALUE[,VALUE...] ({self.assign})")


@dataclasses.dataclass(frozen=True)
class InfoKeySplit(_Assigned):
    """Rule ``info-key``: frames whose ``atoms.info[key]`` is in a subset's values go there."""

    key: str = option(
        "config_type",
        "atoms.info key deciding the subset (default: config_type for info-key, temperature for "
        "temperature)",
    )

    def params(self) -> dict[str, Any]:
        return {"key": self.key, "assign": self.assign_map(), "rest": self.rest}


@dataclasses.dataclass(frozen=True)
class CompositionSplit(_Assigned):
    """Rule ``composition``: by reduced Hill formula (``--assign test=CH4O``)."""

    def params(self) -> dict[str, Any]:
        return {"assign": self.assign_map(), "rest": self.rest}


@dataclasses.dataclass(frozen=True)
class TemperatureSplit:
    """Rule ``temperature``: ``info[key]`` <= ``threshold`` goes to ``train``, above to
    ``test``."""

    key: str = option("temperature", "atoms.info key holding the temperature, K")
    threshold: float | None = option(None, "train <= T < test, K")

    def validate(self) -> None:
        if self.threshold is None:
            raise ConfigError("rule 'temperature' needs --threshold (K)")

    def params(self) -> dict[str, Any]:
        return {"key": self.key, "threshold": self.threshold}


SplitOptions = RandomSplit | InfoKeySplit | CompositionSplit | TemperatureSplit

#: rule -> its options class
RULE_OPTIONS: dict[str, type[Any]] = {
    "random": RandomSplit,
    "info-key": InfoKeySplit,
    "composition": CompositionSplit,
    "temperature": TemperatureSplit,
}


def split_by_rule(
    structures: Sequence[Structure], rule: str, options: SplitOptions
) -> dict[str, list[int]]:
    """Indices of each subset under ``rule`` with its ``options`` (validated here)."""
    if rule not in RULE_OPTIONS:
        raise ConfigError(f"unknown split rule '{rule}'; known: {', '.join(RULES)}")
    if type(options) is not RULE_OPTIONS[rule]:
        raise ConfigError(f"rule '{rule}' takes {RULE_OPTIONS[rule].__name__} options")
    options.validate()
    if isinstance(options, RandomSplit):
        return make_split(structures, rule, options.seed, sizes=options.size_map())
    if isinstance(options, TemperatureSplit):
        return make_split(structures, rule, key=options.key, threshold=options.threshold)
    rest = None if options.rest == "none" else options.rest
    key = options.key if isinstance(options, InfoKeySplit) else "config_type"
    return make_split(structures, rule, key=key, assign=options.assign_map(), rest=rest)


def make_split(
    structures: Sequence[Structure],
    rule: str,
    seed: int = 0,
    sizes: Mapping[str, float] | None = None,
    key: str = "config_type",
    assign: Mapping[str, Sequence[str]] | None = None,
    rest: str | None = "train",
    threshold: float | None = None,
) -> dict[str, list[int]]:
    """Indices of each subset.

    Args:
        rule: ``random`` (``sizes``: counts, or fractions < 1), ``info-key`` (frames whose
            ``info[key]`` is in ``assign[subset]``), ``composition`` (by reduced formula, e.g.
            ``assign={"test": ["CH4O"]}``), ``temperature`` (``info[key]`` <= ``threshold`` goes
            to ``train``, above it to ``test``).
        rest: subset that receives frames no assignment names (None drops them).
    """
    n = len(structures)
    if rule == "random":
        if not sizes:
            raise ConfigError("rule 'random' needs sizes, e.g. --sizes train=0.8 test=0.2")
        return _random(n, sizes, seed)
    if rule in ("info-key", "composition"):
        if not assign:
            raise ConfigError(f"rule '{rule}' needs --assign SUBSET=VALUE[,VALUE...]")
        if rule == "composition":
            values = [_formula(s.numbers) for s in structures]
            assign = {
                k: [Formula(v).reduce()[0].format("hill") for v in vs] for k, vs in assign.items()
            }
        else:
            missing = [k for k, s in enumerate(structures) if key not in s.info]
            if missing:
                raise DataError("split", f"info key '{key}' missing", missing[0], key)
            values = [str(s.info[key]) for s in structures]
        return _by_value(values, assign, rest)
    if rule == "temperature":
        if threshold is None:
            raise ConfigError("rule 'temperature' needs --threshold (K)")
        out: dict[str, list[int]] = {"train": [], "test": []}
        for k, s in enumerate(structures):
            if key not in s.info:
                raise DataError("split", f"info key '{key}' missing", k, key)
            out["train" if float(s.info[key]) <= threshold else "test"].append(k)
        return out
    raise ConfigError(f"unknown split rule '{rule}'; known: {', '.join(RULES)}")


def write_manifest(
    data: str | Path,
    subsets: Mapping[str, list[int]],
    rule: str,
    seed: int | None,
    params: Mapping[str, Any],
    out: str | Path,
) -> dict[str, Any]:
    """Write the manifest JSON; the data path is stored relative to the manifest's folder.

    ``params`` are the options the rule used (and only those); ``seed`` is None for a rule
    that draws nothing at random.
    """
    out = Path(out)
    data = Path(data)
    manifest = {
        "format": SPLIT_FORMAT,
        "version": SPLIT_VERSION,
        "data": os.path.relpath(data.resolve(), out.resolve().parent),
        "sha256": file_sha256(data),
        "rule": rule,
        "seed": seed,
        "params": dict(params),
        "sizes": {k: len(v) for k, v in subsets.items()},
        "subsets": {k: list(map(int, v)) for k, v in subsets.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=1))
    return manifest


def is_manifest_spec(spec: str) -> bool:
    """``path.json`` or ``path.json:subset``."""
    return spec.endswith(".json") or (":" in spec and spec.rsplit(":", 1)[0].endswith(".json"))


def read_manifest_subset(
    spec: str, keys: KeyMap = DEFAULT_KEYS, require: Sequence[str] = ("energy", "forces")
) -> list[Structure]:
    """Structures of ``manifest.json:subset`` after checking the data file's SHA-256."""
    path_text, _, subset = spec.rpartition(":") if not spec.endswith(".json") else (spec, "", "")
    path = Path(path_text)
    if not path.is_file():
        raise DataError(str(path), "no such split manifest")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(str(path), f"not valid JSON: {err}") from None
    if manifest.get("format") != SPLIT_FORMAT:
        raise DataError(str(path), f"not a trustpot split manifest (no '{SPLIT_FORMAT}' tag)")
    subsets = manifest.get("subsets", {})
    if not subset:
        raise ConfigError(f"{path}: name a subset, e.g. {path}:{next(iter(subsets), 'train')}")
    if subset not in subsets:
        raise ConfigError(f"{path}: no subset '{subset}'; has {sorted(subsets)}")
    data = (path.parent / manifest["data"]).resolve()
    if not data.is_file():
        raise DataError(str(path), f"its data file {data} is missing", field="data")
    digest = file_sha256(data)
    if digest != manifest.get("sha256"):
        raise DataError(
            str(path),
            f"data file {data.name} changed since the split was made "
            f"(SHA-256 {digest[:12]}... != {str(manifest.get('sha256'))[:12]}...)",
            field="sha256",
        )
    structures = read_structures(data, keys, require=())
    indices = subsets[subset]
    bad = [i for i in indices if not 0 <= int(i) < len(structures)]
    if bad:
        raise DataError(
            str(path), f"index {bad[0]} out of range for {len(structures)} frames", field=subset
        )
    # labels are required of the subset's frames only (a test subset may be energy-only)
    for i in indices:
        for name in require:
            if getattr(structures[int(i)], name) is None:
                raise DataError(str(data), "label missing", int(i), name)
    return [structures[int(i)] for i in indices]


def data_parts(spec: str) -> list[str]:
    """The parts of a data spec: ``"a.xyz,split.json:train"`` -> ``["a.xyz", "split.json:train"]``.

    A spec naming one existing path is never split (a file name may contain a comma).

    Raises:
        ConfigError: on an empty part (``"a.xyz,,b.xyz"``).
    """
    if "," not in spec or Path(spec).exists():
        return [spec]
    parts = [part.strip() for part in spec.split(",")]
    if not all(parts):
        raise ConfigError(f"data spec '{spec}' has an empty entry between commas")
    return parts


def data_sha256(spec: str) -> list[str | None]:
    """SHA-256 of each data file of ``spec`` (None for a manifest part: it records its own)."""
    return [None if is_manifest_spec(p) else file_sha256(p) for p in data_parts(spec)]


def read_data(
    spec: str, keys: KeyMap = DEFAULT_KEYS, require: Sequence[str] = ("energy", "forces")
) -> list[Structure]:
    """A data file, a manifest subset (``split.json:train``), or several of either joined by
    commas (``a.xyz,b.xyz.gz,split.json:train``: their frames in that order)."""
    parts = data_parts(spec)
    if len(parts) > 1:
        return [s for part in parts for s in read_data(part, keys, require)]
    if is_manifest_spec(spec):
        return read_manifest_subset(spec, keys, require)
    return read_structures(spec, keys, require)
