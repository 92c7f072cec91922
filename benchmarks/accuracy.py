"""Accuracy benchmark: every backbone under the same wall-clock budget on ethanol and 3BPA.

    python benchmarks/accuracy.py --minutes 30 --out benchmarks/results/accuracy

Datasets (read from ../shared/data, never copied into the repository):
- ethanol: rMD17 ``train.xyz`` (1000; 5% held out for validation) -> ``test_MD.xyz`` (1000).
- 3bpa: ``train_300K.xyz`` split 400 train / 100 test with seed 0 (5% of the 400 for
  validation), plus ``ood_mixedT_not_in_train_300K.xyz`` (hotter frames, out of domain).

Each run is ``trustpot train`` then ``trustpot eval`` in a subprocess, so the numbers are
what a user gets from the command line. Writes ``accuracy.json`` and ``accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase.io import read, write

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODELS = ("schnet", "painn", "egnn")


def prepare_3bpa(out: Path, seed: int = 0) -> dict[str, object]:
    """Write the 400/100 split of train_300K.xyz into ``out`` and describe it."""
    from trustpot.data.reader import file_sha256

    source = DATA / "3bpa" / "train_300K.xyz"
    frames = read(source, ":")
    order = np.random.default_rng(seed).permutation(len(frames))
    train_idx, test_idx = sorted(order[:400].tolist()), sorted(order[400:].tolist())
    write(out / "3bpa_train400.xyz", [frames[i] for i in train_idx], format="extxyz")
    write(out / "3bpa_test100.xyz", [frames[i] for i in test_idx], format="extxyz")
    return {
        "source": "3bpa/train_300K.xyz",
        "sha256": file_sha256(source),
        "seed": seed,
        "train_indices": train_idx,
        "test_indices": test_idx,
    }


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}); see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--datasets", nargs="+", default=["ethanol", "3bpa"], choices=["ethanol", "3bpa"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the shared datasets must sit beside the checkout")
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "accuracy.json"
    results = json.loads(result_path.read_text()) if result_path.exists() else {"runs": {}}
    results["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0]}
    results["minutes"] = args.minutes
    tasks: dict[str, tuple[str, dict[str, str]]] = {}
    if "ethanol" in args.datasets:
        tasks["ethanol"] = (
            str(DATA / "ethanol" / "train.xyz"),
            {"test_MD": str(DATA / "ethanol" / "test_MD.xyz")},
        )
    if "3bpa" in args.datasets:
        results["3bpa_split"] = prepare_3bpa(args.out, args.seed)
        tasks["3bpa"] = (
            str(args.out / "3bpa_train400.xyz"),
            {
                "test_300K": str(args.out / "3bpa_test100.xyz"),
                "ood_mixedT": str(DATA / "3bpa" / "ood_mixedT_not_in_train_300K.xyz"),
            },
        )
    trustpot = [sys.executable, "-m", "trustpot"]
    for dataset, (train, tests) in tasks.items():
        for model in args.models:
            name = f"{dataset}/{model}"
            if name in results["runs"] and results["runs"][name].get("minutes") == args.minutes:
                print(f"{name}: done already, skipping")
                continue
            run_dir = args.out / dataset / model
            log = args.out / f"{dataset}_{model}.log"
            start = time.time()
            print(f"{name}: training for {args.minutes} min", flush=True)
            run(
                trustpot
                + [
                    "train",
                    "--train",
                    train,
                    "--model",
                    model,
                    "--max-minutes",
                    str(args.minutes),
                    "--seed",
                    str(args.seed),
                    "--out",
                    str(run_dir),
                ]
                + (["--resume"] if (run_dir / "last.ckpt").exists() else []),
                log,
            )
            entry: dict[str, object] = {"minutes": args.minutes, "wall_s": time.time() - start}
            rows = (run_dir / "metrics.csv").read_text().splitlines()
            entry["epochs"] = len(rows) - 1
            for test_name, test_file in tests.items():
                eval_dir = run_dir / f"eval_{test_name}"
                run(
                    [*trustpot, "eval", str(run_dir / "best.ckpt"), test_file, "--out",
                     str(eval_dir)],
                    log,
                )
                metrics = json.loads((eval_dir / "metrics.json").read_text())
                entry[test_name] = {k: v for k, v in metrics.items() if isinstance(v, float)}
            results["runs"][name] = entry
            result_path.write_text(json.dumps(results, indent=1))
            print(f"{name}: " + json.dumps({t: entry[t]["forces_mae"] for t in tests}), flush=True)
    write_table(results, args.out / "accuracy.md")


def write_table(results: dict, path: Path) -> None:
    lines = [
        f"Budget: {results['minutes']} min per run ({results['machine']['platform']}).",
        "",
        "| dataset | model | epochs | test set | energy MAE (meV/atom) | force MAE (meV/Å) "
        "| force RMSE (meV/Å) | force cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in sorted(results["runs"].items()):
        dataset, model = name.split("/")
        for test_name, m in entry.items():
            if not isinstance(m, dict):
                continue
            lines.append(
                f"| {dataset} | {model} | {entry['epochs']} | {test_name} | "
                f"{1000 * m['energy_mae_per_atom']:.2f} | {1000 * m['forces_mae']:.1f} | "
                f"{1000 * m['forces_rmse']:.1f} | {m['forces_cosine']:.4f} |"
            )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
