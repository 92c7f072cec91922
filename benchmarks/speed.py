"""Speed of trustpot's potentials against MACE (mace-torch), measured in one run on one machine.

Two things are timed for each model, on the 27-atom 3BPA molecule and the 192-atom periodic
water box:

* **training**: seconds per epoch of forward + forces by autograd (graph kept) + backward +
  AdamW (amsgrad) step over the whole training subset, after one warm-up epoch. Batches
  (neighbour lists included) are built once before timing, for both codes.
* **MD**: seconds per step of ASE velocity Verlet (0.5 fs) through each code's ASE calculator
  on the first frame, after warm-up steps. Here each step includes the calculator's own
  neighbour list and tensor conversion, as in real use.

Each code runs in its own subprocess with ``--threads`` torch threads (2 by default):
trustpot with this interpreter, MACE with the Python of ``benchmarks/.mace-venv`` (created by
``--install-mace``). Without that environment, MACE's rows say "not measured"; nothing is
ever estimated. Ratios are MACE seconds / trustpot seconds, so > 1 means trustpot is faster.

Usage (from the repository root)::

    python benchmarks/speed.py --install-mace --out benchmarks/results/speed
    python benchmarks/speed.py --quick --out /tmp/speed-quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MACE_VENV = REPO / "benchmarks" / ".mace-venv"
TORCH_PIN = "torch==2.13.0"
NOT_MEASURED = "not measured (run with --install-mace)"
TRUSTPOT_MODELS = ("painn", "schnet", "egnn")
CUTOFF = 5.0


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark system: file under the data root, frames used, training batch size."""

    name: str
    path: str
    frames: int
    batch_size: int


@dataclass(frozen=True)
class MaceSpec:
    """A MACE size: channels and max_L of the hidden irreps (the rest is MACE's default)."""

    name: str
    channels: int
    max_L: int

    @property
    def hidden_irreps(self) -> str:
        parity = ["0e", "1o", "2e", "3o"]
        return " + ".join(f"{self.channels}x{parity[lv]}" for lv in range(self.max_L + 1))


MACE_CONFIGS = (MaceSpec("mace-128x1o", 128, 1), MaceSpec("mace-64x0e", 64, 0))


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_settings(args: argparse.Namespace) -> Settings:
    """Full or ``--quick`` settings; explicit flags override either."""
    if args.quick:
        datasets = (
            DatasetSpec("3bpa", "3bpa/train_300K.xyz", 16, 8),
            DatasetSpec("water", "water/train_data_0-2.xyz", 2, 2),
        )
        epochs, warmup, steps = 1, 3, 10
    else:
        datasets = (
            DatasetSpec("3bpa", "3bpa/train_300K.xyz", 400, 8),
            DatasetSpec("water", "water/train_data_0-2.xyz", 64, 2),
        )
        epochs, warmup, steps = 2, 20, 200
    return Settings(
        datasets=datasets,
        epochs=args.epochs if args.epochs is not None else epochs,
        md_warmup=args.md_warmup if args.md_warmup is not None else warmup,
        md_steps=args.md_steps if args.md_steps is not None else steps,
        threads=args.threads,
        data_root=args.data_root,
    )


# ---------------------------------------------------------------------------------------
# helpers shared by both workers (they import only torch, numpy and ASE)
# ---------------------------------------------------------------------------------------
def set_threads(n: int) -> dict[str, int]:
    """Use ``n`` intra-op threads; returns what torch reports."""
    import torch

    torch.set_num_threads(n)
    return {"num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads()}


def read_frames(settings: Settings, ds: DatasetSpec) -> list[Any]:
    """The first ``ds.frames`` frames of the dataset as ASE ``Atoms`` (labels attached)."""
    from ase.io import read

    path = (REPO / settings.data_root / ds.path) if not Path(settings.data_root).is_absolute() \
        else Path(settings.data_root) / ds.path
    frames = read(str(path), index=f":{ds.frames}")
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


def time_md(atoms: Any, calc: Any, warmup: int, steps: int, seed: int) -> dict[str, Any]:
    """Seconds per velocity-Verlet step (0.5 fs, 300 K start) after ``warmup`` steps."""
    import numpy as np
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.default_rng(seed))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(warmup)
    t0 = time.perf_counter()
    dyn.run(steps)
    elapsed = time.perf_counter() - t0
    return {
        "seconds": elapsed / steps,
        "steps_per_second": steps / elapsed,
        "total_seconds": elapsed,
        "steps": steps,
        "warmup_steps": warmup,
        "final_temperature_K": float(atoms.get_temperature()),
    }


