"""GPU check: every model family agrees between CPU and CUDA, and training, MD and uncertainty
are timed on CUDA against the same machine's CPU cores, in one process.

Not part of CI (CI has no GPU). Run on a machine with CUDA, from the repository root::

    python benchmarks/gpu_check.py --data-root ../shared/data --out OUT

``--data-root`` holds ``ethanol/train.xyz``, ``3bpa/train_300K.xyz`` and, optionally,
``water/valid_data_3.xyz`` (the layout of ``../shared/data``). Sections (``--sections``, all by
default), each written to ``OUT/gpu_check.json`` as soon as it ends:

* ``agreement``: per model family the largest CPU/CUDA difference of energies (eV) and forces
  (eV/Å) in float64 on 32 ethanol frames (and water boxes with Ewald and PME), and the time of
  one forward + forces pass of the 32-frame batch on each device.
* ``train``: seconds per epoch of ``trustpot train`` (``--backbone``, default PaiNN,
  default hypers, validation included) on ethanol and 3BPA, on the CPU cores
  (``--cpu-threads``) and on CUDA (eager and CUDA graph), at each ``--batch-sizes``; with
  ``--compile`` also the compiled step (``train.compile``) on both; with ``--device cpu`` the
  CPU rows alone (the compiled step's CPU benefit, on a machine without a GPU).
* ``float64``: the same runs in float64 on both devices, whose losses must agree.
* ``cases``: seconds per epoch (CPU cores, CUDA eager, CUDA graph) of the training runs that
  ``trustpot train`` on molecules does not reach: 32-atom copper cells with stress labels
  (EMT), and fine-tuning with replay (two objectives: ethanol, and 3BPA forces replayed).
* ``replay``: where a recorded step's time goes (replay alone, the trainer's step, its host
  share, kernels per replay), PaiNN on ethanol and 3BPA at each ``--batch-sizes``.
* ``md``: MD steps per second through the ASE calculator: CPU (1 thread), CUDA, CUDA compiled.
* ``uq``: what each uncertainty method costs against one model on CUDA (``uq_cost.measure``).
* ``sync``: where a CUDA training step still waits for the device (sync debug mode).
* ``profile``: one CUDA training step under the profiler (host and device time, launches).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trustpot import keys as K
from trustpot.data.graph import collate, structure_to_graph, to_device
from trustpot.data.reader import read_structures
from trustpot.models.build import build_potential, build_scale_mixture
from trustpot.models.electrostatics import ElectrostaticsConfig
from trustpot.uq.perturb import PerturbedPotential


def _timed(model: Any, g: Any, device: str, repeats: int = 5) -> tuple[dict, float]:
    g = to_device(g, device)
    out = model(g, frozenset({K.ENERGY, K.FORCES}), create_graph=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = model(g, frozenset({K.ENERGY, K.FORCES}), create_graph=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {k: v.detach().cpu() for k, v in out.items()}, (time.perf_counter() - t0) / repeats


def compare(
    name: str, model: Any, structures: list, dtype: torch.dtype, device: str
) -> dict[str, float]:
    """Largest |CPU - CUDA| of energy and forces, and the time per pass on each device."""
    g = collate([structure_to_graph(s, model.neighbor_lists(), dtype) for s in structures])
    model = model.eval()
    cpu, t_cpu = _timed(model.to("cpu"), g, "cpu")
    gpu, t_gpu = _timed(model.to(device), g, device)
    row = {
        "energy_max_abs_diff_eV": float((cpu[K.ENERGY] - gpu[K.ENERGY]).abs().max()),
        "forces_max_abs_diff_eV_A": float((cpu[K.FORCES] - gpu[K.FORCES]).abs().max()),
        "seconds_per_pass_cpu": t_cpu,
        "seconds_per_pass_device": t_gpu,
    }
    print(name, json.dumps(row), flush=True)
    return row


SECTIONS = ("agreement", "train", "cases", "replay", "float64", "md", "uq", "sync", "profile")


def agreement(root: Path, device: str) -> dict[str, Any]:
    """Float64 CPU/CUDA differences and pass times of every model family."""
    structures = read_structures(root / "ethanol" / "train.xyz")[:32]
    models: dict[str, Any] = {}
    for backbone in ("schnet", "painn", "egnn", "deepset-moe", "ace"):
        models[backbone] = build_potential(backbone, {}, structures, dtype="float64")
    models["scale-mixture (Ewald)"] = build_scale_mixture(structures, dtype="float64")
    models["perturbed painn"] = PerturbedPotential(models["painn"], n_samples=4)
    cases = [(name, model, structures) for name, model in models.items()]
    water_file = root / "water" / "valid_data_3.xyz"
    if water_file.is_file():  # periodic: 192-atom water boxes, Ewald and PME long-range branches
        water = read_structures(water_file)[:4]
        cases.append(("painn water", build_potential("painn", {}, water, "float64"), water))
        for method in ("ewald", "pme"):
            mix = build_scale_mixture(
                water, dtype="float64", electrostatics=ElectrostaticsConfig(method=method)
            )
            cases.append((f"scale-mixture water ({method})", mix, water))
    rows = {}
    for name, model, frames in cases:
        try:
            rows[name] = compare(name, model, frames, torch.float64, device)
        except Exception as err:  # report every failure, keep checking the others
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            print(name, "FAILED", rows[name]["error"], flush=True)
    return rows


TRAIN_FILES = {"ethanol": "ethanol/train.xyz", "3bpa": "3bpa/train_300K.xyz"}
#: the train section's choice beside them (``--train-sets``): structures of 15-48 atoms, for
#: the padding of static shapes (``--batching``)
ZEOLITE_FILES = tuple(
    f"sio2_zeolites/train_topology_{t}.xyz.gz"
    for t in ("ABW", "DFT", "EDI", "NAB", "OSO", "SBN", "SOD", "THO")
)


#: held out for validation per training set (each epoch's time includes validation): about
#: 50 frames of each (the zeolite files hold about 13,000 frames)
VALID_FRACTION = {"ethanol": 0.05, "3bpa": 0.05, "zeolites": 0.004}


def train_files(root: Path, names: list[str]) -> dict[str, str]:
    """The training data of each named set (``ethanol``, ``3bpa``, ``zeolites``), as
    ``data.train`` reads it (several files joined by commas)."""
    known = {**{k: (v,) for k, v in TRAIN_FILES.items()}, "zeolites": ZEOLITE_FILES}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown training sets {unknown}; known: {', '.join(known)}")
    return {name: ",".join(str(root / rel) for rel in known[name]) for name in names}


def train_section(
    root: Path, device: str, batch_sizes: list[int], cpu_threads: int, frames: int,
    backbone: str = "painn", compiled: bool = False, batching: str = "structures",
    sets: tuple[str, ...] = ("ethanol", "3bpa"),
) -> dict[str, Any]:  # fmt: skip
    """Epoch seconds of ``trustpot train`` (``backbone``) on the CPU cores and on ``device``
    (eager, CUDA graph), with ``compiled`` also the compiled step (``train.compile``) on
    both; with ``device`` "cpu" only the CPU rows. Every row batches alike (``batching``);
    ``sets`` names the training data (:func:`train_files`)."""
    from gpu_timing import train_epochs

    plan: list[tuple[str, str, str, bool]] = [("cpu", "cpu", "never", False)]
    if compiled:
        plan.append(("cpu compiled", "cpu", "never", True))
    if device != "cpu":
        plan += [(device, device, "never", False), (f"{device} graph", device, "always", False)]
        if compiled:
            plan.append((f"{device} graph compiled", device, "always", True))
    rows: dict[str, Any] = {}
    for name, path in train_files(root, list(sets)).items():
        for bs in batch_sizes:
            runs: dict[str, Any] = {}
            for label, dev, graphs, compile_ in plan:
                try:  # one failing row (a graph, a compilation) must not lose the others
                    runs[label] = train_epochs(
                        path, dev, batch_size=bs, max_train=frames, graphs=graphs,
                        backbone=backbone, compile=compile_, batching=batching,
                        threads=cpu_threads if dev == "cpu" else 0,
                        valid_fraction=VALID_FRACTION[name],
                    )  # fmt: skip
                except Exception as err:
                    runs[label] = {"error": f"{type(err).__name__}: {err}",
                                   "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
                    print(label, "FAILED", runs[label]["traceback"], flush=True)
            cpu_s = runs["cpu"]["seconds"]
            ratios = {k: cpu_s / v["seconds"] for k, v in runs.items() if "seconds" in v}
            rows[f"{name} batch {bs}"] = {**runs, "speedup": ratios, "backbone": backbone}
            print(f"train {backbone} {name} batch {bs}: " + ", ".join(
                f"{k} {v['seconds']:.3f} s/epoch" for k, v in runs.items() if "seconds" in v)
                + " | speed-up " + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()),
                flush=True)  # fmt: skip
    return rows


def cases_section(root: Path, device: str, cpu_threads: int, batch_size: int) -> dict[str, Any]:
    """Stress labels and two objectives: CPU cores, eager CUDA and the CUDA graph."""
    from gpu_timing import copper_cells, trainer_epochs

    cases = {
        "copper with stress": (
            {"main": copper_cells(200)},
            {"main": (1.0, 10.0, 5.0)},
        ),
        "ethanol with 3BPA replay": (
            {
                "main": read_structures(root / TRAIN_FILES["ethanol"])[:250],
                "replay": read_structures(root / TRAIN_FILES["3bpa"])[:250],
            },
            {"main": (1.0, 10.0, 0.0), "replay": (0.0, 1.0, 0.0)},
        ),
    }
    rows: dict[str, Any] = {}
    for name, (sets, weights) in cases.items():
        runs: dict[str, Any] = {}
        for label, dev, graphs in (("cpu", "cpu", "never"), (device, device, "never"),
                                   (f"{device} graph", device, "always")):  # fmt: skip
            try:
                runs[label] = trainer_epochs(
                    sets, weights, dev, graphs=graphs, batch_size=batch_size,
                    threads=cpu_threads if dev == "cpu" else 0,
                )  # fmt: skip
            except Exception as err:  # keep the other rows
                runs[label] = {"error": f"{type(err).__name__}: {err}",
                               "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
                print(name, label, "FAILED", runs[label]["traceback"], flush=True)
        cpu_s = runs["cpu"].get("seconds")
        ratios = {k: cpu_s / v["seconds"] for k, v in runs.items() if cpu_s and "seconds" in v}
        rows[name] = {**runs, "speedup": ratios}
        print(f"cases {name} batch {batch_size}: " + ", ".join(
            f"{k} {v['seconds']:.3f} s/epoch" for k, v in runs.items() if "seconds" in v)
            + " | speed-up " + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()),
            flush=True)  # fmt: skip
    return rows


def replay_section(root: Path, device: str, batch_sizes: list[int]) -> dict[str, Any]:
    """The recorded step's time, taken apart (see ``gpu_timing.replay_parts``)."""
    from gpu_timing import replay_parts

    rows: dict[str, Any] = {}
    for name, rel in TRAIN_FILES.items():
        structures = read_structures(root / rel)[:500]
        for bs in batch_sizes:
            rows[f"{name} batch {bs}"] = row = replay_parts(structures, device, bs)
            print(f"replay {name} batch {bs}: " + json.dumps(
                {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True)  # fmt: skip
    return rows


def float64_section(
    root: Path, device: str, cpu_threads: int, batching: str = "structures"
) -> dict[str, Any]:
    """Two float64 epochs from the same start on the CPU, on ``device`` eagerly and through
    the CUDA graph: losses and MAEs must agree. At lr 1e-3: at the default 1e-2 the first
    epochs amplify rounding (two GPU runs differ as much; see the committed results)."""
    from gpu_timing import train_epochs

    rows: dict[str, Any] = {}
    for name, rel in TRAIN_FILES.items():
        runs = {
            label: train_epochs(root / rel, dev, dtype="float64", epochs=2, max_train=100,
                                threads=cpu_threads if dev == "cpu" else 0, graphs=graphs,
                                lr=1e-3, batching=batching)
            for label, dev, graphs in (("cpu", "cpu", "never"), (device, device, "never"),
                                       (f"{device} graph", device, "always"))
        }  # fmt: skip
        ref = runs["cpu"]
        diffs = {}
        for label, run in runs.items():
            if label == "cpu":
                continue
            diffs[label] = {
                "max_rel_diff_train_loss": max(
                    abs(x - y) / abs(x) for x, y in zip(ref["train_loss"], run["train_loss"])
                ),
                "max_rel_diff_val_forces_mae": max(
                    abs(x - y) / abs(x)
                    for x, y in zip(ref["val_forces_mae"], run["val_forces_mae"])
                ),
            }
        rows[name] = {**runs, "against_cpu": diffs}
        print(f"float64 {name}: {diffs}", flush=True)
    return rows


def md_section(root: Path, device: str) -> dict[str, Any]:
    """MD steps/s of an (untrained) PaiNN on the first frame of ethanol and 3BPA."""
    from ase.io import read
    from gpu_timing import md_rate

    rows: dict[str, Any] = {}
    for name, rel in TRAIN_FILES.items():
        atoms = read(str(root / rel), index=0)
        structures = read_structures(root / rel)[:50]
        model = build_potential("painn", {}, structures, dtype="float32")
        row: dict[str, Any] = {}
        torch.set_num_threads(1)
        row["cpu 1 thread"] = md_rate(atoms, model, "cpu")
        torch.set_num_threads(CPU_THREADS)
        row[device] = md_rate(atoms, model, device)
        row[f"{device} compiled"] = md_rate(atoms, model, device, compile=True)
        rows[name] = row
        rates = ", ".join(f"{k} {v['steps_per_second']:.0f} steps/s" for k, v in row.items())
        print(f"md {name}: {rates}", flush=True)
    return rows


def uq_section(root: Path, device: str) -> dict[str, Any]:
    """Uncertainty cost ratios on ``device`` (3BPA, 20 frames)."""
    from uq_cost import measure

    structures = read_structures(root / TRAIN_FILES["3bpa"])[:20]
    return measure(structures, 5.0, 20, device=device)


def _batches(root: Path, device: str, size: int, n: int) -> tuple[Any, Any, list[Any]]:
    from trustpot.data.dataset import GraphDataset

    structures = read_structures(root / TRAIN_FILES["3bpa"])[: size * n]
    model = build_potential("painn", {}, structures, dtype="float32").to(device)
    data = GraphDataset(structures, model.neighbor_lists(), model.dtype).to(device)
    return model, data, [b for b, _ in data.batches(size)]


def sync_section(root: Path, device: str) -> list[str]:
    from gpu_timing import sync_points

    model, data, batches = _batches(root, device, 4, 6)
    return sync_points(model, data, batches)


def profile_section(root: Path, device: str) -> dict[str, Any]:
    from gpu_timing import step_profile

    rows = {}
    for size in (4, 32):
        model, _, batches = _batches(root, device, size, 1)
        rows[f"3bpa batch {size}"] = step_profile(model, batches[0])
        print(rows[f"3bpa batch {size}"]["table"], flush=True)
    return rows


CPU_THREADS = 0


def _commit() -> str:
    """The checkout's commit (empty when git cannot say)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=False)  # fmt: skip
    except OSError:
        return ""
    return done.stdout.strip()


def main() -> None:
    global CPU_THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    ap.add_argument("--batch-sizes", default="4,32", help="training batch sizes")
    ap.add_argument("--frames", type=int, default=500, help="training frames per dataset")
    ap.add_argument("--cpu-threads", type=int, default=0, help="0: every core")
    ap.add_argument("--backbone", default="painn", help="the backbone of the train section")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="train section: also the compiled step (both devices)",
    )
    ap.add_argument(
        "--batching",
        choices=("structures", "atoms"),
        default="structures",
        help="train and float64 sections: train.batching of every row (atoms: packed by size)",
    )
    ap.add_argument(
        "--train-sets",
        default="ethanol,3bpa",
        help="train section: training data, comma-separated (ethanol, 3bpa, zeolites)",
    )
    args = ap.parse_args()
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    CPU_THREADS = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
        "commit": _commit(),
        "torch": torch.__version__,
        "cpu_threads": CPU_THREADS,
        "seconds": {},
    }
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    root, dev = args.data_root, args.device
    run: dict[str, Callable[[], Any]] = {
        "agreement": lambda: agreement(root, dev),
        "train": lambda: train_section(
            root,
            dev,
            batch_sizes,
            CPU_THREADS,
            args.frames,
            args.backbone,
            args.compile,
            args.batching,
            tuple(x for x in args.train_sets.split(",") if x),
        ),
        "cases": lambda: cases_section(root, dev, CPU_THREADS, batch_sizes[0]),
        "replay": lambda: replay_section(root, dev, batch_sizes),
        "float64": lambda: float64_section(root, dev, CPU_THREADS, args.batching),
        "md": lambda: md_section(root, dev),
        "uq": lambda: uq_section(root, dev),
        "sync": lambda: sync_section(root, dev),
        "profile": lambda: profile_section(root, dev),
    }
    for name in sections:
        t0 = time.perf_counter()
        try:
            report[name] = run[name]()
        except Exception as err:  # one broken section must not lose the others
            report[name] = {"error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            print(name, "FAILED", report[name]["traceback"], flush=True)
        report["seconds"][name] = time.perf_counter() - t0
        torch.set_num_threads(CPU_THREADS)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
