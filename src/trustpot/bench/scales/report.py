"""Markdown report and PNG plots of a scale run (from the ``scales.json`` dictionary).

Plots (matplotlib, Agg backend):

- ``mae_vs_distance.png``: test force MAE against the frame's nearest cation-anion distance and
  against each ion's nearest counter-ion distance, for the fixed scales, the router and the
  continuous oracle, with the number of frames/ions per bin;
- ``pool_trajectory.png``: the pool after every refinement round and its calibration/test loss;
- ``router_vs_distance.png``: the router's per-ion s against the ion's counter-ion distance, and
  its frame-mean s against the frame distance next to the continuous oracle's per-frame s;
- ``mae_vs_scale.png``: calibration and test MAE of every fixed scale on a 1/16 grid;
- ``branch_curves.png``: each branch's calibration force MAE against epoch and minutes (from
  ``<branch>/metrics.csv`` in the run folder; left out when no branch folder is there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.train.plateau import learning_curve
from trustpot.units import EV_PER_A_IN_KJ_PER_MOL_PER_NM as KJ


def _tail(gain: float | None) -> str:
    """The plateau measure in words (None or NaN: too short a run to judge)."""
    if gain is None or not math.isfinite(gain):
        return "too few epochs to judge a plateau"
    return f"validation loss {100 * gain:.1f}% lower over the last quarter"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.1f}%"


def plot_mae_vs_distance(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    binned = result["binned"]
    labels = {
        "fixed_0": "s = 0 (short)",
        "fixed_1": "s = 1 (long)",
        "router": "router, per atom",
        "router_structure": "router, per structure",
        "oracle_continuous_structure": "continuous oracle",
    }
    th = result["options"]["threshold"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col", height_ratios=[3, 1])
    for col, level, xlabel in (
        (0, "frames", "frame's nearest cation-anion distance (Å)"),
        (1, "atoms", "ion's nearest counter-ion distance (Å)"),
    ):
        ax, axc = axes[0, col], axes[1, col]
        for key, label in labels.items():
            b = binned[key][level]
            edges = np.asarray(b["edges"])
            mids = 0.5 * (edges[1:] + edges[:-1])
            ax.plot(mids, np.asarray(b["mae"]), marker="o", ms=3, label=label)
        b = binned["fixed_0"][level]
        edges = np.asarray(b["edges"])
        axc.bar(edges[:-1], b["count"], width=np.diff(edges), align="edge", color="0.6")
        for a in (ax, axc):
            a.axvline(th, color="k", ls="--", lw=0.8)
        ax.set_ylabel("force MAE (eV/Å)")
        sec = ax.secondary_yaxis("right", functions=(lambda y: y * KJ, lambda y: y / KJ))
        sec.set_ylabel("kJ/mol/nm")
        axc.set_ylabel("frames" if level == "frames" else "ions")
        axc.set_xlabel(xlabel)
        ax.set_title(f"test force MAE by {level[:-1]} distance")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pool(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rounds = result["pool"]["rounds"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rounds:
        ax.scatter(r["pool"], [r["round"]] * len(r["pool"]), color="C0", s=18)
        if r["inserted"]:
            ax.scatter(r["inserted"], [r["round"] + 1] * len(r["inserted"]), color="C3", s=40,
                       marker="x")  # fmt: skip
    ax.set_xlabel("scale s")
    ax.set_ylabel("round")
    ax.set_title("pool after each round (x: inserted)")
    ax.invert_yaxis()
    idx = [r["round"] for r in rounds]
    ax2.plot(idx, [r["calibration_loss_ev_a"] for r in rounds], marker="o", label="calibration")
    ax2.plot(idx, [r["test_loss_ev_a"] for r in rounds], marker="s", label="test")
    ax2.set_xlabel("round")
    ax2.set_ylabel("pool MAE, oracle selection (eV/Å)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_router(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    r = result["router"]
    th = result["options"]["threshold"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.scatter(r["ion_distance"], r["ion_scale"], s=4, alpha=0.4)
    ax.set_xlabel("ion's nearest counter-ion distance (Å)")
    ax.set_ylabel("router s of the ion")
    ax.axvline(th, color="k", ls="--", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("learned router per ion (test)")
    ax2.scatter(r["frame_distance"], r["frame_mean_scale"], s=10, label="atom router, frame mean")
    ax2.scatter(
        r["frame_distance"], r["structure"]["frame_scale"], s=10, marker="^",
        label="structure router",
    )  # fmt: skip
    ax2.scatter(
        r["frame_distance"], r["oracle_frame_scale"], s=10, marker="x", label="continuous oracle s"
    )
    ax2.axvline(th, color="k", ls="--", lw=0.8)
    ax2.set_xlabel("frame's nearest cation-anion distance (Å)")
    ax2.set_ylabel("s")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale_grid(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    g = result["fixed_grid"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(g["scale"], g["calibration_mae"], marker="o", ms=3, label="calibration")
    ax.plot(g["scale"], g["test_mae"], marker="s", ms=3, label="test")
    ax.set_xlabel("fixed scale s")
    ax.set_ylabel("force MAE (eV/Å)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_branch_curves(out: Path, path: Path) -> bool:
    """Each branch's calibration force MAE against epoch and wall clock, from
    ``out/<branch>/metrics.csv``; False (nothing written) when no branch has one."""
    curves = {
        name: learning_curve(out / name / "metrics.csv", ["val_forces_mae"])
        for name in ("short", "long")
        if (out / name / "metrics.csv").is_file()
    }
    if not curves:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, curve in curves.items():
        mae = [row["val_forces_mae"] for row in curve]
        axes[0].plot([row["epoch"] for row in curve], mae, marker="o", ms=3, label=name)
        axes[1].plot([row["minutes"] for row in curve], mae, marker="o", ms=3, label=name)
    for ax, xlabel in zip(axes, ("epoch", "minutes")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("calibration force MAE (eV/Å)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table_lines(result: dict[str, Any]) -> list[str]:
    """The seed's table, row by row, with our test numbers (both units) next to the seed's."""
    rows = result["rows"]
    base = next(r for r in rows if r["key"] == "fixed_baseline")
    seed_base = result["seed_paper"]["fixed"]
    seed_contact = result["seed_paper"]["contact_fixed"]
    lines = [
        "| Mode | deployable | MAE eV/Å | MAE kJ/mol/nm | Δ vs baseline | close-contact frames "
        "eV/Å (kJ/mol/nm) | close-contact ions eV/Å | seed MAE | seed Δ | seed close-contact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = 100.0 * (r["overall_ev_a"] - base["overall_ev_a"]) / base["overall_ev_a"]
        seed = r["seed"]
        seed_d = 100.0 * (seed - seed_base) / seed_base if seed is not None else None
        sc = r["seed_contact"]
        seed_c = (
            "–" if sc is None else f"{sc:.2f} ({_pct(100.0 * (sc - seed_contact) / seed_contact)})"
        )
        lines.append(
            f"| {r['label']} | {'yes' if r['deployable'] else 'no (uses labels)'} "
            f"| {_f(r['overall_ev_a'])} | {_f(r['overall_kjmolnm'], 1)} | {_pct(d)} "
            f"| {_f(r['contact_frames_ev_a'])} ({_f(r['contact_frames_kjmolnm'], 1)}) "
            f"| {_f(r['contact_atoms_ev_a'])} "
            f"| {'–' if seed is None else f'{seed:.2f}'} | {_pct(seed_d)} | {seed_c} |"
        )
    return lines


#: Rows of the close-contact table (our key, and the seed's number when it has one).
CONTACT_ROWS = (
    ("fixed_baseline", "contact_fixed"),
    ("router", None),
    ("router_structure", None),
    ("differentiable_scale", None),
    ("oracle_hard_structure", None),
    ("oracle_continuous_structure", "contact_adaptive"),
    ("pool_refined", None),
    ("oracle_continuous_atom", None),
)


def contact_lines(result: dict[str, Any]) -> list[str]:
    """Close-contact MAEs (frames and ions under the threshold) and their change against the
    baseline, with the seed's 327.22 -> 260.51 (the seed does not say which mode gives 260.51; it
    is set against the continuous oracle here)."""
    rows = {r["key"]: r for r in result["rows"]}
    seed = result["seed_paper"]
    base = rows["fixed_baseline"]
    lines = [
        "| Close-contact MAE | frames eV/Å | frames kJ/mol/nm | Δ frames | ions eV/Å | Δ ions "
        "| seed | seed Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, seed_key in CONTACT_ROWS:
        r = rows[key]
        df = (
            100.0
            * (r["contact_frames_ev_a"] - base["contact_frames_ev_a"])
            / base["contact_frames_ev_a"]
        )
        da = (
            100.0
            * (r["contact_atoms_ev_a"] - base["contact_atoms_ev_a"])
            / base["contact_atoms_ev_a"]
        )
        sv = seed.get(seed_key) if seed_key else None
        sd = 100.0 * (sv - seed["contact_fixed"]) / seed["contact_fixed"] if sv else None
        lines.append(
            f"| {r['label']} | {_f(r['contact_frames_ev_a'])} "
            f"| {_f(r['contact_frames_kjmolnm'], 1)} | {_pct(df)} "
            f"| {_f(r['contact_atoms_ev_a'])} | {_pct(da)} "
            f"| {'–' if sv is None else f'{sv:.2f}'} | {_pct(sd)} |"
        )
    return lines


def _pool_lines(result: dict[str, Any]) -> list[str]:
    p = result["pool"]
    lines = [
        "| round | pool | calibration MAE eV/Å | test MAE eV/Å | inserted next |",
        "|---|---|---|---|---|",
    ]
    for r in p["rounds"]:
        pool = "{" + ", ".join(f"{s:g}" for s in r["pool"]) + "}"
        ins = ", ".join(f"{s:g}" for s in r["inserted"]) or "–"
        lines.append(
            f"| {r['round']} | {pool} | {_f(r['calibration_loss_ev_a'], 5)} "
            f"| {_f(r['test_loss_ev_a'], 5)} | {ins} |"
        )
    return lines


def _branch_budget(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{name}: {b.get('epochs')} epochs in {b.get('minutes', float('nan')):.1f} min"
        for name, b in result["branches"].items()
    )


def gain_vs(result: dict[str, Any], key: str, oracle: str) -> float:
    """Share of the gain of oracle row ``oracle`` over the baseline that row ``key`` recovers."""
    rows = {r["key"]: r for r in result["rows"]}
    base = rows["fixed_baseline"]["overall_ev_a"]
    gain = base - rows[oracle]["overall_ev_a"]
    return (base - rows[key]["overall_ev_a"]) / gain if gain > 0 else math.nan


def write_report(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/report.md`` and its PNGs; returns the report's path."""
    out = Path(out)
    plot_mae_vs_distance(result, out / "mae_vs_distance.png")
    plot_pool(result, out / "pool_trajectory.png")
    plot_router(result, out / "router_vs_distance.png")
    plot_scale_grid(result, out / "mae_vs_scale.png")
    curves = plot_branch_curves(out, out / "branch_curves.png")
    data, router, opts = result["data"], result["router"], result["options"]
    tb = result["testbed"]
    rows = {r["key"]: r for r in result["rows"]}
    contact = result["close_contact"]
    pool = result["pool"]
    seed = result["seed_paper"]
    seed_red = 100.0 * (seed["contact_fixed"] - seed["contact_adaptive"]) / seed["contact_fixed"]
    lines = [
        f"# Adaptive scale refinement: {tb.get('name', 'files')} testbed",
        "",
        f"Train {data['n_train']} frames, calibration {data['n_calibration']} (held out from "
        f"branch training; every choice below is made on it), test {data['n_test']} "
        f"({data['n_test_contact_frames']} close-contact frames, nearest cation-anion distance "
        f"< {opts['threshold']:g} Å). Branches: {opts['short_backbone']} at "
        f"{opts['short_cutoff']:g} Å (short) and {opts['long_backbone']} at "
        f"{opts['long_cutoff']:g} Å + learned-charge {opts['electrostatics']} (long), "
        f"{opts['n_features']} features, {opts['n_layers']} layers, trained separately with the "
        f"same budget in epochs ({_branch_budget(result)}; cap {opts['branch_minutes']:g} min "
        f"per branch; {'quick mode' if opts['quick'] else 'full mode'}).",
        "",
        "All numbers are test-set force MAEs over force components. The seed's numbers are "
        "copied as printed (the seed states no unit); compare the relative columns (Δ).",
        "",
        *table_lines(result),
        "",
        "## Learned router",
        "",
        f"The per-atom router recovers **{_f(router['gain_recovered_continuous'], 3)}** of the "
        "continuous oracle's "
        f"gain over the baseline on the test set ({_f(router['gain_recovered_hard'], 3)} of the "
        f"hard per-structure oracle's; {_f(router['gain_recovered_contact_frames'], 3)} in "
        f"close-contact frames). Gain recovered = (baseline - router) / (baseline - oracle); "
        f"above 1 the router beats that oracle, below 0 it is worse than the baseline. Mean "
        f"router s on test atoms: {_f(router['mean_scale'], 3)} (started at "
        f"{_f(router['init_scale'], 3)}). Against the per-atom continuous oracle (a bound on "
        "branch forces mixed atom by atom, not a conservative model) the per-atom router recovers "
        f"{_f(gain_vs(result, 'router', 'oracle_continuous_atom'), 3)} of the gain. "
        "The per-structure router (one s per frame from the "
        f"mean of its atoms' features) recovers "
        f"**{_f(router['structure']['gain_recovered_continuous'], 3)}** "
        f"({_f(router['structure']['gain_recovered_hard'], 3)} of the hard oracle's).",
        "",
        "![router](router_vs_distance.png)",
        "",
        "## Close contacts",
        "",
        "Close-contact frame MAE, baseline → router: "
        f"{_f(rows['fixed_baseline']['contact_frames_ev_a'])} → "
        f"{_f(rows['router']['contact_frames_ev_a'])} eV/Å "
        f"({_pct(-contact['router']['reduction_frames_pct'])}); baseline → continuous oracle: "
        f"{_pct(-contact['oracle_continuous_structure']['reduction_frames_pct'])}; close-contact "
        f"ions, baseline → router: {_pct(-contact['router']['reduction_atoms_pct'])}. Seed: "
        f"{seed['contact_fixed']} → {seed['contact_adaptive']} ({-seed_red:+.1f}%; the seed does "
        "not say which mode gives 260.51).",
        "",
        *contact_lines(result),
        "",
        "![mae vs distance](mae_vs_distance.png)",
        "",
        "## Pool refinement",
        "",
        "From {0, 1}, each round inserts the midpoint of the interval whose refinement lowers the "
        "pool loss most (refinement: any point that halving the interval reaches, down to "
        f"{pool['min_spacing']:g}; loss: {pool['loss']}); stop when that gain is less than "
        f"{pool['tolerance_relative']:g} of the current loss (stop reason: "
        f"{pool['stop_reason']}). Final pool: **{{{', '.join(f'{s:g}' for s in pool['final'])}}}** "
        f"(seed: {{{', '.join(f'{s:g}' for s in pool['seed_final'])}}}).",
        "",
        *_pool_lines(result),
        "",
        "![pool](pool_trajectory.png)",
        "",
        "![fixed scales](mae_vs_scale.png)",
        "",
        "## Run",
        "",
        f"Timings (s): {', '.join(f'{k} {v:.0f}' for k, v in result['timings'].items())}.",
        "Branches: "
        + "; ".join(
            f"{k}: {v.get('epochs')} epochs, {v.get('minutes', float('nan')):.1f} min, stopped by "
            f"{v.get('stopped_by')}, {_tail(v.get('val_loss_tail_gain'))}"
            for k, v in result["branches"].items()
        )
        + ".",
        *(["", "![branch learning curves](branch_curves.png)"] if curves else []),
    ]
    sources = result.get("by_test_source") or []
    if len(sources) > 1:
        keys = [k for k in sources[0] if k not in ("source", "frames")]
        lines += [
            "",
            "Test MAE (eV/Å) by test source:",
            "",
            "| source | frames | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for e in sources:
            name = Path(str(e["source"])).name
            lines.append(f"| {name} | {e['frames']} | " + " | ".join(_f(e[k]) for k in keys) + " |")
    excluded = tb.get("excluded")
    if excluded:
        lines += [
            "",
            "Excluded frames (force above the cap of "
            f"{tb.get('force_cap_ev_a')} eV/Å): "
            + ", ".join(
                f"{e['file']} frame {e['frame']} ({e['max_force_ev_a']:.1f} eV/Å)" for e in excluded
            )
            + ".",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def combined_table(results: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """One section per testbed with its table (for a summary of several runs)."""
    lines: list[str] = []
    for name, result in results:
        lines += [f"### {name}", "", *table_lines(result), ""]
    return lines
