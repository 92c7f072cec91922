"""Several seeds of ``benchmarks/uq.py`` in one table: the mean of each ranking and calibration
column with the range over the seeds, and the models' learning-curve summary.

    python benchmarks/uq_seeds.py OUT_SEED0 OUT_SEED1 --out benchmarks/results/uq-seeds

Each ``OUT_SEEDk`` is the ``--out`` folder of one ``uq.py`` run (its ``uq.json``); runs must
share datasets and budgets (checked). Writes ``OUT/uq_seeds.md`` and ``OUT/uq_seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = ("spearman", "auroc", "crps", "nll", "forces_mae", "md_cost", "inference_cost")
SAME = ("mode", "minutes_per_model", "minutes_per_model_nbody", "threads")


def load(folder: Path) -> dict[str, Any]:
    path = folder / "uq.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run benchmarks/uq.py --out {folder} first)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def combine(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, test, method): mean, min and max of each column over the runs."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        for row in run["rows"]:
            cells[(row["dataset"], row["test"], row["method"])].append(row)
    out = []
    for (dataset, test, method), rows in cells.items():
        entry: dict[str, Any] = {"dataset": dataset, "test": test, "method": method}
        entry["seeds"] = len(rows)
        for col in COLUMNS:
            values = [float(r[col]) for r in rows if r.get(col) is not None]
            values = [v for v in values if math.isfinite(v)]
            entry[col] = (
                {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
                if values
                else None
            )
        out.append(entry)
    return out


def _cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    if stats is None:
        return "n/a"
    mean, lo, hi = stats["mean"], stats["min"], stats["max"]
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]], names: list[str]) -> str:
    settings = runs[0]["settings"]
    seeds = [r["settings"]["seed"] for r in runs]
    text = (
        f"# trustpot reliability benchmark, seeds {seeds}\n\n"
        f"{settings['minutes_per_model']} min per trained model "
        f"({settings['minutes_per_model_nbody']} min on N-body), {settings['threads']} thread(s) "
        f"per run; runs: {', '.join(names)}. Each cell: mean over the seeds [lowest, highest].\n\n"
        "| dataset | test | method | Spearman | AUROC | CRPS | NLL | force MAE | MD cost |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        text += (
            f"| {r['dataset']} | {r['test']} | {r['method']} | {_cell(r['spearman'])} | "
            f"{_cell(r['auroc'])} | {_cell(r['crps'])} | {_cell(r['nll'])} | "
            f"{_cell(r['forces_mae'])} | {_cell(r['md_cost'], 2)} |\n"
        )
    text += (
        "\n## Training runs\n\nPer seed: epochs and how much the best validation loss still fell "
        "over the last quarter of each run's minutes (small: at a plateau).\n\n"
        "| seed | dataset | run | epochs | minutes | val loss drop, last quarter |\n"
        "|---|---|---|---|---|---|\n"
    )
    for run in runs:
        for c in run.get("learning_curves", []):
            text += (
                f"| {run['settings']['seed']} | {c['dataset']} | {c['run']} | {c['epochs']} | "
                f"{c['minutes']:.1f} | {100 * c['tail_gain']:.1f}% |\n"
            )
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="uq.py output folders, one per seed")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    runs = [load(f) for f in args.runs]
    for key in SAME:
        values = {str(r["settings"].get(key)) for r in runs}
        if len(values) > 1:
            raise SystemExit(f"the runs differ in {key}: {sorted(values)}")
    rows = combine(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "uq_seeds.json").write_text(json.dumps({"rows": rows}, indent=1))
    names = [f.name for f in args.runs]
    text = markdown(rows, runs, names)
    (args.out / "uq_seeds.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
