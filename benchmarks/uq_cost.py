"""What uncertainty costs at inference: every reliability method against one plain model.

Each method wraps the same PaiNN (float32, default size, cutoff 5 Å) built on the benchmark
frames: a deep ensemble of 5 (its default evaluation: one stacked network for small batches
on a CPU, see ``DeepEnsemble``; and ``ensemble-one-by-one``: the same members one after the
other, as before stacking), MC dropout (16 masks in the energy
head), PROBE, learned perturbations (8 samples), LLPR (8 drawn last layers;
``llpr-distance``: each atom's feature distance from its element's training atoms, no
samples) and a shallow ensemble (8 heads). The weights are untrained: inference cost does
not depend on them. Two costs, each the ratio of the method's seconds to the plain model's,
timed alternately in this process:

- ``md``: one structure per call, as MD with a trust policy runs (energy, forces and the
  method's uncertainty: ``forces_std`` and/or ``reliability``), the median over structures;
- ``batch``: the frames in batches of 16 (the best of 3 passes).

    python benchmarks/uq_cost.py --out benchmarks/results/uq_cost            # 3BPA, ethanol
    python benchmarks/uq_cost.py --quick --out /tmp/uq-cost                   # seconds

``benchmarks/speed.py`` runs :func:`measure` in its trustpot worker, so its report gives MD steps
per second and these ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    "ensemble",
    "ensemble-one-by-one",
    "mc-dropout",
    "probe",
    "perturb",
    "llpr",
    "llpr-distance",
    "shallow-ensemble",
)


def identity_distance(structures: Sequence[Any], h: int) -> tuple[Any, Any, Any]:
    """Feature-distance statistics of the right shapes (zero means, identity whitening) for
    every element of ``structures``: the cost does not depend on their values."""
    import torch

    elements = sorted({int(z) for s in structures for z in s.numbers})
    e = len(elements)
    eye = torch.eye(h, dtype=torch.float64).expand(e, h, h).clone()
    return torch.tensor(elements), torch.zeros((e, h), dtype=torch.float64), eye


def build_wrappers(structures: Sequence[Any], cutoff: float, seed: int = 0) -> dict[str, Any]:
    """The plain potential and every method's wrapper around a model of its architecture."""
    import torch

    from trustpot.models import build_potential
    from trustpot.uq.ensemble import DeepEnsemble, MCDropout
    from trustpot.uq.lastlayer import LLPR, last_layer
    from trustpot.uq.perturb import PerturbedPotential
    from trustpot.uq.probe import Probe, ProbeHypers
    from trustpot.uq.shallow import ShallowEnsemble

    def painn(k: int, dropout: float = 0.0) -> Any:
        hypers = {"cutoff": cutoff}
        return build_potential(
            "painn", hypers, structures, "float32", seed=seed + k, head_dropout=dropout
        ).eval()

    plain = painn(0)
    members = [painn(k) for k in range(5)]
    perturbed = PerturbedPotential(painn(0), n_samples=8)
    for p in perturbed.modulator.parameters():  # non-zero, so the samples differ
        p.data.normal_(0.0, 0.05)
    h = last_layer(plain)[1].in_features
    return {
        "plain": plain,
        "ensemble": DeepEnsemble(members),
        "ensemble-one-by-one": DeepEnsemble(members, stacked=False),
        "mc-dropout": MCDropout(painn(0, dropout=0.1), n_samples=16),
        "probe": Probe(painn(0), ProbeHypers(), 0.1, 1.0),
        "perturb": perturbed,
        "llpr": LLPR(painn(0), 1e-4 * torch.eye(h, dtype=torch.float64), n_samples=8),
        "llpr-distance": LLPR(
            painn(0),
            1e-4 * torch.eye(h, dtype=torch.float64),
            force_std="distance",
            distance=identity_distance(structures, h),
        ),
        "shallow-ensemble": ShallowEnsemble(painn(0), n_heads=8, spread=0.1),
    }


def _outputs(model: Any) -> list[str]:
    from trustpot import keys as K

    have = model.supported_outputs()
    return [K.ENERGY, K.FORCES, *sorted(have & {K.FORCES_STD, K.RELIABILITY})]


