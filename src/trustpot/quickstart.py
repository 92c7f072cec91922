"""``trustpot quickstart``: the main job end to end on data made here, with no download.

1. GFN2-xTB Langevin MD of a small molecule (ethanol by default) at 300 K (training and
   in-domain test) and at a hotter temperature (out of domain), labelled as it runs;
2. a split manifest of the 300 K frames (train 70% / calibration 10% / test 20%);
3. a potential trained for a few minutes;
4. in-domain and out-of-domain evaluation;
5. reliability: learned functional perturbations fine-tuned from the potential with the CRPS,
   recalibrated on the calibration frames, then asked how far to trust each test frame;
6. ``report.md`` with the numbers and plots.

Every step resumes: rerunning the command reuses finished data, a finished training run and
finished evaluations.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.data.structures import Structure
from trustpot.metrics.accuracy import per_structure_force_mae


@dataclass(frozen=True)
class QuickstartOptions:
    """What the quickstart does.

    Attributes:
        smiles: the molecule.
        frames: frames sampled at 300 K (70% train, 10% calibration, 20% in-domain test).
        ood_frames: frames sampled at ``ood_temperature``.
        ood_temperature: K, the out-of-domain condition.
        model: backbone.
        minutes: training budget.
        uq_minutes: budget of the perturbation fine-tuning (reliability step).
        workers: xTB worker processes.
        seed: seed of sampling, split and training.
    """

    smiles: str = "CCO"
    frames: int = 300
    ood_frames: int = 100
    ood_temperature: float = 800.0
    model: str = "painn"
    minutes: float = 4.0
    uq_minutes: float = 1.0
    workers: int = 2
    seed: int = 0


def run_quickstart(
    out: str | Path, opts: QuickstartOptions = QuickstartOptions()
) -> dict[str, Any]:
    """Run the whole job into folder ``out``; returns the summary written to ``summary.json``."""
    from trustpot.calculator import Predictor
    from trustpot.config import config_to_dict, load_config
    from trustpot.data.reader import read_structures
    from trustpot.data.splits import make_split, read_data, write_manifest
    from trustpot.engines.xtb import generate_molecules
    from trustpot.evaluate import evaluate_file
    from trustpot.train.reuse import run_step, step_status
    from trustpot.train.run import run_training

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    in_domain = out / "data_300K.xyz"
    ood = out / f"data_{opts.ood_temperature:g}K.xyz"
    print(
        f"[1/6] sampling {opts.smiles} with GFN2-xTB: {opts.frames} frames at 300 K, "
        f"{opts.ood_frames} at {opts.ood_temperature:g} K",
        flush=True,
    )
    generate_molecules(
        [opts.smiles], [300.0], opts.frames, in_domain, seed=opts.seed, workers=opts.workers
    )
    generate_molecules(
        [opts.smiles],
        [opts.ood_temperature],
        opts.ood_frames,
        ood,
        seed=opts.seed + 1,
        workers=opts.workers,
    )
    timings["data_s"] = time.perf_counter() - t0

    print("[2/6] splitting the 300 K frames 70/10/20 (manifest split.json)", flush=True)
    manifest = out / "split.json"
    structures = read_structures(in_domain)
    n = len(structures)
    n_cal, n_test = max(2, round(0.1 * n)), max(2, round(0.2 * n))
    sizes = {"train": n - n_cal - n_test, "calibration": n_cal, "test": n_test}
    subsets = make_split(structures, "random", opts.seed, sizes=sizes)
    write_manifest(in_domain, subsets, "random", opts.seed, sizes, manifest)

    run_dir = out / "train"
    t1 = time.perf_counter()
    cfg = load_config(
        overrides=[
            f"data.train={manifest}:train",
            "data.valid_fraction=0.1",
            f"model.name={opts.model}",
            f"train.max_minutes={opts.minutes}",
            f"train.seed={opts.seed}",
        ]
    )
    train_config = config_to_dict(cfg)
    if step_status(run_dir, train_config) == "done":
        print("[3/6] training: done already", flush=True)
    else:
        print(f"[3/6] training {opts.model} for {opts.minutes:g} min", flush=True)

    def train_step(folder: Path, resuming: bool) -> dict[str, Any]:
        result = run_training(cfg, folder, resume=(folder / "last.ckpt").exists())
        return dataclasses.asdict(result)

    run_step(run_dir, train_config, train_step)
    timings["train_s"] = time.perf_counter() - t1

    print(
        f"[4/6] evaluating in domain (300 K) and out of domain ({opts.ood_temperature:g} K)",
        flush=True,
    )
    predictor = Predictor.from_checkpoint(run_dir / "best.ckpt")
    results: dict[str, Any] = {}
    per_frame: dict[str, np.ndarray] = {}
    for name, spec in (
        ("in_domain_300K", f"{manifest}:test"),
        (f"out_of_domain_{opts.ood_temperature:g}K", str(ood)),
    ):
        data = read_data(spec)
        metrics = evaluate_file(predictor, data, out / f"eval_{name}", source=spec)
        results[name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        per_frame[name] = per_structure_force_mae(data, predictor.predict_structures(data))
    id_name, ood_name = list(results)
    ratio = results[ood_name]["forces_mae"] / results[id_name]["forces_mae"]

    t2 = time.perf_counter()
    print(
        f"[5/6] reliability: perturbations fine-tuned for {opts.uq_minutes:g} min, "
        "recalibrated on the calibration frames",
        flush=True,
    )
    tests: dict[str, Sequence[Structure]] = {
        id_name: read_data(f"{manifest}:test"),
        ood_name: read_data(str(ood)),
    }
    reliability = reliability_step(
        run_dir / "best.ckpt",
        read_data(f"{manifest}:train"),
        read_data(f"{manifest}:calibration"),
        tests,
        out / "reliability",
        opts.uq_minutes,
        opts.seed,
    )
    timings["reliability_s"] = time.perf_counter() - t2

    print("[6/6] writing report.md", flush=True)
    _error_histogram(per_frame, out / "force_error_hist.png")
    summary = {
        "options": opts.__dict__,
        "metrics": results,
        "ood_id_force_mae_ratio": ratio,
        "reliability": reliability,
        "timings_s": timings,
        "total_s": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _write_report(out, opts, results, ratio, summary["total_s"], reliability)
    return summary


def _error_histogram(per_frame: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    top = max(float(v.max()) for v in per_frame.values())
    bins = np.linspace(0, top * 1.02, 40)
    for name, values in per_frame.items():
        ax.hist(
            1000 * values,
            bins=(1000 * bins).tolist(),
            alpha=0.6,
            label=f"{name} (median {1000 * np.median(values):.1f})",
        )
    ax.set_xlabel("force MAE per frame (meV/Å)")
    ax.set_ylabel("frames")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_report(
    out: Path,
    opts: QuickstartOptions,
    results: dict[str, Any],
    ratio: float,
    total: float,
    reliability: dict[str, Any],
) -> None:
    rows = [
        "| test set | frames | energy MAE (meV/atom) | force MAE (meV/Å) | force RMSE (meV/Å) "
        "| force cosine |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        rows.append(
            f"| {name} | {int(m['n_structures'])} | {1000 * m['energy_mae_per_atom']:.2f} | "
            f"{1000 * m['forces_mae']:.1f} | {1000 * m['forces_rmse']:.1f} | "
            f"{m['forces_cosine']:.4f} |"
        )
    names = list(results)
    text = f"""# trustpot quickstart

