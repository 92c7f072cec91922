"""What fine-tuning did to a model: downstream error, forgetting and representation drift.

The figures of ``report.json`` (rendered as ``report.md`` with t-SNE maps by
:mod:`trustpot.finetune_render`), comparing the pretrained model (``before``) with the
fine-tuned one (``after``):

- **downstream error** (:func:`downstream_errors`): both models on the downstream validation
  frames (in domain) and on out-of-domain test frames when given: energy MAE/RMSE per atom
  (eV/atom) and force MAE/RMSE (eV/Å), by :func:`trustpot.metrics.accuracy.accuracy_metrics`.
  The caller chooses the ``before`` model there; ``trustpot finetune`` uses the fine-tune's
  step 0 (the starting model plus the fitted per-element energy offsets), so that the energy
  errors share one energy zero;
- **forgetting** (:func:`forgetting`): the pretraining task's error on frames of the
  pretraining domain (``--replay`` frames, else the validation frames), before and after. The
  reference is the frames' own energy and force labels when they are given (``labels`` =
  ``given``), otherwise the pretrained model's own predictions (``pseudo``: the pretrained error
  is then zero by construction, and the fine-tuned error is how far the model moved). The
  fine-tuned energies are taken with the pretrained model's per-element energy offsets (the
  downstream offsets only move the energy zero to the new level of theory);
  ``forces_mae_vs_pretrained`` (eV/Å) is always given;
- **drift per layer** of the per-atom invariant embeddings (``embed(g)["layers"]``, atoms
  matched one to one, :class:`Embeddings`): the 1-Wasserstein distance between the two
  distributions of each feature (``scipy.stats.wasserstein_distance``), averaged over features
  and divided by the pretrained feature's standard deviation (dimensionless), overall and per
  element; linear CKA between the two (1: the same up to rotation and scale); the
  Davies-Bouldin index of the atoms grouped by element and grouped by local environment
  (:mod:`trustpot.data.environments`), before and after (lower: groups better separated; a
  rise is a collapse of the representation).

``verdict`` is one plain line stating whether the model forgot or collapsed beyond the stated
thresholds (:data:`THRESHOLDS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.data.environments import environments
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.structures import Structure
from trustpot.metrics.accuracy import accuracy_metrics, pooled_mae
from trustpot.models.contract import Model
from trustpot.models.finetuned import FineTuned

#: ``forgetting_ev_a``: the model "forgot" when its pretraining-task force MAE rose by more than
#: this many eV/Å (against pseudo-labels: when it moved that far from the pretrained forces);
#: a layer "collapsed" when its CKA fell below ``cka_min`` or its Davies-Bouldin index grouped
#: by element (``davies_bouldin_growth``) or by local environment
#: (``davies_bouldin_env_growth``) grew by more than that factor
THRESHOLDS = {
    "forgetting_ev_a": 0.1,
    "cka_min": 0.5,
    "davies_bouldin_growth": 1.5,
    "davies_bouldin_env_growth": 1.5,
}

Metrics = Callable[[Sequence[Structure], Sequence[Mapping[str, Any]]], dict[str, float]]


@dataclass
class Embeddings:
    """Per-atom embeddings of the same atoms under both models.

    Attributes:
        before, after: per layer, [n_atoms, F_l] float64 (structures concatenated in order).
        numbers: [n_atoms] atomic numbers.
        environments: [n_atoms] local-environment labels (``Si(O4)``; rare ones pooled).
    """

    before: list[np.ndarray]
    after: list[np.ndarray]
    numbers: np.ndarray
    environments: np.ndarray


@torch.no_grad()
def layer_embeddings(
    model: Model, structures: Sequence[Structure], batch_size: int = 16
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-layer embeddings, each [n_atoms, F_l] (float64, structures in order), and the
    [n_atoms] atomic numbers."""
    model.eval()
    layers: list[list[np.ndarray]] = []
    numbers = []
    specs = model.neighbor_lists()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for start in range(0, len(structures), batch_size):
        chunk = list(structures[start : start + batch_size])
        g = collate([structure_to_graph(s, specs, model.dtype) for s in chunk])
        g = {k: v.to(device) for k, v in g.items()}
        emb = model.embed(g).get("layers", [])
        if not layers:
            layers = [[] for _ in emb]
        for k, h in enumerate(emb):
            layers[k].append(h.detach().double().cpu().numpy())
        numbers.append(g[K.ATOMIC_NUMBERS].cpu().numpy())
    return [np.concatenate(parts) for parts in layers], np.concatenate(numbers)


def compare_embeddings(before: Model, after: Model, structures: Sequence[Structure]) -> Embeddings:
    """Both models' per-layer embeddings of ``structures`` and the atoms' elements and
    environments."""
    eb, numbers = layer_embeddings(before, structures)
    ea, _ = layer_embeddings(after, structures)
    return Embeddings(eb, ea, numbers, environments(structures))


