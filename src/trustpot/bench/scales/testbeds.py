"""The two NaCl(aq) testbeds of the scale analysis, each ending in split manifests.

- ``dft``: the revPBE0-D3 files of ``shared/data/nacl_water`` (one file per active-learning
  generation). Train (and calibration) frames come from the training generations, test frames from
  the others; one manifest per file (``OUT/splits/<file>.json``, subsets ``train``, ``valid``,
  ``test`` and ``excluded``) ties the split to the file's SHA-256. Data are read by path, never
  copied. Frames with a force component above ``force_cap`` (eV/Å) go to ``excluded`` (the
  30 eV/Å frame of ``revPBE0-D3_gen1b.xyz``): an input sanity cap, reported, not a tuned filter.
- ``openmm``: NaCl in flexible TIP3P water generated here (:mod:`trustpot.engines.nacl_water`),
  half the trajectories started from a contact ion pair so that close contacts are frequent;
  split by trajectory (frames of one trajectory never straddle train and test) into one manifest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.data.reader import read_structures
from trustpot.data.splits import write_manifest
from trustpot.engines.nacl_water import BoxOptions
from trustpot.errors import ConfigError, DataError

DFT_METHOD = "revPBE0-D3"
DFT_TRAIN_GENERATIONS = ("gen1a", "gen1b", "gen1c", "gen1d")
DFT_TEST_GENERATIONS = ("gen1e", "gen3")
#: Default force cap (eV/Å): no thermal liquid configuration comes near it (frame maxima of these
#: files are 3-6.4 eV/Å); frames above it are treated as label errors and excluded, with a record.
FORCE_CAP = 15.0


@dataclass
class Testbed:
    """Data specifications of one testbed (files or ``manifest.json:subset``)."""

    name: str
    train: list[str]
    valid: list[str]
    test: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def _limit(indices: list[int], share: float, rng: np.random.Generator) -> list[int]:
    if share >= 1.0:
        return indices
    keep = max(1, math.ceil(share * len(indices))) if indices else 0
    return sorted(rng.choice(indices, keep, replace=False).tolist())


def prepare_dft(
    data_dir: str | Path,
    out: str | Path,
    train_generations: Sequence[str] = DFT_TRAIN_GENERATIONS,
    test_generations: Sequence[str] = DFT_TEST_GENERATIONS,
    valid_fraction: float = 0.2,
    force_cap: float = FORCE_CAP,
    seed: int = 0,
    max_train: int = 0,
    max_valid: int = 0,
    max_test: int = 0,
    log: Callable[[str], None] = print,
) -> Testbed:
    """Write the DFT split manifests into ``out/splits`` and return their subsets.

    ``max_*`` (0: all) cap each subset, spread over the files in proportion to their sizes (used by
    the quick mode); the manifests record exactly the frames used.
    """
    data_dir = Path(data_dir)
    gens = list(train_generations) + list(test_generations)
    files = {g: data_dir / f"{DFT_METHOD}_{g}.xyz" for g in gens}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"DFT testbed: missing data file(s) {missing} (see --data-dir)")
    if set(train_generations) & set(test_generations):
        raise ConfigError("a generation cannot be both in training and in test")
    rng = np.random.default_rng(seed)
    plan: dict[str, dict[str, list[int]]] = {}
    excluded_info: list[dict[str, Any]] = []
    for gen, path in files.items():
        structures = read_structures(path)
        keep, excluded = [], []
        for k, s in enumerate(structures):
            assert s.forces is not None
            peak = float(np.abs(s.forces).max())
            if force_cap > 0 and peak > force_cap:
                excluded.append(k)
                excluded_info.append({"file": path.name, "frame": k, "max_force_ev_a": peak})
                log(f"  {path.name} frame {k}: max force {peak:.1f} eV/Å > cap {force_cap:g}")
            else:
                keep.append(k)
        if gen in train_generations:
            order = rng.permutation(keep).tolist()
            n_valid = max(1, round(valid_fraction * len(order)))
            subsets = {"train": sorted(order[n_valid:]), "valid": sorted(order[:n_valid])}
        else:
            subsets = {"test": keep}
        subsets["excluded"] = excluded
        plan[gen] = subsets
    totals = {
        name: sum(len(p.get(name, [])) for p in plan.values())
        for name in ("train", "valid", "test")
    }
    caps = {"train": max_train, "valid": max_valid, "test": max_test}
    for name, cap in caps.items():
        if cap and totals[name] > cap:
            for p in plan.values():
                if name in p:
                    p[name] = _limit(p[name], cap / totals[name], rng)
    spec: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    manifests = []
    for gen, subsets in plan.items():
        manifest = Path(out) / "splits" / f"{DFT_METHOD}_{gen}.json"
        params = {
            "train_generations": list(train_generations),
            "test_generations": list(test_generations),
            "valid_fraction": valid_fraction,
            "force_cap_ev_a": force_cap,
            "max": caps,
        }
        write_manifest(files[gen], subsets, "generation", seed, params, manifest)
        manifests.append(str(manifest))
        for name in spec:
            if subsets.get(name):
                spec[name].append(f"{manifest}:{name}")
    sizes = {
        name: sum(len(p.get(name, [])) for p in plan.values())
        for name in ("train", "valid", "test")
    }
    log(f"DFT testbed: {sizes} frames; manifests in {Path(out) / 'splits'}")
    info = {
        "data_dir": os.path.relpath(data_dir),  # no absolute path of this machine in reports
        "method": DFT_METHOD,
        "train_generations": list(train_generations),
        "test_generations": list(test_generations),
        "force_cap_ev_a": force_cap,
        "excluded": excluded_info,
        "manifests": manifests,
        "sizes": sizes,
    }
    return Testbed("dft", spec["train"], spec["valid"], spec["test"], info)


def _testbed_box(**changes: Any) -> BoxOptions:
    """Box options of the OpenMM testbed: 12.4 Å boxes like the DFT ones, half the
    trajectories started from a contact ion pair."""
    return replace(BoxOptions(grid=4, cutoff=0.6, chunk=10, contact_fraction=0.5), **changes)


@dataclass(frozen=True)
class OpenMMPlan:
    """What the OpenMM testbed generates: ``frames`` per ion-pair count in ``pairs``, sampled
    with ``box`` (:class:`~trustpot.engines.nacl_water.BoxOptions`), split by trajectory."""

    pairs: tuple[int, ...] = (1, 2, 4, 8)
    frames: int = 120
    box: BoxOptions = field(default_factory=_testbed_box)
    test_fraction: float = 0.25
    valid_fraction: float = 0.25

    @classmethod
    def quick(cls) -> OpenMMPlan:
        return cls(
            pairs=(1, 2),
            frames=8,
            box=_testbed_box(chunk=4, grid=3, cutoff=0.45, equilibration=200, interval=50),
            test_fraction=0.25,
            valid_fraction=0.34,
        )


def prepare_openmm(
    out: str | Path,
    plan: OpenMMPlan,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Testbed:
    """Generate (or resume) ``out/data/nacl_openmm.xyz`` and split it by trajectory."""
    from trustpot.engines.nacl_water import generate_nacl_water

    data = Path(out) / "data" / "nacl_openmm.xyz"
    data.parent.mkdir(parents=True, exist_ok=True)
    log(f"OpenMM testbed: generating {plan.frames} frames x pairs {list(plan.pairs)} into {data}")
    summary = generate_nacl_water(
        plan.pairs, plan.frames, data, seed=seed, box=plan.box, progress=False
    )
    if summary.failed:
        log(f"  {summary.failed} frame(s) failed (see {data}.failed.jsonl); using the others")
    structures = read_structures(data)
    if not structures:
        raise DataError(str(data), "no frames were generated")
    groups: dict[int, list[int]] = {}
    for k, s in enumerate(structures):
        if "seed" not in s.info:
            raise DataError(str(data), "no trajectory seed in atoms.info", k, "seed")
        groups.setdefault(int(s.info["seed"]), []).append(k)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_test = max(1, round(plan.test_fraction * len(keys)))
    n_valid = max(1, round(plan.valid_fraction * (len(keys) - n_test)))
    if len(keys) < n_test + n_valid + 1:
        raise ConfigError(
            f"{data}: {len(keys)} trajectories cannot make train, valid and test subsets; "
            "generate more frames"
        )
    names = ["test"] * n_test + ["valid"] * n_valid + ["train"] * (len(keys) - n_test - n_valid)
    subsets: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for name, j in zip(names, order):
        subsets[name] += groups[keys[int(j)]]
    subsets = {k: sorted(v) for k, v in subsets.items()}
    manifest = Path(out) / "splits" / "nacl_openmm.json"
    params = {"by": "trajectory (info seed)", "plan": asdict(plan)}
    write_manifest(data, subsets, "trajectory", seed, params, manifest)
    sizes = {k: len(v) for k, v in subsets.items()}
    log(f"OpenMM testbed: {sizes} frames from {len(keys)} trajectories; manifest {manifest}")
    info = {
        "data": str(data),
        "plan": asdict(plan),
        "trajectories": len(keys),
        "failed_frames": summary.failed,
        "manifests": [str(manifest)],
        "sizes": sizes,
    }
    return Testbed(
        "openmm",
        [f"{manifest}:train"],
        [f"{manifest}:valid"],
        [f"{manifest}:test"],
        info,
    )
