"""Scoring, tables and learning curves of ``benchmarks/accuracy.py``.

One scorer for both codes: every test set's ``predictions.npz`` (``energy`` [frames] eV,
``forces`` [atoms of all frames, 3] eV/Å, ``n_atoms`` [frames]; the layout ``trustpot eval``
writes and ``benchmarks/mace_peer.py`` copies) goes through
:func:`trustpot.metrics.accuracy.accuracy_metrics`, and probe paths through
:func:`trustpot.bench.paths.path_errors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.train.plateau import learning_curve, tail_gain


def curve_rows(metrics_csv: Path) -> list[dict[str, float]]:
    """trustpot's ``metrics.csv`` as learning-curve rows (epoch, minutes, validation errors)."""
    keys = ("val_forces_mae", "val_forces_rmse", "val_energy_mae_per_atom")
    return learning_curve(metrics_csv, keys)


def _predictions(path: Path) -> list[dict[str, Any]]:
    data = np.load(path)
    bounds = np.concatenate([[0], np.cumsum(data["n_atoms"])])
    return [
        {"energy": float(e), "forces": data["forces"][bounds[k] : bounds[k + 1]]}
        for k, e in enumerate(data["energy"])
    ]


def score_run(
    tests: Mapping[str, str], probes: str, folder: Path, predictions: Mapping[str, str]
) -> dict[str, Any]:
    """Metrics of every test set and probe path from the run's ``predictions.npz`` files."""
    from trustpot.data.splits import read_data
    from trustpot.metrics.accuracy import accuracy_metrics

    out: dict[str, Any] = {"tests": {}, "probes": {}}
    for name, spec in tests.items():
        structures = read_data(spec, require=())
        preds = _predictions(folder / predictions[name])
        if len(preds) != len(structures):
            raise SystemExit(f"{folder}: {len(preds)} predictions for {len(structures)} frames")
        out["tests"][name] = accuracy_metrics(structures, preds)
    if probes:
        from trustpot.bench.paths import path_errors, path_force_errors, read_paths

        preds = _predictions(folder / predictions["probes"])
        start = 0
        for path in read_paths(Path(probes)):
            n = len(path.frames)
            mine = preds[start : start + n]
            start += n
            ref_e = np.array([a.info["energy"] for a in path.frames])
            errors = path_errors(ref_e, np.array([p["energy"] for p in mine]), path.coords)
            errors.update(
                path_force_errors(
                    [a.arrays["forces"] for a in path.frames], [p["forces"] for p in mine]
                )
            )
            out["probes"][path.name] = {**errors, "predicted": [p["energy"] for p in mine]}
    return out


def _fmt(x: float, scale: float = 1000.0, digits: int = 1) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{scale * x:.{digits}f}"


def _rows(results: Mapping[str, Any], phase: str) -> list[str]:
    lines = []
    for key, run in sorted(results["runs"].items()):
        p, task, model = key.split("/", 2)
        if p != phase:
            continue
        ind = results["tasks"][task]["in_domain"]
        id_rmse = run["tests"][ind].get("forces_rmse", float("nan"))
        for test in results["tasks"][task]["tests"]:
            m = run["tests"][test]
            ratio = m["forces_rmse"] / id_rmse if test != ind else float("nan")
            lines.append(
                f"| {task} | {model} | {run['epochs']} | {run['curve'][-1]['minutes']:.1f} | "
                f"{test}{' (ID)' if test == ind else ''} | "
                f"{_fmt(m.get('energy_mae_per_atom'), digits=2)} | "
                f"{_fmt(m.get('energy_rmse_per_atom'), digits=2)} | {_fmt(m['forces_mae'])} | "
                f"{_fmt(m['forces_rmse'])} | {m['forces_rmse'] / m['forces_mae']:.2f} | "
                f"{_fmt(ratio, 1.0, 2)} | {_fmt(m.get('forces_tail_share'), 100.0, 0)} | "
                f"{_fmt(tail_gain(run['curve']), 100.0, 1)} |"
            )
    return lines


