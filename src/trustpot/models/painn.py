"""PaiNN (Schütt, Unke, Gastegger, ICML 2021): equivariant message passing with vector features."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from trustpot.data.graph import Graph
from trustpot.models.base import Backbone, BackboneHypers, Embedding, LayerGroups, edge_vectors
from trustpot.nn import MLP, BesselBasis, CosineCutoff, scatter_sum


@dataclasses.dataclass(frozen=True)
class PaiNNHypers(BackboneHypers):
    """PaiNN hyper-parameters.

    Attributes:
        n_rbf: number of Bessel functions expanding each distance.
    """

    n_rbf: int = 20


class PaiNNMessage(nn.Module):
    """Scalar and vector messages from neighbours, filtered by distance.

    ``forward(s [n_atoms, F], v [n_atoms, 3, F], rbf [n_edges, n_rbf], fcut [n_edges, 1],
    unit [n_edges, 3, 1], index [2, n_edges], norm)`` -> updated ``(s, v)``.
    """

    def __init__(self, f: int, n_rbf: int) -> None:
        super().__init__()
        self.f = f
        self.phi = MLP([f, f, 3 * f])
        self.w = nn.Linear(n_rbf, 3 * f)

    def forward(
        self,
        s: Tensor,
        v: Tensor,
        rbf: Tensor,
        fcut: Tensor,
        unit: Tensor,
        index: Tensor,
        norm: float,
    ) -> tuple[Tensor, Tensor]:
        i, j = index[0], index[1]
        # index_select: the same values as x[j], with less dispatch overhead per call
        x = torch.index_select(self.phi(s), 0, j) * (self.w(rbf) * fcut)
        ds, dv_v, dv_r = torch.split(x, self.f, dim=-1)
        dv = torch.index_select(v, 0, j) * dv_v.unsqueeze(1) + unit * dv_r.unsqueeze(1)
        n = s.shape[0]
        return s + scatter_sum(ds, i, n) / norm, v + scatter_sum(dv, i, n) / norm


class PaiNNUpdate(nn.Module):
    """Atom-wise mixing of scalar and vector channels."""

    def __init__(self, f: int) -> None:
        super().__init__()
        self.f = f
        self.u = nn.Linear(f, f, bias=False)
        self.v = nn.Linear(f, f, bias=False)
        self.mlp = MLP([2 * f, f, 3 * f])

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        uv, vv = self.u(v), self.v(v)
        vnorm = torch.sqrt((vv * vv).sum(dim=1) + 1e-8)
        a = self.mlp(torch.cat([s, vnorm], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, self.f, dim=-1)
        return s + a_ss + a_sv * (uv * vv).sum(dim=1), v + a_vv.unsqueeze(1) * uv


class PaiNN(Backbone):
    """PaiNN backbone; scalar features in ``node``, vector features in ``node_equivariant``."""

    Hypers = PaiNNHypers

    def __init__(self, hypers: PaiNNHypers, species: list[int], avg_neighbors: float) -> None:
        super().__init__(hypers, species, avg_neighbors)
        f = hypers.n_features
        self.embedding = nn.Embedding(self.n_types, f)
        self.rbf = BesselBasis(hypers.cutoff, hypers.n_rbf)
        self.cutoff_fn = CosineCutoff(hypers.cutoff)
        self.messages = nn.ModuleList(PaiNNMessage(f, hypers.n_rbf) for _ in range(hypers.n_layers))
        self.updates = nn.ModuleList(PaiNNUpdate(f) for _ in range(hypers.n_layers))
        self.norm = float(self.avg_neighbors) ** 0.5

    def layer_groups(self) -> LayerGroups:
        """``embedding`` then ``interaction_k`` per layer (see :meth:`Backbone.layer_groups`)."""
        return self.interaction_layers([[m, u] for m, u in zip(self.messages, self.updates)])

    def forward(self, g: Graph) -> Embedding:
        index, vec, r = edge_vectors(g, "main")
        # shaped once for every layer's broadcasts: [n_edges, 3, 1] and [n_edges, 1]
        unit = (vec / r.unsqueeze(-1)).unsqueeze(-1)
        rbf, fcut = self.rbf(r), self.cutoff_fn(r).unsqueeze(-1)
        s = self.embedding(self.type_index(g))
        v = s.new_zeros((s.shape[0], 3, s.shape[1]))
        layers = []
        for k, (message, update) in enumerate(zip(self.messages, self.updates)):
            s, v = message(s, v, rbf, fcut, unit, index, self.norm)
            s, v = update(s, v)
            s = self.modulate(k, s, g)
            layers.append(s)
        return {"node": s, "layers": layers, "node_equivariant": v}