def n_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------
# trustpot worker
# ---------------------------------------------------------------------------------------
def trustpot_worker(settings: Settings) -> dict[str, Any]:
    """Time trustpot's PaiNN, SchNet and EGNN (default hypers, float32)."""
    import torch

    import trustpot
    from trustpot.calculator import Predictor, TrustpotCalculator
    from trustpot.data.dataset import GraphDataset
    from trustpot.data.reader import atoms_to_structure
    from trustpot.models import build_potential
    from trustpot.train.losses import LossWeights, combine, loss_sums, required_outputs

    out: dict[str, Any] = {"threads": set_threads(settings.threads), "models": {}}
    out["versions"] = {"trustpot": trustpot.__version__, **_common_versions()}
    weights = LossWeights()
    outputs = required_outputs(weights, has_stress=False)
    for ds in settings.datasets:
        frames = read_frames(settings, ds)
        structures = [atoms_to_structure(a) for a in frames]
        for name in TRUSTPOT_MODELS:
            model = build_potential(name, {"cutoff": CUTOFF}, structures, dtype="float32", seed=settings.seed)
            data = GraphDataset(structures, model.neighbor_lists(), model.dtype, ds.name)
            batches = [b for b, _ in data.batches(ds.batch_size) if b is not None]
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
            scale = float(model.energy_scale)
            model.train()

            def step(batch: Any, model: Any = model, opt: Any = opt, scale: float = scale) -> None:
                opt.zero_grad(set_to_none=True)
                pred = model(batch, outputs, create_graph=True)
                sums, counts = loss_sums(pred, batch, weights, scale)
                combine(sums, counts, weights).backward()
                opt.step()

            row = out["models"].setdefault(name, {"train": {}, "md": {}})
            row["n_params"] = n_params(model)
            row["train"][ds.name] = time_epochs(step, batches, settings.epochs)
            calc = TrustpotCalculator(Predictor(model.eval(), "cpu", batch_size=1))
            row["md"][ds.name] = time_md(frames[0], calc, settings.md_warmup, settings.md_steps, settings.seed)
            print(f"[trustpot] {name} {ds.name}: {row['train'][ds.name]['seconds']:.3f} s/epoch, "
                  f"{row['md'][ds.name]['steps_per_second']:.2f} MD steps/s", flush=True)
    return out


# ---------------------------------------------------------------------------------------
# MACE worker (runs with benchmarks/.mace-venv's Python)
# ---------------------------------------------------------------------------------------
def _mace_batches(frames: Sequence[Any], z_table: Any, batch_size: int) -> tuple[list[Any], list[Any]]:
    """MACE configurations and pre-built batches of ``frames`` (float32 default dtype)."""
    from mace import data as mace_data
    from mace.tools import torch_geometric

    keyspec = mace_data.KeySpecification(
        info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"}
    )
    configs = []
    for atoms in frames:
        a = atoms.copy()
        a.info["REF_energy"] = float(atoms.get_potential_energy())
        a.arrays["REF_forces"] = atoms.get_forces()
        configs.append(mace_data.config_from_atoms(a, key_specification=keyspec))
    graphs = [mace_data.AtomicData.from_config(c, z_table=z_table, cutoff=CUTOFF) for c in configs]
    batches = [
        torch_geometric.Batch.from_data_list(graphs[k : k + batch_size])
        for k in range(0, len(graphs), batch_size)
    ]
    return configs, batches


