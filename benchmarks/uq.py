"""Reliability benchmark: every method on every dataset, one table.

Methods: deep ensemble (5 members), MC dropout, PROBE (on ensemble member 0), learned
functional perturbations (fine-tuned from member 0 with the CRPS), LLPR (a Bayesian last layer
of member 0, one pass over its training data; ``llpr`` draws 8 last layers for the force std,
``llpr-distance`` scores each atom by its feature distance from the training atoms of its
element at one model's cost) and a shallow ensemble (8 last layers on member 0's backbone,
fine-tuned with the Gaussian NLL for half the budget). Datasets:

- ``3bpa``: train_300K split train / calibration / in-domain test (seeded), out of domain on
  ``ood_mixedT_not_in_train_300K.xyz``;
- ``ethanol``: train.xyz split train / calibration, in domain test_MD, out of domain the
  methanol frames of test_eth_meth.xyz and (energy only) the H-removal and normal-mode probes;
- ``zeolites``: frames of the 8 training topologies (train / calibration / in-domain test),
  out of domain the held-out topologies PTY and UOE;
- ``nbody-N``: charged 5-particle N-body system (trustpot's exact engine) at three training
  sizes N, in-domain test at the training temperature, out of domain at a hotter one;
- ``nbody-sizes``: systems of 5 to 10 charged particles for training, calibration and the
  in-domain test, 15 to 20 particles out of domain (size extrapolation, the N-body test of the
  seed's authors), all at 1000 K.

Every model of a dataset gets the same wall-clock budget (``--minutes``); costs are reported as
ratios to one plain model: training wall clock; inference seconds per structure in batches of
16 (``inference cost``) and one structure at a time as in MD (``MD cost``: the first 20 test
structures, each timed 3 times, the median, plain model timed alternately). Outputs:
``OUT/uq.json`` (every metric of every row) and ``OUT/uq.md`` (the table). Finished models
and evaluations are reused on a rerun.

    python benchmarks/uq.py --quick --out /tmp/uq-quick          # minutes, for CI
    python benchmarks/uq.py --out benchmarks/results/uq           # the README table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = (
    "ensemble",
    "mc-dropout",
    "probe",
    "perturb",
    "llpr",
    "llpr-distance",
    "shallow-ensemble",
)
PERTURB_LR = 1e-2  # learning rate of the perturbation layers (backbone: 1e-4)


@dataclass
class Mode:
    """Sizes and budgets of one benchmark mode."""

    minutes: float  # per trained model
    nbody_minutes: float  # per trained model on the (small, fast) N-body data
    n_train: int
    n_cal: int
    n_test: int
    n_ood: int
    nbody_sizes: tuple[int, ...]
    members: int = 5
    epochs: int = 100000
    hypers: dict[str, Any] = field(default_factory=dict)


MODES = {
    "quick": Mode(
        0.12, 0.12, 40, 30, 30, 30, (30, 60, 120), 5, 4, {"n_features": 16, "n_layers": 2}
    ),
    "full": Mode(3.0, 1.0, 300, 100, 200, 200, (100, 300, 1000)),
}


# -- data -----------------------------------------------------------------------------------
def _write(frames: list[Any], path: Path) -> None:
    from ase.io import write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, frames, format="extxyz")


def _pick(n_total: int, n: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


def prepare(name: str, mode: Mode, out: Path, seed: int) -> dict[str, Any]:
    """Write ``out/data.xyz`` and ``out/split.json`` (train, calibration, test sets)."""
    from ase.io import read

    from trustpot.data.reader import read_atoms
    from trustpot.data.splits import write_manifest

    split_path = out / "split.json"
    if split_path.is_file():
        return json.loads(split_path.read_text())
    rng = np.random.default_rng(seed)
    frames: list[Any] = []
    subsets: dict[str, list[int]] = {}

    def add(subset: str, items: list[Any]) -> None:
        subsets[subset] = list(range(len(frames), len(frames) + len(items)))
        frames.extend(items)

    n_id = mode.n_train + mode.n_cal + mode.n_test
    backbone = "painn"
    if name in ("3bpa", "ethanol"):
        folder = SHARED / name
        pool_file = "train_300K.xyz" if name == "3bpa" else "train.xyz"
        pool = read(folder / pool_file, ":")
        idx = _pick(len(pool), n_id if name == "3bpa" else mode.n_train + mode.n_cal, rng)
        rng.shuffle(idx)
        add("train", [pool[i] for i in idx[: mode.n_train]])
        add("calibration", [pool[i] for i in idx[mode.n_train : mode.n_train + mode.n_cal]])
        if name == "3bpa":
            add("test_id", [pool[i] for i in idx[mode.n_train + mode.n_cal :]])
            ood = read(folder / "ood_mixedT_not_in_train_300K.xyz", ":")
            add("test_ood", [ood[i] for i in _pick(len(ood), mode.n_ood, rng)])
        else:
            test = read(folder / "test_MD.xyz", ":")
            add("test_id", [test[i] for i in _pick(len(test), mode.n_test, rng)])
            meth = [a for a in read(folder / "test_eth_meth.xyz", ":") if len(a) == 6]
            add("test_ood", [meth[i] for i in _pick(len(meth), mode.n_ood, rng)])
            probes = []
            for f in ("test_H_removal.xyz", "test_norm_mode_874.xyz", "test_norm_mode_3005.xyz"):
                probes.extend(read(folder / f, ":"))
            add("test_ood_energy_only", probes)
    elif name == "zeolites":
        folder = SHARED / "sio2_zeolites"
        per_topo = math.ceil(n_id / 8)
        pool = []
        # every 10th MD frame (decorrelated)
        for f in sorted(folder.glob("train_topology_*.xyz.gz")):
            topo = read_atoms(f, "::10")
            pool.extend(topo[i] for i in _pick(len(topo), per_topo, rng))
        idx = list(range(len(pool)))
        rng.shuffle(idx)
        add("train", [pool[i] for i in idx[: mode.n_train]])
        add("calibration", [pool[i] for i in idx[mode.n_train : mode.n_train + mode.n_cal]])
        add("test_id", [pool[i] for i in idx[mode.n_train + mode.n_cal : n_id]])
        ood = []
        for f in sorted(folder.glob("test_topology_*.xyz.gz")):
            topo = read_atoms(f, "::10")
            ood.extend(topo[i] for i in _pick(len(topo), mode.n_ood // 2, rng))
        add("test_ood", ood)
    elif name == "nbody-sizes":  # size extrapolation, as the seed's authors built it
        from trustpot.engines.nbody import generate_nbody

        backbone = "egnn"
        raw = out / "raw"
        sizes_id, sizes_ood = list(range(5, 11)), list(range(15, 21))
        per_size = math.ceil(n_id / len(sizes_id))
        generate_nbody(sizes_id, per_size, raw / "id.xyz", (1000.0,), seed, progress=False)
        per_ood = math.ceil(mode.n_ood / len(sizes_ood))
        generate_nbody(sizes_ood, per_ood, raw / "big.xyz", (1000.0,), seed + 1, progress=False)
        pool = read(raw / "id.xyz", ":")
        idx = list(range(len(pool)))
        rng.shuffle(idx)
        add("train", [pool[i] for i in idx[: mode.n_train]])
        add("calibration", [pool[i] for i in idx[mode.n_train : mode.n_train + mode.n_cal]])
        add("test_id", [pool[i] for i in idx[mode.n_train + mode.n_cal : n_id]])
        add("test_ood", read(raw / "big.xyz", ":"))
    elif name.startswith("nbody-"):
        from trustpot.engines.nbody import generate_nbody

        backbone = "egnn"
        n_train = int(name.split("-")[1])
        raw = out / "raw"
        need = n_train + mode.n_cal + mode.n_test
        generate_nbody([5], need, raw / "id.xyz", (1000.0,), seed, progress=False)
        generate_nbody([5], mode.n_ood, raw / "hot.xyz", (3000.0,), seed + 1, progress=False)
        pool = read(raw / "id.xyz", ":")
        idx = list(range(len(pool)))
        rng.shuffle(idx)
        add("train", [pool[i] for i in idx[:n_train]])
        add("calibration", [pool[i] for i in idx[n_train : n_train + mode.n_cal]])
        add("test_id", [pool[i] for i in idx[n_train + mode.n_cal : need]])
        add("test_ood", read(raw / "hot.xyz", ":"))
    else:
        raise SystemExit(f"unknown dataset {name}")
    data_path = out / "data.xyz"
    _write(frames, data_path)
    manifest = write_manifest(data_path, subsets, "benchmark", seed, {"dataset": name}, split_path)
    manifest["backbone"] = backbone
    split_path.write_text(json.dumps(manifest, indent=1))
    return manifest


# -- one dataset ----------------------------------------------------------------------------
def run_dataset(
    name: str, mode_name: str, out_root: str, seed: int, threads: int, recalibrate: bool = False
) -> list[dict]:
    """Fit every method on one dataset and evaluate it on every test set."""
    import torch

    from trustpot.calculator import Predictor
    from trustpot.config import load_config
    from trustpot.data.splits import read_data
    from trustpot.io.checkpoint import load_model, load_potential
    from trustpot.uq import fit as F
    from trustpot.uq.base import UQModel
    from trustpot.uq.collect import collect
    from trustpot.uq.ensemble import DeepEnsemble
    from trustpot.uq.lastlayer import fit_llpr
    from trustpot.uq.perturb import fit_perturbation
    from trustpot.uq.probe import fit_probe
    from trustpot.uq.report import headline, uq_metrics
    from trustpot.uq.shallow import fit_shallow_ensemble

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import uq_cost  # the one-at-a-time timing (benchmarks/uq_cost.py)

    torch.set_num_threads(threads)
    mode = MODES[mode_name]
    out = Path(out_root) / name
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.txt"

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {name}: {message}"
        print(line, flush=True)
        with open(log_path, "a") as handle:
            handle.write(line + "\n")

    manifest = prepare(name, mode, out, seed)
    spec = str(out / "split.json")
    sets = {k: read_data(f"{spec}:{k}", require=()) for k in manifest["subsets"]}
    backbone = manifest["backbone"]
    minutes = mode.nbody_minutes if name.startswith("nbody") else mode.minutes
    cfg = load_config(
        None,
        [f"model.hypers.{k}={v}" for k, v in mode.hypers.items()],
        {
            "data": {"train": f"{spec}:train", "valid_fraction": 0.1},
            "model": {"name": backbone},
            "train": {
                "max_minutes": minutes,
                "epochs": mode.epochs,
                "seed": seed,
                "threads": threads,
            },
        },
    )
    costs: dict[str, float] = {}
    timing_path = out / "timings.json"
    if timing_path.is_file():
        costs = json.loads(timing_path.read_text())

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        if key not in costs:
            costs[key] = time.perf_counter() - t0
            timing_path.write_text(json.dumps(costs, indent=1))
        return result

    cal = sets["calibration"]
    ckpts = {m: out / m / "uq.ckpt" for m in METHODS}
    member_paths = [out / "ensemble" / f"member_{k}" for k in range(mode.members)]
    if not ckpts["ensemble"].is_file():
        for k, d in enumerate(member_paths):
            member = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed + k))
            timed(f"member_{k}", lambda m=member, d=d: F.train_once(m, d, log))
        ens = DeepEnsemble([load_potential(d / "best.ckpt") for d in member_paths])
        F.finish(ens, out / "ensemble", cal, "calibration", {"method": "ensemble"}, log=log)
    base_path = member_paths[0] / "best.ckpt"
    if not ckpts["mc-dropout"].is_file():
        mc = timed("mc-dropout", lambda: F.train_mc_dropout(cfg, out / "mc-dropout", 0.1, 16, log))
        F.finish(mc, out / "mc-dropout", cal, "calibration", {"method": "mc-dropout"}, log=log)
    if not ckpts["probe"].is_file():
        probe = timed(
            "probe",
            lambda: fit_probe(
                load_potential(base_path),
                cal,
                max_minutes=mode.minutes,
                seed=seed,
                log=log,
                source="calibration",
            ),
        )
        F.finish(probe, out / "probe", None, "", {"method": "probe"}, log=log)
    if not ckpts["perturb"].is_file():
        train = sets["train"]
        n_val = max(1, len(train) // 10)
        pert = timed(
            "perturb",
            lambda: fit_perturbation(
                load_potential(base_path),
                train[n_val:],
                train[:n_val],
                max_minutes=minutes / 2,
                epochs=mode.epochs,
                lr=PERTURB_LR,
                seed=seed,
                log=log,
            ),
        )
        F.finish(pert, out / "perturb", cal, "calibration", {"method": "perturb"}, log=log)
    if not ckpts["llpr"].is_file():
        llpr = timed(
            "llpr", lambda: fit_llpr(load_potential(base_path), sets["train"], cal, log=log)
        )
        F.finish(llpr, out / "llpr", cal, "calibration", {"method": "llpr"}, log=log)
    if not ckpts["llpr-distance"].is_file():
        distance = timed(
            "llpr-distance",
            lambda: fit_llpr(
                load_potential(base_path), sets["train"], cal, force_std="distance", log=log
            ),
        )
        F.finish(distance, out / "llpr-distance", cal, "calibration", {}, log=log)
    if not ckpts["shallow-ensemble"].is_file():
        train = sets["train"]
        n_val = max(1, len(train) // 10)
        shallow = timed(
            "shallow-ensemble",
            lambda: fit_shallow_ensemble(
                load_potential(base_path),
                train[n_val:],
                train[:n_val],
                max_minutes=minutes / 2,
                epochs=mode.epochs,
                seed=seed,
                log=log,
            ),
        )
        F.finish(shallow, out / "shallow-ensemble", cal, "calibration", {}, log=log)

    if recalibrate:  # refit the recalibration of the trained wrappers, evaluate them afresh
        for method in ("ensemble", "mc-dropout", "perturb"):
            model = load_model(ckpts[method], UQModel)
            F.finish(model, out / method, cal, "calibration", {"method": method}, log=log)
            for stale in (out / method).glob("eval_*.json"):
                stale.unlink()

    plain = Predictor(load_potential(base_path))
    # one plain model: the median member (member 0 also pays for building the data cache)
    one_model_s = float(np.median([costs[f"member_{k}"] for k in range(mode.members)]))
    train_cost = {
        "ensemble": sum(costs[f"member_{k}"] for k in range(mode.members)) / one_model_s,
        "mc-dropout": costs["mc-dropout"] / one_model_s,
        "probe": (one_model_s + costs["probe"]) / one_model_s,
        "perturb": (one_model_s + costs["perturb"]) / one_model_s,
        "llpr": (one_model_s + costs["llpr"]) / one_model_s,
        "llpr-distance": (one_model_s + costs["llpr-distance"]) / one_model_s,
        "shallow-ensemble": (one_model_s + costs["shallow-ensemble"]) / one_model_s,
    }
    rows = []
    for test_name in [k for k in manifest["subsets"] if k.startswith("test")]:
        structures = sets[test_name]
        t0 = time.perf_counter()
        plain.predict_structures(structures, source=test_name)
        plain_s = (time.perf_counter() - t0) / len(structures)
        for method in METHODS:
            result_path = out / method / f"eval_{test_name}.json"
            if result_path.is_file():
                rows.append(json.loads(result_path.read_text()))
                continue
            model = load_model(ckpts[method], UQModel)
            data = collect(model, structures, 16, f"{name}/{test_name}", progress=False)
            metrics = uq_metrics(data)
            row = {
                "dataset": name,
                "test": test_name,
                "method": method,
                "n": len(structures),
                **headline(metrics),
                "train_cost": train_cost[method],
                "inference_cost": data.seconds / len(structures) / plain_s,
                "metrics": metrics,
            }
            result_path.write_text(json.dumps(row, indent=1))
            rows.append(row)
            log(f"{method} on {test_name}: Spearman {row['spearman']:.3f} AUROC {row['auroc']:.3f}")
    md_path = out / "md_cost.json"
    md_cost = json.loads(md_path.read_text()) if md_path.is_file() else {}
    first_test = next(k for k in manifest["subsets"] if k.startswith("test"))
    for method in METHODS:
        if method not in md_cost:
            model = Predictor(load_model(ckpts[method], UQModel))
            md_cost[method] = uq_cost.md_cost(model, plain, sets[first_test][:20])
            md_path.write_text(json.dumps(md_cost, indent=1))
    for row in rows:
        row["md_cost"] = md_cost[row["method"]]
    return rows


# -- table ----------------------------------------------------------------------------------
def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def learning_curves(out: Path, names: list[str]) -> list[dict[str, Any]]:
    """Every trained model's run: epochs, minutes, best validation loss (and force MAE where
    the run has it) and how much the best validation loss still fell over the last quarter
    of the run's minutes (``tail_gain``: small means a plateau), from its ``metrics.csv``."""
    from trustpot.train.plateau import run_plateau  # the one plateau measure

    rows = []
    for name in names:
        for path in sorted((out / name).glob("**/metrics.csv")):
            loss = run_plateau(path, "val_loss")
            if loss["epochs"] < 2 or math.isnan(loss["best"]):
                continue
            mae = run_plateau(path, "val_forces_mae")
            rows.append(
                {
                    "dataset": name,
                    "run": str(path.parent.relative_to(out / name)),
                    "epochs": loss["epochs"],
                    "minutes": loss["minutes"],
                    "best_val_loss": loss["best"],
                    "best_val_forces_mae": mae["best"],
                    "tail_gain": loss["tail_gain"],
                }
            )
    return rows


