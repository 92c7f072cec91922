"""Speed of trustpot's potentials against MACE (mace-torch) and SchNetPack's PaiNN, measured in
one run on one machine.

Two things are timed for each model, on the 9-atom rMD17 ethanol molecule, the 27-atom 3BPA
molecule and the 192-atom periodic water box:

* **training**: seconds per epoch of forward + forces by autograd (graph kept) + backward +
  AdamW (amsgrad) step over the whole training subset, after one warm-up epoch. Batches
  (neighbour lists included) are built once before timing, for every code.
* **MD**: seconds per step of ASE velocity Verlet (0.5 fs) through each code's ASE calculator
  on the first frame, after warm-up steps. Here each step includes the calculator's own
  neighbour list and tensor conversion, as in real use.

Each code runs in its own subprocess with ``--threads`` torch threads (2 by default):
trustpot with this interpreter, MACE with the Python of ``benchmarks/.mace-venv`` (created by
``--install-mace``), SchNetPack with that of ``benchmarks/.schnetpack-venv`` (created by
``--install-schnetpack``; the peer is described in ``schnetpack_peer.py``). Without an
environment, its code's rows say "not measured"; nothing is ever estimated. Ratios are peer
seconds / trustpot seconds, so > 1 means trustpot is faster.

Usage (from the repository root)::

    python benchmarks/speed.py --install-mace --install-schnetpack --out benchmarks/results/speed
    python benchmarks/speed.py --quick --out /tmp/speed-quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schnetpack_peer import MODELS as SCHNETPACK_MODELS
from schnetpack_peer import NOT_MEASURED as SPK_NOT_MEASURED
from schnetpack_peer import install_schnetpack, schnetpack_python
from speed_common import (
    CUTOFF,
    REPO,
    TORCH_PIN,
    DatasetSpec,
    Settings,
    check_torch_pin,
    common_versions,
    loadavg,
    read_frames,
    record,
    set_threads,
    venv_with_torch,
)

MACE_VENV = REPO / "benchmarks" / ".mace-venv"
NOT_MEASURED = "not measured (run with --install-mace)"
TRUSTPOT_MODELS = ("painn", "schnet", "egnn", "ace")
#: PaiNN through ``TrustpotCalculator(compile=True)``: MD only, full mode only (compiling takes
#: 5-45 s per system, too long for the CI's ``--quick``)
COMPILED = "painn-compiled"
#: MD with uncertainty, deep ensembles of 5 (forces_std every step): row -> (backbone,
#: ``DeepEnsemble(stacked=...)``, compiled). The default (``"auto"``: stacked for small systems
#: on a CPU), always stacked, always one by one (as before stacking), and for PaiNN stacked +
#: compiled (full mode only)
ENSEMBLES: dict[str, tuple[str, bool | str, bool]] = {
    "painn-ensemble5": ("painn", "auto", False),
    "painn-ensemble5-stacked": ("painn", True, False),
    "painn-ensemble5-one-by-one": ("painn", False, False),
    "painn-ensemble5-compiled": ("painn", True, True),
    "ace-ensemble5": ("ace", "auto", False),
    "ace-ensemble5-stacked": ("ace", True, False),
    "ace-ensemble5-one-by-one": ("ace", False, False),
}
WORKERS = ("trustpot", "mace", "schnetpack")


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


MACE_CONFIGS = (
    MaceSpec("mace-128x1o", 128, 1),
    MaceSpec("mace-64x0e", 64, 0),
    MaceSpec("mace-small", 32, 1),  # MACE-small of benchmarks/accuracy.py (32x0e + 32x1o)
)


def make_settings(args: argparse.Namespace) -> Settings:
    """Full or ``--quick`` settings; explicit flags override either."""
    if args.quick:
        # a smoke test: MACE's default size needs ~10 s per water step on 2 busy cores
        datasets = (
            DatasetSpec("ethanol", "ethanol/train.xyz", 2, 2),
            DatasetSpec("3bpa", "3bpa/train_300K.xyz", 2, 2),
            DatasetSpec("water", "water/train_data_0-2.xyz", 1, 1),
        )
        epochs, warmup, steps = 1, 1, 2
    else:
        # sized so that the whole run (MACE's default size dominates) takes about 15 minutes
        datasets = (
            DatasetSpec("ethanol", "ethanol/train.xyz", 160, 8),
            DatasetSpec("3bpa", "3bpa/train_300K.xyz", 160, 8),
            DatasetSpec("water", "water/train_data_0-2.xyz", 16, 2),
        )
        epochs, warmup, steps = 1, 10, 50
    repeats = 1 if args.quick else 3
    compiled = not args.quick
    return Settings(
        datasets=datasets,
        epochs=args.epochs if args.epochs is not None else epochs,
        md_warmup=args.md_warmup if args.md_warmup is not None else warmup,
        md_steps=args.md_steps if args.md_steps is not None else steps,
        threads=args.threads,
        data_root=args.data_root,
        md_repeats=repeats,
        compiled=compiled,
    )


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

    out: dict[str, Any] = {"code": "trustpot", "models": {}}
    out["threads"] = set_threads(settings.threads)
    out["versions"] = {"trustpot": trustpot.__version__, **common_versions()}
    out["loadavg_at_start"] = loadavg()
    weights = LossWeights()
    outputs = required_outputs(weights, has_stress=False)
    for ds in settings.datasets:
        frames = read_frames(settings, ds)
        structures = [atoms_to_structure(a) for a in frames]
        for name in TRUSTPOT_MODELS:
            model = build_potential(
                name, {"cutoff": CUTOFF}, structures, dtype="float32", seed=settings.seed
            )
            data = GraphDataset(structures, model.neighbor_lists(), model.dtype, ds.name)
            batches = [b for b, _ in data.batches(ds.batch_size) if b is not None]
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
            scale = float(model.meta.energy_scale)
            model.train()

            def step(batch: Any, model: Any = model, opt: Any = opt, scale: float = scale) -> None:
                opt.zero_grad(set_to_none=True)
                pred = model(batch, outputs, create_graph=True)
                sums, counts = loss_sums(pred, batch, weights, scale)
                torch.autograd.backward(combine(sums, counts, weights))
                opt.step()

            def calc(model: Any = model) -> Any:
                return TrustpotCalculator(Predictor(model.eval(), "cpu", batch_size=1))

            record(out, name, ds, frames, settings, model, step, batches, calc)
            if name == "painn" and settings.compiled:
                compiled = COMPILED

                def calc_compiled(
                    model: Any = model, ds: str = ds.name, at: Any = frames[0]
                ) -> Any:
                    # the first call compiles (excluded from the timing, kept in the report)
                    c = TrustpotCalculator(Predictor(model.eval()), compile=True)
                    t0 = time.perf_counter()
                    c.calculate(at.copy(), ["energy", "forces"])
                    out.setdefault("compile_seconds", {})[ds] = time.perf_counter() - t0
                    return c

                record(out, compiled, ds, frames, settings, model, None, [], calc_compiled)
            if name in ("painn", "ace"):
                ensemble_md(out, name, ds, frames, structures, settings, model)
        if ds.name == "3bpa":  # what uncertainty costs (benchmarks/uq_cost.py)
            sys.path.insert(0, str(REPO / "benchmarks"))
            from uq_cost import measure

            out["uq_cost"] = {ds.name: measure(structures, CUTOFF, min(20, len(structures)))}
    out["loadavg_at_end"] = loadavg()
    return out


def ensemble_md(
    out: dict[str, Any],
    backbone: str,
    ds: DatasetSpec,
    frames: Sequence[Any],
    structures: Sequence[Any],
    settings: Settings,
    first: Any,
) -> None:
    """MD steps/s of a 5-member ensemble of ``backbone`` (``first`` and 4 more seeds), each
    step with the ensemble's force std: stacked, one by one and (PaiNN, full mode) stacked and
    compiled."""
    from trustpot.calculator import Predictor, TrustpotCalculator
    from trustpot.models import build_potential
    from trustpot.uq.ensemble import DeepEnsemble

    members = [first.eval()] + [
        build_potential(
            backbone, {"cutoff": CUTOFF}, structures, dtype="float32", seed=settings.seed + k
        ).eval()
        for k in range(1, 5)
    ]
    for key, (name, stacked, compiled) in ENSEMBLES.items():
        if name != backbone or (compiled and not settings.compiled):
            continue
        ensemble = DeepEnsemble(members, stacked=stacked)

        def calc(ensemble: Any = ensemble, compiled: bool = compiled, at: Any = frames[0]) -> Any:
            c = TrustpotCalculator(Predictor(ensemble, "cpu", batch_size=1), compile=compiled)
            t0 = time.perf_counter()
            c.calculate(at.copy(), ["energy", "forces"])  # compiles, when compiled (not timed)
            if compiled:
                out.setdefault("compile_seconds", {})[f"{ds.name} ensemble"] = (
                    time.perf_counter() - t0
                )
            return c

        record(out, key, ds, frames, settings, ensemble, None, [], calc)
        out["models"][key].setdefault("evaluation", {})[ds.name] = ensemble.evaluation


# ---------------------------------------------------------------------------------------
# MACE worker (runs with benchmarks/.mace-venv's Python)
# ---------------------------------------------------------------------------------------
def _mace_batches(frames: Sequence[Any], z_table: Any, size: int) -> tuple[list[Any], list[Any]]:
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
        torch_geometric.Batch.from_data_list(graphs[k : k + size])
        for k in range(0, len(graphs), size)
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
        (float(a.get_potential_energy()) - sum(e0s[int(z)] for z in a.numbers)) / len(a)
        for a in frames
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
    import e3nn
    import mace
    from mace.calculators import MACECalculator

    out: dict[str, Any] = {"code": "mace", "models": {}}
    out["threads"] = set_threads(settings.threads)
    out["versions"] = {"mace-torch": mace.__version__, **common_versions()}
    out["versions"]["e3nn"] = e3nn.__version__
    out["loadavg_at_start"] = loadavg()
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

            def calc(model: Any = model) -> Any:
                # saved and loaded as a user would; weights do not change the speed
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "model.model"
                    torch.save(model.eval(), path)
                    return MACECalculator(
                        model_paths=str(path), device="cpu", default_dtype="float32"
                    )

            record(out, spec.name, ds, frames, settings, model, step, batches, calc)
    out["loadavg_at_end"] = loadavg()
    return out


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
def mace_python() -> Path:
    return MACE_VENV / "bin" / "python"


def install_mace() -> None:
    """Create ``benchmarks/.mace-venv`` with the CPU torch pin and mace-torch."""
    pip = venv_with_torch(MACE_VENV)
    # the pin again in the same command, so mace-torch's requirements cannot swap torch
    subprocess.run([*pip, "mace-torch", TORCH_PIN], check=True)
    check_torch_pin(MACE_VENV)


def run_worker(kind: str, python: Path | str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--worker kind`` in a subprocess of ``python``; its JSON, or a failure record."""
    with tempfile.TemporaryDirectory() as tmp:
        json_out = Path(tmp) / f"{kind}.json"
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", kind]
        cmd += ["--json-out", str(json_out), "--threads", str(args.threads)]
        cmd += ["--data-root", args.data_root]
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
        result: dict[str, Any] = json.loads(json_out.read_text())
        result["status"] = "measured"
        result["wall_seconds"] = time.perf_counter() - t0
        return result


