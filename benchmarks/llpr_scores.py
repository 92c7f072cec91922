"""Which one-model-cost per-atom score ranks force errors? LLPR's per-atom scores compared.

One PaiNN per dataset and seed (``benchmarks/uq.py``'s data split and training recipe: 300
training frames, 6 minutes, one thread; N-body EGNN 1 minute) and, on its test sets, how well
each per-atom score, averaged over a structure's atoms, ranks the structures' force MAE
(Spearman; AUROC for flagging the worst 20%):

- ``local``: the per-structure rigidity of an atom's energy contribution,
  ``sqrt(f_i^T Sigma f_i)`` with LLPR's posterior ``Sigma`` (trustpot's ``--force-std local``
  until it was replaced);
- ``local-centered``: the same after subtracting each element's mean training feature from
  the atom features and from the structure sums that build ``Sigma``;
- ``distance``: the shipped ``--force-std distance`` (Mahalanobis distance from the training
  atoms of the same element, :func:`trustpot.uq.lastlayer.fit_feature_distance`);
- ``knn``: the mean distance to the 5 nearest training atoms of the same element in the same
  standardised features (:mod:`trustpot.uq.manifold`, what PROBE's off-manifold term uses);
- ``energy-std``: LLPR's exact energy std per atom (a structure-level score);
- ``samples``: LLPR's force std from 8 drawn last layers (8 backward passes of compute).

    python benchmarks/llpr_scores.py --out benchmarks/results/llpr_scores          # ~40 min
    python benchmarks/llpr_scores.py --quick --out /tmp/llpr-scores                # seconds

Trained models are reused from ``OUT/<dataset>_s<seed>/member0`` (the one reuse rule).
Outputs ``OUT/llpr_scores.json`` and ``OUT/llpr_scores.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("local", "local-centered", "distance", "knn", "energy-std", "samples")
RUNS = (("3bpa", 0), ("3bpa", 1), ("zeolites", 0), ("zeolites", 1), ("ethanol", 0))
RUNS_NBODY = (("nbody-sizes", 0),)


def run(name: str, seed: int, minutes: float, out: Path, quick: bool) -> dict[str, Any]:
    """Train (or reuse) one model and score every test set of ``name``."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import uq

    from trustpot import keys as K
    from trustpot.config import load_config
    from trustpot.data.dataset import GraphDataset
    from trustpot.data.graph import collate
    from trustpot.data.splits import read_data
    from trustpot.io.checkpoint import load_potential
    from trustpot.metrics.uncertainty import auroc, high_error_labels, spearman
    from trustpot.uq import fit as F
    from trustpot.uq.lastlayer import _inverse, _scaled, fit_llpr, last_layer
    from trustpot.uq.manifold import EmbeddingDistance

    torch.set_num_threads(1)
    mode = uq.MODES["quick" if quick else "full"]
    folder = out / f"{name}_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = uq.prepare(name, mode, folder, seed)
    spec = str(folder / "split.json")
    sets = {k: read_data(f"{spec}:{k}", require=()) for k in manifest["subsets"]}
    cfg = load_config(
        None,
        [f"model.hypers.{k}={v}" for k, v in mode.hypers.items()],
        {
            "data": {"train": f"{spec}:train", "valid_fraction": 0.1},
            "model": {"name": manifest["backbone"]},
            "train": {"max_minutes": minutes, "epochs": mode.epochs, "seed": seed, "threads": 1},
        },
    )
    base = load_potential(F.train_once(cfg, folder / "member0", print)).eval()
    below, _ = last_layer(base)

    def atoms_of(structures: list[Any]) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Per structure: atomic numbers, scaled last-layer features, force MAE (eV/Å)."""
        data = GraphDataset(structures, base.neighbor_lists(), base.dtype, name)
        rows = []
        for i in range(len(data)):
            g = collate([data.graph(i)])
            pred = base(g, {K.FORCES}, create_graph=False)[K.FORCES].detach().double()
            with torch.no_grad():
                f = _scaled(base, below(base.backbone(g)["node"])).numpy()
            err = float((pred - g[K.FORCES].double()).abs().mean())
            rows.append((g[K.ATOMIC_NUMBERS].numpy(), f, err))
        return rows

    train = atoms_of(sets["train"])
    z_all = np.concatenate([r[0] for r in train])
    f_all = np.concatenate([r[1] for r in train])
    mean = {int(z): f_all[z_all == z].mean(0) for z in np.unique(z_all)}

    def centred(z: np.ndarray, f: np.ndarray) -> np.ndarray:
        return f - np.stack([mean[int(a)] for a in z])

    samples = fit_llpr(base, sets["train"], sets["calibration"], log=print)
    distance = fit_llpr(base, sets["train"], sets["calibration"], force_std="distance", log=print)
    sigma = samples.covariance.numpy()
    phi_c = np.stack([centred(z, f).sum(0) for z, f, _ in train])
    sigma_c = _inverse(phi_c.T @ phi_c, float(samples.fit_report["regularizer"]))
    elements = sorted(mean)
    scale = f_all.std(0) + 1e-12
    knn = EmbeddingDistance(f_all.shape[1], len(elements)).double()
    knn.set_reference(
        torch.from_numpy(f_all / scale), torch.tensor([elements.index(int(a)) for a in z_all])
    )
    wanted = frozenset({K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD})
    result: dict[str, Any] = {"dataset": name, "seed": seed, "sets": {}}
    for subset in (k for k in manifest["subsets"] if k in ("test_id", "test_ood")):
        rows = atoms_of(sets[subset])
        data = GraphDataset(sets[subset], base.neighbor_lists(), base.dtype, name)
        score: dict[str, list[float]] = {k: [] for k in SCORES}
        for i, (z, f, _) in enumerate(rows):
            g = collate([data.graph(i)])
            fc = centred(z, f)
            types = torch.tensor([elements.index(int(a)) for a in z])
            score["local"].append(np.sqrt(np.einsum("ah,hk,ak->a", f, sigma, f)).mean())
            score["local-centered"].append(
                np.sqrt(np.einsum("ah,hk,ak->a", fc, sigma_c, fc)).mean()
            )
            score["distance"].append(float(distance.predict(g, wanted)[K.FORCES_STD].mean()))
            dist = knn.atom_distances(torch.from_numpy(f / scale), types)
            score["knn"].append(float(dist.mean()))
            out_s = samples.predict(g, wanted)
            score["energy-std"].append(float(out_s[K.ENERGY_STD].sum()) / len(z))
            score["samples"].append(float(out_s[K.FORCES_STD].mean()))
        err = np.array([r[2] for r in rows])
        worst = high_error_labels(err, 0.2)
        result["sets"][subset] = {
            k: {"spearman": spearman(np.array(v), err), "auroc": auroc(np.array(v), worst)}
            for k, v in score.items()
        }
        result["sets"][subset]["force_mae"] = float(err.mean())
    (folder / "scores.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per dataset, seed and test set; Spearman / AUROC per score."""
    head = "| dataset, seed | test set | force MAE (eV/Å) | " + " | ".join(SCORES) + " |"
    lines = [head, "|" + "---|" * (3 + len(SCORES))]
    for r in results:
        for subset, m in r["sets"].items():
            cells = [f"{m[k]['spearman']:.2f} / {m[k]['auroc']:.2f}" for k in SCORES]
            lines.append(
                f"| {r['dataset']}, {r['seed']} | {subset} | {m['force_mae']:.4f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="tiny models, one dataset (CI)")
    p.add_argument("--minutes", type=float, default=6.0, help="per PaiNN (N-body: 1)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import uq  # the data and budgets of the reliability benchmark

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        runs, minutes = (("nbody-sizes", 0),), 0.05
    else:
        runs, minutes = RUNS + RUNS_NBODY, args.minutes
    if not args.quick and not uq.SHARED.exists():
        raise SystemExit(f"{uq.SHARED} is absent: the datasets of this benchmark live there")
    results = []
    for name, seed in runs:
        budget = min(minutes, 1.0) if name.startswith("nbody") else minutes
        results.append(run(name, seed, budget, out, args.quick))
    (out / "llpr_scores.json").write_text(json.dumps(results, indent=1))
    text = (
        "# Per-atom scores at one model's cost: Spearman / AUROC (worst 20%) of each "
        "structure's mean score against its force MAE\n\n" + table(results) + "\n"
    )
    (out / "llpr_scores.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
