"""Markdown report and figures of the compositional benchmark (``OUT/report.md``, PNGs).

Written from the ``compositional.json`` summary alone (:func:`write_report`), so a report can be
regenerated without retraining. Figures per task: ``<task>_distance.png`` (per-structure force
MAE against the kNN embedding distance, one panel per model, in-domain and out-of-domain test
structures) and ``<task>_routing.png`` (DeepSet-MoE atoms per top expert and fragment); across
tasks: ``ratios.png`` (OOD/ID force-MAE ratio per model and task).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

#: The seed's fragment-duplication table (GMD-26): model -> (force MAE ID, OOD) in eV/Å.
SEED_DUPLICATION = {
    "SchNet": (0.0292, 0.1143),
    "PaiNN": (0.0020, 0.0600),
    "GemNet": (0.0009, 0.0224),
    "EquiFormerV2": (0.0018, 0.0538),
    "DimeNet++": (0.0018, 0.2484),
    "MACE": (0.0028, 0.0171),
    "NequIP": (0.0256, 0.0460),
}


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _g(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.3g}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def task_table(task: dict[str, Any]) -> list[str]:
    """Markdown rows of the seed's table for one task (plus offset and distance columns)."""
    lines = [
        "| model | F MAE ID | F MAE OOD | **OOD/ID** | cos ID | cos OOD | \\|F\\| MAE ID "
        "| \\|F\\| MAE OOD | E MAE ID | E MAE OOD | E OOD offset | E OOD rest | kNN ρ | epochs "
        "| last-quarter drop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in task["models"].items():
        i, o = m["subsets"]["test_id"], m["subsets"]["test_ood"]
        off = o.get("energy_offset", {})
        lines.append(
            f"| {name} | {_f(i.get('forces_mae'))} | {_f(o.get('forces_mae'))} "
            f"| **{_g(m['ratios'].get('forces_mae'))}** | {_f(i.get('forces_cosine'))} "
            f"| {_f(o.get('forces_cosine'))} | {_f(i.get('forces_magnitude_mae'))} "
            f"| {_f(o.get('forces_magnitude_mae'))} | {_f(i.get('energy_mae'), 3)} "
            f"| {_f(o.get('energy_mae'), 3)} | {_f(off.get('offset_mae'), 3)} "
            f"| {_f(off.get('mae_rest'), 3)} "
            f"| {_f(m['spearman'].get('max_distance_vs_forces_mae'), 2)} "
            f"| {m.get('training', {}).get('epochs', '–')} "
            f"| {_percent(m.get('training', {}).get('val_loss_tail_gain'))} |"
        )
    return lines


def _hardest_molecule(task: dict[str, Any]) -> tuple[str, float]:
    """The OOD molecule with the largest median (over models) force MAE, and that MAE."""
    per: dict[str, list[float]] = {}
    for m in task["models"].values():
        ps = m["per_structure"]["test_ood"]
        groups: dict[str, list[tuple[float, int]]] = {}
        for smi, mae, n in zip(ps["smiles"], ps["forces_mae"], ps["n_atoms"]):
            groups.setdefault(smi, []).append((mae, n))
        for smi, rows in groups.items():
            value = np.average([e for e, _ in rows], weights=[n for _, n in rows])
            per.setdefault(smi, []).append(float(value))
    if not per:
        return "–", math.nan
    medians = {smi: float(np.median(v)) for smi, v in per.items()}
    worst = max(medians, key=lambda k: medians[k])
    return worst, medians[worst]


def _ranking(summary: dict[str, Any]) -> list[str]:
    """Plain sentences: which model has the lowest ratio where, geometric means."""
    tasks = summary["tasks"]
    models = list(next(iter(tasks.values()))["models"]) if tasks else []
    ratios: dict[str, list[float]] = {m: [] for m in models}
    oods: dict[str, list[float]] = {m: [] for m in models}
    lines = []
    for name, t in tasks.items():
        r = {m: t["models"][m]["ratios"].get("forces_mae") for m in t["models"]}
        valid = {m: v for m, v in r.items() if v is not None}
        best_ratio = min(valid, key=lambda m: valid[m]) if valid else "–"
        f_ood = {m: t["models"][m]["subsets"]["test_ood"].get("forces_mae") for m in t["models"]}
        best_ood = min(f_ood, key=lambda m: f_ood[m] if f_ood[m] is not None else math.inf)
        worst = _hardest_molecule(t)
        median = float(np.median(list(valid.values()))) if valid else math.nan
        lines.append(
            f"- **{name}**: lowest OOD/ID force ratio {best_ratio} ({_g(valid.get(best_ratio))}); "
            f"lowest OOD force MAE {best_ood} ({_f(f_ood[best_ood])} eV/Å); median ratio "
            f"{_g(median)}; hardest OOD molecule `{worst[0]}` ({_f(worst[1])} eV/Å, median "
            "over models)."
        )
        for m in models:
            if m in r and r[m] is not None:
                ratios[m].append(r[m])
                oods[m].append(f_ood[m])
    lines.append("")
    lines.append("| model | geometric mean OOD/ID force ratio | worst ratio | mean OOD force MAE |")
    lines.append("|---|---|---|---|")
    gmean = {}
    for m in models:
        if ratios[m]:
            gmean[m] = float(np.exp(np.mean(np.log(ratios[m]))))
            lines.append(
                f"| {m} | {_g(gmean[m])} | {_g(max(ratios[m]))} | {_f(float(np.mean(oods[m])))} |"
            )
    # a variant "name:opt=value" next to its base "name" isolates one design choice
    pairs = [(m, m.split(":")[0]) for m in models if ":" in m and m.split(":")[0] in gmean]
    if pairs:
        lines.append("")
        lines.append("Design choices (a variant against its base model, same budget and data):")
        lines.append("")
    for variant, base in pairs:
        if variant in gmean:
            change = ", ".join(f"{o}" for o in variant.split(":", 1)[1].split(","))
            lines.append(
                f"- {base} with {change}: geometric-mean OOD/ID ratio {_g(gmean[base])} → "
                f"{_g(gmean[variant])}; mean OOD force MAE {_f(float(np.mean(oods[base])))} → "
                f"{_f(float(np.mean(oods[variant])))} eV/Å."
            )
    return lines


def molecule_lines(task: dict[str, Any]) -> list[str]:
    """Force MAE per OOD molecule (rows) and model (columns): where the error comes from."""
    models = list(task["models"])
    per: dict[str, dict[str, float]] = {}
    for name, m in task["models"].items():
        ps = m["per_structure"]["test_ood"]
        groups: dict[str, list[tuple[float, int]]] = {}
        for smi, mae, n in zip(ps["smiles"], ps["forces_mae"], ps["n_atoms"]):
            groups.setdefault(smi, []).append((mae, n))
        for smi, rows in groups.items():
            weights = [n for _, n in rows]
            per.setdefault(smi, {})[name] = float(np.average([e for e, _ in rows], weights=weights))
    id_row = {n: m["subsets"]["test_id"].get("forces_mae") for n, m in task["models"].items()}
    lines = [
        "Force MAE (eV/Å) per OOD molecule:",
        "",
        "| molecule | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
        "| *ID test (all)* | " + " | ".join(_f(id_row.get(m)) for m in models) + " |",
    ]
    for smi, row in per.items():
        lines.append(f"| `{smi}` | " + " | ".join(_f(row.get(m)) for m in models) + " |")
    return [*lines, ""]


def routing_lines(task: dict[str, Any]) -> list[str]:
    """Routing diagnostics of the DeepSet-MoE models of one task."""
    legend = {int(k): v for k, v in task.get("fragment_legend", {}).items()}
    lines: list[str] = []
    for name, m in task["models"].items():
        routing = m.get("routing")
        if not routing:
            continue
        lines.append(f"*{name}*:")
        lines.append("")
        lines.append(
            "| subset | atoms | expert load | top-expert share | router entropy (norm.) "
            "| I(expert; fragment) nats | normalised MI |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for subset, r in routing.items():
            load = ", ".join(f"{x:.2f}" for x in r["load"])
            top = ", ".join(f"{x:.2f}" for x in r["argmax_load"])
            lines.append(
                f"| {subset} | {r['n_atoms']} | {load} | {top} | {r['entropy']:.3f} "
                f"({r['normalised_entropy']:.2f}) | {r['mutual_information']:.3f} "
                f"| {r['normalised_mi']:.2f} |"
            )
        values = routing["test_ood"]["label_values"]
        names = ", ".join(f"{v} = {legend.get(int(v), 'scaffold')}" for v in values)
        lines.append("")
        lines.append(f"Fragment labels: {names}.")
        lines.append("")
    return lines


def _plots(summary: dict[str, Any], out: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, list[str]] = {}
    tasks = summary["tasks"]
    for name, t in tasks.items():
        figures[name] = []
        models = list(t["models"].items())
        ncols = min(3, len(models))
        nrows = math.ceil(len(models) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.3 * nrows), squeeze=False)
        for ax in axes.ravel()[len(models) :]:
            ax.set_visible(False)
        for ax, (label, m) in zip(axes.ravel(), models):
            for subset, color in (("test_id", "tab:blue"), ("test_ood", "tab:red")):
                ps = m["per_structure"][subset]
                ax.scatter(ps["distance_max"], ps["forces_mae"], s=6, alpha=0.5, c=color,
                           label=subset.replace("test_", "").upper(), rasterized=True)  # fmt: skip
            rho = m["spearman"].get("max_distance_vs_forces_mae")
            ax.set_title(f"{label}\nSpearman ρ = {_g(rho)}", fontsize=9)
            ax.set_xlabel("max atom kNN distance (scaled)")
            ax.set_ylabel("structure force MAE (eV/Å)")
            ax.set_yscale("log")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{name}: error vs distance from the training manifold", fontsize=10)
        fig.tight_layout()
        path = out / f"{name}_distance.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures[name].append(path.name)
        routed = [(label, m) for label, m in models if m.get("routing")]
        if routed:
            legend = {int(k): v for k, v in t.get("fragment_legend", {}).items()}
            panels = [(label, m, sub) for label, m in routed for sub in ("train", "test_ood")]
            fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3),
                                     squeeze=False)  # fmt: skip
            for ax, (label, m, sub) in zip(axes[0], panels):
                r = m["routing"][sub]
                table = np.asarray(r["table"], float)
                share = table / np.clip(table.sum(0, keepdims=True), 1, None)
                ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ticks = [legend.get(int(v), "scaffold") for v in r["label_values"]]
                ax.set_xticks(range(len(ticks)), ticks, rotation=30, fontsize=7, ha="right")
                ax.set_ylabel("top expert")
                ax.set_yticks(range(table.shape[0]))
                ax.set_title(f"{label}, {sub}: atoms of each fragment\nper top expert "
                             f"(MI {r['normalised_mi']:.2f})", fontsize=8)  # fmt: skip
            fig.tight_layout()
            path = out / f"{name}_routing.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            figures[name].append(path.name)
    model_names = list(next(iter(tasks.values()))["models"]) if tasks else []
    if model_names:
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tasks), 3.4))
        width = 0.8 / len(model_names)
        for k, label in enumerate(model_names):
            vals = [t["models"].get(label, {}).get("ratios", {}).get("forces_mae") or np.nan
                    for t in tasks.values()]  # fmt: skip
            ax.bar(np.arange(len(tasks)) + k * width, vals, width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, list(tasks))
        ax.set_ylabel("OOD / ID force MAE")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ratios.png", dpi=110)
        plt.close(fig)
        figures["_all"] = ["ratios.png"]
    return figures


