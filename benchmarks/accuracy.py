"""Accuracy benchmark: trustpot's backbones against MACE, at equal wall-clock and equal epochs.

    python benchmarks/accuracy.py --quick --out /tmp/accuracy-quick          # minutes
    python benchmarks/accuracy.py --minutes 8 --models painn ace mace-small mace-medium \\
        --out benchmarks/results/accuracy

Every (task, model) pair is trained twice over, in this one run, on this one machine:

1. **equal budget**: ``--minutes`` of wall clock each, ``--parallel`` runs at a time with
   ``--threads`` torch threads each (2 x 1 on a 2-core machine), trustpot and MACE side by side;
2. **equal epochs** (``--equal-epochs``, default on): every trustpot backbone again, stopped at
   the number of epochs MACE-small reached in its budget run on that task (the architecture,
   not the speed). MACE-medium is not rerun (it would need more than the budget).

trustpot runs are ``trustpot train`` then ``trustpot eval`` in subprocesses (what a user gets);
MACE runs are ``benchmarks/mace_peer.py`` with the Python of ``benchmarks/.mace-venv``
(mace-torch, created on first use, as ``benchmarks/speed.py --install-mace`` does; ``--skip-mace``
leaves MACE out). Both write ``predictions.npz``; one scorer
(:func:`trustpot.metrics.accuracy.accuracy_metrics`) computes every number in the tables.

Tasks (data read from ``../shared/data``; the subsets are split manifests in ``OUT/work``):

- ``ethanol``: rMD17 ``train.xyz`` -> ``test_MD.xyz`` (in domain only);
- ``3bpa``: ``train_300K.xyz`` split train/valid/test -> ``ood_mixedT_not_in_train_300K.xyz``;
- ``zeolites``: frames of the 8 training topologies -> held-out frames of those topologies (in
  domain) and the topologies PTY and UOE (structural out of domain);
- ``zeolites-holdout``: the same frames with two training topologies (EDI, DFT) held out as
  the unseen ones: where recipes for new topologies are chosen without touching PTY and UOE;
- ``xtb-ethanol``, ``xtb-acetylacetone``: GFN2-xTB Langevin MD of the molecule generated here
  (``trustpot data molecules``'s engine) at 300 K (train/valid/test) and 600 K (out of domain),
  plus far-from-data probes labelled by the same engine (:mod:`trustpot.bench.paths`: torsion
  scans about rotatable bonds and bond-breaking stretches), scored as relative-energy errors
  along each path: the final exam's shape (trained at 300 K, tested at 600 K). Acetylacetone is
  the enol (an intramolecular O-H...O bond: its O-H stretch probe moves the proton towards the
  other oxygen), 15 atoms and two methyl rotors, a second molecule so that no recipe is chosen
  on ethanol alone.

Writes ``OUT/accuracy.json`` (settings, every run's curve and metrics), ``OUT/accuracy.md`` (the
tables) and ``OUT/curves_<task>.png`` (validation force MAE against minutes). A finished run is
reused on a rerun with the same settings (:mod:`trustpot.train.reuse`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy_report import curve_rows, plot_curves, plot_probes, score_run, write_report  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MACE_PYTHON = ROOT / "benchmarks" / ".mace-venv" / "bin" / "python"
TRUSTPOT_MODELS = ("schnet", "painn", "egnn", "ace")
MACE_MODELS = {"mace-small": "small", "mace-medium": "medium"}
#: molecules of the generated (GFN2-xTB) tasks: task name -> SMILES
XTB_MOLECULES = {"xtb-ethanol": "CCO", "xtb-acetylacetone": "CC(O)=CC(=O)C"}
TASKS = ("ethanol", "3bpa", "zeolites", *XTB_MOLECULES, "zeolites-holdout")
ZEOLITE_TRAIN = ("EDI", "DFT", "OSO", "NAB", "SBN", "THO", "SOD", "ABW")
ZEOLITE_OOD = ("PTY", "UOE")
#: held out of ``zeolites-holdout``'s training (the first two of ZEOLITE_TRAIN, fixed before
#: any result): recipes are chosen there, never on PTY and UOE
ZEOLITE_HOLDOUT = ZEOLITE_TRAIN[:2]


@dataclass(frozen=True)
class Sizes:
    """Frames per subset (``full`` and ``quick`` modes)."""

    ethanol_train: int
    ethanol_valid: int
    ethanol_test: int
    bpa_train: int
    bpa_valid: int
    bpa_test: int
    bpa_ood: int
    zeolite_train: int  # per training topology
    zeolite_valid: int
    zeolite_test: int
    zeolite_ood: int  # per held-out topology
    xtb_300: int  # generated frames at 300 K (train + valid + test)
    xtb_600: int
    xtb_train: int
    xtb_valid: int
    torsion_points: int
    stretch_points: int


SIZES = {
    "full": Sizes(950, 50, 1000, 380, 20, 100, 469, 50, 5, 20, 100, 500, 150, 380, 20, 24, 16),
    "quick": Sizes(150, 10, 100, 100, 10, 40, 60, 12, 2, 4, 15, 80, 30, 50, 10, 8, 6),
}


@dataclass
class Task:
    """One dataset: data specs (files or ``manifest.json:subset``, commas join several)."""

    name: str
    train: str
    valid: str
    tests: dict[str, str]
    in_domain: str
    probes: str = ""  # labelled paths file (trustpot.bench.paths.write_paths), or none


def model_spec(text: str) -> tuple[str, list[str]]:
    """``"ace:correlation=2,train.ema_decay=0"`` -> ``("ace", ["-o", "model.hypers.correlation=2",
    "-o", "train.ema_decay=0"])``: a backbone with options set (a key with a dot is a full
    option path, any other a ``model.hypers`` key), for recipes and variants side by side."""
    name, _, options = text.partition(":")
    if name in MACE_MODELS:
        if options:
            raise SystemExit(f"'{text}': MACE sizes take no options here")
        return name, []
    if name not in TRUSTPOT_MODELS:
        known = ", ".join((*TRUSTPOT_MODELS, *MACE_MODELS))
        raise SystemExit(f"unknown model '{name}' in '{text}'; known: {known}")
    overrides: list[str] = []
    for item in filter(None, options.split(",")):
        if "=" not in item:
            raise SystemExit(f"'{item}' in '{text}' must look like key=value")
        key = item if "." in item.split("=", 1)[0] else f"model.hypers.{item}"
        overrides += ["-o", key]
    return name, overrides


# -- data --------------------------------------------------------------------------------------
def _manifest(data: Path, sizes: dict[str, int], seed: int, out: Path) -> str:
    """A random split of ``data`` into ``sizes`` (frames beyond them unused); the manifest path."""
    from trustpot.data.reader import read_structures
    from trustpot.data.splits import make_split, write_manifest

    if not out.is_file():
        subsets = make_split(read_structures(data, require=()), "random", sizes=sizes, seed=seed)
        write_manifest(data, subsets, "random", seed, {"sizes": sizes}, out)
    return str(out)


def _join(manifests: list[str], subset: str) -> str:
    return ",".join(f"{m}:{subset}" for m in manifests)


def build_task(name: str, sz: Sizes, seed: int, work: Path, log: Callable[[str], None]) -> Task:
    """The task's data specs, writing its split manifests (and generated data) under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    if name == "ethanol":
        train = _manifest(
            DATA / "ethanol" / "train.xyz",
            {"train": sz.ethanol_train, "valid": sz.ethanol_valid},
            seed,
            work / "ethanol_train.json",
        )
        test = _manifest(
            DATA / "ethanol" / "test_MD.xyz", {"test": sz.ethanol_test}, seed, work / "et.json"
        )
        return Task(
            name, f"{train}:train", f"{train}:valid", {"test_MD": f"{test}:test"}, "test_MD"
        )
    if name == "3bpa":
        split = _manifest(
            DATA / "3bpa" / "train_300K.xyz",
            {"train": sz.bpa_train, "valid": sz.bpa_valid, "test": sz.bpa_test},
            seed,
            work / "3bpa_split.json",
        )
        ood = _manifest(
            DATA / "3bpa" / "ood_mixedT_not_in_train_300K.xyz",
            {"test": sz.bpa_ood},
            seed,
            work / "3bpa_ood.json",
        )
        tests = {"test_300K": f"{split}:test", "ood_mixedT": f"{ood}:test"}
        return Task(name, f"{split}:train", f"{split}:valid", tests, "test_300K")
    if name == "zeolites":
        folder = DATA / "sio2_zeolites"
        per = {"train": sz.zeolite_train, "valid": sz.zeolite_valid, "test": sz.zeolite_test}
        train = [
            _manifest(folder / f"train_topology_{t}.xyz.gz", per, seed, work / f"zeo_{t}.json")
            for t in ZEOLITE_TRAIN
        ]
        tests = {"train_topologies": _join(train, "test")}
        for t in ZEOLITE_OOD:
            ood = _manifest(
                folder / f"test_topology_{t}.xyz.gz",
                {"test": sz.zeolite_ood},
                seed,
                work / f"zeo_{t}.json",
            )
            tests[t] = f"{ood}:test"
        return Task(name, _join(train, "train"), _join(train, "valid"), tests, "train_topologies")
    if name == "zeolites-holdout":
        folder = DATA / "sio2_zeolites"
        per = {"train": sz.zeolite_train, "valid": sz.zeolite_valid, "test": sz.zeolite_test}
        manifests = {
            t: _manifest(folder / f"train_topology_{t}.xyz.gz", per, seed, work / f"zeo_{t}.json")
            for t in ZEOLITE_TRAIN
        }
        kept = [manifests[t] for t in ZEOLITE_TRAIN if t not in ZEOLITE_HOLDOUT]
        tests = {"train_topologies": _join(kept, "test")}
        for t in ZEOLITE_HOLDOUT:  # every frame of the split: none was trained on
            tests[t] = _join([manifests[t]], "train") + "," + _join([manifests[t]], "test")
        return Task(name, _join(kept, "train"), _join(kept, "valid"), tests, "train_topologies")
    if name in XTB_MOLECULES:
        return build_xtb_task(name, sz, seed, work, log)
    raise SystemExit(f"unknown task '{name}'; known: {', '.join(TASKS)}")


