"""Read labelled structures from any file ASE can read, with checks and a parse cache.

Labels are looked up first in the frame's calculator results (what ``ase.io.read`` gives for
extended XYZ), then in ``atoms.info`` (energy, stress) and ``atoms.arrays`` (forces) under the
names of a :class:`KeyMap`. Units are converted to eV and Å on the way in.

Everything else numeric is kept, as the file stores it (no unit conversion), for property
targets: per-structure values in :attr:`Structure.info`, per-atom arrays in
:attr:`Structure.arrays`. The extended XYZ reader moves some of them (``dipole``, ``charges``,
``magmoms``...) into calculator results; they are put back there by name (ASE's per-atom
names to ``arrays``, the others to ``info``).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import iread
from ase.io.formats import filetype

from trustpot.data.structures import Structure, check_structure
from trustpot.errors import DataError
from trustpot.units import energy_factor, length_factor

#: Bump when the parsed-cache layout changes.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class KeyMap:
    """Where labels live in a file and in which units.

    Attributes:
        energy: name of the total energy (calculator result or ``atoms.info`` key).
        forces: name of the forces (calculator result or ``atoms.arrays`` key).
        stress: name of the stress (calculator result or ``atoms.info`` key), 3x3 or Voigt 6.
        energy_unit: unit of energies in the file (``eV``, ``Hartree``, ``kcal/mol``...).
        length_unit: unit of lengths in the file (``Å``, ``Bohr``, ``nm``).
    """

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"
    energy_unit: str = "eV"
    length_unit: str = "Å"


#: Labels under their usual names, in eV and Å.
DEFAULT_KEYS = KeyMap()


def _json_safe(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _stress_3x3(value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape == (6,):
        xx, yy, zz, yz, xz, xy = arr
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    return arr.reshape(3, 3) if arr.size == 9 else arr


#: calculator results and arrays that are energy, force or stress labels, never properties
LABEL_NAMES = frozenset({"energy", "free_energy", "energies", "forces", "stress", "stresses"})
#: ASE's per-atom calculator results (the extended XYZ reader's ``per_atom_properties``)
PER_ATOM_RESULTS = frozenset({"charges", "magmoms", "born_effective_charges"})


def _properties(
    atoms: Atoms, results: dict[str, Any], keys: KeyMap
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Numeric per-structure results (JSON-safe) and per-atom arrays (float64 [n_atoms, ...])
    of a frame that are not labels, positions or atomic numbers."""
    skip = LABEL_NAMES | {keys.energy, keys.forces, keys.stress, "numbers", "positions"}
    arrays: dict[str, np.ndarray] = {}
    for name, value in atoms.arrays.items():
        arr = np.asarray(value)
        if name not in skip and arr.dtype.kind in "fiu":
            arrays[name] = arr.astype(np.float64)
    extra: dict[str, Any] = {}
    for name, value in results.items():
        arr = np.asarray(value)
        if name in skip or arr.dtype.kind not in "fiu":
            continue
        if name in PER_ATOM_RESULTS and arr.shape[:1] == (len(atoms),):
            arrays.setdefault(name, arr.astype(np.float64))
        else:
            extra[name] = _json_safe(value)
    return extra, arrays


