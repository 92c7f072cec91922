"""The fine-tuning report for people: t-SNE maps (PNG) and ``report.md``.

:func:`tsne_maps` draws the last layer's per-atom embeddings of the pretrained and the
fine-tuned model side by side, the same atoms in both (at most :data:`MAX_MAP_ATOMS`, drawn
with a fixed seed), each map fitted by ``sklearn.manifold.TSNE`` with a fixed ``random_state``
and PCA initialisation (deterministic): ``tsne_element.png`` coloured by element and
``tsne_environment.png`` by local environment (:mod:`trustpot.data.environments`). t-SNE keeps
neighbourhoods, not distances: the two maps are fitted separately, so their axes mean nothing
and only which atoms sit together can be compared.

:func:`report_markdown` renders a :func:`trustpot.finetune_report.finetune_report` dictionary
as ``report.md``: the verdict, the downstream errors, forgetting before and after, the drift
per layer, the environments and the maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from trustpot.data.environments import BOND_FACTOR, MIN_COUNT
from trustpot.finetune_report import Embeddings, forgetting_rise

__all__ = ["MAX_MAP_ATOMS", "report_markdown", "tsne_2d", "tsne_maps"]

#: atoms drawn on the maps at most (t-SNE costs about O(n log n) and seconds per thousand)
MAX_MAP_ATOMS = 1000
#: t-SNE needs more points than this
MIN_MAP_ATOMS = 5


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """[n, 2] t-SNE map of the rows of ``x`` [n, F] (PCA start, ``random_state=seed``;
    perplexity 30, or (n - 1) / 3 for fewer than 91 rows)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(x) - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(np.asarray(x, dtype=np.float64)))


