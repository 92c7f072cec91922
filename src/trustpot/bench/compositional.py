"""Compositional out-of-domain benchmark (GMD-26): every model on every task, one report.

For each task (:mod:`trustpot.engines.compositional`) the pipeline

1. builds the task's xTB data (``OUT/<task>/data``: ``data.xyz`` and ``split.json`` with
   subsets ``train``, ``test_id``, ``test_ood``; resumable);
2. trains every model on ``split.json:train`` (10 % of it held out for validation) with the same
   wall-clock budget, seed and training options (``OUT/<task>/<model>/``, a step under the one
   reuse rule of :mod:`trustpot.train.reuse`: a finished model is reused, an unfinished one is
   resumed, one trained with other options is an error);
3. evaluates it on ``test_id`` and ``test_ood``: force MAE, force cosine similarity, force
   magnitude MAE, energy MAE and its offset part (:mod:`trustpot.bench.offsets`), the OOD/ID
   ratios, the kNN distance of every test structure from the training atoms in the model's
   embedding space (:mod:`trustpot.bench.manifold`) with its Spearman correlation to the
   structure's force MAE, and for DeepSet-MoE models the routing diagnostics
   (:func:`trustpot.models.deepset_moe.routing_statistics`) with the per-atom fragment labels;
   the result goes to ``OUT/<task>/<model>/eval.json`` (reused on a rerun);
4. writes ``OUT/compositional.json`` (every number) and ``OUT/report.md`` with PNG figures
   (:mod:`trustpot.bench.report`).

A model is a registry name with optional hyper-parameters: ``deepset-moe`` or
``deepset-moe:aggregation=mean,top_k=2``; its folder and table row use that text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trustpot.engines.compositional import SUBSETS, TASKS
from trustpot.errors import ConfigError
from trustpot.train.plateau import run_plateau

Log = Callable[[str], None]
DEFAULT_MODELS = ("schnet", "painn", "egnn", "deepset-moe")
TEST_SUBSETS = ("test_id", "test_ood")


@dataclass(frozen=True)
class BenchMode:
    """Sizes and budgets of one benchmark mode.

    Attributes:
        name: ``quick`` or ``full``.
        frames_per_molecule: MD frames per molecule (300 K), 20 % of a training molecule's
            frames go to ``test_id``.
        minutes: default training budget per model, minutes of wall clock.
        hypers: backbone hyper-parameters every model gets (model options override them).
        batch_size: structures per optimiser step.
        knn_k: neighbours of the kNN distance.
        temperatures: MD temperatures, K.
    """

    name: str
    frames_per_molecule: int
    minutes: float
    hypers: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    knn_k: int = 5
    temperatures: tuple[float, ...] = (300.0,)


MODES = {
    "quick": BenchMode("quick", 6, 0.1, {"n_features": 16, "n_layers": 2}, batch_size=4),
    "full": BenchMode("full", 40, 3.0, {"n_features": 32, "n_layers": 3}),
}


@dataclass(frozen=True)
class ModelSpec:
    """A model of the benchmark: registry name plus hyper-parameters.

    Attributes:
        text: as given (``deepset-moe:aggregation=mean``), the row label.
        name: registry name.
        hypers: hyper-parameters set by the spec.
    """

    text: str
    name: str
    hypers: dict[str, Any]

    @property
    def folder(self) -> str:
        """File-system-safe form of :attr:`text`."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.text)


def parse_model(text: str) -> ModelSpec:
    """``name`` or ``name:key=value,key=value`` -> :class:`ModelSpec`.

    Raises:
        ConfigError: unknown model or malformed option.
    """
    from trustpot.registry import canonical_name, lookup, names

    name, _, opts = text.partition(":")
    try:
        lookup("backbone", name)
    except Exception:
        raise ConfigError(
            f"unknown model '{name}'; known: {', '.join(names('backbone'))}"
        ) from None
    hypers: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"model option '{item}' of '{text}' must look like key=value")
        hypers[key.strip()] = yaml.safe_load(value)
    return ModelSpec(text, canonical_name("backbone", name), hypers)


def parse_tasks(tasks: Sequence[str]) -> list[str]:
    """Task names, ``all`` expanded, duplicates dropped; ConfigError for an unknown one."""
    out: list[str] = []
    for t in tasks:
        for name in TASKS if t == "all" else (t,):
            if name not in TASKS:
                raise ConfigError(
                    f"unknown compositional task '{name}'; known: {', '.join(TASKS)}, all"
                )
            if name not in out:
                out.append(name)
    if not out:
        raise ConfigError("no task given")
    return out


