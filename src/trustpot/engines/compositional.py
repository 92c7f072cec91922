"""The four compositional out-of-domain tasks (GMD-26) and their labelled data.

Each task is a :class:`TaskSpec`: molecules (:class:`~trustpot.engines.fragments.MoleculeSpec`)
per subset ``train``, ``test_id`` and ``test_ood``.

* ``duplication``: train on molecules with one fragment A, test on molecules with two A.
* ``combination``: train on A alone and B alone, test on molecules carrying A and B.
* ``size``: train on short chains, test on longer chains with the same fragments.
* ``holdout``: a fragment never seen in training whose elements all appear in training.

``test_id`` lists the training molecules: its frames are a held-out random part
(``id_fraction``) of each training molecule's MD frames, from the same runs as the training
frames. ``test_ood`` molecules never appear in training. Chains carry their fragments on the
terminal carbons (``X-(CH2)n-Y``), rings on every distinct pattern (``quick``: para only).

:func:`build_task_data` samples every molecule by Langevin MD with GFN2-xTB labels
(:func:`trustpot.engines.xtb.generate_molecules`, resumable, into ``raw.xyz``), writes the
annotated frames to ``data.xyz`` (:func:`~trustpot.engines.fragments.annotate_frames`) and a
split manifest ``split.json`` with the three subsets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.engines.fragments import FragmentLibrary, MoleculeSpec, default_library
from trustpot.errors import ConfigError

SUBSETS = ("train", "test_id", "test_ood")


@dataclass(frozen=True)
class TaskSpec:
    """Molecules of one task.

    Attributes:
        task: task name.
        description: one line saying what is held out.
        subsets: ``train``, ``test_id`` (the training molecules) and ``test_ood`` molecules.
        params: the options that defined the task.
        library: the fragment library of the molecules.
    """

    task: str
    description: str
    subsets: dict[str, tuple[MoleculeSpec, ...]]
    params: dict[str, Any]
    library: FragmentLibrary = field(default_factory=default_library, compare=False, repr=False)

    def __post_init__(self) -> None:
        if set(self.subsets) != set(SUBSETS):
            raise ConfigError(f"task '{self.task}' needs subsets {SUBSETS}")
        train = {m.smiles for m in self.subsets["train"]}
        if not train or not self.subsets["test_ood"]:
            raise ConfigError(f"task '{self.task}' has no training or no out-of-domain molecule")
        if {m.smiles for m in self.subsets["test_id"]} != train:
            raise ConfigError(f"task '{self.task}': test_id must list the training molecules")
        both = train & {m.smiles for m in self.subsets["test_ood"]}
        if both:
            raise ConfigError(f"task '{self.task}': {sorted(both)} in train and test_ood")

    def molecules(self) -> list[MoleculeSpec]:
        """Every distinct molecule, training ones first."""
        seen: dict[str, MoleculeSpec] = {}
        for name in ("train", "test_ood"):
            for m in self.subsets[name]:
                seen.setdefault(m.smiles, m)
        return list(seen.values())


def _spec(
    task: str,
    description: str,
    train: list[MoleculeSpec],
    ood: list[MoleculeSpec],
    params: dict[str, Any],
    library: FragmentLibrary,
) -> TaskSpec:
    train_t = tuple({m.smiles: m for m in train}.values())
    ood_t = tuple({m.smiles: m for m in ood}.values())
    subsets = {"train": train_t, "test_id": train_t, "test_ood": ood_t}
    return TaskSpec(task, description, subsets, params, library)


def _placed(
    library: FragmentLibrary,
    counts: Mapping[str, int],
    chain_lengths: Sequence[int],
    rings: Sequence[str],
    quick: bool,
) -> list[MoleculeSpec]:
    """``counts`` on the terminal carbons of each chain and on each ring scaffold."""
    n = sum(counts.values())
    out = []
    for length in chain_lengths:
        if length >= n:
            out += library.enumerate("chain", counts, length, sites=(0, length - 1))
    for ring in rings:
        size = library.scaffold(ring).size
        sites = (0, size // 2) if quick and n == 2 else None
        out += library.enumerate(ring, counts, sites=sites)
    return out


def duplication_task(
    fragment: str = "carboxylic_acid",
    quick: bool = False,
    chain_lengths: Sequence[int] | None = None,
    rings: Sequence[str] = ("benzene",),
    library: FragmentLibrary | None = None,
) -> TaskSpec:
    """Train: one ``fragment`` per molecule; test OOD: two (``X-R-X``; ortho/meta/para)."""
    lib = library or default_library()
    lengths = tuple(chain_lengths or ((1, 2) if quick else (1, 2, 3, 4)))
    train = _placed(lib, {fragment: 1}, lengths, rings, quick)
    ood = _placed(lib, {fragment: 2}, [n for n in lengths if n >= 2], rings, quick)
    params = {"fragment": fragment, "chain_lengths": list(lengths), "rings": list(rings)}
    return _spec("duplication", f"one {fragment} in training, two in test", train, ood, params, lib)


def combination_task(
    a: str = "carboxylic_acid",
    b: str = "amine",
    quick: bool = False,
    chain_lengths: Sequence[int] | None = None,
    rings: Sequence[str] = ("benzene",),
    library: FragmentLibrary | None = None,
) -> TaskSpec:
    """Train: ``a`` alone and ``b`` alone; test OOD: ``a`` and ``b`` in one molecule."""
    if a == b:
        raise ConfigError("the combination task needs two different fragments")
    lib = library or default_library()
    lengths = tuple(chain_lengths or ((1, 2) if quick else (1, 2, 3, 4)))
    train = _placed(lib, {a: 1}, lengths, rings, quick) + _placed(
        lib, {b: 1}, lengths, rings, quick
    )
    ood = _placed(lib, {a: 1, b: 1}, [n for n in lengths if n >= 2], rings, quick)
    params = {"a": a, "b": b, "chain_lengths": list(lengths), "rings": list(rings)}
    desc = f"{a} and {b} apart in training, together in test"
    return _spec("combination", desc, train, ood, params, lib)


def size_task(
    fragments: Sequence[str] = ("hydroxyl", "carboxylic_acid"),
    quick: bool = False,
    train_lengths: Sequence[int] | None = None,
    test_lengths: Sequence[int] | None = None,
    library: FragmentLibrary | None = None,
) -> TaskSpec:
    """Train: ``X-(CH2)n-H`` for short ``n``; test OOD: the same fragments on longer chains."""
    lib = library or default_library()
    train_n = tuple(train_lengths or ((1, 2) if quick else (1, 2, 3, 4)))
    test_n = tuple(test_lengths or ((4,) if quick else (6, 8)))
    if not fragments:
        raise ConfigError("the size task needs at least one fragment")
    if max(train_n) >= min(test_n):
        raise ConfigError(
            f"size task: test chains {list(test_n)} must all be longer than training chains "
            f"{list(train_n)}"
        )
    train, ood = [], []
    for f in fragments:
        train += _placed(lib, {f: 1}, train_n, (), quick)
        ood += _placed(lib, {f: 1}, test_n, (), quick)
    params = {
        "fragments": list(fragments),
        "train_lengths": list(train_n),
        "test_lengths": list(test_n),
    }
    desc = f"chains of {min(train_n)}-{max(train_n)} C in training, {list(test_n)} C in test"
    return _spec("size", desc, train, ood, params, lib)


def holdout_task(
    held_out: str = "nitrile",
    train_fragments: Sequence[str] | None = None,
    quick: bool = False,
    chain_lengths: Sequence[int] | None = None,
    rings: Sequence[str] = ("benzene",),
    library: FragmentLibrary | None = None,
) -> TaskSpec:
    """Train: one of ``train_fragments`` per molecule; test OOD: ``held_out`` instead.

    Raises:
        ConfigError: ``held_out`` among the training fragments, or an element of the test
            molecules that no training molecule has.
    """
    from ase.data import chemical_symbols

    lib = library or default_library()
    lib.fragment(held_out)
    if train_fragments is None:
        pool = ("hydroxyl", "amine", "aldehyde", "fluoro") if quick else lib.names
        train_fragments = tuple(n for n in pool if n != held_out)
    if held_out in train_fragments:
        raise ConfigError(f"hold-out fragment '{held_out}' is also a training fragment")
    lengths = tuple(chain_lengths or ((1, 2) if quick else (1, 2, 3)))
    train = [m for f in train_fragments for m in _placed(lib, {f: 1}, lengths, rings, quick)]
    ood = _placed(lib, {held_out: 1}, lengths, rings, quick)
    seen = set().union(*(m.elements() for m in train))
    missing = sorted(set().union(*(m.elements() for m in ood)) - seen)
    if missing:
        names = ", ".join(chemical_symbols[z] for z in missing)
        raise ConfigError(
            f"hold-out fragment '{held_out}' has element(s) {names} that no training molecule "
            f"has (training fragments: {', '.join(train_fragments)})"
        )
    params = {
        "held_out": held_out,
        "train_fragments": list(train_fragments),
        "chain_lengths": list(lengths),
        "rings": list(rings),
    }
    return _spec("holdout", f"{held_out} never in training", train, ood, params, lib)


#: Task name -> builder (keyword options, ``quick`` and ``library`` accepted by all).
TASKS: dict[str, Callable[..., TaskSpec]] = {
    "duplication": duplication_task,
    "combination": combination_task,
    "size": size_task,
    "holdout": holdout_task,
}


def make_task(
    task: str,
    quick: bool = False,
    options: Mapping[str, Any] | None = None,
    library: FragmentLibrary | None = None,
) -> TaskSpec:
    """The :class:`TaskSpec` of a task name with builder ``options``.

    Raises:
        ConfigError: unknown task or option, or options that break the task's definition.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown compositional task '{task}'; known: {', '.join(TASKS)}")
    try:
        return TASKS[task](quick=quick, library=library, **dict(options or {}))
    except TypeError as err:
        raise ConfigError(f"task '{task}': {err}") from None