def cpu_info() -> dict[str, Any]:
    """What the machine is: platform, CPU model, core count, load."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor()}
    info |= {"cpu_count": os.cpu_count(), "loadavg_at_start": loadavg()}
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    info["cpu_model"] = models[0] if models else platform.processor()
    return info


def git_commit() -> str:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass(frozen=True)
class Peer:
    """A peer model: the report side (``mace``, ``schnetpack``) and its key there."""

    side: str
    key: str
    label: str


PEERS = (
    Peer("schnetpack", SCHNETPACK_MODELS[0], "SchNetPack PaiNN (ASE list)"),
    Peer("schnetpack", SCHNETPACK_MODELS[1], "SchNetPack PaiNN (skin list)"),
    *(Peer("mace", s.name, f"MACE {s.hidden_irreps}") for s in MACE_CONFIGS),
)
#: a peer row that has no timing of this task (the skin-list row is MD only)
NOT_TIMED = "n/a (MD only)"


def compute_ratios(
    tp: dict[str, Any], sides: dict[str, dict[str, Any]], datasets: Sequence[str]
) -> dict[str, Any]:
    """ratio[task][dataset][trustpot model][peer key] = peer s / trustpot s, or why not."""
    ratios: dict[str, Any] = {}
    if tp.get("status") != "measured":
        return ratios
    for task in ("train", "md"):
        for ds in datasets:
            for name, row in tp["models"].items():
                cell = ratios.setdefault(task, {}).setdefault(ds, {}).setdefault(name, {})
                for peer in PEERS:
                    side = sides[peer.side]
                    got = side.get("models", {}).get(peer.key, {}).get(task, {}).get(ds)
                    if side.get("status") != "measured":
                        cell[peer.key] = side.get("status", "not measured")
                    else:
                        mine = row[task].get(ds)
                        cell[peer.key] = got["seconds"] / mine["seconds"] if got and mine else None
    return ratios


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables, one per task and dataset."""
    meta, tp = report["meta"], report["trustpot"]
    cpu, st = meta["cpu"], meta["settings"]
    sides = {name: report[name] for name in ("mace", "schnetpack")}
    lines = [
        "# trustpot vs MACE and SchNetPack speed",
        "",
        f"- mode: {'quick' if meta['quick'] else 'full'}; torch threads: {st['threads']}; "
        f"float32; cutoff {CUTOFF} Å; git {meta['git_commit']}",
        f"- CPU: {cpu['cpu_model']}, os.cpu_count()={cpu['cpu_count']}, {cpu['platform']}",
        f"- trustpot side: {_versions(tp)}; 1-min load average {_load(tp)}",
        f"- MACE side: {_versions(sides['mace'])}; 1-min load average {_load(sides['mace'])}",
        f"- SchNetPack side: {_versions(sides['schnetpack'])}; "
        f"1-min load average {_load(sides['schnetpack'])}",
        *(
            [
                f"- {COMPILED} and painn-ensemble5-compiled: TrustpotCalculator(compile=True), "
                "first call (compiling, not timed) "
                + ", ".join(f"{k} {v:.1f} s" for k, v in tp["compile_seconds"].items())
            ]
            if "compile_seconds" in tp
            else []
        ),
        "- ratio = peer seconds / trustpot seconds (> 1: trustpot faster; for MD the same as "
        "trustpot steps/s / peer steps/s)",
        "- painn-ensemble5, ace-ensemble5: 5 members with the force std every step (the "
        "peers' rows are single models without uncertainty): the default (stacked for small "
        "systems on a CPU), always stacked, one by one, stacked and compiled",
        "",
    ]
    for task in ("train", "md"):
        for ds in st["datasets"]:
            if task == "train":
                title = f"Training time per epoch: {ds['name']} ({ds['frames']} frame(s), "
                title += f"batch {ds['batch_size']})"
            else:
                title = f"MD, ASE velocity Verlet 0.5 fs: {ds['name']} (median of "
                title += f"{st['md_repeats']} x {st['md_steps']} steps after {st['md_warmup']})"
            heads = " | ".join(f"ratio vs {p.key}" for p in PEERS)
            lines += [f"## {title}", "", f"| model | params | time | {heads} |"]
            lines.append("|---" * (3 + len(PEERS)) + "|")
            for name in [
                *TRUSTPOT_MODELS,
                *(k for k in (COMPILED, *ENSEMBLES) if k in tp.get("models", {})),
            ]:
                if task == "train" and name in ENSEMBLES:
                    continue
                got = report["ratios"].get(task, {}).get(ds["name"], {}).get(name, {})
                cells = [_ratio_cell(r) for r in got.values()] or [""] * len(PEERS)
                lines.append(_row(f"trustpot {name}", tp, name, task, ds["name"], cells))
            for peer in PEERS:
                extra = [""] * len(PEERS)
                lines.append(_row(peer.label, sides[peer.side], peer.key, task, ds["name"], extra))
            lines.append("")
    if "uq_cost" in tp:
        from uq_cost import markdown as cost_table

        lines += ["## Inference cost of the reliability methods (x one plain PaiNN)", ""]
        lines += [cost_table(tp["uq_cost"])]
    return "\n".join(lines)