Molecule `{opts.smiles}`, GFN2-xTB labels (tblite), Langevin MD at 300 K ({opts.frames}
frames: 70% training, 10% calibration, 20% in-domain test) and at {opts.ood_temperature:g} K
({opts.ood_frames} frames, out of domain). Model: {opts.model}, trained for {opts.minutes:g} min.
Whole run: {total / 60:.1f} min.

{chr(10).join(rows)}

Out-of-domain / in-domain force MAE: **{ratio:.2f}x** (measured in this run). The hotter frames
reach geometries the 300 K training data never showed.

![force error per frame](force_error_hist.png)

In domain: ![parity in domain](eval_{names[0]}/parity.png)

Out of domain: ![parity out of domain](eval_{names[1]}/parity.png)

{reliability_markdown(reliability)}

Files: `data_*.xyz` (labelled frames with provenance), `split.json` (manifest), `train/`
(run directory: `metrics.csv`, `best.ckpt`...), `eval_*/metrics.json`, `reliability/`
(`uq.ckpt`, metrics and plots), `summary.json`. Other reliability methods: `trustpot uq fit
{{ensemble,mc-dropout,probe,perturb}}` (see docs/uq.md).
"""
    (out / "report.md").write_text(text)


# -- step 5: reliability ----------------------------------------------------------------------
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
    from trustpot.io.checkpoint import load_model, load_potential
    from trustpot.train.reuse import run_step
    from trustpot.uq.base import UQModel
    from trustpot.uq.collect import collect
    from trustpot.uq.fit import finish
    from trustpot.uq.perturb import fit_perturbation
    from trustpot.uq.plots import write_plots
    from trustpot.uq.report import uq_metrics

    ckpt = out / "uq.ckpt"
    config = {
        "checkpoint_sha256": file_sha256(checkpoint),
        "minutes": minutes,
        "seed": seed,
        "n_train": len(train),
        "n_calibration": len(calibration),
        "validation": "calibration",
    }

    def fit(folder: Path, resuming: bool) -> dict[str, Any]:
        model = fit_perturbation(
            load_potential(checkpoint),
            list(train),
            # epochs are chosen on frames the potential did not train on (in-sample frames
            # favour zero spread); the same frames then fit the recalibration
            list(calibration),
            max_minutes=minutes,
            epochs=100000,
            lr=1e-2,
            seed=seed,
            run_dir=folder / "run",
        )
        finish(model, out, calibration, "calibration frames", {"method": "perturb"})
        return {"checkpoint": ckpt.name, "fit_report": model.fit_report}

    run_step(out / "fit", config, fit)
    model = load_model(ckpt, UQModel)
    result: dict[str, Any] = {"method": model.method, "sets": {}}
    names: list[str] = []
    frames: list[Any] = []
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
