"""Two experts mixed per atom: a short-scale branch and a long-range branch with electrostatics.

E = sum_i [(1 - s_i) e_i^short + s_i e_i^long], s_i in [0, 1]

- ``e^short``: a :class:`~trustpot.models.potential.Potential` whose backbone sees the neighbour
  list ``"short"`` (small cutoff);
- ``e^long``: a potential on the neighbour list ``"long"`` (large cutoff) plus the per-atom
  electrostatic energy q_i φ_i of charges learned from the long backbone's invariant features
  (:mod:`trustpot.models.electrostatics`).

Both branches follow the :class:`~trustpot.models.potential.ModelMeta` conventions: each per-atom
energy is scale * head + shift + E0[z], with the same reference energies E0 in both branches. As
(1 - s_i) + s_i = 1, the mixture keeps E0 exactly for every s, and the per-branch totals
``energy_short`` / ``energy_long`` are full energies comparable with the labels.

Mixing acts on per-atom energies, and forces, stress and virial come from autograd of the mixed
total (:func:`~trustpot.models.potential.compute_outputs`), so every mode is conservative. The
per-atom scale comes from, in order of precedence:

1. the ``scale`` argument of :meth:`ScaleMixturePotential.forward` (a float, or an [n_atoms]
   tensor: oracle routing, pool evaluation);
2. the model's scale mode: ``"fixed"`` (the buffer ``fixed_scale``, one value for all atoms),
   ``"router"`` (sigmoid of a small MLP on the short branch's invariant features, per atom, or
   on their mean over the structure with ``router_level="structure"``; usable in
   deployment; its s depends on the positions, and the forces include that dependence, so the
   router's features are never detached: to train the router alone, freeze the branches'
   parameters with ``requires_grad_(False)``) or
   ``"parameter"`` (one learnable s = sigmoid(theta): differentiable scale updates).

Backbones read the neighbour list named ``"main"``; the mixture hands each branch a shallow copy
of the graph in which ``"main"`` points at that branch's list.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Final

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Embedding
from trustpot.models.contract import Model, load_state_checked
from trustpot.models.electrostatics import (
    TOTAL_CHARGE,
    ElectrostaticEnergy,
    ElectrostaticsConfig,
    LearnedCharges,
)
from trustpot.models.potential import (
    DEFAULT_OUTPUTS,
    SUPPORTED_OUTPUTS,
    ModelMeta,
    Potential,
    compute_outputs,
    potential_from_meta,
)
from trustpot.nn import MLP, scatter_sum

SHORT: Final = "short"
LONG: Final = "long"
# the mixture's own outputs are declared once, in trustpot.keys
ENERGY_SHORT: Final = K.ENERGY_SHORT
ENERGY_LONG: Final = K.ENERGY_LONG
ENERGY_ELECTROSTATIC: Final = K.ENERGY_ELECTROSTATIC
NODE_ENERGY_SHORT: Final = K.NODE_ENERGY_SHORT
NODE_ENERGY_LONG: Final = K.NODE_ENERGY_LONG
FORCES_SHORT: Final = K.FORCES_SHORT
FORCES_LONG: Final = K.FORCES_LONG
SCALE: Final = K.SCALE
CHARGES: Final = K.CHARGES
MIXTURE_OUTPUTS: Final = SUPPORTED_OUTPUTS | {
    ENERGY_SHORT,
    ENERGY_LONG,
    ENERGY_ELECTROSTATIC,
    NODE_ENERGY_SHORT,
    NODE_ENERGY_LONG,
    FORCES_SHORT,
    FORCES_LONG,
    SCALE,
    CHARGES,
}
SCALE_MODES: Final = ("fixed", "router", "parameter")
ROUTER_LEVELS: Final = ("atom", "structure")


class DifferentiableScale(nn.Module):
    """A learnable scale s = sigmoid(theta) in (0, 1).

    Args:
        init: initial s, clipped to [1e-4, 1 - 1e-4].
    """

    def __init__(self, init: float = 0.5) -> None:
        super().__init__()
        s = min(max(float(init), 1e-4), 1.0 - 1e-4)
        self.theta = nn.Parameter(torch.tensor(math.log(s / (1.0 - s))))

    def forward(self) -> Tensor:
        """0-d tensor s in (0, 1)."""
        return torch.sigmoid(self.theta)

    @property
    def value(self) -> float:
        return float(torch.sigmoid(self.theta.detach()))


@dataclass(frozen=True)
class ScaleMixtureMeta:
    """Everything needed to rebuild a :class:`ScaleMixturePotential`.

    Attributes:
        short: metadata of the short-scale branch (its ``hypers["cutoff"]`` is the short list's).
        long: metadata of the long-range branch (its cutoff is the long list's and the Ewald
            real-space cutoff).
        electrostatics: Coulomb settings.
        use_electrostatics: add the learned-charge Coulomb energy to the long branch.
        scale_mode: ``"fixed"``, ``"router"`` or ``"parameter"``.
        scale: the fixed scale, or the initial s of the router (its bias) and of the parameter.
        router_hidden: hidden width of the router MLP.
        router_level: ``"atom"`` (s_i from atom i's features) or ``"structure"`` (one s per
            structure from the mean of its atoms' features, given to all its atoms).
        extra: free-form metadata (data split, training options...).
    """

    short: ModelMeta
    long: ModelMeta
    electrostatics: ElectrostaticsConfig = field(default_factory=ElectrostaticsConfig)
    use_electrostatics: bool = True
    scale_mode: str = "fixed"
    scale: float = 0.5
    router_hidden: int = 32
    router_level: str = "atom"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`ConfigError` when the branches or options do not fit together."""
        if self.scale_mode not in SCALE_MODES:
            raise ConfigError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if not 0.0 <= self.scale <= 1.0:
            raise ConfigError(f"scale must lie in [0, 1], got {self.scale}")
        if list(self.short.species) != list(self.long.species):
            raise ConfigError(
                f"branches know different species: {self.short.species} vs {self.long.species}"
            )
        if self.short.dtype != self.long.dtype:
            raise ConfigError(f"branch dtypes differ: {self.short.dtype} vs {self.long.dtype}")
        if self.router_hidden < 1:
            raise ConfigError("router_hidden must be at least 1")
        if self.router_level not in ROUTER_LEVELS:
            raise ConfigError(
                f"router_level must be one of {ROUTER_LEVELS}, got {self.router_level!r}"
            )
        self.electrostatics.validate()

    @property
    def short_cutoff(self) -> float:
        return float(self.short.hypers["cutoff"])

    @property
    def long_cutoff(self) -> float:
        return float(self.long.hypers["cutoff"])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["short"] = self.short.to_dict()
        out["long"] = self.long.to_dict()
        out["electrostatics"] = self.electrostatics.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScaleMixtureMeta:
        d = dict(d)
        d["short"] = ModelMeta.from_dict(d["short"])
        d["long"] = ModelMeta.from_dict(d["long"])
        d["electrostatics"] = ElectrostaticsConfig.from_dict(d["electrostatics"])
        meta = cls(**d)
        meta.validate()
        return meta


class ScaleRouter(nn.Module):
    """s_i = sigmoid(MLP(h_i)) from [n_atoms, F] invariant features; starts near ``init``.

    Args:
        n_features: input width F.
        hidden: hidden width.
        init: initial s (the last layer's bias is logit(init), its weights are small).
    """

    def __init__(self, n_features: int, hidden: int = 32, init: float = 0.5) -> None:
        super().__init__()
        self.mlp = MLP([n_features, hidden, 1])
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        p = min(max(init, 1e-3), 1.0 - 1e-3)
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.fill_(math.log(p / (1.0 - p)))

    def forward(self, features: Tensor) -> Tensor:
        """[n_atoms, F] -> [n_atoms] in (0, 1)."""
        logits: Tensor = self.mlp(features)
        return torch.sigmoid(logits.squeeze(-1))

    def output_bias(self) -> Tensor:
        """[1] bias of the last layer (logit of the scale of an atom with zero features)."""
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        return last.bias.detach()


def graph_for_list(g: Graph, name: str) -> Graph:
    """Shallow copy of ``g`` whose ``"main"`` neighbour list is the list ``name``."""
    if K.edge_index_key(name) not in g:
        raise KeyError(
            f"the graph has no neighbour list '{name}'; build graphs with the mixture's "
            "neighbor_lists() (the 'short' and 'long' lists)"
        )
    out = dict(g)
    out[K.edge_index_key("main")] = g[K.edge_index_key(name)]
    out[K.edge_shift_key("main")] = g[K.edge_shift_key(name)]
    return out


@dataclass
class BranchParts:
    """Per-atom pieces of one evaluation (all [n_atoms]; energies in eV, float64)."""

    short: Tensor
    long: Tensor
    electrostatic: Tensor | None
    charges: Tensor | None
    emb_short: Embedding
    emb_long: Embedding


class ScaleMixturePotential(Model):
    """Short-scale and long-range experts mixed per atom by s in [0, 1].

    Args:
        short: short-scale potential (its backbone's cutoff is the ``"short"`` list's).
        long: long-range potential (cutoff of the ``"long"`` list).
        meta: the mixture's metadata (``short``/``long`` must describe the two potentials).
    """

    kind: ClassVar[str] = "scale-mixture"
    fixed_scale: Tensor
    energy_scale: Tensor

    def __init__(self, short: Potential, long: Potential, meta: ScaleMixtureMeta) -> None:
        super().__init__()
        meta.validate()
        self.meta = meta
        self.short = short
        self.long = long
        self.charges: LearnedCharges | None = None
        self.electrostatics: ElectrostaticEnergy | None = None
        if meta.use_electrostatics:
            self.charges = LearnedCharges(
                long.backbone.n_features, len(meta.long.species), meta.electrostatics.charges_hidden
            )
            self.electrostatics = ElectrostaticEnergy(
                meta.long_cutoff, meta.electrostatics, list_name=LONG
            )
        self.router = (
            ScaleRouter(short.backbone.n_features, meta.router_hidden, meta.scale)
            if meta.scale_mode == "router"
            else None
        )
        self.scale_parameter = (
            DifferentiableScale(meta.scale) if meta.scale_mode == "parameter" else None
        )
        self.register_buffer("fixed_scale", torch.tensor(float(meta.scale), dtype=torch.float64))
        self.register_buffer(
            "energy_scale", torch.tensor(float(meta.short.energy_scale), dtype=torch.float64)
        )

    # -- contract shared with Potential ---------------------------------------------------
    def neighbor_lists(self) -> list[NeighborListSpec]:
        """The ``"short"`` and ``"long"`` lists the data pipeline must build."""
        return [
            NeighborListSpec(SHORT, self.meta.short_cutoff),
            NeighborListSpec(LONG, self.meta.long_cutoff),
        ]

    def output_specs(self) -> dict[str, K.FieldSpec]:
        """A potential's outputs plus the branch energies, forces, scale and charges."""
        return K.specs_of(MIXTURE_OUTPUTS)

    @property
    def species(self) -> list[int]:
        return list(self.meta.short.species)

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.short.torch_dtype

    @property
    def scale_mode(self) -> str:
        return self.meta.scale_mode

    def set_scale(self, value: float) -> None:
        """Set the fixed scale (used in ``"fixed"`` mode; also recorded in ``meta.scale``)."""
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"scale must lie in [0, 1], got {value}")
        self.fixed_scale.fill_(float(value))
        self.meta = replace(self.meta, scale=float(value))

    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Checkpoint fields (kind ``"scale-mixture"``), weights from ``state`` when given."""
        return self.checkpoint_fields(self.meta.to_dict(), state)

    @classmethod
    def from_payload(
        cls, data: Mapping[str, Any], path: str = "checkpoint"
    ) -> ScaleMixturePotential:
        """Rebuild a mixture from its checkpoint fields, checking names, shapes, finiteness."""
        try:
            meta = ScaleMixtureMeta.from_dict(data["meta"])
            model = mixture_from_meta(meta)
        except (TypeError, KeyError, ValueError, ConfigError) as err:
            raise CheckpointError(f"{path}: malformed scale-mixture metadata: {err}") from None
        load_state_checked(model, data.get("model"), path, "scale mixture")
        return model

    def embed(self, g: Graph) -> Embedding:
        """Invariant features of both branches, concatenated: ``node`` [n_atoms, F_s + F_l]."""
        es = self.short.embed(graph_for_list(g, SHORT))
        el = self.long.embed(graph_for_list(g, LONG))
        return {
            "node": torch.cat([es["node"], el["node"]], dim=-1),
            "layers": list(es.get("layers", [])) + list(el.get("layers", [])),
        }

    # -- evaluation -------------------------------------------------------------------------
    def long_parts(self, g: Graph) -> tuple[Tensor, Tensor | None, Tensor | None, Embedding]:
        """The long branch alone: [n_atoms] per-atom energies with their Coulomb part (eV,
        float64), the Coulomb part, the charges (e) and the long backbone's embedding."""
        e_long, emb_long = self.long.node_energies(graph_for_list(g, LONG))
        e_el = q = None
        if self.charges is not None and self.electrostatics is not None:
            n_graphs = int(g[K.N_ATOMS].shape[0])
            q = self.charges(
                emb_long["node"],
                self.long.backbone.type_index(g),
                g[K.BATCH],
                n_graphs,
                g.get(TOTAL_CHARGE),
            )
            e_el = self.electrostatics(g, q).double()
            e_long = e_long + e_el
        return e_long, e_el, q, emb_long

    def branch_parts(self, g: Graph) -> BranchParts:
        """Per-atom energies of both branches (eV, float64), charges and embeddings."""
        e_short, emb_short = self.short.node_energies(graph_for_list(g, SHORT))
        e_long, e_el, q, emb_long = self.long_parts(g)
        return BranchParts(e_short, e_long, e_el, q, emb_short, emb_long)

    def atom_scale(
        self, g: Graph, parts: BranchParts, scale: float | Tensor | None = None
    ) -> Tensor:
        """[n_atoms] s_i (float64) from ``scale`` if given, else from the scale mode."""
        n = int(g[K.POSITIONS].shape[0])
        device = g[K.POSITIONS].device
        if scale is None:
            if self.router is not None:
                h = parts.emb_short["node"]
                if self.meta.router_level == "structure":
                    counts = g[K.N_ATOMS].to(h.dtype).clamp_min(1.0).unsqueeze(-1)
                    pooled = scatter_sum(h, g[K.BATCH], int(counts.shape[0])) / counts
                    pooled_scale: Tensor = self.router(pooled)
                    return pooled_scale.double()[g[K.BATCH]]
                atom_scale: Tensor = self.router(h)
                return atom_scale.double()
            value = self.scale_parameter() if self.scale_parameter is not None else self.fixed_scale
            return value.double().expand(n)
        s = torch.as_tensor(scale, dtype=torch.float64, device=device)
        if s.dim() == 0:
            s = s.expand(n)
        if s.shape != (n,):
            raise ValueError(f"scale must be a float or an [n_atoms]={n} tensor, got {s.shape}")
        return s.double()

    def node_energies(
        self, g: Graph, scale: float | Tensor | None = None
    ) -> tuple[Tensor, Embedding]:
        """[n_atoms] mixed per-atom energies (eV, float64) and the short branch's embedding."""
        parts = self.branch_parts(g)
        s = self.atom_scale(g, parts, scale)
        return (1.0 - s) * parts.short + s * parts.long, parts.emb_short

    def forward(
        self,
        g: Graph,
        outputs: Iterable[str] = DEFAULT_OUTPUTS,
        create_graph: bool | None = None,
        scale: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Evaluate the mixture on the batch ``g``.

        Args:
            g: batch with the ``"short"`` and ``"long"`` neighbour lists.
            outputs: any of :data:`MIXTURE_OUTPUTS`.
            create_graph: keep the graph of the derivatives (training); default
                ``self.training``.
            scale: override of s: a float for all atoms or an [n_atoms] tensor.

        Returns:
            the requested outputs of :class:`Potential` (``energy`` [n_graphs] eV float64,
            ``forces`` [n_atoms, 3] eV/Å, ``stress``, ``virial``, ``energies``) plus always
            ``energy_short``, ``energy_long`` [n_graphs] eV and ``scale`` [n_atoms], and on
            request ``energies_short``/``energies_long`` [n_atoms] eV, ``forces_short``/
            ``forces_long`` [n_atoms, 3] eV/Å (autograd of each branch's total, same forward
            pass), ``energy_electrostatic`` [n_graphs] eV and ``charges`` [n_atoms] e.
        """
        wanted = self.check_outputs(outputs)
        create = self.training if create_graph is None else create_graph
        branch_forces = [k for k in (FORCES_SHORT, FORCES_LONG) if k in wanted]
        core = set(wanted & SUPPORTED_OUTPUTS) | ({K.FORCES} if branch_forces else set())
        stash: dict[str, Any] = {}

        def node_energy_fn(gg: Graph) -> tuple[Tensor, Embedding]:
            parts = self.branch_parts(gg)
            s = self.atom_scale(gg, parts, scale)
            pos = gg[K.POSITIONS]
            for key in branch_forces:
                e = parts.short if key == FORCES_SHORT else parts.long
                (grad,) = torch.autograd.grad(
                    e.sum(), pos, retain_graph=True, create_graph=create, allow_unused=True
                )
                stash[key] = -grad if grad is not None else torch.zeros_like(pos)
            stash["parts"], stash["s"] = parts, s
            return (1.0 - s) * parts.short + s * parts.long, parts.emb_short

        out = compute_outputs(node_energy_fn, g, frozenset(core), create)
        if K.FORCES not in wanted:
            out.pop(K.FORCES, None)
        parts: BranchParts = stash["parts"]
        n_graphs = int(g[K.N_ATOMS].shape[0])
        batch = g[K.BATCH]
        out[ENERGY_SHORT] = scatter_sum(parts.short, batch, n_graphs)
        out[ENERGY_LONG] = scatter_sum(parts.long, batch, n_graphs)
        out[SCALE] = stash["s"].to(g[K.POSITIONS].dtype)
        for key in branch_forces:
            out[key] = stash[key]
        if NODE_ENERGY_SHORT in wanted:
            out[NODE_ENERGY_SHORT] = parts.short
        if NODE_ENERGY_LONG in wanted:
            out[NODE_ENERGY_LONG] = parts.long
        if ENERGY_ELECTROSTATIC in wanted:
            el = parts.electrostatic
            out[ENERGY_ELECTROSTATIC] = (
                scatter_sum(el, batch, n_graphs)
                if el is not None
                else torch.zeros(n_graphs, dtype=torch.float64, device=batch.device)
            )
        if CHARGES in wanted:
            q = parts.charges
            out[CHARGES] = q if q is not None else torch.zeros_like(out[SCALE])
        return out


def mixture_from_meta(meta: ScaleMixtureMeta) -> ScaleMixturePotential:
    """A freshly initialised mixture described by ``meta``, in its dtype."""
    meta.validate()
    model = ScaleMixturePotential(
        potential_from_meta(meta.short), potential_from_meta(meta.long), meta
    )
    return model.to(meta.short.torch_dtype)