def atoms_to_structure(atoms: Atoms, keys: KeyMap = KeyMap()) -> Structure:
    """Convert an ASE ``Atoms`` into a :class:`Structure` (no checks)."""
    e_f = energy_factor(keys.energy_unit)
    l_f = length_factor(keys.length_unit)
    results: dict[str, Any] = dict(atoms.calc.results) if atoms.calc is not None else {}
    energy = results.get(keys.energy, atoms.info.get(keys.energy))
    forces = results.get(keys.forces, atoms.arrays.get(keys.forces))
    stress = results.get(keys.stress, atoms.info.get(keys.stress))
    info = {k: _json_safe(v) for k, v in atoms.info.items() if k not in (keys.energy, keys.stress)}
    extra, arrays = _properties(atoms, results, keys)
    for name, value in extra.items():
        info.setdefault(name, value)
    return Structure(
        numbers=np.asarray(atoms.numbers, dtype=np.int64).copy(),
        positions=np.asarray(atoms.positions, dtype=np.float64) * l_f,
        cell=np.asarray(atoms.cell.array, dtype=np.float64) * l_f,
        pbc=np.asarray(atoms.pbc, dtype=bool).copy(),
        energy=None if energy is None else float(np.asarray(energy).reshape(())) * e_f,
        forces=None if forces is None else np.asarray(forces, dtype=np.float64) * (e_f / l_f),
        stress=None if stress is None else _stress_3x3(stress) * (e_f / l_f**3),
        info=info,
        arrays=arrays,
    )


#: compressed files ASE reads, by suffix, and how to open them as text
_DECOMPRESS: dict[str, Any] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _source(path: Path) -> tuple[Any, str | None]:
    """What ``ase.io`` parses ``path`` from, and the format to tell it.

    A compressed file is decompressed into memory first: ASE's extended XYZ reader indexes the
    frames, then seeks back to each, and every backward seek in a gzip stream decompresses
    from the start (a 1600-frame zeolite file took 36 s to read whole, 0.2 s from memory).
    """
    opener = _DECOMPRESS.get(path.suffix)
    if opener is None:
        return str(path), None
    with opener(path, "rt") as handle:
        text = handle.read()
    return io.StringIO(text), filetype(str(path), read=False)


def read_atoms(path: str | Path, index: str | int = ":") -> list[Atoms]:
    """``ase.io.read(path, index)`` as a list, fast on compressed files (see :func:`_source`).

    Args:
        path: any file ``ase.io.read`` understands (``.gz``, ``.bz2``, ``.xz`` too).
        index: ASE frame selection (``":"``, ``"::10"``, ``3``).
    """
    source, fmt = _source(Path(path))
    return list(iread(source, index=index, format=fmt))


