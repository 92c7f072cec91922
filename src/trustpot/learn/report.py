"""The report of ``trustpot learn``: ``report.json``, ``report.md``, ``learning_curve.png``.

Per strategy (the ``--uq`` method, and random with ``--baseline``) and round: labels used
(training + calibration frames), the test force MAE and energy MAE, how well the score ranks
the test frames' force errors (Spearman, AUROC for the 20% largest, RMS of error/std), and what
exploration harvested (frames visited, stops per MD segment, frames selected and labelled). The
comparison gives, for each strategy, the fewest labels with which it reached a force MAE: the
``--target-mae`` when given, and the level every strategy reached (the worst final MAE).
Errors in the Markdown and the figure are in meV/Å and meV/atom; the JSON keeps eV units.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trustpot.learn.options import LearnOptions


def labels_to_reach(rounds: Sequence[dict[str, Any]], level: float) -> int | None:
    """Fewest labels with which the test force MAE (eV/Å) was at most ``level``; None if never."""
    hits = [r["labels"] for r in rounds if r["test"]["forces_mae"] <= level]
    return min(hits) if hits else None


def comparison(results: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """Labels each strategy needed to reach the target and the common level (eV/Å)."""
    finals = [r["rounds"][-1]["test"]["forces_mae"] for r in results]
    common = max(finals)
    out: dict[str, Any] = {"common_level": common, "target": target, "strategies": {}}
    for r, final in zip(results, finals):
        out["strategies"][r["strategy"]] = {
            "final_forces_mae": final,
            "final_labels": r["rounds"][-1]["labels"],
            "labels_to_common_level": labels_to_reach(r["rounds"], common),
            "labels_to_target": None if target is None else labels_to_reach(r["rounds"], target),
        }
    return out


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def _cells(row: dict[str, Any]) -> list[str]:
    """One round's cells of a strategy table (meV units)."""
    t, a = row["test"], row.get("acquire")
    cells = [
        str(row["round"]),
        f"{row['labels']} ({row['train_frames']} + {row['calibration_frames']})",
        _fmt(t["forces_mae"], 1000),
        _fmt(t["energy_mae_per_atom"], 1000),
        _fmt(t.get("spearman"), 1, 2),
        _fmt(t.get("auroc"), 1, 2),
        _fmt(t.get("z_rms"), 1, 2),
    ]
    if a is None:
        cells += ["-"] * 5
    else:
        cells += [
            str(a["candidates"]),
            f"{len(a['stops'])}/{a['segments']}",
            f"{a['selected']} + {a['calibration']}",
            f"{a['labelled']} ({a['failed']})",
            _fmt(a.get("mean_selected_score"), 1, 3),
        ]
    return [*cells, f"{row['seconds']:.0f}", _fmt(a.get("seconds") if a else None, digits=0)]


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: the comparison, then one table per strategy."""
    opts, comp = report["options"], report["comparison"]
    lines = [
        "# trustpot learn",
        "",
        f"Engine {opts['engine']}; exploration at {opts['temperature']:g} K; "
        f"{report['start']['frames']} starting frames ({report['start']['calibration']} held "
        f"out for calibration); {report['test']['frames']} test frames; "
        f"{opts['per_round']} labels per round. Wall time {report['wall_s'] / 60:.1f} min.",
        "",
        "| strategy | labels | final force MAE (meV/Å) | labels to reach "
        f"{comp['common_level'] * 1000:.1f} meV/Å | labels to reach the target | stopped by |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["strategies"]:
        c = comp["strategies"][r["strategy"]]
        lines.append(
            f"| {r['strategy']} | {r['labels']} | {_fmt(c['final_forces_mae'], 1000)} "
            f"| {_fmt(c['labels_to_common_level'], digits=0)} "
            f"| {_fmt(c['labels_to_target'], digits=0)} | {r['stopped_by']} |"
        )
    for r in report["strategies"]:
        lines += [
            "",
            f"## {r['strategy']}",
            "",
            "| round | labels (train + cal) | force MAE (meV/Å) | energy MAE (meV/atom) "
            "| Spearman | AUROC | RMS z | visited | stops/segments | selected + cal "
            "| labelled (failed) | mean score selected | fit s | acquire s |",
            "|" + "---|" * 14,
        ]
        lines += ["| " + " | ".join(_cells(row)) + " |" for row in r["rounds"]]
    lines += [
        "",
        "Spearman and AUROC rank the test frames' force MAE by the selection score; "
        "RMS z is the RMS of force-component errors over the calibrated std (1 when "
        "calibrated). Files: `data.xyz` (every labelled frame, provenance in its info), "
        "`rounds/NN/`, `learning_curve.png`.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """``learning_curve.png``: test force MAE against labels, harvest and calibration per
    round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    strategies = report["strategies"]
    width = 0.8 / max(len(strategies), 1)
    target = report["options"]["target_mae"]
    for s, r in enumerate(strategies):
        rows, color = r["rounds"], f"C{s}"
        labels = [row["labels"] for row in rows]
        axes[0].plot(
            labels,
            [1000 * row["test"]["forces_mae"] for row in rows],
            "o-",
            color=color,
            label=r["strategy"],
        )
        acq = [(row["round"], row["acquire"]) for row in rows if "acquire" in row]
        x = [k + (s - (len(strategies) - 1) / 2) * width for k, _ in acq]
        axes[1].bar(
            x,
            [a["candidates"] for _, a in acq],
            width,
            color=color,
            alpha=0.3,
            label=f"{r['strategy']}: visited",
        )
        axes[1].bar(
            x,
            [a["labelled"] for _, a in acq],
            width,
            color=color,
            label=f"{r['strategy']}: labelled",
        )
        if any("spearman" in row["test"] for row in rows):
            rounds = [row["round"] for row in rows]
            axes[2].plot(
                rounds,
                [row["test"].get("spearman", math.nan) for row in rows],
                "o-",
                color=color,
                label=f"{r['strategy']}: Spearman",
            )
            axes[2].plot(
                rounds,
                [row["test"].get("auroc", math.nan) for row in rows],
                "s--",
                color=color,
                alpha=0.6,
                label=f"{r['strategy']}: AUROC",
            )
    n_rounds = max((len(r["rounds"]) for r in strategies), default=1)
    for ax in axes[1:]:
        ax.set_xticks(range(n_rounds))
    if target is not None:
        axes[0].axhline(1000 * target, color="grey", ls=":", label="target")
    axes[0].set(xlabel="labelled frames", ylabel="test force MAE (meV/Å)", title="learning curve")
    axes[1].set(xlabel="round", ylabel="frames", title="harvest per round")
    axes[2].set(
        xlabel="round", ylabel="on the test frames", ylim=(-1, 1.05), title="score vs force error"
    )
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    opts: LearnOptions,
    start: dict[str, Any],
    test: dict[str, Any],
    results: Sequence[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """Write the three report files in ``out``; returns the JSON content."""
    report = {
        "options": dataclasses.asdict(opts),
        "start": {k: v for k, v in start.items() if k != "reused"},
        "test": {k: v for k, v in test.items() if k != "reused"},
        "strategies": list(results),
        "comparison": comparison(results, opts.target_mae),
        "wall_s": wall_s,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "learning_curve.png")
    return report
