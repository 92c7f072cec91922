"""Adaptive scale refinement benchmark: ``trustpot scales run`` on both NaCl(aq) testbeds.

Runs, one after the other and with one torch thread each (budgets long enough for the branches'
cosine schedules to reach a plateau: each branch trains until its minutes run out, the learning
rate decaying over those minutes; about 60 + 80 minutes on one core of the 2-core CI machine, or
run the two testbeds side by side with ``--testbeds``):

    trustpot scales run --testbed openmm --out OUT/openmm --threads 1 \
        --epochs 200 --branch-minutes 35 --router-minutes 5
    trustpot scales run --testbed dft --data-dir ../shared/data/nacl_water --out OUT/dft \
        --threads 1 --epochs 200 --branch-minutes 45 --router-minutes 6

then writes ``OUT/report.md`` (both tables, with links to each testbed's report) and
``OUT/summary.json``. Every finished branch and router is reused on a rerun.

    python benchmarks/scales.py --out benchmarks/results/scales            # the full run
    python benchmarks/scales.py --quick --out /tmp/scales-quick             # minutes
    python benchmarks/scales.py --report-only --out benchmarks/results/scales  # reports only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DFT_DIR = ROOT.parent / "shared" / "data" / "nacl_water"

#: Per testbed: the CLI flags of the full run.
FULL: dict[str, list[str]] = {
    "openmm": ["--epochs", "200", "--branch-minutes", "35", "--router-minutes", "5"],
    "dft": ["--epochs", "200", "--branch-minutes", "45", "--router-minutes", "6"],
}


def _command(testbed: str, out: Path, quick: bool, threads: int) -> list[str]:
    args = ["scales", "run", "--testbed", testbed, "--out", str(out / testbed)]
    args += ["--threads", str(threads)]
    if testbed == "dft":
        args += ["--data-dir", str(DFT_DIR)]
    return args + (["--quick"] if quick else FULL[testbed])


def _summary_lines(results: list[tuple[str, dict[str, Any], list[str]]]) -> list[str]:
    from trustpot.bench.scales.report import contact_lines, gain_vs, table_lines

    lines = [
        "# Adaptive scale refinement on NaCl in water (seed 000)",
        "",
        "Force MAEs on each testbed's test frames, in eV/Å and kJ/mol/nm, next to the seed's "
        "numbers as printed (the seed states no unit: compare the relative columns). Each "
        "testbed's own report has the plots, the pool trajectory and the router's behaviour.",
        "",
    ]
    for name, result, command in results:
        rows = {r["key"]: r for r in result["rows"]}
        router = result["router"]
        cc = result["close_contact"]
        lines += [
            f"## {name} ([report]({name}/report.md))",
            "",
            f"`trustpot {' '.join(command)}`",
            "",
            f"Train {result['data']['n_train']}, calibration {result['data']['n_calibration']}, "
            f"test {result['data']['n_test']} frames ({result['data']['n_test_contact_frames']} "
            f"in close contact). Final refined pool: "
            f"{{{', '.join(f'{s:g}' for s in result['pool']['final'])}}}. Router gain recovered "
            "(continuous per-structure oracle): per atom "
            f"{router['gain_recovered_continuous']:.3f}, "
            f"per structure {router['structure']['gain_recovered_continuous']:.3f}; per-atom "
            f"router against the per-atom force-mixing bound "
            f"{gain_vs(result, 'router', 'oracle_continuous_atom'):.3f}. Close-contact "
            f"frame MAE change, baseline → router: {-cc['router']['reduction_frames_pct']:+.1f}%, "
            f"→ continuous oracle: "
            f"{-cc['oracle_continuous_structure']['reduction_frames_pct']:+.1f}%. "
            f"Baseline {rows['fixed_baseline']['overall_ev_a']:.4f} eV/Å. Wall time "
            f"{result['timings']['total_s'] / 60:.1f} min.",
            "",
            *table_lines(result),
            "",
            *contact_lines(result),
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--testbeds", nargs="+", default=["openmm", "dft"])
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite every report from the finished runs' scales.json (no model is run)",
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from trustpot.cli.main import main as trustpot

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    t0 = time.perf_counter()
    for testbed in args.testbeds:
        if testbed == "dft" and not DFT_DIR.is_dir():
            print(f"skipping the DFT testbed: {DFT_DIR} not found", flush=True)
            continue
        command = _command(testbed, out, args.quick, args.threads)
        if args.report_only:
            code = trustpot(["scales", "report", str(out / testbed)])
        else:
            print(f"== trustpot {' '.join(command)}", flush=True)
            code = trustpot(command)
        if code != 0:
            print(f"the {testbed} run failed (exit {code})", file=sys.stderr)
            return code
        result = json.loads((out / testbed / "scales.json").read_text())
        shown = [os.path.relpath(c, ROOT) if c.startswith("/") else c for c in command]
        results.append((testbed, result, shown))
    lines = _summary_lines(results)
    run_minutes = sum(r["timings"]["total_s"] for _, r, _ in results) / 60
    lines += [
        f"Machine: {platform.processor() or platform.machine()}, torch threads {args.threads}; "
        f"the runs took {run_minutes:.1f} min (scales run steps, OpenMM data generation not "
        f"included); this invocation {(time.perf_counter() - t0) / 60:.1f} min.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        name: {
            "rows": result["rows"],
            "pool": result["pool"]["final"],
            "router_gain_recovered": result["router"]["gain_recovered_continuous"],
            "timings": result["timings"],
        }
        for name, result, _ in results
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