def _seconds(predictor: Any, structures: Sequence[Any], outputs: list[str]) -> float:
    t0 = time.perf_counter()
    predictor.predict_structures(list(structures), outputs, source="timing")
    return time.perf_counter() - t0


def md_cost(model: Any, plain: Any, structures: Sequence[Any], repeats: int = 3) -> float:
    """Median over ``structures`` of (seconds of ``model``) / (seconds of ``plain``), two
    :class:`~trustpot.calculator.Predictor`, one structure per call as MD runs, each timed
    ``repeats`` times alternately (the best of each, after a warm-up); the model is asked for
    its uncertainty (``forces_std`` and/or ``reliability``) as MD with a trust policy asks."""
    m_out, p_out = _outputs(model), _outputs(plain)
    ratios = []
    for s in structures:
        _seconds(model, [s], m_out)  # warm-up for this size
        _seconds(plain, [s], p_out)
        best = {"m": math.inf, "p": math.inf}
        for _ in range(repeats):
            best["m"] = min(best["m"], _seconds(model, [s], m_out))
            best["p"] = min(best["p"], _seconds(plain, [s], p_out))
        ratios.append(best["m"] / best["p"])
    return statistics.median(ratios)


def measure(
    structures: Sequence[Any], cutoff: float, md_frames: int = 20, device: str = "cpu"
) -> dict[str, Any]:
    """Cost ratios of every method (see the module docstring) on ``structures``, every model
    on ``device``."""
    from trustpot.calculator import Predictor

    models = build_wrappers(structures, cutoff)
    predictors = {k: Predictor(m, device, batch_size=16) for k, m in models.items()}
    rows: dict[str, Any] = {}
    plain = predictors["plain"]
    for method in METHODS:
        model = predictors[method]
        batch = {"m": math.inf, "p": math.inf}
        for _ in range(3):
            batch["m"] = min(batch["m"], _seconds(model, structures, _outputs(model)))
            batch["p"] = min(batch["p"], _seconds(plain, structures, _outputs(plain)))
        rows[method] = {
            "md": md_cost(model, plain, structures[:md_frames]),
            "batch": batch["m"] / batch["p"],
            "outputs": _outputs(model),
        }
    return {
        "frames": len(structures),
        "md_frames": min(md_frames, len(structures)),
        "device": device,
        "rows": rows,
    }


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One table: method x dataset, MD and batched cost ratios."""
    names = list(results)
    head = "| method | " + " | ".join(f"{n}: MD | {n}: batch of 16" for n in names) + " |\n"
    head += "|---|" + "---|---|" * len(names) + "\n"
    lines = []
    for method in METHODS:
        cells = []
        for n in names:
            r = results[n]["rows"][method]
            cells += [f"{r['md']:.2f}x", f"{r['batch']:.2f}x"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="8 frames of one dataset")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args(argv)
    import torch
    from ase.io import read

    from trustpot.data.reader import atoms_to_structure

    torch.set_num_threads(args.threads)
    data = {"3bpa": "3bpa/train_300K.xyz", "ethanol": "ethanol/test_MD.xyz"}
    if args.quick:
        data = {"3bpa": data["3bpa"]}
    n = 8 if args.quick else 48
    results = {}
    t0 = time.perf_counter()
    for name, rel in data.items():
        path = Path(args.data_root) / rel
        if not path.is_file():
            print(f"skipping {name}: {path} is absent", file=sys.stderr)
            continue
        frames = [atoms_to_structure(a) for a in read(path, f":{n}")]
        results[name] = measure(frames, cutoff=5.0, md_frames=4 if args.quick else 20)
        print(
            f"{name}: "
            + json.dumps({k: round(v["md"], 2) for k, v in results[name]["rows"].items()})
        )
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "threads": args.threads,
        "frames": n,
        "platform": platform.platform(),
        "wall_s": time.perf_counter() - t0,
    }
    (args.out / "uq_cost.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=1)
    )
    text = (
        "# Inference cost of the reliability methods (ratio to one plain model)\n\n"
        f"PaiNN (default size, float32, cutoff 5 Å), {args.threads} thread(s), {n} frames per "
        "dataset; MD: one structure per call with the method's uncertainty, median over "
        "structures; batch: batches of 16.\n\n" + (markdown(results) if results else "no data\n")
    )
    (args.out / "uq_cost.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