def _draw(
    maps: Sequence[np.ndarray], labels: np.ndarray, title: str, layer: int, path: Path
) -> None:
    """Before and after side by side, points coloured by ``labels`` [n] (the same colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(sorted(labels.tolist())))
    cmap = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    markers = "os^Dv<>P*X"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, xy, name in zip(axes, maps, ("pretrained", "fine-tuned")):
        for k, g in enumerate(groups):
            pick = labels == g
            ax.scatter(
                xy[pick, 0], xy[pick, 1], s=7, alpha=0.75, color=cmap(k % cmap.N),
                marker=markers[(k // cmap.N) % len(markers)], label=f"{g} ({int(pick.sum())})",
            )  # fmt: skip
        ax.set_title(f"{name}: layer {layer}, by {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tsne_maps(
    emb: Embeddings, out: Path, layer: int = -1, max_atoms: int = MAX_MAP_ATOMS, seed: int = 0
) -> dict[str, Any]:
    """Write ``out/tsne_element.png`` and ``out/tsne_environment.png`` of ``layer``.

    Args:
        emb: both models' embeddings of the same atoms.
        out: the run folder.
        layer: which layer (index into ``emb.before``; -1: the last).
        max_atoms: atoms drawn at most (a random subset, the same for both models).
        seed: seed of the subset and of t-SNE.

    Returns:
        ``layer`` (its index), ``n_atoms`` drawn, ``element`` and ``environment`` (the PNG
        names), or only a ``skipped`` reason when there are too few atoms or no layer.
    """
    if not emb.before:
        return {"skipped": "the model exposes no per-atom embedding layers"}
    n = len(emb.numbers)
    if n < MIN_MAP_ATOMS:
        return {"skipped": f"{n} atoms: too few for t-SNE"}
    k = layer % len(emb.before)
    pick = np.arange(n)
    if n > max_atoms:
        pick = np.sort(np.random.default_rng(seed).choice(n, max_atoms, replace=False))
    maps = [tsne_2d(h[pick], seed) for h in (emb.before[k], emb.after[k])]
    elements = np.array([chemical_symbols[int(z)] for z in emb.numbers[pick]])
    out.mkdir(parents=True, exist_ok=True)
    names = {"element": "tsne_element.png", "environment": "tsne_environment.png"}
    _draw(maps, elements, "element", k, out / names["element"])
    _draw(maps, emb.environments[pick], "environment", k, out / names["environment"])
    return {"layer": k, "n_atoms": len(pick), **names}


def _num(x: Any, scale: float = 1.0, digits: int = 4) -> str:
    """A number for a table (``-`` when absent or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{scale * float(x):.{digits}g}"


def _errors_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    lines = [
        "| model | structures | energy MAE (meV/atom) | energy RMSE (meV/atom) | "
        "force MAE (eV/Å) | force RMSE (eV/Å) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m.get('n_structures', '-')} | "
            f"{_num(m.get('energy_mae_per_atom'), 1000)} | "
            f"{_num(m.get('energy_rmse_per_atom'), 1000)} | {_num(m.get('forces_mae'))} | "
            f"{_num(m.get('forces_rmse'))} |"
        )
    return lines


def _downstream(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Downstream error", ""]
    titles = {"in_domain": "In domain", "out_of_domain": "Out of domain"}
    if not report.get("downstream"):
        return [*lines, "Not measured.", ""]
    lines += [
        "`pretrained` is the fine-tune's step 0: the starting model with the per-element "
        "energy offsets fitted to the training energies (forces as the starting model's), so "
        "both models' energies share the downstream energy zero.",
        "",
    ]
    for name, row in report["downstream"].items():
        lines += [f"### {titles.get(name, name)}: {row['frames']}", ""]
        lines += _errors_table(
            [("pretrained", row["pretrained"]), ("fine-tuned", row["finetuned"])]
        )
        lines.append("")
    if "out_of_domain" not in report["downstream"]:
        lines += ["No out-of-domain frames were given (`--test-ood FILE`).", ""]
    return lines


def _forgetting(report: Mapping[str, Any]) -> list[str]:
    f = report["forgetting"]
    lines = ["## Forgetting (the pretraining task)", ""]
    if f.get("labels") == "given":
        ref = "the frames' own energy and force labels (given)"
    else:
        ref = (
            "pseudo-labels: the pretrained model's own predictions (so its error is zero by "
            "construction, and the fine-tuned model's error is how far it moved)"
        )
    lines += [
        f"Frames: {report['frames']} ({report['n_structures']} structures). Reference: {ref}. "
        "The fine-tuned energies are taken with the pretrained model's energy offsets (the "
        "downstream offsets only move the energy zero).",
        "",
    ]
    if "pretrained" in f:
        lines += _errors_table([("pretrained", f["pretrained"]), ("fine-tuned", f["finetuned"])])
        lines.append("")
    lines += [
        f"Fine-tuned force MAE against the pretrained predictions: "
        f"{_num(f['forces_mae_vs_pretrained'])} eV/Å; rise of the pretraining-task force MAE: "
        f"{_num(forgetting_rise(f))} eV/Å (threshold {report['thresholds']['forgetting_ev_a']}).",
        "",
    ]
    return lines


def _drift(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Representation drift per layer",
        "",
        "W1: 1-Wasserstein distance between the pretrained and fine-tuned distributions of each "
        "feature, in units of the pretrained feature's standard deviation, averaged over "
        "features. CKA: linear centred kernel alignment (1: same up to rotation and scale). "
        "DB: Davies-Bouldin index of the atoms grouped by element or by local environment "
        "(lower: better separated).",
        "",
        "| layer | W1 | CKA | DB element before | DB element after | DB environment before | "
        "DB environment after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["drift"]:
        lines.append(
            f"| {r['layer']} | {_num(r['w1'])} | {_num(r['cka'])} | "
            f"{_num(r['davies_bouldin_before'])} | {_num(r['davies_bouldin_after'])} | "
            f"{_num(r.get('davies_bouldin_env_before'))} | "
            f"{_num(r.get('davies_bouldin_env_after'))} |"
        )
    if report["drift"]:
        zs = list(report["drift"][0]["w1_per_element"])
        symbols = [chemical_symbols[int(z)] for z in zs]
        lines += ["", "W1 per element:", "", f"| layer | {' | '.join(symbols)} |",
                  "|---" * (len(zs) + 1) + "|"]  # fmt: skip
        for r in report["drift"]:
            values = " | ".join(_num(r["w1_per_element"][z]) for z in zs)
            lines.append(f"| {r['layer']} | {values} |")
    envs = report.get("environments", {})
    if envs:
        lines += [
            "",
            f"Local environments (element, then the counts of neighbours closer than "
            f"{BOND_FACTOR} x the sum of covalent radii; environments of fewer than {MIN_COUNT} "
            "atoms pooled as `X(other)`), atoms of each:",
            "",
            ", ".join(f"`{name}` {count}" for name, count in envs.items()),
        ]
    return [*lines, ""]


def _maps(report: Mapping[str, Any]) -> list[str]:
    maps = report.get("maps", {})
    lines = ["## t-SNE maps", ""]
    if not maps or "skipped" in maps:
        return [*lines, f"Not drawn: {maps.get('skipped', 'not requested')}.", ""]
    return [
        *lines,
        f"Layer {maps['layer']}, {maps['n_atoms']} atoms, pretrained (left) and fine-tuned "
        "(right); each map fitted separately, so only neighbourhoods compare.",
        "",
        f"![by element]({maps['element']})",
        "",
        f"![by environment]({maps['environment']})",
        "",
    ]


def report_markdown(report: Mapping[str, Any], title: str = "Fine-tuning report") -> str:
    """``report.md``: the report of :func:`~trustpot.finetune_report.finetune_report` (plus
    ``maps`` from :func:`tsne_maps`) as Markdown tables, verdict first and last."""
    t = report["thresholds"]
    lines = [f"# {title}", "", f"**Verdict:** {report['verdict']}", ""]
    if "from" in report:
        lines += [f"Started from `{report['from']}`, strategy `{report.get('strategy')}`.", ""]
    lines += _downstream(report) + _forgetting(report) + _drift(report) + _maps(report)
    lines += [
        "## Thresholds",
        "",
        f"- forgot: pretraining-task force MAE rose by more than {t['forgetting_ev_a']} eV/Å",
        f"- collapsed (per layer): CKA below {t['cka_min']}, or Davies-Bouldin by element grown "
        f"more than {t['davies_bouldin_growth']}x, or by environment more than "
        f"{t['davies_bouldin_env_growth']}x",
        "",
        f"**Verdict:** {report['verdict']}",
        "",
    ]
    return "\n".join(lines)