def _ratio_cell(r: float | str | None) -> str:
    if isinstance(r, float):
        return f"{r:.2f}"
    return NOT_TIMED if r is None else "not measured"


def _row(label: str, side: dict[str, Any], key: str, task: str, ds: str, extra: list[str]) -> str:
    """One table row: label, parameters, time (or why it was not measured), ratios."""
    row = side.get("models", {}).get(key)
    if side.get("status") != "measured" or not row:
        cells = ["", str(side.get("status", NOT_MEASURED))]
    elif ds not in row.get(task, {}):
        cells = [f"{row['n_params']:,}", NOT_TIMED]
    else:
        timing = row[task][ds]
        seconds = timing["seconds"]
        if task == "train":
            t = f"{seconds:.3f} s/epoch"
        else:
            t = f"{1000 * seconds:.2f} ms/step ({timing['steps_per_second']:.0f} steps/s)"
        cells = [f"{row['n_params']:,}", t]
    return "| " + " | ".join([label, *cells, *extra]) + " |"


def _load(side: dict[str, Any]) -> str:
    """1-minute load average at the start and end of a worker, e.g. ``2.1 -> 3.4``."""
    a, b = side.get("loadavg_at_start"), side.get("loadavg_at_end")
    return f"{a[0]:.1f} -> {b[0]:.1f}" if a and b else "n/a"


