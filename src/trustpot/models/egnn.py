"""E(n)-equivariant graph network (Satorras, Hoogeboom, Welling, ICML 2021) for energies.

Messages depend on invariant features and distances; positions are updated along relative
vectors (equivariant), and the energy reads only invariant features. Every message is
weighted by a cutoff function of the *input* distance, so the energy is smooth when atoms
cross the cutoff, and periodic images work because cell shifts stay fixed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from trustpot.data.graph import Graph
from trustpot.models.base import Backbone, BackboneHypers, Embedding, LayerGroups, edge_vectors
from trustpot.nn import MLP, BesselBasis, CosineCutoff, scatter_sum


@dataclasses.dataclass(frozen=True)
class EGNNHypers(BackboneHypers):
    """EGNN hyper-parameters.

    Attributes:
        n_rbf: Bessel functions expanding each (updated) distance.
        update_positions: let layers move the equivariant coordinates.
    """

    n_rbf: int = 16
    update_positions: bool = True


class EGNNLayer(nn.Module):
    """One EGNN layer: edge messages, optional coordinate update, feature update."""

    def __init__(self, f: int, n_rbf: int, update_positions: bool) -> None:
        super().__init__()
        self.edge = MLP([2 * f + n_rbf, f, f])
        self.act = nn.SiLU()
        self.node = MLP([2 * f, f, f])
        self.coord = MLP([f, f, 1], bias_last=False) if update_positions else None

    def forward(
        self,
        h: Tensor,
        x: Tensor,
        base_vec: Tensor,
        index: Tensor,
        fcut: Tensor,
        rbf_fn: BesselBasis,
        norm: float,
    ) -> tuple[Tensor, Tensor]:
        i, j = index[0], index[1]
        vec = x[j] - x[i] + base_vec
        r = torch.sqrt((vec * vec).sum(-1) + 1e-12)
        m = self.act(self.edge(torch.cat([h[i], h[j], rbf_fn(r)], dim=-1))) * fcut.unsqueeze(-1)
        n = h.shape[0]
        if self.coord is not None:
            step = torch.tanh(self.coord(m)) * vec / (r.unsqueeze(-1) + 1.0)
            x = x + scatter_sum(step, i, n) / norm
        h = h + self.node(torch.cat([h, scatter_sum(m, i, n) / norm], dim=-1))
        return h, x


class EGNN(Backbone):
    """EGNN backbone; ``node`` holds the last invariant features."""

    Hypers = EGNNHypers

    def __init__(self, hypers: EGNNHypers, species: list[int], avg_neighbors: float) -> None:
        super().__init__(hypers, species, avg_neighbors)
        f = hypers.n_features
        self.embedding = nn.Embedding(self.n_types, f)
        self.rbf = BesselBasis(hypers.cutoff, hypers.n_rbf)
        self.cutoff_fn = CosineCutoff(hypers.cutoff)
        self.layers = nn.ModuleList(
            EGNNLayer(f, hypers.n_rbf, hypers.update_positions) for _ in range(hypers.n_layers)
        )

    def layer_groups(self) -> LayerGroups:
        """``embedding`` then ``interaction_k`` per layer (see :meth:`Backbone.layer_groups`)."""
        return self.interaction_layers(list(self.layers))

    def forward(self, g: Graph) -> Embedding:
        index, vec, r = edge_vectors(g, "main")
        x = torch.zeros_like(g["positions"])
        # vec = pos_j - pos_i + shift: carry positions as zero offsets plus fixed edge vectors,
        # so updated vectors are (x_j - x_i) + vec and periodic images need no special case
        fcut = self.cutoff_fn(r)
        h = self.embedding(self.type_index(g))
        layers = []
        for k, layer in enumerate(self.layers):
            h, x = layer(h, x, vec, index, fcut, self.rbf, self.avg_neighbors)
            h = self.modulate(k, h, g)
            layers.append(h)
        return {"node": h, "layers": layers}