def _iterate_frames(path: Path, index: str | int) -> Iterator[tuple[int, Atoms]]:
    frame = -1
    try:
        source, fmt = _source(path)
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as err:  # a damaged archive
        raise DataError(str(path), f"cannot decompress: {type(err).__name__}: {err}") from err
    iterator = iread(source, index=index, format=fmt)
    while True:
        try:
            atoms = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # ASE raises many types for malformed input
            raise DataError(
                str(path), f"cannot parse frame: {type(err).__name__}: {err}", frame + 1
            ) from err
        frame += 1
        yield frame, atoms


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Folder of parsed-file caches: ``$TRUSTPOT_CACHE`` or ``~/.cache/trustpot``."""
    root = os.environ.get("TRUSTPOT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "trustpot"
    )
    return Path(root)


def _cache_path(path: Path, keys: KeyMap, index: str | int) -> Path:
    tag = json.dumps([CACHE_FORMAT, file_sha256(path), keys.__dict__, str(index)], sort_keys=True)
    return cache_dir() / f"{hashlib.sha256(tag.encode()).hexdigest()[:24]}.npz"


def _save_cache(target: Path, structures: Sequence[Structure]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    n = np.array([s.n_atoms for s in structures])
    nan33 = np.full((3, 3), np.nan)
    arrays = {
        "n_atoms": n,
        "numbers": np.concatenate([s.numbers for s in structures]),
        "positions": np.concatenate([s.positions for s in structures]),
        "cell": np.stack([s.cell for s in structures]),
        "pbc": np.stack([s.pbc for s in structures]),
        "energy": np.array([np.nan if s.energy is None else s.energy for s in structures]),
        "has_forces": np.array([s.forces is not None for s in structures]),
        "forces": np.concatenate(
            [s.forces if s.forces is not None else np.zeros((s.n_atoms, 3)) for s in structures]
        ),
        "stress": np.stack([s.stress if s.stress is not None else nan33 for s in structures]),
        "info": np.array(json.dumps([s.info for s in structures])),
    }
    # per-atom property arrays: one flat buffer per name, the shapes per frame in JSON
    names = sorted({name for s in structures for name in s.arrays})
    shapes = [{name: list(a.shape) for name, a in s.arrays.items()} for s in structures]
    arrays["array_shapes"] = np.array(json.dumps({"names": names, "frames": shapes}))
    for k, name in enumerate(names):
        parts = [s.arrays[name].ravel() for s in structures if name in s.arrays]
        arrays[f"array_{k}"] = np.concatenate(parts)
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, allow_pickle=True, **arrays)  # numpy's default, spelled out for the type check
    os.replace(tmp, target)


def _load_cache(source: Path) -> list[Structure]:
    with np.load(source, allow_pickle=False) as npz:
        z = {key: npz[key] for key in npz.files}
        n = z["n_atoms"]
        offsets = np.concatenate([[0], np.cumsum(n)])
        infos = json.loads(str(z["info"]))
        layout = json.loads(str(z["array_shapes"]))
        flat = {name: z[f"array_{k}"] for k, name in enumerate(layout["names"])}
        start = dict.fromkeys(flat, 0)
        out = []
        for k in range(len(n)):
            a, b = offsets[k], offsets[k + 1]
            energy = float(z["energy"][k])
            stress = z["stress"][k]
            arrays: dict[str, np.ndarray] = {}
            for name, shape in layout["frames"][k].items():
                size = int(np.prod(shape))
                arrays[name] = flat[name][start[name] : start[name] + size].reshape(shape)
                start[name] += size
            out.append(
                Structure(
                    numbers=z["numbers"][a:b],
                    positions=z["positions"][a:b],
                    cell=z["cell"][k],
                    pbc=z["pbc"][k],
                    energy=None if np.isnan(energy) else energy,
                    forces=z["forces"][a:b] if z["has_forces"][k] else None,
                    stress=None if np.isnan(stress).any() else stress,
                    info=infos[k],
                    arrays=arrays,
                )
            )
    return out


def read_structures(
    path: str | Path,
    keys: KeyMap = KeyMap(),
    require: Sequence[str] = ("energy", "forces"),
    index: str | int = ":",
    use_cache: bool = True,
) -> list[Structure]:
    """Read, convert and check every frame of ``path``.

    Args:
        path: any file ``ase.io.read`` understands (extended XYZ first; ``.gz`` too).
        keys: where labels are and in which units.
        require: labels every frame must have (subset of ``energy``, ``forces``, ``stress``).
        index: ASE frame selection.
        use_cache: reuse a parsed copy keyed by the file's SHA-256 (see :func:`cache_dir`).

    Raises:
        DataError: naming the file, frame and field, for a missing file, an unreadable frame,
            a missing label, NaN or inf, overlapping atoms, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such file")
    if path.stat().st_size == 0:
        raise DataError(str(path), "file is empty (empty dataset)")
    cached = _cache_path(path, keys, index) if use_cache else None
    if cached is not None and cached.is_file():
        try:
            structures = _load_cache(cached)
        except (OSError, ValueError, KeyError):
            structures = None  # a damaged cache is rebuilt from the source
        if structures is not None:
            _check_required(structures, path, require)
            return structures
    structures = []
    for frame, atoms in _iterate_frames(path, index):
        s = atoms_to_structure(atoms, keys)
        check_structure(s, str(path), frame)
        structures.append(s)
    if not structures:
        raise DataError(str(path), "file holds no structures (empty dataset)")
    _check_required(structures, path, require)
    if cached is not None:
        # caching is an optimisation; a read-only home must not stop the run
        with contextlib.suppress(OSError):
            _save_cache(cached, structures)
    return structures


def _check_required(structures: Sequence[Structure], path: Path, require: Sequence[str]) -> None:
    for frame, s in enumerate(structures):
        for name in require:
            if getattr(s, name) is None:
                raise DataError(str(path), "label missing", frame, name)
