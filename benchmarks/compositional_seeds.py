"""Several seeds of ``benchmarks/compositional.py`` in one report: each model's in- and
out-of-domain force errors, OOD/ID ratio and energy offsets as the mean with the range over the
seeds, every model's training length and plateau, and whether each design choice's effect keeps
its sign on every seed.

    python benchmarks/compositional_seeds.py OUT_SEED0 OUT_SEED1 \
        --out benchmarks/results/compositional-seeds

Each ``OUT_SEEDk`` is the ``--out`` folder of one ``compositional.py --seed k`` run (its
``compositional.json``); the runs must share mode, models and budget (checked). A seed changes
the MD data, the splits and the training. Writes ``OUT/compositional_seeds.md`` and
``OUT/compositional_seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

#: design choices: (variant, the base model it changes)
CHOICES = (("deepset-moe:aggregation=mean", "deepset-moe"), ("schnet:n_layers=1", "schnet"))


def load(folder: Path) -> dict[str, Any]:
    path = folder / "compositional.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run benchmarks/compositional.py --out {folder})")
    data: dict[str, Any] = json.loads(path.read_text())
    if not data.get("complete"):
        raise SystemExit(f"{path}: the run did not finish every task")
    return data


def _stats(values: list[float | None]) -> dict[str, float] | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    return {"mean": statistics.fmean(finite), "min": min(finite), "max": max(finite)}


def _cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    if stats is None:
        return "n/a"
    return f"{stats['mean']:.{digits}g} [{stats['min']:.{digits}g}, {stats['max']:.{digits}g}]"


def _model_values(model: dict[str, Any]) -> dict[str, float | None]:
    i, o = model["subsets"]["test_id"], model["subsets"]["test_ood"]
    training = model.get("training", {})
    return {
        "forces_mae_id": i.get("forces_mae"),
        "forces_mae_ood": o.get("forces_mae"),
        "ratio": model["ratios"].get("forces_mae"),
        "energy_offset_ood": o.get("energy_offset", {}).get("offset_mae"),
        "energy_rest_ood": o.get("energy_offset", {}).get("mae_rest"),
        "epochs": training.get("epochs"),
        "tail_gain": training.get("val_loss_tail_gain"),
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and model, each value's mean, min and max over the runs; per design choice,
    the variant's OOD/ID ratio and OOD force MAE against its base on every seed."""
    tasks: dict[str, Any] = {}
    for task in runs[0]["tasks"]:
        models: dict[str, Any] = {}
        for name in runs[0]["tasks"][task]["models"]:
            per_run = [_model_values(r["tasks"][task]["models"][name]) for r in runs]
            models[name] = {k: _stats([v[k] for v in per_run]) for k in per_run[0]}
            models[name]["per_seed_ratio"] = [v["ratio"] for v in per_run]
        tasks[task] = models
    choices = []
    for variant, base in CHOICES:
        for task in tasks:
            if variant not in tasks[task] or base not in tasks[task]:
                continue
            pairs = [
                (
                    _model_values(r["tasks"][task]["models"][variant]),
                    _model_values(r["tasks"][task]["models"][base]),
                )
                for r in runs
            ]
            choices.append(
                {
                    "variant": variant,
                    "base": base,
                    "task": task,
                    "ratio": [(v["ratio"], b["ratio"]) for v, b in pairs],
                    "forces_mae_ood": [
                        (v["forces_mae_ood"], b["forces_mae_ood"]) for v, b in pairs
                    ],
                }
            )
    return {"tasks": tasks, "choices": choices}


def _verdict(pairs: list[tuple[float | None, float | None]]) -> str:
    diffs = [v - b for v, b in pairs if v is not None and b is not None]
    if not diffs:
        return "n/a"
    if all(d < 0 for d in diffs):
        return "lower on every seed"
    if all(d > 0 for d in diffs):
        return "higher on every seed"
    return "sign changes between seeds"


def markdown(runs: list[dict[str, Any]], combined: dict[str, Any], folders: list[str]) -> str:
    first = runs[0]
    lines = [
        "# Compositional out-of-domain benchmark over seeds",
        "",
        f"{len(runs)} seeds ({', '.join(folders)}), mode {first['mode']['name']}, "
        f"{first['minutes_per_model']:g} min per model on one thread. Each cell: mean "
        "[lowest, highest] over the seeds; forces eV/Å, energies eV per molecule. A seed "
        "changes the GFN2-xTB MD data, the splits and the training.",
        "",
    ]
    for task, models in combined["tasks"].items():
        lines += [
            f"## {task}",
            "",
            "| model | F MAE ID | F MAE OOD | OOD/ID | E OOD offset | E OOD rest | epochs "
            "| last-quarter drop |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in models.items():
            drop = m["tail_gain"]
            drop_text = (
                "n/a"
                if drop is None
                else f"{100 * drop['mean']:.1f}% [{100 * drop['min']:.1f}, {100 * drop['max']:.1f}]"
            )
            lines.append(
                f"| {name} | {_cell(m['forces_mae_id'])} | {_cell(m['forces_mae_ood'])} "
                f"| {_cell(m['ratio'])} | {_cell(m['energy_offset_ood'])} "
                f"| {_cell(m['energy_rest_ood'])} | {_cell(m['epochs'], 4)} | {drop_text} |"
            )
        lines.append("")
    lines += [
        "## Design choices, seed by seed",
        "",
        "| variant vs base | task | OOD/ID ratio (variant / base per seed) | verdict on the ratio "
        "| OOD force MAE verdict |",
        "|---|---|---|---|---|",
    ]
    for c in combined["choices"]:
        per_seed = ", ".join(
            f"{v:.2f} / {b:.2f}" for v, b in c["ratio"] if v is not None and b is not None
        )
        lines.append(
            f"| {c['variant']} vs {c['base']} | {c['task']} | {per_seed} "
            f"| {_verdict(c['ratio'])} | {_verdict(c['forces_mae_ood'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [load(f) for f in args.runs]
    for key in ("mode", "minutes_per_model"):
        if len({json.dumps(r.get(key)) for r in runs}) != 1:
            raise SystemExit(f"the runs differ in {key}: {[r.get(key) for r in runs]}")
    model_sets = {json.dumps(sorted(t["models"])) for r in runs for t in r["tasks"].values()}
    if len(model_sets) != 1:
        raise SystemExit("the runs trained different models")
    combined = combine(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    folders = [f"seed {r['options'].get('seed', '?')}" for r in runs]
    (args.out / "compositional_seeds.json").write_text(json.dumps(combined, indent=1))
    text = markdown(runs, combined, folders)
    (args.out / "compositional_seeds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
