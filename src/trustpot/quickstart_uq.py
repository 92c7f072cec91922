"""The reliability step of ``trustpot quickstart``: perturbations, recalibration, verdicts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.data.structures import Structure


def reliability_step(
    checkpoint: Path,
    train: Sequence[Structure],
    calibration: Sequence[Structure],
    tests: dict[str, Sequence[Structure]],
    out: Path,
    minutes: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune learned perturbations from ``checkpoint``, recalibrate, evaluate every test set.

    Returns per test set the force MAE, mean force std and reliability, 95% interval coverage,
    and, on all test frames together, how well the uncertainty ranks the errors (Spearman,
    AUROC of the top-20% errors) and the share of out-of-domain frames among the 20% least
    reliable. The fit is a step under the one reuse rule (``out/fit/state.json``): reused when
    done with the same checkpoint and options, resumed when interrupted.
    """
    from trustpot.data.reader import file_sha256
    from trustpot.io.checkpoint import load_potential
    from trustpot.train.reuse import run_step
    from trustpot.uq.collect import collect
    from trustpot.uq.fit import finish
    from trustpot.uq.io import load_uq
    from trustpot.uq.perturb import fit_perturbation
    from trustpot.uq.plots import write_plots
    from trustpot.uq.report import uq_metrics

    ckpt = out / "uq.ckpt"
    n_val = max(1, len(train) // 10)
    config = {
        "checkpoint_sha256": file_sha256(checkpoint),
        "minutes": minutes,
        "seed": seed,
        "n_train": len(train),
        "n_calibration": len(calibration),
    }

    def fit(folder: Path, resuming: bool) -> dict[str, Any]:
        model = fit_perturbation(
            load_potential(checkpoint),
            list(train[n_val:]),
            list(train[:n_val]),
            max_minutes=minutes,
            epochs=100000,
            lr=1e-2,
            seed=seed,
            run_dir=folder / "run",
        )
        finish(model, out, calibration, "calibration frames", {"method": "perturb"})
        return {"checkpoint": ckpt.name, "fit_report": model.fit_report}

    run_step(out / "fit", config, fit)
    model = load_uq(ckpt)
    result: dict[str, Any] = {"method": model.kind, "sets": {}}
    names, frames = [], []
    for name, structures in tests.items():
        data = collect(model, structures, source=name, progress=False)
        m = uq_metrics(data)
        result["sets"][name] = {
            "n": data.n_structures,
            "forces_mae": m["forces_mae"],
            "mean_forces_std": float(np.mean(data["atom_force_std"])),
            "mean_reliability": m.get("mean_reliability", float("nan")),
            "coverage_95": m["forces_gaussian"]["coverage_95"],
        }
        names.extend([name] * len(structures))
        frames.extend(structures)
    data = collect(model, frames, source="all test frames", progress=False)
    ranking = uq_metrics(data)["structure"]["forces_std"]
    result["all"] = {k: ranking.get(k, float("nan")) for k in ("spearman", "auroc", "n")}
    if data.has("reliability"):
        least = np.argsort(data["reliability"])[: max(1, len(frames) // 5)]
        ood_name = list(tests)[-1]
        result["all"]["ood_share_of_least_reliable_20pct"] = float(
            np.mean([names[i] == ood_name for i in least])
        )
        result["all"]["ood_share_of_all"] = float(np.mean([n == ood_name for n in names]))
    write_plots(data, out, "perturbations, all test frames")
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def reliability_markdown(rel: dict[str, Any]) -> str:
    """The report section of the reliability step."""
    rows = [
        "| test set | frames | force MAE (meV/Å) | mean force std (meV/Å) | mean reliability "
        "| 95% interval coverage |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rel["sets"].items():
        rows.append(
            f"| {name} | {m['n']} | {1000 * m['forces_mae']:.1f} | "
            f"{1000 * m['mean_forces_std']:.1f} | {m['mean_reliability']:.2f} | "
            f"{m['coverage_95']:.2f} |"
        )
    a = rel["all"]
    share = ""
    if "ood_share_of_least_reliable_20pct" in a:
        share = (
            f" Out-of-domain frames are {100 * a['ood_share_of_all']:.0f}% of all test frames and "
            f"{100 * a['ood_share_of_least_reliable_20pct']:.0f}% of the 20% least reliable."
        )
    return f"""## How far to trust it

Learned functional perturbations were fine-tuned from the potential with the CRPS and
recalibrated on the calibration frames (`reliability/uq.ckpt`; use it like any checkpoint:
its ASE calculator also returns `forces_std` and `reliability`).

{chr(10).join(rows)}

On all test frames together the force std ranks the per-frame force errors with Spearman
{a["spearman"]:.2f} and flags the 20% largest errors with AUROC {a["auroc"]:.2f}.{share}

![error vs uncertainty](reliability/error_vs_uncertainty.png)
![calibration](reliability/calibration.png)
![risk-coverage](reliability/risk_coverage.png)
"""
