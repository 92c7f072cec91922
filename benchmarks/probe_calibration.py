"""How PROBE's ranking grows with the number of calibration examples (out-of-fold labels).

On 3BPA (``../shared/data/3bpa``): a PaiNN potential trained on ``train_300K`` frames; the same
frames labelled with out-of-fold force errors by ``--folds`` fold models
(:func:`trustpot.uq.calibration.out_of_fold`, the same training options); PROBE fitted on
``n`` of those labelled frames for each ``n`` of ``--sizes`` (random subsets, ``--repeats``
seeds each); each PROBE ranks the per-frame force errors of the potential on the held-out 300 K
frames (in domain) and on ``ood_mixedT_not_in_train_300K`` (out of domain): Spearman of
1 - reliability against the error and AUROC for the 20% largest errors. Every trained model is
a step under the one reuse rule (a rerun reuses it).

    python benchmarks/probe_calibration.py --quick --out /tmp/probe-cal     # a smoke test
    python benchmarks/probe_calibration.py --out benchmarks/results/probe_calibration

Writes ``OUT/probe_calibration.json`` and ``OUT/probe_calibration.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.io import read, write

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.config import load_config
from trustpot.data.reader import read_structures
from trustpot.data.structures import info_values
from trustpot.io.checkpoint import load_model
from trustpot.metrics.accuracy import per_structure_force_mae
from trustpot.metrics.uncertainty import auroc, spearman
from trustpot.uq.calibration import OOF_KEY, out_of_fold
from trustpot.uq.fit import train_once
from trustpot.uq.options import CalibrationSetOptions
from trustpot.uq.probe import fit_probe

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "3bpa"


@dataclass(frozen=True)
class Mode:
    """Sizes and budgets."""

    n_train: int
    n_test: int
    n_ood: int
    minutes: float  # per potential (the base and each fold model)
    folds: int
    sizes: tuple[int, ...]
    repeats: int
    probe_epochs: int


MODES = {
    "quick": Mode(40, 12, 12, 0.1, 3, (10, 20, 40), 1, 5),
    "full": Mode(400, 100, 200, 4.0, 5, (10, 30, 100, 400), 3, 200),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"no 3BPA data at {DATA}")
    torch.set_num_threads(args.threads)
    mode = MODES["quick" if args.quick else "full"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    frames = read(DATA / "train_300K.xyz", index=":")
    order = rng.permutation(len(frames))
    train_idx, test_idx = order[: mode.n_train], order[mode.n_train : mode.n_train + mode.n_test]
    write(out / "train.xyz", [frames[i] for i in train_idx], format="extxyz")
    write(out / "test_300K.xyz", [frames[i] for i in test_idx], format="extxyz")
    ood = read(DATA / "ood_mixedT_not_in_train_300K.xyz", index=":")
    pick = rng.choice(len(ood), min(mode.n_ood, len(ood)), replace=False)
    write(out / "ood_mixedT.xyz", [ood[i] for i in sorted(pick)], format="extxyz")

    overrides = [f"train.max_minutes={mode.minutes}", f"train.seed={args.seed}"]
    overrides += [f"train.threads={args.threads}"]
    cfg = load_config(None, overrides, {"data": {"train": str(out / "train.xyz")}})
    base_ckpt = train_once(cfg, out / "base", print)
    cal = CalibrationSetOptions(
        train=str(out / "train.xyz"), folds=mode.folds, seed=args.seed, overrides=tuple(overrides)
    )
    labelled = out_of_fold(cal, out / "oof", print)
    oof_errors = info_values(labelled, OOF_KEY, "oof.xyz")

    base = load_model(base_ckpt)
    tests = {
        "in_domain_300K": read_structures(out / "test_300K.xyz", use_cache=False),
        "ood_mixedT": read_structures(out / "ood_mixedT.xyz", use_cache=False),
    }
    errors = {
        name: per_structure_force_mae(s, Predictor(base).predict_structures(s))
        for name, s in tests.items()
    }
    rows: list[dict[str, Any]] = []
    for n in mode.sizes:
        for repeat in range(mode.repeats):
            idx = np.sort(np.random.default_rng(1000 * n + repeat).choice(len(labelled), n, False))
            probe = fit_probe(
                base,
                [labelled[i] for i in idx],
                errors=oof_errors[idx],
                epochs=mode.probe_epochs,
                batch_size=8,
                seed=repeat,
                log=lambda _: None,
                run_dir=out / "probes" / f"n{n}_r{repeat}",
            )
            row: dict[str, Any] = {"n_calibration": n, "repeat": repeat}
            for name, structures in tests.items():
                preds = Predictor(probe).predict_structures(structures, (K.ENERGY, K.RELIABILITY))
                risk = np.array([1.0 - float(p[K.RELIABILITY]) for p in preds])
                err = errors[name]
                worst = err >= np.quantile(err, 0.8)
                row[f"{name}_spearman"] = spearman(risk, err)
                row[f"{name}_auroc"] = auroc(risk, worst)
            rows.append(row)
            print(json.dumps(row))
    summary = {
        "mode": "quick" if args.quick else "full",
        "options": mode.__dict__,
        "seed": args.seed,
        "base_forces_mae": {k: float(np.mean(v)) for k, v in errors.items()},
        "oof_forces_mae_mean": float(np.mean(oof_errors)),
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / "probe_calibration.json").write_text(json.dumps(summary, indent=1))
    (out / "probe_calibration.md").write_text(table(summary))
    print(table(summary))
    return 0


def table(summary: dict[str, Any]) -> str:
    """Markdown: mean (min-max over repeats) Spearman and AUROC per calibration size."""
    lines = [
        f"# PROBE against the number of calibration examples ({summary['mode']} mode)",
        "",
        f"3BPA, PaiNN base trained {summary['options']['minutes']} min on "
        f"{summary['options']['n_train']} frames at 300 K; labels: out-of-fold force errors of "
        f"{summary['options']['folds']} fold models (mean {summary['oof_forces_mae_mean']:.4g} "
        f"eV/Å); base force MAE in domain {summary['base_forces_mae']['in_domain_300K']:.4g}, "
        f"out of domain {summary['base_forces_mae']['ood_mixedT']:.4g} eV/Å. Wall clock "
        f"{summary['wall_s'] / 60:.1f} min.",
        "",
        "| calibration frames | Spearman in domain | AUROC in domain | Spearman OOD | AUROC OOD |",
        "|---|---|---|---|---|",
    ]
    sizes = sorted({r["n_calibration"] for r in summary["rows"]})
    for n in sizes:
        rs = [r for r in summary["rows"] if r["n_calibration"] == n]

        def cell(key: str, rs: list[dict[str, Any]] = rs) -> str:
            v = np.array([r[key] for r in rs], dtype=float)
            if len(v) == 1:
                return f"{v[0]:.3f}"
            return f"{np.nanmean(v):.3f} ({np.nanmin(v):.3f}-{np.nanmax(v):.3f})"

        lines.append(
            f"| {n} | {cell('in_domain_300K_spearman')} | {cell('in_domain_300K_auroc')} | "
            f"{cell('ood_mixedT_spearman')} | {cell('ood_mixedT_auroc')} |"
        )
    if summary["mode"] == "quick":
        lines += ["", "Quick mode: a smoke test of the pipeline, not a result."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
