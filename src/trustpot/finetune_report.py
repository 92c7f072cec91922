"""What fine-tuning did to a model: forgetting and representation drift (``report.json``).

Compared on the same frames (``--replay`` frames of the pretraining domain when given, else the
fine-tune's validation frames), the pretrained model (``before``) and the fine-tuned one
(``after``):

- **forgetting**: the force MAE (eV/Å) of ``after`` against ``before``'s own predictions (pseudo
  labels: how far the fine-tuned model moved from what the pretrained one predicted there), and,
  where the frames carry labels, both models' force MAE against them;
- **drift per layer** of the per-atom invariant embeddings (``embed(g)["layers"]``, atoms
  matched one to one): the 1-Wasserstein distance between the two distributions of each feature
  (``scipy.stats.wasserstein_distance``), averaged over features and divided by the pretrained
  feature's standard deviation (dimensionless), overall and per element; linear CKA between the
  two (1: the same up to rotation and scale); the Davies-Bouldin index of the atoms grouped by
  element, before and after (lower: elements better separated; a rise is the collapse the seed
  describes).

``verdict`` is one plain line stating whether the model forgot or collapsed beyond the stated
thresholds (:data:`THRESHOLDS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.structures import Structure
from trustpot.metrics.accuracy import pooled_mae
from trustpot.models.contract import Model

#: a layer "collapsed" when its Davies-Bouldin index by element grew by more than this factor or
#: its CKA fell below this value; the model "forgot" when its force MAE against the pretrained
#: predictions exceeds this many eV/Å
THRESHOLDS = {"davies_bouldin_growth": 1.5, "cka_min": 0.5, "forgetting_ev_a": 0.1}


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
    """Davies-Bouldin index of the rows of ``x`` [n, F] grouped by ``labels`` [n] (mean over
    groups of the worst (s_i + s_j) / d(c_i, c_j); lower is better separated); NaN with fewer
    than two groups."""
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


def drift(before: Model, after: Model, structures: Sequence[Structure]) -> list[dict[str, Any]]:
    """Per layer: scaled W1 (overall and per element), CKA, Davies-Bouldin before and after."""
    eb, numbers = layer_embeddings(before, structures)
    ea, _ = layer_embeddings(after, structures)
    rows = []
    for k, (b, a) in enumerate(zip(eb, ea)):
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
            }
        )
    return rows


def forgetting(before: Model, after: Model, structures: Sequence[Structure]) -> dict[str, float]:
    """Force MAE (eV/Å) of ``after`` against ``before``'s predictions, and of both models
    against the frames' force labels where they have them."""
    pb = Predictor(before).predict_structures(structures)
    pa = Predictor(after).predict_structures(structures)
    out = {
        "forces_mae_vs_pretrained": pooled_mae(a[K.FORCES] - b[K.FORCES] for a, b in zip(pa, pb))
    }
    labelled = [k for k, s in enumerate(structures) if s.forces is not None]
    if labelled:
        ref = [structures[k].forces for k in labelled]
        out["forces_mae_pretrained"] = pooled_mae(
            pb[k][K.FORCES] - r for k, r in zip(labelled, ref)
        )
        out["forces_mae_finetuned"] = pooled_mae(pa[k][K.FORCES] - r for k, r in zip(labelled, ref))
    return out


def verdict(report: dict[str, Any]) -> str:
    """One plain line: did the model forget or collapse beyond :data:`THRESHOLDS`?"""
    t = THRESHOLDS
    moved = report["forgetting"]["forces_mae_vs_pretrained"]
    collapsed = [
        r["layer"]
        for r in report["drift"]
        if r["cka"] < t["cka_min"]
        or r["davies_bouldin_after"] > t["davies_bouldin_growth"] * r["davies_bouldin_before"]
    ]
    forgot = moved > t["forgetting_ev_a"]
    parts = [
        f"{'FORGOT' if forgot else 'kept'}: force MAE against the pretrained predictions on the "
        f"{report['frames']} frames {moved:.4g} eV/Å (threshold {t['forgetting_ev_a']})",
        (
            f"COLLAPSED in layer(s) {collapsed}"
            if collapsed
            else "no layer collapsed (CKA >= "
            f"{t['cka_min']}, Davies-Bouldin growth <= {t['davies_bouldin_growth']}x)"
        ),
    ]
    return "; ".join(parts)


def finetune_report(
    before: Model, after: Model, structures: Sequence[Structure], frames: str
) -> dict[str, Any]:
    """The whole report on ``structures`` (described by ``frames`` in the output)."""
    report: dict[str, Any] = {
        "frames": frames,
        "n_structures": len(structures),
        "thresholds": dict(THRESHOLDS),
        "forgetting": forgetting(before, after, structures),
        "drift": drift(before, after, structures),
    }
    report["verdict"] = verdict(report)
    return report