def build_mace(spec: MaceSpec, frames: Sequence[Any], batch_size: int) -> tuple[Any, list[Any]]:
    """A ScaleShiftMACE of MACE's default architecture with ``spec``'s hidden irreps.

    Defaults follow ``mace_run_train --model MACE``: first interaction
    RealAgnosticInteractionBlock, then RealAgnosticResidualInteractionBlock, max_ell 3,
    correlation 3, 2 interactions, 8 Bessel functions, polynomial cutoff 5, MLP 16x0e,
    radial MLP [64, 64, 64], SiLU gate. E0s are MACE's least-squares averages of the data.
    """
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules
    from mace.data.utils import compute_average_E0s
    from mace.tools import AtomicNumberTable

    zs = sorted({int(z) for a in frames for z in a.numbers})
    z_table = AtomicNumberTable(zs)
    configs, batches = _mace_batches(frames, z_table, batch_size)
    e0s = compute_average_E0s(configs, z_table)
    atomic_energies = np.array([e0s[z] for z in zs])
    edges = sum(int(b.edge_index.shape[1]) for b in batches)
    avg_neighbors = edges / sum(len(a) for a in frames)
    forces = np.concatenate([a.get_forces().ravel() for a in frames])
    residual = [
        (float(a.get_potential_energy()) - sum(e0s[int(z)] for z in a.numbers)) / len(a) for a in frames
    ]
    model = modules.ScaleShiftMACE(
        r_max=CUTOFF,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=2,
        num_elements=len(zs),
        hidden_irreps=o3.Irreps(spec.hidden_irreps),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=atomic_energies,
        avg_num_neighbors=avg_neighbors,
        atomic_numbers=zs,
        correlation=3,
        gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64],
        radial_type="bessel",
        atomic_inter_scale=float(np.sqrt(np.mean(forces**2))),
        atomic_inter_shift=float(np.mean(residual)),
    )
    return model.float(), batches


def mace_worker(settings: Settings) -> dict[str, Any]:
    """Time the MACE sizes of :data:`MACE_CONFIGS` (float32)."""
    import torch

    torch.set_default_dtype(torch.float32)
    import mace
    from mace.calculators import MACECalculator

    out: dict[str, Any] = {"threads": set_threads(settings.threads), "models": {}}
    out["versions"] = {"mace-torch": mace.__version__, **_common_versions()}
    import e3nn

    out["versions"]["e3nn"] = e3nn.__version__
    for ds in settings.datasets:
        frames = read_frames(settings, ds)
        for spec in MACE_CONFIGS:
            torch.manual_seed(settings.seed)
            model, batches = build_mace(spec, frames, ds.batch_size)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
            scale = float(model.scale_shift.scale.reshape(-1)[0])
            model.train()

            def step(batch: Any, model: Any = model, opt: Any = opt, scale: float = scale) -> None:
                opt.zero_grad(set_to_none=True)
                pred = model(batch.to_dict(), training=True, compute_force=True)
                n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(pred["energy"].dtype)
                de = (pred["energy"] - batch.energy) / n_atoms / scale
                df = (pred["forces"] - batch.forces) / scale
                loss = (de**2).mean() + 10.0 * (df**2).mean()
                loss.backward()
                opt.step()

            row = out["models"].setdefault(spec.name, {"train": {}, "md": {}})
            row["n_params"] = n_params(model)
            row["hidden_irreps"] = spec.hidden_irreps
            row["train"][ds.name] = time_epochs(step, batches, settings.epochs)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.model"
                torch.save(model.eval(), path)
                calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float32")
            row["md"][ds.name] = time_md(frames[0], calc, settings.md_warmup, settings.md_steps, settings.seed)
            print(f"[mace] {spec.name} {ds.name}: {row['train'][ds.name]['seconds']:.3f} s/epoch, "
                  f"{row['md'][ds.name]['steps_per_second']:.2f} MD steps/s", flush=True)
    return out


