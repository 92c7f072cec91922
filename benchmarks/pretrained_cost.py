"""Cost of the pretrained models against a trustpot PaiNN, on one CPU thread, in one run.

For each model (``trustpot-mol``: a PaiNN of 96 features x 3 layers; the default-size PaiNN
of ``trustpot train`` (64 x 3, untrained: timing only); ``sevennet-0`` and ``chgnet`` when their
packages are installed) and each structure (ethanol, 9 atoms; a zeolite frame, 15 atoms; a
NaCl-water box, 160 atoms): the time of one energy + forces call through the ASE calculator
(median of repeats, after a warm-up), per atom, and velocity-Verlet MD steps per second.
Models that do not know an element of a structure get no entry there. Ratios are against the
PaiNN of the same run.

    python benchmarks/pretrained_cost.py --out benchmarks/results/pretrained_cost
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from ase import Atoms, units
from ase.build import molecule
from ase.io import read
from ase.md.verlet import VelocityVerlet

from trustpot.calculator import Predictor, TrustpotCalculator
from trustpot.data.reader import read_structures
from trustpot.io.checkpoint import load_model
from trustpot.models.build import build_potential
from trustpot.models.pretrained import package_available
from trustpot.registry import lookup

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def structures() -> dict[str, Atoms]:
    """The timed structures (labels dropped)."""
    out = {"ethanol (9 atoms)": molecule("CH3CH2OH")}
    zeolite = SHARED / "sio2_zeolites" / "train_topology_EDI.xyz.gz"
    water = SHARED / "nacl_water" / "revPBE0-D3_gen1a.xyz"
    if zeolite.is_file():
        atoms = read(zeolite, index=0)
        out[f"zeolite EDI ({len(atoms)} atoms)"] = atoms
    if water.is_file():
        atoms = read(water, index=0)
        out[f"NaCl-water ({len(atoms)} atoms)"] = atoms
    for atoms in out.values():
        atoms.calc = None
    return out


def models() -> dict[str, Any]:
    """Name -> model, PaiNN first (the reference of the ratios)."""
    data = read_structures(ROOT / "tests" / "fixtures" / "checkpoints" / "frames.xyz")
    species = [1, 6, 7, 8, 11, 14, 17]  # H C N O Na Si Cl: every timed structure
    zero = {z: 0.0 for z in species}  # untrained: reference energies do not matter for timing
    painn = build_potential("painn", {}, data, extra_species=species, reference_energies=zero)
    out: dict[str, Any] = {"PaiNN 64x3 (trustpot train default)": painn.eval()}
    out["trustpot-mol (PaiNN 96x3)"] = load_model("trustpot-mol")
    for name in ("sevennet-0", "chgnet"):
        if package_available(lookup("pretrained", name).package):
            out[name] = load_model(name)
    return out


def time_calls(calc: TrustpotCalculator, atoms: Atoms, repeats: int) -> float:
    """Median seconds of one energy + forces call (positions nudged so nothing is cached)."""
    atoms = atoms.copy()
    atoms.calc = calc
    times = []
    for k in range(repeats + 1):
        atoms.positions[0, 0] += 1e-4 * (-1) ** k
        t0 = time.perf_counter()
        atoms.get_forces()
        if k:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def md_rate(calc: TrustpotCalculator, atoms: Atoms, steps: int) -> float:
    """Velocity-Verlet steps per second (0.5 fs), after one warm-up step."""
    atoms = atoms.copy()
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(1)
    t0 = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per structure")
    parser.add_argument("--md-steps", type=int, default=10, help="timed MD steps per structure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    frames = structures()
    for name, model in models().items():
        calc = TrustpotCalculator(Predictor(model))
        for label, atoms in frames.items():
            if not set(atoms.numbers.tolist()) <= set(model.species):
                continue
            seconds = time_calls(calc, atoms, args.repeats)
            rows.append(
                {
                    "model": name,
                    "structure": label,
                    "atoms": len(atoms),
                    "ms_per_call": 1000 * seconds,
                    "ms_per_atom": 1000 * seconds / len(atoms),
                    "md_steps_per_s": md_rate(calc, atoms, args.md_steps),
                }
            )
            print(json.dumps(rows[-1]))
    reference = {r["structure"]: r for r in rows if r["model"].startswith("PaiNN")}
    for r in rows:
        ref = reference.get(r["structure"])
        r["cost_vs_painn"] = r["ms_per_call"] / ref["ms_per_call"] if ref else float("nan")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": platform.processor() or platform.machine(), "threads": 1, "rows": rows}
    (args.out / "pretrained_cost.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Cost of pretrained models against a trustpot PaiNN (1 CPU thread, one run)",
        "",
        "| model | structure | ms per call | ms per atom | x PaiNN | MD steps/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['structure']} | {r['ms_per_call']:.1f} | "
            f"{r['ms_per_atom']:.2f} | {r['cost_vs_painn']:.1f} | {r['md_steps_per_s']:.1f} |"
        )
    (args.out / "pretrained_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
