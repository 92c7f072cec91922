"""What every worker of ``speed.py`` shares: the settings, frame reading and the timers.

Imported by the trustpot, MACE and SchNetPack workers, each in its own virtual environment,
so it needs only the standard library at import time (torch, numpy and ASE inside functions).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
CUTOFF = 5.0


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark system: file under the data root, frames used, training batch size."""

    name: str
    path: str
    frames: int
    batch_size: int


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs to time the same thing as its peer."""

    datasets: tuple[DatasetSpec, ...]
    epochs: int
    md_warmup: int
    md_steps: int
    threads: int
    data_root: str
    seed: int = 0
    md_repeats: int = 1
    #: also time trustpot's PaiNN with ``TrustpotCalculator(compile=True)`` in MD
    compiled: bool = False


def set_threads(n: int) -> dict[str, int]:
    """Use ``n`` intra-op threads; returns what torch reports."""
    import torch

    torch.set_num_threads(n)
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
    }


def read_frames(settings: Settings, ds: DatasetSpec) -> list[Any]:
    """The first ``ds.frames`` frames of the dataset as ASE ``Atoms`` (labels attached)."""
    from ase.io import read

    # relative to the repository root; an absolute --data-root replaces it
    frames = read(str(REPO / settings.data_root / ds.path), index=f":{ds.frames}")
    return frames if isinstance(frames, list) else [frames]


def time_epochs(step: Callable[[Any], None], batches: Sequence[Any], epochs: int) -> dict[str, Any]:
    """One warm-up epoch, then ``epochs`` timed epochs of ``step`` over ``batches``."""
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    warmup = time.perf_counter() - t0
    times: list[float] = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        times.append(time.perf_counter() - t0)
    return {
        "seconds": statistics.median(times),
        "epoch_seconds": times,
        "warmup_epoch_seconds": warmup,
        "steps_per_epoch": len(batches),
    }


def time_md(
    atoms: Any, calc: Any, warmup: int, steps: int, seed: int, repeats: int = 1
) -> dict[str, Any]:
    """Seconds per velocity-Verlet step (0.5 fs, 300 K start) of ``calc`` on ``atoms``.

    After ``warmup`` steps, ``repeats`` segments of ``steps`` steps each start again from the
    first frame with the same velocities (``seed``: the same for every code), so that every
    code integrates the same window of time however long it is timed, and an untrained model
    has no time to blow the molecule apart. ``seconds`` is the median over the segments.
    """
    import numpy as np
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.default_rng(seed))
    Stationary(atoms)
    start = (atoms.positions.copy(), atoms.get_momenta().copy())
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(warmup)
    times: list[float] = []
    extents: list[float] = []
    for _ in range(max(1, repeats)):
        atoms.set_positions(start[0])
        atoms.set_momenta(start[1])
        t0 = time.perf_counter()
        dyn.run(steps)
        times.append((time.perf_counter() - t0) / steps)
        # how far the farthest atom is from the centre of mass (a molecule that came apart
        # would have a sparser, cheaper graph)
        com = atoms.get_center_of_mass()
        extents.append(float(np.linalg.norm(atoms.positions - com, axis=1).max()))
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "steps_per_second": 1.0 / seconds,
        "segment_seconds_per_step": times,
        "total_seconds": steps * sum(times),
        "steps": steps,
        "repeats": len(times),
        "warmup_steps": warmup,
        "final_temperature_K": float(atoms.get_temperature()),
        "final_max_extent_A": max(extents),
    }


def record(
    out: dict[str, Any],
    key: str,
    ds: DatasetSpec,
    frames: Sequence[Any],
    settings: Settings,
    model: Any,
    step: Callable[[Any], None] | None,
    batches: Sequence[Any],
    make_calc: Callable[[], Any],
) -> None:
    """Time training (``step`` over ``batches``; skipped when ``step`` is None) and MD
    (``make_calc()``) of one model, into ``out["models"][key]``."""
    row = out["models"].setdefault(key, {"train": {}, "md": {}})
    row["n_params"] = int(sum(p.numel() for p in model.parameters()))
    msg = ""
    if step is not None:
        row["train"][ds.name] = train = time_epochs(step, batches, settings.epochs)
        msg = f"{train['seconds']:.3f} s/epoch, "
    md = time_md(
        frames[0],
        make_calc(),
        settings.md_warmup,
        settings.md_steps,
        settings.seed,
        settings.md_repeats,
    )
    row["md"][ds.name] = md
    msg += f"{md['steps_per_second']:.2f} MD steps/s"
    print(f"[{out['code']}] {key} {ds.name}: {msg}", flush=True)


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def common_versions() -> dict[str, str]:
    """Versions of torch, ASE, NumPy and Python in this worker's environment."""
    import ase
    import numpy
    import torch

    return {
        "torch": torch.__version__,
        "ase": ase.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def venv_with_torch(venv: Path) -> list[str]:
    """Create ``venv`` if missing and install the CPU torch pin into it, alone (an unpinned
    torch would pull a CUDA build of several GB); returns its ``pip install`` command."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    return pip


def check_torch_pin(venv: Path, imports: str = "torch") -> None:
    """Exit unless ``import {imports}`` works in ``venv`` with torch at :data:`TORCH_PIN`."""
    check = [str(venv / "bin" / "python"), "-c", f"import {imports}; print(torch.__version__)"]
    got = subprocess.run(check, check=True, capture_output=True, text=True).stdout.strip()
    if not got.startswith(TORCH_PIN.split("==")[1]):
        raise SystemExit(f"{venv.name} ended up with torch {got}, expected {TORCH_PIN}")