def _common_versions() -> dict[str, str]:
    import ase
    import numpy
    import torch

    return {"torch": torch.__version__, "ase": ase.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
def mace_python() -> Path:
    return MACE_VENV / "bin" / "python"


def install_mace() -> None:
    """Create ``benchmarks/.mace-venv`` with the CPU torch pin and mace-torch."""
    py = mace_python()
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(MACE_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    # the pin again in the same command, so mace-torch's requirements cannot swap torch
    subprocess.run([*pip, "mace-torch", TORCH_PIN], check=True)
    got = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    if not got.startswith(TORCH_PIN.split("==")[1]):
        raise SystemExit(f"mace venv ended up with torch {got}, expected {TORCH_PIN}")


def run_worker(kind: str, python: Path | str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--worker kind`` in a subprocess of ``python``; its JSON, or a failure record."""
    with tempfile.TemporaryDirectory() as tmp:
        json_out = Path(tmp) / f"{kind}.json"
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", kind, "--json-out", str(json_out),
               "--threads", str(args.threads), "--data-root", args.data_root]
        for flag in ("epochs", "md_warmup", "md_steps"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0 or not json_out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            sys.stderr.write("\n".join(tail) + "\n")
            return {"status": f"failed (exit {proc.returncode}): " + (tail[-1] if tail else "")}
        result = json.loads(json_out.read_text())
        result["status"] = "measured"
        result["wall_seconds"] = time.perf_counter() - t0
        return result


def cpu_info() -> dict[str, Any]:
    """What the machine is: platform, CPU model, core count, load."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compute_ratios(tp: dict[str, Any], mc: dict[str, Any], datasets: Sequence[str]) -> dict[str, Any]:
    """ratio[task][dataset][trustpot model][mace config] = MACE s / trustpot s."""
    ratios: dict[str, Any] = {}
    if tp.get("status") != "measured":
        return ratios
    for task in ("train", "md"):
        for ds in datasets:
            for name, row in tp["models"].items():
                cell = ratios.setdefault(task, {}).setdefault(ds, {}).setdefault(name, {})
                for spec in MACE_CONFIGS:
                    peer = mc.get("models", {}).get(spec.name, {}).get(task, {}).get(ds)
                    cell[spec.name] = (
                        peer["seconds"] / row[task][ds]["seconds"] if mc.get("status") == "measured" and peer
                        else mc.get("status", NOT_MEASURED)
                    )
    return ratios


def _fmt_seconds(task: str, seconds: float) -> str:
    return f"{seconds:.3f} s/epoch" if task == "train" else f"{1000 * seconds:.1f} ms/step"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables, one per task and dataset."""
    meta = report["meta"]
    tp, mc, ratios = report["trustpot"], report["mace"], report["ratios"]
    lines = [
        "# trustpot vs MACE speed", "",
        f"- mode: {'quick' if meta['quick'] else 'full'}; torch threads: {meta['settings']['threads']}; "
        f"float32; cutoff {CUTOFF} Å; git {meta['git_commit']}",
        f"- CPU: {meta['cpu'].get('cpu_model', meta['cpu']['processor'])}, os.cpu_count()={meta['cpu']['cpu_count']}, "
        f"{meta['cpu']['platform']}",
        f"- trustpot side: {_versions(tp)}", f"- MACE side: {_versions(mc)}",
        "- ratio = MACE seconds / trustpot seconds (> 1: trustpot faster)", "",
    ]
    for task, title in (("train", "Training time per epoch"), ("md", "MD (ASE velocity Verlet, 0.5 fs)")):
        for ds in meta["settings"]["datasets"]:
            what = (f"{ds['frames']} frames, batch {ds['batch_size']}" if task == "train"
                    else f"{meta['settings']['md_steps']} steps after {meta['settings']['md_warmup']}")
            lines += [f"## {title}: {ds['name']} ({what})", ""]
            header = "| model | params | time | " + " | ".join(f"ratio vs {s.name}" for s in MACE_CONFIGS) + " |"
            lines += [header, "|" + "---|" * (3 + len(MACE_CONFIGS))]
            for name in TRUSTPOT_MODELS:
                if tp.get("status") != "measured":
                    lines.append(f"| trustpot {name} | | {tp.get('status')} |" + " |" * len(MACE_CONFIGS))
                    continue
                row = tp["models"][name]
                cells = []
                for spec in MACE_CONFIGS:
                    r = ratios[task][ds["name"]][name][spec.name]
                    cells.append(f"{r:.2f}" if isinstance(r, float) else "n/a")
                lines.append(f"| trustpot {name} | {row['n_params']:,} | "
                             f"{_fmt_seconds(task, row[task][ds['name']]['seconds'])} | " + " | ".join(cells) + " |")
            for spec in MACE_CONFIGS:
                row = mc.get("models", {}).get(spec.name)
                if mc.get("status") == "measured" and row:
                    t = _fmt_seconds(task, row[task][ds["name"]]["seconds"])
                    lines.append(f"| MACE {spec.hidden_irreps} | {row['n_params']:,} | {t} |" + " |" * len(MACE_CONFIGS))
                else:
                    lines.append(f"| MACE {spec.hidden_irreps} | | {mc.get('status', NOT_MEASURED)} |"
                                 + " |" * len(MACE_CONFIGS))
            lines.append("")
    return "\n".join(lines)


def _versions(side: dict[str, Any]) -> str:
    v = side.get("versions")
    return ", ".join(f"{k} {x}" for k, x in v.items()) if v else str(side.get("status"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for speed.json and speed.md")
    p.add_argument("--quick", action="store_true", help="few frames and steps (a smoke test)")
    p.add_argument("--install-mace", action="store_true",
                   help=f"create {MACE_VENV.relative_to(REPO)} with {TORCH_PIN} and mace-torch first")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both codes")
    p.add_argument("--epochs", type=int, help="timed epochs after the warm-up epoch")
    p.add_argument("--md-steps", type=int, help="timed MD steps")
    p.add_argument("--md-warmup", type=int, help="MD warm-up steps")
    p.add_argument("--data-root", default="../shared/data", help="data folder (relative to the repo root)")
    p.add_argument("--skip-mace", action="store_true", help="time trustpot only")
    p.add_argument("--worker", choices=("trustpot", "mace"), help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    if args.worker is not None:
        fn = trustpot_worker if args.worker == "trustpot" else mace_worker
        result = fn(settings)
        args.json_out.write_text(json.dumps(result, indent=2))
        return 0
    if args.out is None:
        raise SystemExit("--out DIR is required")
    if args.install_mace:
        install_mace()
    t0 = time.perf_counter()
    cpu = cpu_info()
    tp = run_worker("trustpot", sys.executable, args)
    if args.skip_mace:
        mc: dict[str, Any] = {"status": "not measured (--skip-mace)"}
    elif mace_python().exists():
        mc = run_worker("mace", mace_python(), args)
    else:
        mc = {"status": NOT_MEASURED}
    if hasattr(os, "getloadavg"):
        cpu["loadavg_at_end"] = list(os.getloadavg())
    names = [d.name for d in settings.datasets]
    report = {
        "meta": {
            "quick": args.quick, "settings": settings.to_dict(), "cpu": cpu, "git_commit": git_commit(),
            "cutoff": CUTOFF, "dtype": "float32", "trustpot_models": list(TRUSTPOT_MODELS),
            "mace_configs": [asdict(s) | {"hidden_irreps": s.hidden_irreps} for s in MACE_CONFIGS],
            "ratio_definition": "MACE seconds / trustpot seconds (> 1: trustpot faster)",
            "wall_seconds": time.perf_counter() - t0,
        },
        "trustpot": tp,
        "mace": mc,
        "ratios": compute_ratios(tp, mc, names),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / "speed.md").write_text(md + "\n")
    print(md)
    return 0 if tp.get("status") == "measured" else 1


if __name__ == "__main__":
    sys.exit(main())
