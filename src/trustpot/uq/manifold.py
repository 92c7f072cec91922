"""Distance from the training manifold: kNN distances of per-atom embeddings, as a module.

An atom's distance is the mean Euclidean distance of its embedding to its ``k`` nearest
*reference atoms of the same element* (an O atom is never "near" an H atom), divided by a
per-element scale: the median of the same distance for a random half of the reference atoms
measured against the other half, so 1 means "as far as a typical reference atom is from the
rest". A structure's distance is the **maximum** over its atoms (one atom in an unseen
environment is enough to leave the data); an element with no reference atom is infinitely far.

The reference points are buffers, so the module is saved in checkpoints (``weights_only``) and
moves to the model's device; distances are computed with ``torch.cdist`` in chunks. This is the
one implementation: PROBE uses it to lower its reliability off the manifold
(:mod:`trustpot.uq.probe`), and the compositional benchmark reports it
(:mod:`trustpot.bench.manifold`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trustpot.errors import ConfigError
from trustpot.nn import scatter_sum

#: query rows per ``cdist`` call (bounds memory: CHUNK x reference atoms of one element)
CHUNK = 4096


class EmbeddingDistance(nn.Module):
    """kNN distance of atom embeddings to a stored reference set, per element.

    Args:
        n_features: embedding width F.
        n_types: number of element types (indices ``0..n_types-1``).
        k: neighbours averaged.
    """

    points: Tensor  # [n_ref, F]
    types: Tensor  # [n_ref] element index of each reference atom
    scale: Tensor  # [n_types] per-element median kNN distance (1 for an element without atoms)

    def __init__(self, n_features: int, n_types: int, k: int = 5) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.n_types = int(n_types)
        self.register_buffer("points", torch.zeros((0, n_features)))
        self.register_buffer("types", torch.zeros(0, dtype=torch.long))
        self.register_buffer("scale", torch.ones(n_types, dtype=torch.float64))

    def set_reference(self, x: Tensor, types: Tensor, max_atoms: int = 4096, seed: int = 0) -> None:
        """Store at most ``max_atoms`` random reference atoms per element of ``x`` [n, F]
        (``types`` [n]) and fit the per-element scales (random halves, seeded)."""
        gen = torch.Generator().manual_seed(seed)
        keep: list[Tensor] = []
        scale = torch.ones(self.n_types, dtype=torch.float64)
        for t in range(self.n_types):
            rows = torch.nonzero(types.cpu() == t).flatten()
            if len(rows) > max_atoms:
                rows = rows[torch.randperm(len(rows), generator=gen)[:max_atoms]]
            keep.append(rows)
            order = rows[torch.randperm(len(rows), generator=gen)]
            half = len(order) // 2
            if half >= 1:
                pts = x[order[half:]].double()
                d = _knn_mean(pts, x[order[:half]].double(), self.k)
                s = float(d.median())
                scale[t] = s if s > 1e-12 else 1.0
        rows = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
        self.points = x[rows.to(x.device)].detach().clone()
        self.types = types[rows.to(types.device)].detach().clone()
        self.scale = scale.to(x.device)

    @property
    def is_set(self) -> bool:
        return self.points.shape[0] > 0

    def atom_distances(self, x: Tensor, types: Tensor) -> Tensor:
        """[n_atoms] scaled kNN distance of each row of ``x`` [n_atoms, F] (float64; ``inf``
        for an element without reference atoms)."""
        out = torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
        for t in torch.unique(types).tolist():
            ref = self.points[self.types == t]
            if ref.shape[0] == 0:
                continue
            rows = torch.nonzero(types == t).flatten()
            out[rows] = _knn_mean(ref.double(), x[rows].double(), self.k) / self.scale[t]
        return out

    def forward(self, x: Tensor, types: Tensor, batch: Tensor, n_graphs: int) -> Tensor:
        """[n_graphs] distance of each structure: the maximum over its atoms."""
        d = self.atom_distances(x, types)
        out = torch.full((n_graphs,), -float("inf"), dtype=torch.float64, device=x.device)
        return out.scatter_reduce(0, batch, d, reduce="amax")

    def mean_distance(self, x: Tensor, types: Tensor, batch: Tensor, n_graphs: int) -> Tensor:
        """[n_graphs] mean over each structure's atoms of the scaled distances."""
        d = self.atom_distances(x, types)
        count = scatter_sum(torch.ones_like(d), batch, n_graphs)
        return scatter_sum(d, batch, n_graphs) / count.clamp_min(1.0)


def _knn_mean(ref: Tensor, query: Tensor, k: int) -> Tensor:
    """[n_query] mean distance of each query row to its ``k`` nearest rows of ``ref`` (all of
    them when ``ref`` has fewer)."""
    kk = min(k, ref.shape[0])
    parts = []
    for start in range(0, query.shape[0], CHUNK):
        dist = torch.cdist(query[start : start + CHUNK], ref)
        parts.append(dist.topk(kk, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=query.dtype, device=query.device)


def off_manifold_factor(distance: Tensor, onset: float) -> Tensor:
    """[n] factor in (0, 1] that lowers a reliability off the manifold:
    ``exp(-max(0, d - onset) / onset)``.

    1 up to ``onset`` (the largest distance of calibration structures held out of the
    reference, so in-domain structures keep their reliability), then a fall by a factor e for
    every further ``onset``: a structure twice as far as any held-out calibration structure
    keeps at most 37% of its reliability, three times as far 14%. The shape is a fixed prior,
    not fitted: calibration data cannot show how fast reliability should fall where they have
    no examples.
    """
    excess = (distance - onset).clamp_min(0.0) / onset
    return torch.exp(-excess)


def load_reference(module: EmbeddingDistance, state: object, path: str) -> None:
    """Load a stored reference (``points`` [n, F], ``types`` [n], ``scale`` [n_types]) into
    ``module``, checking shapes and finiteness.

    Raises:
        CheckpointError: naming ``path`` and the offending tensor.
    """
    from trustpot.errors import CheckpointError

    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the manifold reference is not a state dict")
    points, types, scale = state.get("points"), state.get("types"), state.get("scale")
    tensors = (points, types, scale)
    if not all(isinstance(t, Tensor) for t in tensors):
        raise CheckpointError(f"{path}: the manifold reference lacks points, types or scale")
    assert isinstance(points, Tensor) and isinstance(types, Tensor) and isinstance(scale, Tensor)
    f = module.points.shape[1]
    if points.ndim != 2 or points.shape[1] != f or types.shape != (points.shape[0],):
        raise CheckpointError(
            f"{path}: manifold reference of shape {tuple(points.shape)}, expected [n, {f}]"
        )
    if scale.shape != (module.n_types,) or not bool(torch.isfinite(points).all()):
        raise CheckpointError(f"{path}: malformed manifold reference (scale or NaN points)")
    if types.numel() and (int(types.min()) < 0 or int(types.max()) >= module.n_types):
        raise CheckpointError(f"{path}: manifold reference types out of range")
    module.points, module.types, module.scale = points, types.long(), scale.double()