def build_xtb_task(name: str, sz: Sizes, seed: int, work: Path, log: Callable[[str], None]) -> Task:
    """GFN2-xTB MD of ``XTB_MOLECULES[name]`` at 300 K and 600 K, and probe paths from a 300 K
    test frame; files in ``work`` are named after the task (``xtb_ethanol_300K.xyz``...)."""
    from trustpot.bench.paths import label_paths, probe_paths, read_paths, write_paths
    from trustpot.data.reader import read_structures
    from trustpot.engines.xtb import generate_molecules

    stem = name.replace("-", "_")
    files = {}
    for temperature, n, offset in ((300.0, sz.xtb_300, 0), (600.0, sz.xtb_600, 1)):
        path = work / f"{stem}_{int(temperature)}K.xyz"
        log(f"{name}: {n} GFN2-xTB frames at {temperature:g} K -> {path.name}")
        smiles = [XTB_MOLECULES[name]]
        generate_molecules(smiles, [temperature], n, path, seed + offset, 1, progress=False)
        files[temperature] = path
    n_test = sz.xtb_300 - sz.xtb_train - sz.xtb_valid
    split = _manifest(
        files[300.0],
        {"train": sz.xtb_train, "valid": sz.xtb_valid, "test": n_test},
        seed,
        work / f"{stem}_split.json",
    )
    probes = work / f"{stem}_probes.xyz"
    if not probes.is_file():
        from ase import Atoms

        test_index = json.loads(Path(split).read_text())["subsets"]["test"][0]
        start = read_structures(files[300.0])[test_index]
        atoms = Atoms(numbers=start.numbers, positions=start.positions)
        paths = probe_paths(atoms, n_torsion=sz.torsion_points, n_stretch=sz.stretch_points)
        log(f"{name}: labelling {sum(len(p.frames) for p in paths)} probe frames")
        write_paths(label_paths(paths, work / f"{stem}_probe_labelling"), probes)
    read_paths(probes)  # a labelled set that does not read back fails here, not in a run
    tests = {"test_300K": f"{split}:test", "test_600K": str(files[600.0])}
    return Task(name, f"{split}:train", f"{split}:valid", tests, "test_300K", str(probes))


