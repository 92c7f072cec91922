"""DeepSet-MoE: a structure energy ``E = rho(AGG_i phi(x_i))`` with a mixture of experts as phi.

* ``x_i`` [n_atoms, F]: invariant environment features of a local encoder, a trustpot backbone
  built inside (``encoder``: ``schnet`` by default, or ``painn``/``egnn``) with the same
  ``cutoff``, ``n_features`` and ``n_layers``.
* ``phi(x_i) = sum_k w_ik E_k(x_i)`` [n_atoms, D]: K expert MLPs behind a router
  ``p_i = softmax(W x_i + b)``. ``top_k = 0`` (soft): ``w_i = p_i``, every expert contributes.
  ``top_k = k``: only the k most probable experts contribute, with *margin-renormalised*
  weights ``w_ij = (p_ij - p_i(k+1)) / sum_{top k} p_i`` (``p_i(k+1)`` the (k+1)-th largest
  probability). When the (k+1)-th probability is small these are the usual renormalised top-k
  weights; an expert about to leave the top k has a weight going continuously to zero. So the
  energy stays continuous everywhere (plain renormalised top-k jumps when the chosen set
  changes), and forces, the exact autograd gradient of it, are conservative; they have kinks
  on the measure-zero surfaces where the chosen set changes. No straight-through estimator:
  the router learns through the probabilities inside the weights. ``gate = "renormalised"``
  gives the usual ``p_ij / sum_{top k} p_i`` instead (energy discontinuous where the chosen
  set changes), for comparison.
* ``AGG`` per structure: ``sum``, ``mean``, or ``attention`` (softmax over the structure's
  atoms of a learned score of ``phi_i``, then the weighted sum of ``phi_i``).
* ``rho``: an MLP to one number per structure.

Plugging into :class:`~trustpot.models.potential.Potential`: the backbone provides
``energy_head(dropout)``, which the potential uses instead of its additive per-atom head. The
head returns ``rho(AGG phi)`` divided evenly among the structure's atoms, so that the
potential's per-structure sum (then scale, per-atom shift and reference energies) is the
DeepSet energy. Per-atom energies (``energies`` output) are therefore *not* meaningful for
this model.

Routing diagnostics (:func:`routing_diagnostics`): expert load, router entropy and the mutual
information between each atom's top expert and a per-atom label (e.g. its fragment).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph, collate, structure_to_graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.models.base import Backbone, BackboneHypers, Embedding, LayerGroups, make_hypers
from trustpot.models.potential import Potential
from trustpot.nn import MLP, scatter_sum
from trustpot.registry import canonical_name, lookup

AGGREGATIONS = ("sum", "mean", "attention")
GATES = ("margin", "renormalised")


@dataclasses.dataclass(frozen=True)
class DeepSetMoEHypers(BackboneHypers):
    """DeepSet-MoE hyper-parameters (``cutoff``, ``n_features``, ``n_layers``: the encoder's).

    Attributes:
        encoder: registry name of the local encoder backbone.
        n_rbf: radial functions of the encoder (0: the encoder's default).
        n_experts: K, experts per atom.
        top_k: experts used per atom; 0 is soft routing (all K).
        gate: top-k weights, ``margin`` (continuous energy) or ``renormalised``.
        expert_hidden: hidden width of each expert MLP (0: ``n_features``).
        n_latent: width D of phi (0: ``n_features``).
        aggregation: ``sum``, ``mean`` or ``attention``.
        rho_hidden: hidden width of rho (0: ``n_features``).
        current_encoder: build the encoder with its current defaults; False (checkpoints
            written before this field) gives fields added to the encoder since then the values
            those checkpoints were built with (the encoder's ``Hypers.LEGACY``).
    """

    LEGACY: ClassVar[dict[str, Any]] = {"current_encoder": False}

    encoder: str = "schnet"
    n_rbf: int = 0
    n_experts: int = 4
    top_k: int = 0
    gate: str = "margin"
    expert_hidden: int = 0
    n_latent: int = 0
    aggregation: str = "sum"
    rho_hidden: int = 0
    current_encoder: bool = True

    def validate(self) -> None:
        super().validate()
        if canonical_name("backbone", self.encoder) == "deepset-moe":
            raise ConfigError("a DeepSet-MoE cannot be its own encoder")
        lookup("backbone", self.encoder)
        if self.n_experts < 1:
            raise ConfigError(f"n_experts must be >= 1, got {self.n_experts}")
        if not 0 <= self.top_k <= self.n_experts:
            raise ConfigError(f"top_k must be in [0, n_experts={self.n_experts}], got {self.top_k}")
        if self.gate not in GATES:
            raise ConfigError(f"gate must be one of {', '.join(GATES)}, got '{self.gate}'")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}, got '{self.aggregation}'"
            )
        for name in ("n_rbf", "expert_hidden", "n_latent", "rho_hidden"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


def topk_gate(probs: Tensor, k: int, gate: str = "margin") -> Tensor:
    """Top-k weights of router probabilities.

    Args:
        probs: [n, K] probabilities (rows sum to 1).
        k: experts kept per row; ``k <= 0`` or ``k >= K`` returns ``probs`` (soft routing).
        gate: ``margin``: ``(p_j - p_(k+1)) / sum_{top k} p`` inside each row's top k,
            continuous in ``probs`` also where the top-k set changes, row sums <= 1;
            ``renormalised``: ``p_j / sum_{top k} p``, row sums 1, jumps where the set changes.

    Returns:
        [n, K] weights, zero outside each row's top k.
    """
    n_experts = probs.shape[-1]
    if k <= 0 or k >= n_experts:
        return probs
    top = probs.topk(k + 1, dim=-1)
    kept = top.values[:, :k]
    numerator = kept - top.values[:, k : k + 1] if gate == "margin" else kept
    weights = numerator / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.zeros_like(probs).scatter(-1, top.indices[:, :k], weights)


class Experts(nn.Module):
    """K two-layer MLPs ``F -> H -> D`` evaluated together (batched weights).

    Args:
        n_experts: K.
        n_in: F.
        n_hidden: H.
        n_out: D.
    """

    def __init__(self, n_experts: int, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, n_in, n_hidden))
        self.b1 = nn.Parameter(torch.empty(n_experts, n_hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, n_hidden, n_out))
        self.b2 = nn.Parameter(torch.empty(n_experts, n_out))
        for w, b, fan_in in ((self.w1, self.b1, n_in), (self.w2, self.b2, n_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x: [n, F] -> [n, K, D], every expert's output for every atom."""
        h = nn.functional.silu(torch.einsum("nf,kfh->nkh", x, self.w1) + self.b1)
        return torch.einsum("nkh,khd->nkd", h, self.w2) + self.b2


def segment_softmax(scores: Tensor, index: Tensor, n_segments: int) -> Tensor:
    """Softmax of ``scores`` [n] within each segment given by ``index`` [n] -> [n]."""
    peak = scores.new_full((n_segments,), -torch.inf)
    peak = peak.scatter_reduce(0, index, scores.detach(), "amax", include_self=True)
    e = torch.exp(scores - peak[index])  # the shift cancels exactly: detaching it is exact
    return e / scatter_sum(e, index, n_segments)[index]


class DeepSetMoEHead(nn.Module):
    """``rho(AGG phi(x))`` per structure, returned as equal shares per atom.

    Args:
        hypers: the model's hyper-parameters.
        dropout: dropout inside rho (MC dropout).
    """

    def __init__(self, hypers: DeepSetMoEHypers, dropout: float = 0.0) -> None:
        super().__init__()
        f = hypers.n_features
        latent = hypers.n_latent or f
        self.top_k = hypers.top_k
        self.gate = hypers.gate
        self.aggregation = hypers.aggregation
        self.router = nn.Linear(f, hypers.n_experts)
        self.experts = Experts(hypers.n_experts, f, hypers.expert_hidden or f, latent)
        self.score = MLP([latent, latent, 1]) if hypers.aggregation == "attention" else None
        self.rho = MLP([latent, hypers.rho_hidden or f, 1], dropout=dropout)
        if dropout > 0:
            self.rho.insert(0, nn.Dropout(dropout))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [n, F] -> router probabilities [n, K] and expert weights [n, K]."""
        probs = torch.softmax(self.router(x), dim=-1)
        return probs, topk_gate(probs, self.top_k, self.gate)

    def phi(self, x: Tensor) -> Tensor:
        """x: [n, F] -> [n, D], the weighted mixture of expert outputs."""
        _, weights = self.route(x)
        mixed: Tensor = (weights.unsqueeze(-1) * self.experts(x)).sum(1)
        return mixed

    def pool(self, phi: Tensor, batch: Tensor, n_atoms: Tensor) -> Tensor:
        """phi [n, D], batch [n], n_atoms [G] -> [G, D] aggregated per structure."""
        n_graphs = n_atoms.shape[0]
        if self.aggregation == "attention":
            assert self.score is not None
            alpha = segment_softmax(self.score(phi).squeeze(-1), batch, n_graphs)
            pooled: Tensor = scatter_sum(alpha.unsqueeze(-1) * phi, batch, n_graphs)
            return pooled
        total = scatter_sum(phi, batch, n_graphs)
        if self.aggregation == "mean":
            return total / n_atoms.to(phi.dtype).clamp_min(1.0).unsqueeze(-1)
        return total

    def structure_energy(self, g: Graph, emb: Embedding) -> Tensor:
        """[n_graphs] dimensionless rho(AGG phi) (before the potential's scale)."""
        phi = self.phi(emb["node"])
        energy: Tensor = self.rho(self.pool(phi, g[K.BATCH], g[K.N_ATOMS]))
        return energy.squeeze(-1)

    def forward(self, g: Graph, emb: Embedding) -> Tensor:
        """-> [n_atoms]: each structure's energy split evenly among its atoms."""
        batch = g[K.BATCH]
        energy = self.structure_energy(g, emb)
        return energy[batch] / g[K.N_ATOMS][batch].to(energy.dtype)


class DeepSetMoE(Backbone):
    """The encoder of a DeepSet-MoE; its :meth:`energy_head` holds the experts, rho and AGG.

    ``Embedding`` is the encoder's (``node`` [n_atoms, F] = x_i, per-layer features, vector
    features for PaiNN). A modulator set on this backbone is applied inside the encoder.
    """

    Hypers = DeepSetMoEHypers

    def __init__(self, hypers: DeepSetMoEHypers, species: list[int], avg_neighbors: float) -> None:
        super().__init__(hypers, species, avg_neighbors)
        cls = lookup("backbone", hypers.encoder)
        shared = {"cutoff": hypers.cutoff, "n_features": hypers.n_features}
        shared["n_layers"] = hypers.n_layers
        names = {f.name for f in dataclasses.fields(cls.Hypers)}
        if hypers.n_rbf and "n_rbf" in names:
            shared["n_rbf"] = hypers.n_rbf
        if not hypers.current_encoder:
            shared = {**cls.Hypers.LEGACY, **shared}
        self.encoder: Backbone = cls(make_hypers(cls.Hypers, shared), species, avg_neighbors)

    def neighbor_lists(self) -> list[NeighborListSpec]:
        return self.encoder.neighbor_lists()

    def layer_groups(self) -> LayerGroups:
        """``embedding`` then ``interaction_k`` per layer (see :meth:`Backbone.layer_groups`)."""
        return self.encoder.layer_groups()

    def forward(self, g: Graph) -> Embedding:
        # a plain attribute, as trustpot.uq.perturb.attached sets it: never a submodule
        object.__setattr__(self.encoder, "modulator", self.modulator)
        emb: Embedding = self.encoder(g)
        return emb

    def energy_head(self, dropout: float = 0.0) -> DeepSetMoEHead:
        """The non-additive energy head :class:`~trustpot.models.potential.Potential` uses."""
        assert isinstance(self.hypers, DeepSetMoEHypers)
        return DeepSetMoEHead(self.hypers, dropout)


@dataclasses.dataclass
class RoutingDiagnostics:
    """How a router spreads atoms over experts.

    Attributes:
        load: [K] share of the routing weight on each expert (sums to 1).
        argmax_load: [K] fraction of atoms whose most probable expert is each expert.
        entropy: mean entropy of the router probabilities per atom, nats.
        normalised_entropy: ``entropy / log K`` in [0, 1] (0 for K = 1).
        mutual_information: I(top expert; label), nats (plug-in estimate).
        label_entropy: H(label), nats; the largest possible mutual information.
        normalised_mi: ``mutual_information / label_entropy`` (0 when H(label) = 0).
        table: [K, L] atom counts per (top expert, label value).
        label_values: [L] the label values, in the table's column order.
        n_atoms: atoms counted.
    """

    load: np.ndarray
    argmax_load: np.ndarray
    entropy: float
    normalised_entropy: float
    mutual_information: float
    label_entropy: float
    normalised_mi: float
    table: np.ndarray
    label_values: np.ndarray
    n_atoms: int

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v.tolist() if isinstance(v, np.ndarray) else v
            for k, v in dataclasses.asdict(self).items()
        }


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def routing_statistics(
    weights: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None
) -> RoutingDiagnostics:
    """Diagnostics of router outputs.

    Args:
        weights: [n_atoms, K] expert weights (soft or top-k gated).
        labels: [n_atoms] integer label per atom.
        probs: [n_atoms, K] router probabilities for the entropy and the top expert;
            ``weights`` normalised per row when not given.
    """
    weights = np.asarray(weights, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if weights.ndim != 2 or len(labels) != len(weights) or len(weights) == 0:
        raise ConfigError(
            f"need weights [n_atoms, K] and labels [n_atoms]; got {weights.shape}, {labels.shape}"
        )
    if probs is None:
        probs = weights / np.clip(weights.sum(1, keepdims=True), 1e-300, None)
    probs = np.asarray(probs, dtype=np.float64)
    n, n_experts = weights.shape
    load = weights.sum(0) / max(weights.sum(), 1e-300)
    top = probs.argmax(1)
    argmax_load = np.bincount(top, minlength=n_experts) / n
    entropy = float(np.mean([_entropy(row) for row in probs]))
    values, column = np.unique(labels, return_inverse=True)
    table = np.zeros((n_experts, len(values)), dtype=np.int64)
    np.add.at(table, (top, column), 1)
    joint = table / n
    h_label = _entropy(joint.sum(0))
    mi = _entropy(joint.sum(1)) + h_label - _entropy(joint.reshape(-1))
    mi = max(mi, 0.0)
    return RoutingDiagnostics(
        load=load,
        argmax_load=argmax_load,
        entropy=entropy,
        normalised_entropy=entropy / math.log(n_experts) if n_experts > 1 else 0.0,
        mutual_information=mi,
        label_entropy=h_label,
        normalised_mi=mi / h_label if h_label > 0 else 0.0,
        table=table,
        label_values=values,
        n_atoms=n,
    )


@torch.no_grad()
def router_outputs(
    model: Potential, structures: Sequence[Structure], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Router probabilities and expert weights, each [total atoms, K], structures in order.

    Raises:
        ConfigError: ``model`` is not a potential with a DeepSet-MoE head.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, DeepSetMoEHead):
        raise ConfigError("routing diagnostics need a DeepSet-MoE potential (--model deepset-moe)")
    probs, weights = [], []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in chunk])
        p, w = head.route(model.embed(g)["node"])
        probs.append(p.double().cpu().numpy())
        weights.append(w.double().cpu().numpy())
    return np.concatenate(probs), np.concatenate(weights)


def routing_diagnostics(
    model: Potential,
    structures: Sequence[Structure],
    labels: np.ndarray | Sequence[np.ndarray],
    batch_size: int = 32,
) -> RoutingDiagnostics:
    """Expert load, router entropy and I(top expert; label) of a DeepSet-MoE potential.

    Args:
        model: a :class:`~trustpot.models.potential.Potential` built as ``deepset-moe``.
        structures: the structures routed.
        labels: integer label per atom: one array over all atoms in order, or one array per
            structure (e.g. each frame's ``fragment_label``).
    """
    if len(labels) == len(structures) and all(np.ndim(x) == 1 for x in labels):
        flat = np.concatenate([np.asarray(x) for x in labels]) if len(labels) else np.zeros(0)
    else:
        flat = np.asarray(labels).reshape(-1)
    n_atoms = sum(s.n_atoms for s in structures)
    if len(flat) != n_atoms:
        raise ConfigError(f"{len(flat)} labels for {n_atoms} atoms")
    probs, weights = router_outputs(model, structures, batch_size)
    return routing_statistics(weights, flat.astype(np.int64), probs)
