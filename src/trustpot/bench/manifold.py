"""Distance from the training manifold, for the compositional benchmark: per-atom embeddings of
structures, and their kNN distance (:class:`trustpot.uq.manifold.EmbeddingDistance`, the one
implementation, which PROBE also uses).

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
from typing import TYPE_CHECKING

import numpy as np
import torch

from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.metrics import uncertainty
from trustpot.uq.manifold import EmbeddingDistance

if TYPE_CHECKING:
    from trustpot.models.potential import Potential


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
        distance: the kNN module (:class:`trustpot.uq.manifold.EmbeddingDistance`).
        elements: atomic numbers of the element types, in type order.
    """

    distance: EmbeddingDistance
    elements: list[int]

    @property
    def k(self) -> int:
        return self.distance.k

    @property
    def scale(self) -> dict[int, float]:
        """Atomic number -> median kNN distance of held-out training atoms."""
        return {z: float(self.distance.scale[t]) for t, z in enumerate(self.elements)}

    @property
    def n_atoms(self) -> dict[int, int]:
        """Atomic number -> training atoms in the reference."""
        return {z: int((self.distance.types == t).sum()) for t, z in enumerate(self.elements)}

    def type_index(self, numbers: np.ndarray) -> torch.Tensor:
        """[n] type index of each atomic number (-1 for an element without training atoms)."""
        table = {z: t for t, z in enumerate(self.elements)}
        return torch.tensor([table.get(int(z), -1) for z in numbers], dtype=torch.long)


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
    if not embeddings:
        raise ConfigError("no training structures to build the kNN reference from")
    x = torch.as_tensor(np.concatenate(embeddings), dtype=torch.float64)
    z = np.concatenate(numbers).astype(int)
    elements = sorted(int(e) for e in np.unique(z))
    distance = EmbeddingDistance(x.shape[1], len(elements), k)
    ref = KnnReference(distance, elements)
    distance.set_reference(x, ref.type_index(z), max_atoms=max_atoms, seed=seed)
    return ref


def atom_distances(ref: KnnReference, embedding: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """[n_atoms] scaled kNN distances of one structure's atoms (``inf`` for an element that no
    training atom has)."""
    types = ref.type_index(numbers)
    out = np.full(len(numbers), np.inf)
    known = (types >= 0).numpy()
    if known.any():
        x = torch.as_tensor(embedding[known], dtype=torch.float64)
        out[known] = ref.distance.atom_distances(x, types[known]).numpy()
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