def _versions(side: dict[str, Any]) -> str:
    v = side.get("versions")
    return ", ".join(f"{k} {x}" for k, x in v.items()) if v else str(side.get("status"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for speed.json and speed.md")
    p.add_argument("--quick", action="store_true", help="few frames and steps (a smoke test)")
    p.add_argument(
        "--install-mace",
        action="store_true",
        help=f"create {MACE_VENV.relative_to(REPO)} with {TORCH_PIN} and mace-torch first",
    )
    p.add_argument(
        "--install-schnetpack",
        action="store_true",
        help="create benchmarks/.schnetpack-venv with torch and schnetpack 2.2.0 first",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for every code")
    p.add_argument("--epochs", type=int, help="timed epochs after the warm-up epoch")
    p.add_argument("--md-steps", type=int, help="timed MD steps")
    p.add_argument("--md-warmup", type=int, help="MD warm-up steps")
    p.add_argument(
        "--data-root", default="../shared/data", help="data folder (relative to the repo root)"
    )
    p.add_argument("--skip-mace", action="store_true", help="do not time MACE")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    if args.worker is not None:
        if args.worker == "schnetpack":
            from schnetpack_peer import schnetpack_worker

            result = schnetpack_worker(settings)
        else:
            result = (trustpot_worker if args.worker == "trustpot" else mace_worker)(settings)
        args.json_out.write_text(json.dumps(result, indent=2))
        return 0
    if args.out is None:
        raise SystemExit("--out DIR is required")
    if args.install_mace:
        install_mace()
    if args.install_schnetpack:
        install_schnetpack()
    t0 = time.perf_counter()
    cpu = cpu_info()
    tp = run_worker("trustpot", sys.executable, args)
    if args.skip_mace:
        mc: dict[str, Any] = {"status": "not measured (--skip-mace)"}
    elif mace_python().exists():
        mc = run_worker("mace", mace_python(), args)
    else:
        mc = {"status": NOT_MEASURED}
    spk: dict[str, Any] = {"status": SPK_NOT_MEASURED}
    if schnetpack_python().exists():
        spk = run_worker("schnetpack", schnetpack_python(), args)
    cpu["loadavg_at_end"] = loadavg()
    names = [d.name for d in settings.datasets]
    report = {
        "meta": {
            "quick": args.quick,
            "settings": asdict(settings),
            "cpu": cpu,
            "git_commit": git_commit(),
            "cutoff": CUTOFF,
            "dtype": "float32",
            "trustpot_models": list(TRUSTPOT_MODELS),
            "mace_configs": [asdict(s) | {"hidden_irreps": s.hidden_irreps} for s in MACE_CONFIGS],
            "peers": [asdict(p) for p in PEERS],
            "ratio_definition": "peer seconds / trustpot seconds (> 1: trustpot faster)",
            "wall_seconds": time.perf_counter() - t0,
        },
        "trustpot": tp,
        "mace": mc,
        "schnetpack": spk,
        "ratios": compute_ratios(tp, {"mace": mc, "schnetpack": spk}, names),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / "speed.md").write_text(md + "\n")
    print(md)
    return 0 if tp.get("status") == "measured" else 1


if __name__ == "__main__":
    sys.exit(main())