def frame_sets(spec: str) -> list[list[Any]]:
    """``[[data path, indices or None], ...]`` of a spec, for the MACE worker (no trustpot)."""
    from trustpot.data.splits import data_parts, is_manifest_spec

    out: list[list[Any]] = []
    for part in data_parts(spec):
        if is_manifest_spec(part):
            path, _, subset = part.rpartition(":")
            manifest = json.loads(Path(path).read_text())
            data = (Path(path).parent / manifest["data"]).resolve()
            out.append([str(data), manifest["subsets"][subset]])
        else:
            out.append([str(Path(part).resolve()), None])
    return out


def portable(value: Any, out: Path) -> Any:
    """``value`` with this machine's paths replaced: ``OUT/...`` and ``../shared/...``."""
    text = json.dumps(value)
    shared = ROOT.parent.resolve() / "shared"
    for path, name in ((shared, "../shared"), (out.resolve(), "OUT"), (out, "OUT")):
        text = text.replace(str(path), name)
    return json.loads(text)


# -- runs --------------------------------------------------------------------------------------
def _call(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}); see {log}")


def train_trustpot(
    task: Task, model: str, folder: Path, minutes: float, epochs: int, args: argparse.Namespace
) -> dict[str, Any]:
    """``trustpot train`` + ``trustpot eval`` of every test set; predictions per test set."""
    backbone, overrides = model_spec(model)
    trustpot = [sys.executable, "-m", "trustpot"]
    log = folder / "run.log"
    run_dir = folder / "model"
    # a budget run is stopped by its minutes only (and its cosine schedule spans them)
    limits = ["--max-minutes", str(minutes), "--epochs", str(10**6)] if minutes > 0 else []
    limits += ["--epochs", str(epochs)] if epochs > 0 else []
    cmd = [*trustpot, "train", "--train", task.train, "--valid", task.valid, "--model", backbone]
    cmd += [*limits, "--seed", str(args.seed), "--out", str(run_dir)]
    _call([*cmd, "-o", f"train.threads={args.threads}", *overrides], log)
    tests = {**task.tests, **({"probes": task.probes} if task.probes else {})}
    predictions = {}
    for name, spec in tests.items():
        ev = folder / f"eval_{name}"
        _call([*trustpot, "eval", str(run_dir / "best.ckpt"), spec, "--out", str(ev)], log)
        predictions[name] = str((ev / "predictions.npz").relative_to(folder))
    return {
        "code": "trustpot",
        "curve": curve_rows(run_dir / "metrics.csv"),
        "predictions": predictions,
    }