def write_report(summary: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/report.md`` and its PNGs from a ``compositional.json`` summary."""
    out = Path(out)
    figures = _plots(summary, out)
    mode = summary["mode"]
    lines = [
        "# Compositional out-of-domain benchmark (GMD-26 protocol)",
        "",
        f"Mode **{mode['name']}**: {mode['frames_per_molecule']} GFN2-xTB MD frames per molecule "
        f"at {', '.join(f'{t:g}' for t in mode['temperatures'])} K; every model trained "
        f"**{summary['minutes_per_model']:g} min** of wall clock on "
        f"{summary['machine']['threads']} CPU thread(s), same data, seed "
        f"{summary['options']['seed']} and training options; hyper-parameters "
        f"{mode['hypers']}. Total {summary['wall_s'] / 60:.1f} min "
        f"(this invocation; reused models and data cost nothing).",
        "",
        "Units: forces eV/Å, energies eV per molecule. ID = held-out MD frames of the training "
        "molecules; OOD = molecules never seen in training. **OOD/ID** = force MAE ratio (the "
        "seed's models: 2x to over 100x). *E OOD offset* = MAE of the per-molecule constant part "
        "of the OOD energy error; *E OOD rest* = MAE of what is left, the error of energy "
        "differences between conformers (see below). *kNN ρ* = Spearman correlation "
        "between a test structure's distance from the training manifold and its force MAE "
        "(ID and OOD structures together).",
        "",
        *(
            ["**Partial run**: the tasks below finished; rerun the command to add the rest.", ""]
            if not summary.get("complete", True)
            else []
        ),
        "## Summary",
        "",
        *_ranking(summary),
        "",
        "![OOD/ID ratios](ratios.png)" if "_all" in figures else "",
        "",
    ]
    for name, t in summary["tasks"].items():
        frames = t["frames"]
        lines += [
            f"## Task `{name}`: {t['description']}",
            "",
            f"Training molecules: {', '.join(f'`{s}`' for s in t['molecules']['train'])}; "
            f"OOD molecules: {', '.join(f'`{s}`' for s in t['molecules']['test_ood'])}. "
            f"Frames: {frames['train']} train (10 % of them validate), {frames['test_id']} ID "
            f"test, {frames['test_ood']} OOD test.",
            "",
            *task_table(t),
            "",
        ]
        lines += molecule_lines(t)
        lines += [f"![{f}]({f})" for f in figures.get(name, []) if f.endswith("distance.png")]
        lines.append("")
        routing = routing_lines(t)
        if routing:
            lines += ["Routing (DeepSet-MoE):", "", *routing]
            lines += [f"![{f}]({f})" for f in figures.get(name, []) if f.endswith("routing.png")]
            lines.append("")
        lines += _offset_lines(t)
    isolated = summary["options"].get("reference_energies", "fit") == "isolated"
    reference = (
        "Reference energies per element are the free atoms' GFN2-xTB energies (ground-state "
        "spin), so the model learns atomisation energies; offsets left are the model's. "
        if isolated
        else "Reference energies per element are fitted by least squares to the training energies. "
    )
    lines += [
        "## How to read the numbers",
        "",
        f"- *Energy offsets.* {reference}A molecule that training never had (two COOH instead "
        "of one, a "
        "nitrile) can carry an energy error that is the same for all its conformers: forces, "
        "MD and conformational energy differences do not see it. The OOD energy error is split "
        "into that per-molecule constant (*offset*, its MAE over structures) and the *rest* "
        "(error of energy differences between conformers). Whether the offsets are a "
        "per-element energy (what a wrong reference energy gives) is the least-squares fit of "
        "the offsets on element counts; its explained share means something only with more "
        "distinct compositions than elements (marked *determined*).",
        "- *kNN distance.* Per atom: mean distance to its k nearest training atoms of the same "
        "element in the model's embedding space, divided by the median of the same distance "
        "among training atoms (1 = typical training atom). Per structure: the maximum over "
        "atoms. Spearman ρ > 0 means the distance ranks structures by error.",
        "- *Routing.* Expert load = share of routing weight per expert; router entropy per atom "
        "(normalised by log K); I(expert; fragment) = mutual information between an atom's "
        "most probable expert and its fragment label (0 = routing ignores fragments; the "
        "normalised value divides by H(fragment)).",
        "",
        "The seed's fragment-duplication force MAE (eV/Å, ID → OOD, ratio): "
        + "; ".join(f"{k} {a} → {b} ({b / a:.0f}x)" for k, (a, b) in SEED_DUPLICATION.items())
        + ".",
        "",
        "What the numbers mean, the design choices and the caveats: `docs/compositional.md`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _offset_lines(task: dict[str, Any]) -> list[str]:
    rows = []
    for name, m in task["models"].items():
        o = m["subsets"]["test_ood"].get("energy_offset") or {}
        if not o:
            continue
        per = ", ".join(f"{k} {v:+.3f}" for k, v in o["offset_per_element"].items())
        determined = "determined" if o["element_fit_determined"] else "not determined"
        rows.append(
            f"| {name} | {_f(o['energy_mae'], 3)} | {_f(o['energy_bias'], 3)} "
            f"| {_f(o['offset_mae'], 3)} | {_f(o['mae_rest'], 3)} | {o['offset_share']:.2f} "
            f"| {per} | {o['element_share']:.2f} ({determined}) |"
        )
    if not rows:
        return []
    return [
        "Energy error on OOD molecules, split (eV):",
        "",
        "| model | MAE | bias | offset MAE | rest MAE | offset share of squared error "
        "| per-element fit of offsets (eV/atom) | share explained |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
