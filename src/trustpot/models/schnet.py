"""SchNet (Schütt et al., J. Chem. Phys. 148, 241722, 2018): continuous-filter convolutions."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from trustpot.data.graph import Graph
from trustpot.models.base import Backbone, BackboneHypers, Embedding, LayerGroups, edge_vectors
from trustpot.nn import CosineCutoff, GaussianBasis, ShiftedSoftplus, scatter_sum


@dataclasses.dataclass(frozen=True)
class SchNetHypers(BackboneHypers):
    """SchNet hyper-parameters.

    Attributes:
        n_rbf: number of Gaussians expanding each distance.
        n_filters: width of the filter network.
    """

    n_rbf: int = 50
    n_filters: int = 64


class CFConv(nn.Module):
    """One interaction: filter-weighted sum over neighbours, then an atom-wise update."""

    def __init__(self, n_features: int, n_filters: int, n_rbf: int) -> None:
        super().__init__()
        self.filter = nn.Sequential(
            nn.Linear(n_rbf, n_filters), ShiftedSoftplus(), nn.Linear(n_filters, n_filters)
        )
        self.in_proj = nn.Linear(n_features, n_filters, bias=False)
        self.out = nn.Sequential(
            nn.Linear(n_filters, n_features), ShiftedSoftplus(), nn.Linear(n_features, n_features)
        )

    def forward(self, h: Tensor, rbf: Tensor, fcut: Tensor, index: Tensor, norm: float) -> Tensor:
        i, j = index[0], index[1]
        w = self.filter(rbf) * fcut.unsqueeze(-1)
        messages = self.in_proj(h)[j] * w
        out: Tensor = self.out(scatter_sum(messages, i, h.shape[0]) / norm)
        return out


class SchNet(Backbone):
    """SchNet backbone; ``Embedding['node']`` is the last layer's [n_atoms, F] features."""

    Hypers = SchNetHypers

    def __init__(self, hypers: SchNetHypers, species: list[int], avg_neighbors: float) -> None:
        super().__init__(hypers, species, avg_neighbors)
        self.embedding = nn.Embedding(self.n_types, hypers.n_features)
        self.rbf = GaussianBasis(hypers.cutoff, hypers.n_rbf)
        self.cutoff_fn = CosineCutoff(hypers.cutoff)
        self.interactions = nn.ModuleList(
            CFConv(hypers.n_features, hypers.n_filters, hypers.n_rbf)
            for _ in range(hypers.n_layers)
        )

    def layer_groups(self) -> LayerGroups:
        """``embedding`` then ``interaction_k`` per layer (see :meth:`Backbone.layer_groups`)."""
        return self.interaction_layers(list(self.interactions))

    def forward(self, g: Graph) -> Embedding:
        index, _, r = edge_vectors(g, "main")
        rbf, fcut = self.rbf(r), self.cutoff_fn(r)
        h = self.embedding(self.type_index(g))
        layers = []
        for k, block in enumerate(self.interactions):
            h = h + block(h, rbf, fcut, index, self.avg_neighbors)
            h = self.modulate(k, h, g)
            layers.append(h)
        return {"node": h, "layers": layers}