def train_mace(
    task: Task, model: str, folder: Path, minutes: float, epochs: int, args: argparse.Namespace
) -> dict[str, Any]:
    """``benchmarks/mace_peer.py`` in the MACE environment; predictions per test set."""
    tests = {**task.tests, **({"probes": task.probes} if task.probes else {})}
    job = {
        "size": MACE_MODELS[model],
        "cutoff": 5.0,
        "train": frame_sets(task.train),
        "valid": frame_sets(task.valid),
        "tests": {name: frame_sets(spec) for name, spec in tests.items()},
        "minutes": minutes if minutes > 0 else 1e9,
        "max_epochs": epochs if epochs > 0 else 10**9,
        "seed": args.seed,
        "threads": args.threads,
        "batch_size": 5,
        "lr": 0.01,
        "out": str(folder / "mace"),
    }
    (folder / "job.json").write_text(json.dumps(job, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    _call(
        [str(MACE_PYTHON), str(ROOT / "benchmarks" / "mace_peer.py"), str(folder / "job.json")],
        folder / "run.log",
        env,
    )
    report = json.loads((folder / "mace" / "mace_peer.json").read_text())
    curve = [
        {
            "epoch": r["epoch"],
            "minutes": r["minutes"],
            "val_forces_mae": r["valid_forces_mae"],
            "val_forces_rmse": r["valid_forces_rmse"],
            "val_energy_mae_per_atom": r["valid_energy_mae_per_atom"],
        }
        for r in report["curve"]
    ]
    predictions = {name: f"mace/{p}" for name, p in report["tests"].items()}
    meta = {k: report.get(k) for k in ("mace_version", "hidden_irreps", "n_parameters")}
    return {"code": "mace", "curve": curve, "predictions": predictions, **meta}


def install_mace() -> None:
    """Create the MACE environment the way ``benchmarks/speed.py --install-mace`` does."""
    from speed import install_mace as create

    create()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small data, 0.5 min per run")
    parser.add_argument("--minutes", type=float, help="budget per run (default 8; quick 0.5)")
    parser.add_argument(
        "--models",
        nargs="+",
        help="backbones (default painn ace mace-small "
        "mace-medium; quick: painn ace mace-small); options: ace:correlation=2",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--no-equal-epochs", action="store_true", help="budget runs only")
    parser.add_argument("--skip-mace", action="store_true", help="trustpot backbones only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    minutes = args.minutes if args.minutes is not None else (0.5 if args.quick else 8.0)
    default = ["painn", "ace", "mace-small"] + ([] if args.quick else ["mace-medium"])
    models = list(args.models or default)
    for spec in models:
        model_spec(spec)
    if args.skip_mace:
        if any(m in MACE_MODELS for m in models if args.models):
            raise SystemExit("--skip-mace with a MACE model in --models: drop one of them")
        models = [m for m in models if m not in MACE_MODELS]
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the shared datasets must sit beside the checkout")
    if any(m in MACE_MODELS for m in models) and not MACE_PYTHON.is_file():
        print("creating benchmarks/.mace-venv for the MACE peer (once, a few minutes)", flush=True)
        install_mace()
    args.out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            print(message, flush=True)

    sz = SIZES[mode]
    tasks = {name: build_task(name, sz, args.seed, args.out / "work", log) for name in args.tasks}
    results: dict[str, Any] = {
        "mode": mode,
        "minutes": minutes,
        "seed": args.seed,
        "parallel": args.parallel,
        "threads_per_run": args.threads,
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "sizes": asdict(sz),
        "tasks": {name: portable(asdict(task), args.out) for name, task in tasks.items()},
        "runs": {},
    }

    def one(phase: str, task: Task, model: str, epochs: int) -> None:
        from trustpot.train.reuse import run_step

        key = f"{phase}/{task.name}/{model}"
        folder = args.out / phase / task.name / model.replace(":", "_").replace(",", "_")
        budget = minutes if phase == "budget" else 0.0
        config = {
            "task": asdict(task),
            "model": model,
            "minutes": budget,
            "epochs": epochs,
            "seed": args.seed,
            "threads": args.threads,
            "mode": mode,
        }

        def work(where: Path, resuming: bool) -> dict[str, Any]:
            if resuming:  # a budget run restarts from scratch: its clock must be one run's
                for item in where.iterdir():
                    if item.name != "state.json":
                        shutil.rmtree(item) if item.is_dir() else item.unlink()
            log(f"{key}: training" + (f" {budget:g} min" if budget else f" {epochs} epochs"))
            start = time.time()
            train = train_mace if model in MACE_MODELS else train_trustpot
            entry = train(task, model, where, budget, epochs, args)
            entry["wall_s"] = time.time() - start
            entry["epochs"] = len(entry["curve"])
            entry.update(score_run(task.tests, task.probes, where, entry["predictions"]))
            return entry

        folder.mkdir(parents=True, exist_ok=True)
        entry = run_step(folder, config, work, log)
        with lock:
            results["runs"][key] = entry
            (args.out / "accuracy.json").write_text(json.dumps(results, indent=1))
        log(
            f"{key}: {entry['epochs']} epochs, in-domain force MAE "
            f"{1000 * entry['tests'][task.in_domain]['forces_mae']:.1f} meV/Å"
        )

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        jobs = [pool.submit(one, "budget", t, m, 0) for t in tasks.values() for m in models]
        for job in jobs:
            job.result()
    if not args.no_equal_epochs and "mace-small" in models:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            jobs = []
            for t in tasks.values():
                n = results["runs"][f"budget/{t.name}/mace-small"]["epochs"]
                for m in models:
                    if m not in MACE_MODELS:
                        jobs.append(pool.submit(one, "epochs", t, m, n))
            for job in jobs:
                job.result()
    for t in tasks.values():
        plot_curves(results, t.name, args.out / f"curves_{t.name}.png")
        if t.probes:
            plot_probes(results, t.name, Path(t.probes), args.out / f"probes_{t.name}.png")
    (args.out / "accuracy.json").write_text(json.dumps(results, indent=1))
    print(write_report(results, args.out / "accuracy.md"))


if __name__ == "__main__":
    main()
