"""Splits as data: a JSON manifest of frame indices, tied to its data file by SHA-256.

    trustpot data split data.xyz --rule random --sizes train=400 test=100 --seed 0 --out split.json
    trustpot train --train split.json:train ...
    trustpot eval best.ckpt split.json:test --out eval

A manifest whose data file no longer matches the recorded hash is refused: a split of a file
that changed is not the split that was reported.
"""

from __future__ import annotations

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
    seed: int,
    params: Mapping[str, Any],
    out: str | Path,
) -> dict[str, Any]:
    """Write the manifest JSON; the data path is stored relative to the manifest's folder."""
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


def read_data(
    spec: str, keys: KeyMap = DEFAULT_KEYS, require: Sequence[str] = ("energy", "forces")
) -> list[Structure]:
    """A data file or a manifest subset (``split.json:train``)."""
    if is_manifest_spec(spec):
        return read_manifest_subset(spec, keys, require)
    return read_structures(spec, keys, require)
