"""Timings behind ``benchmarks/gpu_check.py``: the real training loop, MD and uncertainty on a
device against the same machine's CPU cores, measured in one process.

Every function here runs the code a user runs: :func:`train_epochs` calls
:func:`trustpot.train.run.run_training` (the ``trustpot train`` driver, validation included in
each epoch's time), :func:`md_rate` drives ASE velocity Verlet through
:class:`trustpot.calculator.TrustpotCalculator`. Nothing is estimated: a failure is recorded as
an error row by the caller.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def train_epochs(
    train_file: Path | str,
    device: str,
    *,
    backbone: str = "painn",
    dtype: str = "float32",
    batch_size: int = 4,
    epochs: int = 3,
    max_train: int = 500,
    threads: int = 0,
    seed: int = 0,
    graphs: str = "auto",
    lr: float | None = None,
    compile: bool = False,
    batching: str = "structures",
    valid_fraction: float = 0.05,
) -> dict[str, Any]:
    """Seconds per epoch of ``trustpot train`` (default hypers and ``lr`` unless given) on
    ``device``, with ``train.cuda_graphs`` = ``graphs`` and ``train.batching`` = ``batching``
    (``structures`` by default: the same batches for every step, eager, graphed or compiled,
    as every earlier run had).

    The first epoch builds the neighbour lists (and, on a device, copies the graphs there
    once), so ``seconds`` is the median of the later epochs. Returns each epoch's seconds,
    training loss and validation force MAE (eV/Å), which a float64 comparison between devices
    checks for identity.
    """
    from trustpot.config import load_config
    from trustpot.train.run import run_training

    overrides = [
        f"data.train={train_file}",
        f"data.max_train={max_train}",
        f"data.valid_fraction={valid_fraction}",
        f"model.name={backbone}",
        f"model.dtype={dtype}",
        f"train.device={device}",
        f"train.batch_size={batch_size}",
        f"train.epochs={epochs}",
        f"train.threads={threads}",
        f"train.seed={seed}",
        "train.checkpoint_every=1000",
        f"train.cuda_graphs={graphs}",
        f"train.compile={str(compile).lower()}",
        f"train.batching={batching}",
        *([f"train.lr={lr}"] if lr is not None else []),
    ]
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_training(cfg, Path(tmp) / "run")
        wall = time.perf_counter() - t0
        with open(Path(tmp) / "run" / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
    seconds = [float(r["epoch_s"]) for r in rows]
    return {
        "device": device,
        "cuda_graphs": graphs,
        "compile": compile,
        "batching": batching,
        "dtype": dtype,
        "batch_size": batch_size,
        "frames": max_train,
        "threads": torch.get_num_threads(),
        "epochs": result.epochs,
        "epoch_seconds": seconds,
        "seconds": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "train_loss": [float(r["train_loss"]) for r in rows],
        "val_forces_mae": [float(r["val_forces_mae"]) for r in rows],
        "wall_seconds": wall,
    }


def copper_cells(n: int, seed: int = 0) -> list[Any]:
    """``n`` rattled, strained 32-atom fcc copper cells labelled by ASE's EMT (energy, forces
    and stress): periodic training data with stress labels."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from trustpot.data.reader import atoms_to_structure

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        strain = np.eye(3) + rng.normal(scale=0.01, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_forces()  # the calculator's results: energy, forces
        atoms.get_stress()
        out.append(atoms_to_structure(atoms))
    return out


def _fitted_trainer(
    sets: dict[str, list[Any]],
    weights: dict[str, tuple[float, float, float]],
    device: str,
    graphs: str,
    batch_size: int,
    epochs: int,
) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """A PaiNN (float32) trained by the :class:`~trustpot.train.trainer.Trainer` for
    ``epochs`` on one objective per entry of ``sets`` (the first also validated on a tenth of
    its frames); returns the trainer, its training sets and the metrics rows."""
    from trustpot.config import TrainConfig
    from trustpot.data.dataset import GraphDataset
    from trustpot.models.build import build_potential
    from trustpot.train.losses import LossWeights
    from trustpot.train.objectives import Objective
    from trustpot.train.trainer import Trainer

    names = list(sets)
    everything = [s for name in names for s in sets[name]]
    model = build_potential("painn", {}, everything, dtype="float32", seed=0).to(device)
    specs = model.neighbor_lists()
    train = {name: GraphDataset(sets[name], specs, model.dtype, name) for name in names}
    first = names[0]
    n_val = max(len(sets[first]) // 10, 1)
    val = {first: train[first].subset(range(n_val))}
    train[first] = train[first].subset(range(n_val, len(sets[first])))
    objectives = [Objective(name, name, LossWeights(*weights[name])) for name in names]
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, cuda_graphs=graphs, device=device)
    trainer = Trainer(model, objectives, cfg, progress=False)
    rows: list[dict[str, Any]] = []
    trainer.on_epoch = lambda _t, row: rows.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        trainer.fit(train, val, Path(tmp) / "run", log=lambda _m: None)
    return trainer, {k: trainer._on_device(v) for k, v in train.items()}, rows


def trainer_epochs(
    sets: dict[str, list[Any]],
    weights: dict[str, tuple[float, float, float]],
    device: str,
    *,
    graphs: str,
    batch_size: int = 4,
    epochs: int = 3,
    threads: int = 0,
) -> dict[str, Any]:
    """Seconds per epoch of the :class:`~trustpot.train.trainer.Trainer` (PaiNN, float32) on
    one objective per entry of ``sets`` (``weights``: its energy, force and stress weights;
    the first set is also validated), with ``train.cuda_graphs`` = ``graphs``: the cases
    ``trustpot train`` alone does not reach (stress labels, fine-tuning with replay)."""
    if threads > 0:
        torch.set_num_threads(threads)
    trainer, train, rows = _fitted_trainer(sets, weights, device, graphs, batch_size, epochs)
    first = next(iter(sets))
    seconds = [float(r["epoch_s"]) for r in rows]
    return {
        "device": device,
        "cuda_graphs": graphs,
        "graphed": trainer._static is not None,
        "batch_size": batch_size,
        "frames": {name: len(ds) for name, ds in train.items()},
        "threads": torch.get_num_threads(),
        "epoch_seconds": seconds,
        "seconds": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "train_loss": [float(r["train_loss"]) for r in rows],
        "val_forces_mae": [  # the first objective's (its name prefixes it beside others)
            float(r.get("val_forces_mae", r.get(f"{first}_val_forces_mae", float("nan"))))
            for r in rows
        ],
    }


def replay_parts(
    structures: list[Any], device: str, batch_size: int, steps: int = 200
) -> dict[str, Any]:
    """Where the time of a recorded training step goes (PaiNN, float32, after one epoch):
    the graph's replay alone, the step as the trainer runs it (plan row copy, replay, EMA),
    the host's share of that step (its loop without waiting for the device), and one
    replay under the profiler (kernels and the device's busy time)."""
    from torch.profiler import ProfilerActivity, profile

    trainer, train, _ = _fitted_trainer(
        {"main": structures}, {"main": (1.0, 10.0, 0.0)}, device, "always", batch_size, 1
    )
    graphed = trainer._static
    n = graphed.start_epoch(trainer.order.items(trainer.objectives, train, trainer.epoch))

    def timed(run: Any) -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(steps):
            run(k % n)
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        return host / steps, (time.perf_counter() - t0) / steps

    _, replay_only = timed(lambda _k: graphed.graph.replay())
    host, step = timed(lambda k: trainer._static_step(graphed, k))
    profiled: dict[str, Any] = {}
    try:  # the profiler's event API differs between versions: keep the timings regardless
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphed.graph.replay()
            torch.cuda.synchronize()
        cuda = torch.autograd.DeviceType.CUDA
        events = [e for e in prof.events() if e.device_type == cuda]
        profiled["kernels_per_replay"] = len(events)
        profiled["device_busy_seconds_per_replay"] = sum(e.device_time_total for e in events) / 1e6
    except Exception as err:
        profiled["profile_error"] = f"{type(err).__name__}: {err}"
    return {
        "batch_size": batch_size,
        "atoms_per_step": graphed.atoms_per_step,
        "replay_seconds": replay_only,
        "step_seconds": step,
        "step_host_seconds": host,
        **profiled,
    }


def md_rate(
    atoms: Any, model: Any, device: str, *, compile: bool = False, warmup: int = 20,
    steps: int = 200,
) -> dict[str, Any]:  # fmt: skip
    """MD steps per second of ``model`` through the ASE calculator on ``device``."""
    from speed_common import time_md

    from trustpot.calculator import Predictor, TrustpotCalculator

    calc = TrustpotCalculator(Predictor(model.eval(), device, batch_size=1), compile=compile)
    t0 = time.perf_counter()
    calc.calculate(atoms.copy(), ["energy", "forces"])  # compiles when asked (not timed)
    first = time.perf_counter() - t0
    row = time_md(atoms, calc, warmup, steps, seed=0, repeats=3)
    row["first_call_seconds"] = first
    return row


def sync_points(model: Any, data: Any, batches: Sequence[Any], steps: int = 4) -> list[str]:
    """Where a training step of the real :class:`~trustpot.train.trainer.Trainer` makes the
    host wait for the device (CUDA's sync debug mode), as ``file:line: message`` lines."""
    from trustpot.config import TrainConfig
    from trustpot.train.losses import LossWeights
    from trustpot.train.trainer import Objective, Trainer

    cfg = TrainConfig(epochs=1, batch_size=4)
    trainer = Trainer(model, [Objective("main", "main", LossWeights())], cfg, progress=False)
    trainer.train_mode(model)
    trainer.train_step([batches[0]])  # warm-up: allocations, lazy initialisation
    torch.cuda.synchronize()
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in batches[1 : steps + 1]:
                trainer.train_step([b])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        line = f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:120]}"
        if line not in seen:
            seen.append(line)
    return seen


def step_profile(model: Any, batch: Any, top: int = 12) -> dict[str, Any]:
    """One training step under the profiler: host time, device time, kernel launches and
    the operators that take the most host time."""
    from torch.profiler import ProfilerActivity, profile

    from trustpot.config import TrainConfig
    from trustpot.train.losses import LossWeights
    from trustpot.train.trainer import Objective, Trainer

    trainer = Trainer(
        model, [Objective("main", "main", LossWeights())], TrainConfig(epochs=1), progress=False
    )
    trainer.train_mode(model)
    for _ in range(3):
        trainer.train_step([batch])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        trainer.train_step([batch])
    torch.cuda.synchronize()
    step_seconds = (time.perf_counter() - t0) / 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step([batch])
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
    table = events.table(sort_by="self_cpu_time_total", row_limit=top)
    return {
        "step_seconds": step_seconds,
        "kernel_launches": launches,
        "device_busy_seconds": device_us / 1e6,
        "table": table,
    }
