"""Accuracy benchmark: every backbone under the same wall-clock budget on ethanol and 3BPA.

    python benchmarks/accuracy.py --minutes 30 --parallel 2 --threads 1 \
        --out benchmarks/results/accuracy

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODELS = ("schnet", "painn", "egnn", "ace")


def model_spec(text: str) -> tuple[str, list[str]]:
    """``"ace:correlation=2,n_features=64"`` -> ``("ace", ["-o", "model.hypers.correlation=2",
    ...])``: a backbone with hyper-parameters set, for variants of one backbone side by side."""
    name, _, hypers = text.partition(":")
    if name not in MODELS:
        raise SystemExit(f"unknown model '{name}' in '{text}'; known: {', '.join(MODELS)}")
    overrides: list[str] = []
    for item in filter(None, hypers.split(",")):
        if "=" not in item:
            raise SystemExit(f"'{item}' in '{text}' must look like key=value")
        overrides += ["-o", f"model.hypers.{item}"]
    return name, overrides


def prepare_3bpa(out: Path, seed: int = 0) -> Path:
    """Split train_300K.xyz 400/100 with ``seed`` into a manifest (``trustpot data split``)."""
    manifest = out / "3bpa_split.json"
    run(
        [
            sys.executable,
            "-m",
            "trustpot",
            "data",
            "split",
            str(DATA / "3bpa" / "train_300K.xyz"),
            "--rule",
            "random",
            "--sizes",
            "train=400",
            "test=100",
            "--seed",
            str(seed),
            "--out",
            str(manifest),
        ],
        out / "split.log",
    )
    return manifest


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
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        help=f"backbones ({', '.join(MODELS)}), each optionally with hypers: ace:correlation=2",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=["ethanol", "3bpa"], choices=["ethanol", "3bpa"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at once (use 2 with --threads 1 on a 2-core machine)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = parser.parse_args()
    for spec in args.models:
        model_spec(spec)
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
        manifest = prepare_3bpa(args.out, args.seed)
        results["3bpa_split"] = str(manifest.name)
        tasks["3bpa"] = (
            f"{manifest}:train",
            {
                "test_300K": f"{manifest}:test",
                "ood_mixedT": str(DATA / "3bpa" / "ood_mixedT_not_in_train_300K.xyz"),
            },
        )
    trustpot = [sys.executable, "-m", "trustpot"]
    jobs = [
        (d, m)
        for d in tasks
        for m in args.models
        if results["runs"].get(f"{d}/{m}", {}).get("minutes") != args.minutes
    ]
    results["parallel"] = args.parallel
    results["threads_per_run"] = args.threads
    lock = threading.Lock()

    def one(dataset: str, model: str) -> None:
        train, tests = tasks[dataset]
        name = f"{dataset}/{model}"
        backbone, hypers = model_spec(model)
        folder = model.replace(":", "_").replace(",", "_")  # no ':' (split syntax) in paths
        run_dir = args.out / dataset / folder
        log = args.out / f"{dataset}_{folder}.log"
        start = time.time()
        print(f"{name}: training for {args.minutes} min", flush=True)
        resume = ["--resume"] if (run_dir / "last.ckpt").exists() else []
        run(
            [
                *trustpot,
                "train",
                "--train",
                train,
                "--model",
                backbone,
                "--max-minutes",
                str(args.minutes),
                "--seed",
                str(args.seed),
                "--out",
                str(run_dir),
                "-o",
                f"train.threads={args.threads}",
                *hypers,
                *resume,
            ],
            log,
        )
        entry: dict[str, object] = {"minutes": args.minutes, "wall_s": time.time() - start}
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        entry["epochs"] = len(rows) - 1
        for test_name, test_file in tests.items():
            eval_dir = run_dir / f"eval_{test_name}"
            run(
                [*trustpot, "eval", str(run_dir / "best.ckpt"), test_file, "--out", str(eval_dir)],
                log,
            )
            metrics = json.loads((eval_dir / "metrics.json").read_text())
            entry[test_name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with lock:
            results["runs"][name] = entry
            result_path.write_text(json.dumps(results, indent=1))
            write_table(results, args.out / "accuracy.md", echo=False)
        print(f"{name}: " + json.dumps({t: entry[t]["forces_mae"] for t in tests}), flush=True)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(one, d, m) for d, m in jobs]:
            future.result()
    write_table(results, args.out / "accuracy.md")


def write_table(results: dict, path: Path, echo: bool = True) -> None:
    lines = [
        f"Budget: {results['minutes']} min per run, {results.get('threads_per_run')} torch "
        f"thread(s) per run, {results.get('parallel')} run(s) at a time "
        f"({results['machine']['platform']}).",
        "",
        "| dataset | model | epochs | test set | energy MAE (meV/atom) | force MAE (meV/Å) "
        "| force RMSE (meV/Å) | force cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in sorted(results["runs"].items()):
        dataset, model = name.split("/", 1)
        for test_name, m in entry.items():
            if not isinstance(m, dict):
                continue
            lines.append(
                f"| {dataset} | {model} | {entry['epochs']} | {test_name} | "
                f"{1000 * m['energy_mae_per_atom']:.2f} | {1000 * m['forces_mae']:.1f} | "
                f"{1000 * m['forces_rmse']:.1f} | {m['forces_cosine']:.4f} |"
            )
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