@dataclass
class TaskData:
    """What :func:`build_task_data` wrote.

    Attributes:
        data: annotated frames (extended XYZ).
        manifest: split manifest with subsets ``train``, ``test_id``, ``test_ood``.
        raw: the xTB engine's resumable output.
        sizes: frames per subset.
        molecules: molecules per subset.
        failed: frames the engine could not label (listed in ``raw.xyz.failed.jsonl``).
        seconds: wall-clock time.
    """

    data: Path
    manifest: Path
    raw: Path
    sizes: dict[str, int]
    molecules: dict[str, int]
    failed: int
    seconds: float


def quick_md() -> Any:
    """Shorter MD settings for quick mode (100 equilibration steps, a frame every 10)."""
    from trustpot.engines.xtb import MDOptions

    return MDOptions(equilibration=100, interval=10, chunk=5)


def split_frames(
    smiles: Sequence[str], spec: TaskSpec, id_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Frame indices per subset, from each frame's molecule: ``test_ood`` molecules' frames to
    ``test_ood``; of each training molecule's frames a random ``id_fraction`` (at least one
    when it has two or more, never all) to ``test_id``, the rest to ``train``."""
    from trustpot.engines.labelling import stable_seed

    train = {m.smiles for m in spec.subsets["train"]}
    ood = {m.smiles for m in spec.subsets["test_ood"]}
    out: dict[str, list[int]] = {name: [] for name in SUBSETS}
    per_molecule: dict[str, list[int]] = {}
    for k, s in enumerate(smiles):
        if s in ood:
            out["test_ood"].append(k)
        elif s in train:
            per_molecule.setdefault(s, []).append(k)
    for s, frames in per_molecule.items():
        n_id = 0
        if id_fraction > 0 and len(frames) >= 2:
            n_id = min(max(1, round(id_fraction * len(frames))), len(frames) - 1)
        rng = np.random.default_rng(stable_seed(seed, s, "test_id"))
        held = set(rng.choice(len(frames), n_id, replace=False).tolist())
        for j, k in enumerate(frames):
            out["test_id" if j in held else "train"].append(k)
    return {name: sorted(v) for name, v in out.items()}


def build_task_data(
    task: str | TaskSpec,
    out_dir: str | Path,
    frames_per_molecule: int = 20,
    temperatures: Sequence[float] = (300.0,),
    seed: int = 0,
    workers: int = 1,
    quick: bool = False,
    options: Mapping[str, Any] | None = None,
    id_fraction: float = 0.2,
    md: Any | None = None,
    method: str = "GFN2-xTB",
    progress: bool = False,
) -> TaskData:
    """Sample, label and split the molecules of ``task`` into ``out_dir``; resumable.

    Args:
        task: a task name (:data:`TASKS`) or a ready :class:`TaskSpec`.
        out_dir: folder of ``raw.xyz``, ``data.xyz`` and ``split.json``.
        frames_per_molecule: frames per (molecule, temperature).
        temperatures: MD temperatures, K.
        seed: seed of sampling and of the in-domain split.
        workers: xTB worker processes (0: in this process).
        quick: small molecules (task default) and short MD (:func:`quick_md`).
        options: keyword options of the task builder (only with a task name).
        id_fraction: share of each training molecule's frames held out as ``test_id``.
        md: :class:`~trustpot.engines.xtb.MDOptions`; default per ``quick``.
        method: xTB method.
        progress: show the engine's progress bar.

    Raises:
        ConfigError: any bad option, before any work starts.
    """
    from trustpot.data.splits import write_manifest
    from trustpot.engines.xtb import MDOptions, check_method, generate_molecules, require_xtb

    t0 = time.perf_counter()
    if frames_per_molecule < 1:
        raise ConfigError(f"frames_per_molecule must be >= 1, got {frames_per_molecule}")
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ConfigError(f"temperatures must be one or more values > 0 K, got {temperatures}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if not 0 <= id_fraction < 1:
        raise ConfigError(f"id_fraction must be in [0, 1), got {id_fraction}")
    if id_fraction > 0 and frames_per_molecule * len(temperatures) < 2:
        raise ConfigError("an in-domain test set needs >= 2 frames per training molecule")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder")
    md = md if md is not None else (quick_md() if quick else MDOptions())
    md.check()
    check_method(method)
    require_xtb()
    if isinstance(task, TaskSpec):
        if options:
            raise ConfigError("options apply to a task name, not to a ready TaskSpec")
        spec = task
    else:
        spec = make_task(task, quick, options)
    molecules = spec.molecules()

    out_dir.mkdir(parents=True, exist_ok=True)
    raw, data, manifest = out_dir / "raw.xyz", out_dir / "data.xyz", out_dir / "split.json"
    summary = generate_molecules(
        [m.smiles for m in molecules],
        [float(t) for t in temperatures],
        frames_per_molecule,
        raw,
        seed=seed,
        workers=workers,
        method=method,
        md=md,
        progress=progress,
    )
    from trustpot.engines.fragments import annotate_frames

    annotate_frames(raw, data, molecules, spec.library)
    from ase.io import iread

    smiles = [str(a.info["smiles"]) for a in iread(str(data), index=":", format="extxyz")]
    subsets = split_frames(smiles, spec, id_fraction, seed)
    params = {
        "task": spec.task,
        "description": spec.description,
        "options": spec.params,
        "quick": quick,
        "frames_per_molecule": frames_per_molecule,
        "temperatures": [float(t) for t in temperatures],
        "id_fraction": id_fraction,
        "method": method,
        "md": dataclasses.asdict(md),
        "molecules": {k: [m.smiles for m in v] for k, v in spec.subsets.items()},
        "fragment_legend": {str(k): v for k, v in spec.library.legend().items()},
        "failed_frames": summary.failed,
    }
    write_manifest(data, subsets, "compositional", seed, params, manifest)
    return TaskData(
        data=data,
        manifest=manifest,
        raw=raw,
        sizes={k: len(v) for k, v in subsets.items()},
        molecules={k: len(v) for k, v in spec.subsets.items()},
        failed=summary.failed,
        seconds=time.perf_counter() - t0,
    )
