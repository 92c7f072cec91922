"""Distance from the training manifold: k-nearest-neighbour distances of per-atom embeddings.

Each atom of a test structure is embedded by the trained model (``Potential.embed``, the
last layer's invariant features ``node`` [n_atoms, F]). Its distance to the training data is
the mean Euclidean distance to its ``k`` nearest *training atoms of the same element* in that
space (atoms of other elements are never neighbours: an O atom is not "near" an H atom). The
per-atom distances are divided by a per-element scale, the median of the same kNN distance of
held-out training atoms (leave-one-structure-out is too expensive; a random half of the
training atoms is the reference for the other half), so that 1 means "as far as a typical
training atom is from the rest of the training set" and numbers of different models and
elements can be compared. A structure's distance is the **maximum** over its atoms (one atom
in an unseen environment is enough for a structure to be out of domain); the mean over atoms
is reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.metrics import uncertainty

if TYPE_CHECKING:
    from trustpot.models.potential import Potential


class KDTree(Protocol):
    """What this module uses of ``scipy.spatial.cKDTree``."""

    @property
    def n(self) -> int: ...

    def query(self, x: np.ndarray, k: int) -> tuple[Any, Any]: ...


@torch.no_grad()
def atom_embeddings(
    model: Potential, structures: Sequence[Structure], batch_size: int = 32
) -> list[np.ndarray]:
    """Per-structure embeddings, each [n_atoms, F] float64, in the order of ``structures``."""
    from trustpot.data.graph import collate, structure_to_graph

    model.eval()
    out: list[np.ndarray] = []
    specs = model.neighbor_lists()
    for start in range(0, len(structures), batch_size):
        chunk = list(structures[start : start + batch_size])
        g = collate([structure_to_graph(s, specs, model.dtype) for s in chunk])
        node = model.embed(g)["node"].double().cpu().numpy()
        offsets = np.cumsum([0] + [s.n_atoms for s in chunk])
        out.extend(node[offsets[k] : offsets[k + 1]] for k in range(len(chunk)))
    return out


@dataclass
class KnnReference:
    """Training atoms per element and the per-element distance scale.

    Attributes:
        trees: atomic number -> ``scipy.spatial.cKDTree`` of training embeddings.
        scale: atomic number -> median kNN distance of held-out training atoms (embedding
            units); distances are divided by it.
        k: neighbours averaged.
        n_atoms: atomic number -> training atoms in the tree.
    """

    trees: dict[int, KDTree]
    scale: dict[int, float]
    k: int
    n_atoms: dict[int, int]


def _knn_mean(tree: KDTree, x: np.ndarray, k: int) -> np.ndarray:
    """[n_query] mean distance of each row of ``x`` to its ``k`` nearest points of ``tree``
    (all of them when the tree holds fewer)."""
    kk = min(k, tree.n)
    dist, _ = tree.query(x, k=kk)
    mean: np.ndarray = np.asarray(dist, dtype=np.float64).reshape(len(x), kk).mean(1)
    return mean


def fit_reference(
    embeddings: Sequence[np.ndarray],
    numbers: Sequence[np.ndarray],
    k: int = 5,
    max_atoms: int = 20000,
    seed: int = 0,
) -> KnnReference:
    """kNN reference of the training atoms.

    Args:
        embeddings: per training structure [n_atoms, F].
        numbers: per training structure [n_atoms] atomic numbers.
        k: neighbours averaged per query atom.
        max_atoms: at most this many training atoms per element (random, seeded).
        seed: seed of the subsampling and of the halves that set the scale.
    """
    from scipy.spatial import cKDTree

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not embeddings:
        raise ConfigError("no training structures to build the kNN reference from")
    x = np.concatenate(embeddings)
    z = np.concatenate(numbers).astype(int)
    rng = np.random.default_rng(seed)
    trees: dict[int, KDTree] = {}
    scale: dict[int, float] = {}
    counts: dict[int, int] = {}
    for element in np.unique(z):
        rows = np.flatnonzero(z == element)
        if len(rows) > max_atoms:
            rows = rng.choice(rows, max_atoms, replace=False)
        pts = x[rows]
        trees[int(element)] = cKDTree(pts)
        counts[int(element)] = len(rows)
        order = rng.permutation(len(pts))
        half = len(pts) // 2
        if half >= 1 and len(pts) - half >= 1:
            d = _knn_mean(cKDTree(pts[order[half:]]), pts[order[:half]], k)
            s = float(np.median(d))
        else:
            s = 0.0
        scale[int(element)] = s if s > 1e-12 else 1.0
    return KnnReference(trees, scale, k, counts)


def atom_distances(ref: KnnReference, embedding: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """[n_atoms] scaled kNN distances of one structure's atoms (``inf`` for an element that no
    training atom has)."""
    out = np.full(len(numbers), np.inf)
    for element in np.unique(numbers):
        rows = np.flatnonzero(numbers == element)
        tree = ref.trees.get(int(element))
        if tree is not None:
            out[rows] = _knn_mean(tree, embedding[rows], ref.k) / ref.scale[int(element)]
    return out


def structure_distances(
    ref: KnnReference, embeddings: Sequence[np.ndarray], numbers: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-structure (max over atoms, mean over atoms) of the scaled kNN distances, each [S]."""
    per_atom = [atom_distances(ref, e, z) for e, z in zip(embeddings, numbers)]
    return (
        np.array([d.max() for d in per_atom]),
        np.array([d.mean() for d in per_atom]),
    )


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of finite pairs; NaN with fewer than 3 or a constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return uncertainty.spearman(x[ok], y[ok])