def scaled_w1(before: np.ndarray, after: np.ndarray) -> float:
    """Mean over features of the 1-Wasserstein distance between ``before`` [n, F] and
    ``after`` [n, F], each divided by the feature's standard deviation in ``before``."""
    out = []
    for f in range(before.shape[1]):
        scale = float(before[:, f].std()) or 1.0
        out.append(wasserstein_distance(before[:, f], after[:, f]) / scale)
    return float(np.mean(out)) if out else float("nan")


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear centred kernel alignment of [n, F_a] and [n, F_b] (1 when ``b`` is ``a`` up to an
    orthogonal transform and a scale)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    cross = np.linalg.norm(a.T @ b) ** 2
    norm = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    return float(cross / norm) if norm > 0 else float("nan")


def davies_bouldin(x: np.ndarray, labels: np.ndarray) -> float:
    """Davies-Bouldin index of the rows of ``x`` [n, F] grouped by ``labels`` [n] (any
    comparable values: atomic numbers, environment strings): mean over groups of the worst
    (s_i + s_j) / d(c_i, c_j); lower is better separated; NaN with fewer than two groups."""
    groups = np.unique(labels)
    if len(groups) < 2:
        return float("nan")
    centres = np.stack([x[labels == g].mean(0) for g in groups])
    spread = np.array(
        [np.linalg.norm(x[labels == g] - c, axis=1).mean() for g, c in zip(groups, centres)]
    )
    worst = []
    for i in range(len(groups)):
        d = np.linalg.norm(centres - centres[i], axis=1)
        ratios = [(spread[i] + spread[j]) / d[j] for j in range(len(groups)) if j != i and d[j]]
        worst.append(max(ratios) if ratios else float("inf"))
    return float(np.mean(worst))


def drift(emb: Embeddings) -> list[dict[str, Any]]:
    """Per layer: scaled W1 (overall and per element), CKA, Davies-Bouldin by element and by
    environment, before and after."""
    rows = []
    numbers, envs = emb.numbers, emb.environments
    for k, (b, a) in enumerate(zip(emb.before, emb.after)):
        per_element = {
            str(int(z)): scaled_w1(b[numbers == z], a[numbers == z]) for z in np.unique(numbers)
        }
        rows.append(
            {
                "layer": k,
                "w1": scaled_w1(b, a),
                "w1_per_element": per_element,
                "cka": linear_cka(b, a),
                "davies_bouldin_before": davies_bouldin(b, numbers),
                "davies_bouldin_after": davies_bouldin(a, numbers),
                "davies_bouldin_env_before": davies_bouldin(b, envs),
                "davies_bouldin_env_after": davies_bouldin(a, envs),
            }
        )
    return rows


def offsets_of(model: Model) -> dict[int, float]:
    """The per-element energy offsets of a fine-tuned model (eV; empty for any other)."""
    return model.offsets_by_element() if isinstance(model, FineTuned) else {}


def with_offsets(model: Model, offsets: Mapping[int, float]) -> FineTuned:
    """The base network of ``model`` (shared, not copied) with the per-element energy
    ``offsets`` (eV by atomic number; others zero): the same forces, another energy zero."""
    base = model.base if isinstance(model, FineTuned) else model
    value = torch.zeros(119, dtype=torch.float64)
    for z, v in offsets.items():
        value[int(z)] = float(v)
    return FineTuned(base, value)


def forgetting(
    before: Model, after: Model, structures: Sequence[Structure], given_labels: bool
) -> dict[str, Any]:
    """The pretraining task's error on ``structures`` before and after fine-tuning.

    Args:
        before, after: the pretrained and the fine-tuned model (``after``'s energies are taken
            with ``before``'s energy offsets, :func:`with_offsets`).
        structures: frames of the pretraining domain.
        given_labels: measure against the frames' own labels (every frame must have forces);
            else against ``before``'s predictions (pseudo-labels).

    Returns:
        ``labels`` (``given`` or ``pseudo``), ``forces_mae_vs_pretrained`` (eV/Å),
        ``pretrained`` and ``finetuned`` (:func:`~trustpot.metrics.accuracy.accuracy_metrics`:
        eV, eV/atom, eV/Å) and, with given labels, ``forces_mae_pretrained`` and
        ``forces_mae_finetuned`` (eV/Å).
    """
    pb = Predictor(before).predict_structures(structures)
    pa = Predictor(with_offsets(after, offsets_of(before))).predict_structures(structures)
    out: dict[str, Any] = {
        "labels": "given" if given_labels else "pseudo",
        "forces_mae_vs_pretrained": pooled_mae(a[K.FORCES] - b[K.FORCES] for a, b in zip(pa, pb)),
    }
    if given_labels:
        reference = list(structures)
    else:
        reference = [
            Structure(s.numbers, s.positions, s.cell, s.pbc, float(p[K.ENERGY]), p[K.FORCES])
            for s, p in zip(structures, pb)
        ]
    out["pretrained"] = accuracy_metrics(reference, pb)
    out["finetuned"] = accuracy_metrics(reference, pa)
    if given_labels:
        out["forces_mae_pretrained"] = out["pretrained"].get("forces_mae", math.nan)
        out["forces_mae_finetuned"] = out["finetuned"].get("forces_mae", math.nan)
    return out