@dataclass
class BenchOptions:
    """Everything a benchmark run depends on.

    Attributes:
        tasks: task names.
        models: model specs (text form).
        mode: ``quick`` or ``full``.
        minutes: training budget per model (None: the mode's).
        seed: seed of data, splits and training.
        threads: torch threads (and xTB OpenMP threads are left to the environment).
        workers: xTB worker processes (0: in this process).
        epochs: epoch cap per model (the wall-clock budget is the usual limit).
        reference_energies: ``isolated`` (the free atoms' GFN2-xTB energies, written to
            ``OUT/<task>/data/isolated_atoms.xyz``) or ``fit`` (least squares on the training
            energies, which leaves per-molecule offsets on compositions training never had).
    """

    tasks: list[str]
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    mode: str = "full"
    minutes: float | None = None
    seed: int = 0
    threads: int = 1
    workers: int = 1
    epochs: int = 100000
    reference_energies: str = "isolated"

    def check(self) -> tuple[BenchMode, list[ModelSpec]]:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode '{self.mode}'; known: {', '.join(MODES)}")
        self.tasks = parse_tasks(self.tasks)
        specs = [parse_model(m) for m in self.models]
        if not specs:
            raise ConfigError("no model given")
        folders = [s.folder for s in specs]
        if len(set(folders)) != len(folders):
            raise ConfigError(f"models given twice: {self.models}")
        minutes = self.minutes if self.minutes is not None else MODES[self.mode].minutes
        if not minutes > 0:
            raise ConfigError(f"--minutes must be > 0, got {minutes}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.reference_energies not in ("isolated", "fit"):
            raise ConfigError(
                f"--reference-energies must be isolated or fit, got {self.reference_energies}"
            )
        return MODES[self.mode], specs


def _logger(path: Path) -> Log:
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    return log


def _train(
    spec: ModelSpec,
    mode: BenchMode,
    opts: BenchOptions,
    manifest: Path,
    run_dir: Path,
    log: Log,
    isolated: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume, or reuse) one model: a step under the one reuse rule
    (:func:`trustpot.train.reuse.run_step`) in ``run_dir``; returns its result record."""
    from trustpot.config import config_to_dict, load_config
    from trustpot.train.reuse import run_step, step_status
    from trustpot.train.run import run_training

    hypers = {**mode.hypers, **spec.hypers}
    minutes = opts.minutes if opts.minutes is not None else mode.minutes
    cfg = load_config(
        None,
        [f"model.hypers.{k}={json.dumps(v)}" for k, v in hypers.items()],
        {
            "data": {
                "train": f"{manifest}:train",
                "valid_fraction": 0.1,
                "isolated_atoms": str(isolated) if isolated is not None else "",
            },
            "model": {"name": spec.name},
            "train": {
                "max_minutes": minutes,
                "epochs": opts.epochs,
                "seed": opts.seed,
                "threads": opts.threads,
                "batch_size": mode.batch_size,
            },
        },
    )
    config = config_to_dict(cfg)
    config["train"].pop("threads", None)  # how many threads ran it does not change the model
    if step_status(run_dir, config) == "done":
        log(f"  {spec.text}: trained already, reusing {run_dir}")

    def work(folder: Path, resuming: bool) -> dict[str, Any]:
        resume = (folder / "last.ckpt").is_file()
        log(f"  {spec.text}: {'resuming' if resume else 'training'} for {minutes:g} min")
        t0 = time.perf_counter()
        result = run_training(cfg, folder, resume=resume)
        record = dataclasses.asdict(result)
        record["wall_s"] = time.perf_counter() - t0
        record["minutes"] = minutes
        record["hypers"] = hypers
        return record

    record = run_step(run_dir, config, work)
    record.pop("reused", None)
    return record


def _fragment_labels(manifest: Path) -> dict[str, list[np.ndarray]]:
    """Per subset, each frame's per-atom ``fragment_label`` [n_atoms] from ``data.xyz``."""
    from ase.io import iread

    info = json.loads(manifest.read_text())
    frames = list(iread(str(manifest.parent / info["data"]), index=":", format="extxyz"))
    return {
        name: [np.asarray(frames[i].arrays["fragment_label"], int) for i in idx]
        for name, idx in info["subsets"].items()
    }


def evaluate_model(
    checkpoint: Path,
    sets: dict[str, list[Any]],
    labels: dict[str, list[np.ndarray]],
    mode: BenchMode,
    seed: int,
) -> dict[str, Any]:
    """Every number of one trained model on one task (see the module docstring).

    Args:
        checkpoint: the model's ``best.ckpt``.
        sets: ``train``, ``test_id``, ``test_ood`` structures.
        labels: per subset, per-frame fragment labels [n_atoms].
        mode: benchmark mode (kNN k).
        seed: seed of the kNN subsampling.
    """
    from trustpot import keys as K
    from trustpot.bench.manifold import (
        atom_embeddings,
        fit_reference,
        spearman,
        structure_distances,
    )
    from trustpot.bench.offsets import energy_offset_analysis
    from trustpot.calculator import Predictor
    from trustpot.io.checkpoint import load_potential
    from trustpot.metrics.accuracy import accuracy_metrics, per_structure_force_mae

    model = load_potential(checkpoint)
    predictor = Predictor(model, batch_size=32)
    out: dict[str, Any] = {"subsets": {}, "per_structure": {}}
    train = sets["train"]
    ref = fit_reference(
        atom_embeddings(model, train), [s.numbers for s in train], k=mode.knn_k, seed=seed
    )
    out["knn"] = {"k": ref.k, "scale": {str(z): v for z, v in ref.scale.items()},
                  "train_atoms": {str(z): n for z, n in ref.n_atoms.items()},
                  "aggregation": "max over atoms (mean also stored)"}  # fmt: skip
    for name in TEST_SUBSETS:
        structures = sets[name]
        preds = predictor.predict_structures(structures, (K.ENERGY, K.FORCES), source=name)
        metrics: dict[str, Any] = accuracy_metrics(structures, preds)
        offsets = energy_offset_analysis(structures, [float(p[K.ENERGY]) for p in preds])
        metrics["energy_offset"] = offsets
        d_max, d_mean = structure_distances(
            ref, atom_embeddings(model, structures), [s.numbers for s in structures]
        )
        f_mae = per_structure_force_mae(structures, preds)
        e_err = [float(p[K.ENERGY]) - float(s.energy) for s, p in zip(structures, preds)]
        metrics["distance_max_mean"] = float(np.mean(d_max))
        metrics["distance_mean_mean"] = float(np.mean(d_mean))
        out["subsets"][name] = metrics
        out["per_structure"][name] = {
            "forces_mae": f_mae.tolist(),
            "energy_error": e_err,
            "n_atoms": [s.n_atoms for s in structures],
            "smiles": [str(s.info.get("smiles", "")) for s in structures],
            "distance_max": d_max.tolist(),
            "distance_mean": d_mean.tolist(),
        }
    ps = out["per_structure"]
    both = {k: np.concatenate([np.asarray(ps[s][k], float) for s in TEST_SUBSETS])
            for k in ("forces_mae", "distance_max", "distance_mean")}  # fmt: skip
    out["spearman"] = {
        "max_distance_vs_forces_mae": spearman(both["distance_max"], both["forces_mae"]),
        "mean_distance_vs_forces_mae": spearman(both["distance_mean"], both["forces_mae"]),
        "ood_only_max_distance_vs_forces_mae": spearman(
            np.asarray(ps["test_ood"]["distance_max"]), np.asarray(ps["test_ood"]["forces_mae"])
        ),
    }
    ident, ood = out["subsets"]["test_id"], out["subsets"]["test_ood"]
    out["ratios"] = {
        k: ood[k] / ident[k] if ident.get(k) else float("nan")
        for k in ("forces_mae", "forces_magnitude_mae", "energy_mae", "energy_mae_per_atom")
    }
    out["ratios"]["distance_max_mean"] = ood["distance_max_mean"] / ident["distance_max_mean"]
    if model.meta.backbone == "deepset-moe":
        out["routing"] = _routing(model, sets, labels)
    return out


def _routing(
    model: Any, sets: dict[str, list[Any]], labels: dict[str, list[np.ndarray]]
) -> dict[str, Any]:
    from trustpot.models.deepset_moe import router_outputs, routing_statistics

    result: dict[str, Any] = {}
    for name in ("train", *TEST_SUBSETS):
        probs, weights = router_outputs(model, sets[name])
        flat = np.concatenate(labels[name])
        result[name] = routing_statistics(weights, flat, probs).to_dict()
    return result


def _nan_to_none(value: Any) -> Any:
    """JSON-ready: NaN and infinity -> None, floats to 7 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.7g}") if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _finished_data(manifest: Path, wanted: dict[str, Any], seed: int) -> bool:
    """Whether ``manifest`` is a finished task build with these settings and no failed frame
    (the data file's SHA-256 is checked when the subsets are read)."""
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    params = info.get("params", {})
    same = all(params.get(k) == v for k, v in wanted.items()) and info.get("seed") == seed
    return same and not params.get("failed_frames")


def run_task(
    task: str,
    specs: Sequence[ModelSpec],
    mode: BenchMode,
    opts: BenchOptions,
    out: Path,
    log: Log,
) -> dict[str, Any]:
    """Data, training and evaluation of every model on one task (resumable)."""
    from trustpot.data.splits import read_data
    from trustpot.engines.compositional import build_task_data

    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "data" / "split.json"
    wanted = {
        "quick": mode.name == "quick",
        "frames_per_molecule": mode.frames_per_molecule,
        "temperatures": [float(t) for t in mode.temperatures],
    }
    if _finished_data(manifest, wanted, opts.seed):
        log(f"{task}: reusing the data in {manifest.parent}")
    else:
        log(f"{task}: building data (GFN2-xTB MD; resumes what a previous run left)")
        data = build_task_data(
            task,
            folder / "data",
            frames_per_molecule=mode.frames_per_molecule,
            temperatures=mode.temperatures,
            seed=opts.seed,
            workers=opts.workers,
            quick=mode.name == "quick",
        )
        if data.failed:
            raise ConfigError(
                f"{task}: {data.failed} frame(s) failed to label (see {data.raw}.failed.jsonl); "
                "rerun to retry them"
            )
    sets = {k: read_data(f"{manifest}:{k}") for k in SUBSETS}
    log(f"{task}: frames { ({k: len(v) for k, v in sets.items()}) }")
    isolated = None
    if opts.reference_energies == "isolated":
        from trustpot.engines.xtb import isolated_atoms

        isolated = folder / "data" / "isolated_atoms.xyz"
        numbers = {int(z) for subset in sets.values() for s in subset for z in s.numbers}
        summary = isolated_atoms(sorted(numbers), isolated, workers=0, progress=False)
        if summary.failed:
            raise ConfigError(f"{task}: an isolated atom failed to label ({isolated})")
    labels = _fragment_labels(manifest)
    info = json.loads(manifest.read_text())
    result: dict[str, Any] = {
        "task": task,
        "description": info["params"]["description"],
        "molecules": info["params"]["molecules"],
        "fragment_legend": info["params"]["fragment_legend"],
        "frames": {k: len(v) for k, v in sets.items()},
        "data_sha256": info["sha256"],
        "models": {},
    }
    for spec in specs:
        run_dir = folder / spec.folder
        record = _train(spec, mode, opts, manifest, run_dir, log, isolated)
        eval_path = run_dir / "eval.json"
        if eval_path.is_file():
            evaluation = json.loads(eval_path.read_text())
        else:
            log(f"  {spec.text}: evaluating")
            evaluation = _nan_to_none(
                evaluate_model(run_dir / "best.ckpt", sets, labels, mode, opts.seed)
            )
            eval_path.write_text(json.dumps(evaluation))
        plateau = run_plateau(run_dir / "metrics.csv", "val_loss")
        evaluation["training"] = {**record, "val_loss_tail_gain": plateau["tail_gain"]}
        result["models"][spec.text] = _nan_to_none(evaluation)
        f_id = evaluation["subsets"]["test_id"]["forces_mae"]
        f_ood = evaluation["subsets"]["test_ood"]["forces_mae"]
        log(
            f"  {spec.text}: force MAE ID {f_id:.4f} OOD {f_ood:.4f} eV/Å "
            f"(ratio {f_ood / f_id:.2f}), {record['epochs']} epochs, validation loss "
            f"{100 * plateau['tail_gain']:.1f}% lower over the last quarter"
        )
    return result


def run_compositional(out: str | Path, opts: BenchOptions) -> dict[str, Any]:
    """Run the benchmark into ``out``; returns what ``compositional.json`` holds.

    Raises:
        ConfigError: unknown task, model or mode, bad budget; before any work starts.
    """
    import platform

    import torch

    from trustpot.bench.report import write_report

    mode, specs = opts.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(opts.threads)
    log = _logger(out / "log.txt")
    t0 = time.perf_counter()
    minutes = opts.minutes if opts.minutes is not None else mode.minutes
    log(
        f"compositional benchmark ({mode.name}): tasks {', '.join(opts.tasks)}; models "
        f"{', '.join(s.text for s in specs)}; {minutes:g} min per model, {opts.threads} thread(s)"
    )
    tasks: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for task in opts.tasks:
        tasks[task] = run_task(task, specs, mode, opts, out, log)
        # written after every task, so that a long run shows (and keeps) what finished
        summary = {
            "format": "trustpot-compositional-1",
            "mode": dataclasses.asdict(mode),
            "options": dataclasses.asdict(opts),
            "minutes_per_model": minutes,
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": opts.threads,
                "cpus": os.cpu_count(),
            },
            "tasks": tasks,
            "complete": len(tasks) == len(opts.tasks),
            "wall_s": time.perf_counter() - t0,
        }
        summary = _nan_to_none(summary)
        (out / "compositional.json").write_text(json.dumps(summary, separators=(",", ":")))
        write_report(summary, out)
        log(f"wrote {out / 'compositional.json'} and {out / 'report.md'} ({len(tasks)} task(s))")
    return summary