def curves_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| dataset | run | epochs | minutes | best val loss | best val force MAE (eV/Å) | "
        "val loss drop over the last quarter |\n|---|---|---|---|---|---|---|\n"
    )
    body = [
        f"| {r['dataset']} | {r['run']} | {r['epochs']} | {r['minutes']:.1f} | "
        f"{_fmt(r['best_val_loss'])} | {_fmt(r['best_val_forces_mae'])} | "
        f"{100 * r['tail_gain']:.1f}% |"
        for r in rows
    ]
    return head + "\n".join(body) + "\n"


def table(rows: list[dict]) -> str:
    head = (
        "| dataset | test | method | Spearman | AUROC | AURC (oracle / random) | CRPS | NLL | "
        "miscal. area | force MAE | train cost | inference cost | MD cost |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for r in rows:
        body.append(
            f"| {r['dataset']} | {r['test']} | {r['method']} | {_fmt(r['spearman'])} | "
            f"{_fmt(r['auroc'])} | {_fmt(r['aurc'])} ({_fmt(r['aurc_oracle'])} / "
            f"{_fmt(r['aurc_random'])}) | {_fmt(r['crps'])} | {_fmt(r['nll'])} | "
            f"{_fmt(r['miscalibration_area'])} | {_fmt(r['forces_mae'])} | "
            f"{r['train_cost']:.2f}x | {r['inference_cost']:.2f}x | "
            f"{r.get('md_cost', math.nan):.2f}x |"
        )
    return head + "\n".join(body) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (CI)")
    p.add_argument("--minutes", type=float, help="override the per-model budget")
    p.add_argument("--datasets", nargs="+")
    p.add_argument("--parallel", type=int, default=1, help="datasets run at the same time")
    p.add_argument("--threads", type=int, default=2, help="torch threads per dataset run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="refit the recalibration of finished wrappers on their calibration set and "
        "evaluate again (after a change of the recalibration; no model is retrained)",
    )
    args = p.parse_args()
    mode_name = "quick" if args.quick else "full"
    if args.minutes:
        MODES[mode_name].minutes = args.minutes
        MODES[mode_name].nbody_minutes = min(args.minutes, MODES[mode_name].nbody_minutes)
    mode = MODES[mode_name]
    names = args.datasets or [
        "3bpa",
        "ethanol",
        "zeolites",
        *[f"nbody-{n}" for n in mode.nbody_sizes],
        "nbody-sizes",
    ]
    missing = [n for n in names if not n.startswith("nbody") and not SHARED.exists()]
    if missing:
        print(f"skipping {missing}: {SHARED} is absent", file=sys.stderr)
        names = [n for n in names if n not in missing]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if args.parallel > 1:
        with ProcessPoolExecutor(args.parallel) as pool:
            futures = [
                pool.submit(
                    run_dataset, n, mode_name, str(out), args.seed, args.threads, args.recalibrate
                )
                for n in names
            ]
            for f in futures:
                rows.extend(f.result())
    else:
        for n in names:
            rows.extend(
                run_dataset(n, mode_name, str(out), args.seed, args.threads, args.recalibrate)
            )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    header = {
        "mode": mode_name,
        "minutes_per_model": mode.minutes,
        "minutes_per_model_nbody": mode.nbody_minutes,
        "threads": args.threads,
        "parallel": args.parallel,
        "seed": args.seed,
        "git": commit,
        "platform": platform.platform(),
        "wall_s": time.perf_counter() - t0,
    }
    curves = learning_curves(out, names)
    (out / "uq.json").write_text(
        json.dumps({"settings": header, "rows": rows, "learning_curves": curves}, indent=1)
    )
    text = (
        f"# trustpot reliability benchmark ({mode_name})\n\n"
        f"{mode.minutes} min per trained model ({mode.nbody_minutes} min on N-body; "
        f"perturbation fine-tuning half of that), {args.threads} thread(s), "
        f"{args.parallel} dataset(s) at a time, seed {args.seed}, git {commit}. "
        "Ranking columns use the per-structure force MAE "
        "(energy error per atom for energy-only sets) against the method's score (force std; "
        "1 - reliability for PROBE); AUROC flags the top 20% errors; CRPS/NLL/miscalibration on "
        "force components (eV/Å); costs are ratios to one plain model.\n\n"
        + table(rows)
        + "\n## Training runs (learning curves in each run's metrics.csv)\n\n"
        + curves_table(curves)
    )
    (out / "uq.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
