"""GPU check: every model family agrees between CPU and CUDA, and trains and evaluates on CUDA.

Not part of CI (CI has no GPU). Run on a machine with CUDA, from the repository root::

    python benchmarks/gpu_check.py --data DIR_WITH_ETHANOL --out OUT

``DIR_WITH_ETHANOL`` holds ``train.xyz`` of ``../shared/data/ethanol`` and, optionally,
``water.xyz`` (periodic water boxes, e.g. ``../shared/data/water/valid_data_3.xyz``).
Writes ``OUT/gpu_check.json``: per model the largest CPU/CUDA difference of energies (eV) and
forces (eV/Å) in float64 on 32 frames, and the time of one forward+backward pass of a 32-frame
batch on each device (same process, same machine).
"""

from __future__ import annotations

import argparse
import json
import time
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    structures = read_structures(Path(args.data) / "train.xyz")[:32]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    models: dict[str, Any] = {}
    for backbone in ("schnet", "painn", "egnn", "deepset-moe", "ace"):
        models[backbone] = build_potential(backbone, {}, structures, dtype="float64")
    models["scale-mixture (Ewald)"] = build_scale_mixture(structures, dtype="float64")
    models["perturbed painn"] = PerturbedPotential(models["painn"], n_samples=4)
    cases = [(name, model, structures) for name, model in models.items()]
    water_file = Path(args.data) / "water.xyz"
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
            rows[name] = compare(name, model, frames, torch.float64, args.device)
        except Exception as err:  # report every failure, keep checking the others
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            print(name, "FAILED", rows[name]["error"], flush=True)
    report["models"] = rows
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