def downstream_errors(
    before: Model,
    after: Model,
    sets: Mapping[str, tuple[str, Sequence[Structure]]],
    metrics: Metrics = accuracy_metrics,
) -> dict[str, dict[str, Any]]:
    """Both models' errors on each downstream frame set.

    Args:
        before, after: the model fine-tuning started from and the fine-tuned one.
        sets: name (``in_domain``, ``out_of_domain``) -> (description, labelled frames).
        metrics: errors of one model's predictions against the frames' labels
            (default :func:`~trustpot.metrics.accuracy.accuracy_metrics`: energy eV and eV/atom,
            forces eV/Å, a property head's output in its unit).

    Returns:
        per set: ``frames`` (the description), ``n_structures``, ``pretrained`` and
        ``finetuned`` (the metrics of each).
    """
    out = {}
    for name, (source, frames) in sets.items():
        row: dict[str, Any] = {"frames": source, "n_structures": len(frames)}
        for key, model in (("pretrained", before), ("finetuned", after)):
            predictor = Predictor(model)
            preds = predictor.predict_structures(frames, predictor.scored_outputs())
            row[key] = metrics(frames, preds)
        out[name] = row
    return out


def forgetting_rise(forgot: Mapping[str, Any]) -> float:
    """How much the pretraining-task force MAE rose (eV/Å): fine-tuned minus pretrained
    (against pseudo-labels that is ``forces_mae_vs_pretrained``)."""
    if "pretrained" in forgot and "finetuned" in forgot:
        return float(forgot["finetuned"]["forces_mae"] - forgot["pretrained"]["forces_mae"])
    return float(forgot["forces_mae_vs_pretrained"])


def collapse_reasons(row: Mapping[str, Any]) -> list[str]:
    """Why a drift row (one layer) counts as collapsed under :data:`THRESHOLDS` (empty: it
    does not); a NaN index (fewer than two groups) never counts."""
    t = THRESHOLDS
    out = []
    if row["cka"] < t["cka_min"]:
        out.append(f"CKA {row['cka']:.3g} < {t['cka_min']}")
    for key, label, limit in (
        ("davies_bouldin", "by element", t["davies_bouldin_growth"]),
        ("davies_bouldin_env", "by environment", t["davies_bouldin_env_growth"]),
    ):
        db0 = row.get(f"{key}_before", math.nan)
        db1 = row.get(f"{key}_after", math.nan)
        if db1 > limit * db0:
            out.append(f"Davies-Bouldin {label} {db0:.3g} -> {db1:.3g}")
    return out


def verdict(report: Mapping[str, Any]) -> str:
    """One plain line: did the model forget or collapse beyond :data:`THRESHOLDS`?"""
    t = THRESHOLDS
    forgot = report["forgetting"]
    rise = forgetting_rise(forgot)
    if forgot.get("labels") == "given":
        what = (
            f"pretraining-task force MAE on the {report['frames']} frames (given labels) "
            f"{forgot['pretrained']['forces_mae']:.4g} -> {forgot['finetuned']['forces_mae']:.4g}"
            f" eV/Å, rise {rise:.4g}"
        )
    else:
        what = f"force MAE against the pretrained predictions on the {report['frames']} frames "
        what += f"{rise:.4g} eV/Å"
    collapsed = {r["layer"]: collapse_reasons(r) for r in report["drift"]}
    collapsed = {k: v for k, v in collapsed.items() if v}
    if collapsed:
        why = "; ".join(f"layer {k}: {', '.join(v)}" for k, v in collapsed.items())
        shape = f"COLLAPSED in layer(s) {list(collapsed)} ({why})"
    else:
        shape = (
            f"no layer collapsed (CKA >= {t['cka_min']}, Davies-Bouldin growth <= "
            f"{t['davies_bouldin_growth']}x by element and <= {t['davies_bouldin_env_growth']}x "
            "by environment)"
        )
    head = "FORGOT" if rise > t["forgetting_ev_a"] else "kept"
    return f"{head}: {what} (threshold {t['forgetting_ev_a']}); {shape}"


def finetune_report(
    before: Model,
    after: Model,
    structures: Sequence[Structure],
    frames: str,
    emb: Embeddings | None = None,
    given_labels: bool = False,
    downstream: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report on ``structures`` (described by ``frames`` in the output).

    Args:
        before, after: the pretrained and the fine-tuned model.
        structures: frames of the pretraining domain (forgetting and drift).
        frames: what they are (a file name, ``validation``).
        emb: :func:`compare_embeddings` of the two models on ``structures`` (computed when
            absent).
        given_labels: forgetting against the frames' own labels, else pseudo-labels.
        downstream: :func:`downstream_errors`, copied in when given.
    """
    if emb is None:
        emb = compare_embeddings(before, after, structures)
    names, counts = np.unique(emb.environments, return_counts=True)
    report: dict[str, Any] = {
        "frames": frames,
        "n_structures": len(structures),
        "thresholds": dict(THRESHOLDS),
        "downstream": dict(downstream or {}),
        "forgetting": forgetting(before, after, structures, given_labels),
        "environments": {str(n): int(c) for n, c in zip(names, counts)},
        "drift": drift(emb),
    }
    report["verdict"] = verdict(report)
    return report