HEADER = [
    "| task | model | epochs | minutes | test set | energy MAE (meV/atom) | energy RMSE "
    "(meV/atom) | force MAE (meV/Å) | force RMSE (meV/Å) | RMSE/MAE | OOD/ID force RMSE | "
    "worst 5% of frames' share of squared force error (%) | last-quarter gain (%) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def verdicts(results: Mapping[str, Any], phase: str) -> list[str]:
    """Per task and test set: best trustpot force RMSE against MACE-small's (the goal: lower
    everywhere, and at least 1.3x lower out of domain)."""
    lines = []
    for task, spec in results["tasks"].items():
        mace = results["runs"].get(f"budget/{task}/mace-small")
        if mace is None:
            continue
        ours = {
            k.split("/", 2)[2]: r
            for k, r in results["runs"].items()
            if k.startswith(f"{phase}/{task}/") and not k.split("/", 2)[2].startswith("mace")
        }
        if not ours:
            continue
        for test, m in mace["tests"].items():
            best = min(ours, key=lambda name: ours[name]["tests"][test]["forces_rmse"])
            ratio = m["forces_rmse"] / ours[best]["tests"][test]["forces_rmse"]
            where = "in domain" if test == spec["in_domain"] else "out of domain"
            goal = 1.3 if where == "out of domain" else 1.0
            verdict = "met" if ratio >= goal else "NOT met"
            lines.append(
                f"| {task} | {test} ({where}) | {best} | {ratio:.2f}x | {goal:.1f}x | {verdict} |"
            )
    return lines


def probe_rows(results: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, run in sorted(results["runs"].items()):
        phase, task, model = key.split("/", 2)
        for name, e in run.get("probes", {}).items():
            lines.append(
                f"| {phase} | {task} | {model} | {name} | {e['n_points']} | "
                f"{_fmt(e['relative_rmse'])} | {_fmt(e['relative_max_error'])} | "
                f"{e['reference_barrier']:.3f} | {e['predicted_barrier']:.3f} | "
                f"{_fmt(e['force_mae'])} |"
            )
    return lines


def write_report(results: Mapping[str, Any], path: Path) -> str:
    """``accuracy.md``: settings, the equal-budget and equal-epoch tables, verdicts, probes."""
    m = results["machine"]
    lines = [
        f"Mode {results['mode']}, seed {results['seed']}: {results['minutes']:g} min per budget "
        f"run, {results['threads_per_run']} torch thread(s) per run, {results['parallel']} "
        f"run(s) at a time, trustpot and MACE side by side ({m['platform']}, {m['cpus']} CPUs).",
        "",
        "Last-quarter gain: how much the best validation force MAE still fell over the last "
        "quarter of the run (a few % or more: not at a plateau, the comparison is partly a "
        "floor effect).",
        "",
        "## Equal wall-clock budget",
        "",
        *HEADER,
        *_rows(results, "budget"),
        "",
        "Best trustpot backbone against MACE-small (force RMSE ratio, MACE / trustpot):",
        "",
        "| task | test set | best trustpot | MACE-small / ours | goal | verdict |",
        "|---|---|---|---|---|---|",
        *verdicts(results, "budget"),
    ]
    epochs = _rows(results, "epochs")
    if epochs:
        lines += [
            "",
            "## Equal epochs (trustpot stopped at MACE-small's epoch count; MACE rows above)",
            "",
            *HEADER,
            *epochs,
            "",
            "| task | test set | best trustpot | MACE-small / ours | goal | verdict |",
            "|---|---|---|---|---|---|",
            *verdicts(results, "epochs"),
        ]
    probes = probe_rows(results)
    if probes:
        lines += [
            "",
            "## Far-from-data probes (relative energies along each path, each curve shifted to "
            "its own minimum)",
            "",
            "| phase | task | model | path | points | relative-energy RMSE (meV) | max error "
            "(meV) | reference barrier (eV) | predicted barrier (eV) | force MAE (meV/Å) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *probes,
        ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_probes(results: Mapping[str, Any], task: str, probes: Path, path: Path) -> None:
    """Reference and predicted relative energies along every probe path (budget runs)."""
    from trustpot.bench.paths import plot_paths, read_paths

    paths = read_paths(probes)
    predictions = {
        key.split("/", 2)[2]: [np.array(run["probes"][p.name]["predicted"]) for p in paths]
        for key, run in sorted(results["runs"].items())
        if key.startswith(f"budget/{task}/") and run.get("probes")
    }
    if predictions:
        plot_paths(paths, predictions, path)


def plot_curves(results: Mapping[str, Any], task: str, path: Path) -> None:
    """Validation force MAE (meV/Å) against training minutes, every budget run of ``task``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, run in sorted(results["runs"].items()):
        phase, name, model = key.split("/", 2)
        if phase != "budget" or name != task or not run["curve"]:
            continue
        x = [r["minutes"] for r in run["curve"]]
        y = np.minimum.accumulate([1000 * r["val_forces_mae"] for r in run["curve"]])
        ax.plot(x, y, label=f"{model} ({run['epochs']} epochs)")
    ax.set_yscale("log")
    ax.set_xlabel("training wall clock (min)")
    ax.set_ylabel("best validation force MAE (meV/Å)")
    ax.set_title(f"{task}: learning curves at equal budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
