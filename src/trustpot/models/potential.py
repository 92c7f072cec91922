"""A potential: backbone -> per-atom energy head -> scale, shift, reference energies -> sum.

Forces, stress and virial come from autograd of the total energy, so every model is
conservative by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Backbone, Embedding, LayerGroups, Modulator, make_hypers
from trustpot.models.contract import DEFAULT_OUTPUTS, Model, load_state_checked
from trustpot.models.functional import functional_mode, functional_outputs
from trustpot.models.strain import apply_strain, strain_outputs
from trustpot.nn import MLP, scatter_sum
from trustpot.registry import lookup

SUPPORTED_OUTPUTS = frozenset({K.ENERGY, K.FORCES, K.STRESS, K.VIRIAL, K.NODE_ENERGY})
__all__ = ["DEFAULT_OUTPUTS", "SUPPORTED_OUTPUTS", "ModelMeta", "Potential", "potential_from_meta"]


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a potential, stored in its checkpoint.

    Attributes:
        backbone: registry name of the backbone.
        hypers: the backbone's hyper-parameters.
        species: atomic numbers the model knows.
        reference_energies: E0 per element (eV), keyed by atomic number (as str in files).
        energy_scale: std of the per-atom energy head's output (eV); forces' RMS by default.
        energy_shift: mean residual energy per atom (eV).
        avg_neighbors: mean neighbour count, for message normalisation.
        dtype: ``float32`` or ``float64``.
        head_dropout: dropout in the energy head (used by MC dropout).
    """

    backbone: str
    hypers: dict[str, Any]
    species: list[int]
    reference_energies: dict[int, float]
    energy_scale: float = 1.0
    energy_shift: float = 0.0
    avg_neighbors: float = 10.0
    dtype: str = "float32"
    head_dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reference_energies"] = {str(k): v for k, v in self.reference_energies.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        d = dict(d)
        d["reference_energies"] = {int(k): float(v) for k, v in d["reference_energies"].items()}
        return cls(**d)

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return {"float32": torch.float32, "float64": torch.float64}[self.dtype]
        except KeyError:
            raise ConfigError(f"dtype must be float32 or float64, got '{self.dtype}'") from None


class EnergyHead(nn.Module):
    """Per-atom energy from the last invariant features: a two-layer MLP.

    Args:
        n_features: input width F.
        dropout: dropout probability inside the MLP.
    """

    def __init__(self, n_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP([n_features, max(n_features // 2, 1), 1], dropout=dropout)
        if dropout > 0:
            self.mlp.insert(0, nn.Dropout(dropout))

    def forward(self, g: Graph, emb: Embedding) -> Tensor:
        """-> [n_atoms] dimensionless per-atom energies (before scale and shift)."""
        out: Tensor = self.mlp(emb["node"])
        return out.squeeze(-1)


class Potential(Model):
    """Energy = sum over atoms of (scale * head(features) + shift + E0[z]).

    Args:
        backbone: the feature extractor.
        meta: model metadata (species, reference energies, scale, shift...).
        head: per-atom energy head; by default the backbone's ``energy_head(dropout)`` when it
            has one (a non-additive head returns per-atom shares of a structure energy, e.g.
            DeepSet-MoE), else an :class:`EnergyHead`.
    """

    kind: ClassVar[str] = "potential"
    reference_energies: Tensor
    energy_scale: Tensor
    energy_shift: Tensor

    def __init__(self, backbone: Backbone, meta: ModelMeta, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.meta = meta
        own_head = getattr(type(backbone), "energy_head", None)
        if head is None and callable(own_head):
            head = own_head(backbone, meta.head_dropout)
        self.head = head if head is not None else EnergyHead(backbone.n_features, meta.head_dropout)
        e0 = torch.zeros(119, dtype=torch.float64)
        for z, value in meta.reference_energies.items():
            e0[int(z)] = value
        self.register_buffer("reference_energies", e0)
        self.register_buffer("energy_scale", torch.tensor(float(meta.energy_scale)))
        self.register_buffer("energy_shift", torch.tensor(float(meta.energy_shift)))

    # -- contract -------------------------------------------------------------------------
    def neighbor_lists(self) -> list[NeighborListSpec]:
        """Neighbour lists the data pipeline must build for this model."""
        return self.backbone.neighbor_lists()

    def modulation_shape(self) -> tuple[int, int] | None:
        """``(n_layers, F)`` of the backbone (every backbone has the hook,
        :meth:`~trustpot.models.base.Backbone.modulate`)."""
        return int(self.backbone.hypers.n_layers), int(self.backbone.n_features)

    def set_modulator(self, modulator: Modulator | None) -> Modulator | None:
        """Attach ``modulator`` to the backbone; returns the previous one."""
        previous = self.backbone.modulator
        object.__setattr__(self.backbone, "modulator", modulator)
        return previous

    def output_specs(self) -> dict[str, K.FieldSpec]:
        """``energy``, ``forces``, ``stress``, ``virial`` and per-atom ``energies``."""
        return K.specs_of(SUPPORTED_OUTPUTS)

    @property
    def species(self) -> list[int]:
        return list(self.meta.species)

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.torch_dtype

    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Checkpoint fields (kind ``"potential"``), weights from ``state`` when given."""
        return self.checkpoint_fields(self.meta.to_dict(), state)

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> Potential:
        """Rebuild a potential from its checkpoint fields, checking every tensor."""
        try:
            meta = ModelMeta.from_dict(data["meta"])
            model = potential_from_meta(meta)
        except (TypeError, KeyError, ValueError, ConfigError) as err:
            raise CheckpointError(f"{path}: malformed model metadata: {err}") from None
        load_state_checked(model, data.get("model"), path, "potential")
        return model

    def layer_groups(self) -> LayerGroups:
        """The backbone's groups (``embedding``, ``interaction_k``...) then ``head``."""
        groups = [(name, list(params)) for name, params in self.backbone.layer_groups()]
        head = list(self.head.parameters())
        return [*groups, ("head", head)] if head else groups

    def embed(self, g: Graph) -> Embedding:
        """Per-atom invariant features of ``g`` (no energies, no gradients needed)."""
        emb: Embedding = self.backbone(g)
        return emb

    def outputs_and_embedding(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS
    ) -> tuple[dict[str, Tensor], Embedding]:
        """Detached outputs and the embedding from one forward pass (PROBE reads both)."""
        seen: dict[str, Embedding] = {}

        def node_energy_fn(graph: Graph) -> tuple[Tensor, Embedding]:
            energies, emb = self.node_energies(graph)
            seen["emb"] = emb
            return energies, emb

        out = compute_outputs(node_energy_fn, g, self.check_outputs(outputs), create_graph=False)
        return {k: v.detach() for k, v in out.items()}, seen["emb"]

    def embedding_widths(self) -> list[int]:
        """Width of the features after each interaction layer (all ``n_features``)."""
        return [self.backbone.n_features] * self.backbone.hypers.n_layers

    # -- evaluation -----------------------------------------------------------------------
    def node_energies(self, g: Graph) -> tuple[Tensor, Embedding]:
        """[n_atoms] per-atom energies in eV and the embedding.

        The learned part is computed in the model's dtype; the reference energies are added in
        float64, so total energies of large molecules keep their precision in float32 models.
        """
        emb = self.backbone(g)
        return self.energies_from_raw(self.head(g, emb), g), emb

    def energies_from_raw(self, raw: Tensor, g: Graph) -> Tensor:
        """Per-atom energies in eV (float64) from the head's dimensionless output ``raw``:
        [n_atoms], or [n_atoms, M] for M samples of the head (the same scale, shift and
        reference energies for every sample)."""
        learned = raw * self.energy_scale.to(raw.dtype) + self.energy_shift.to(raw.dtype)
        e0 = self.reference_energies[g[K.ATOMIC_NUMBERS]]
        return learned.double() + (e0.unsqueeze(1) if raw.dim() == 2 else e0)

    def forward(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS, create_graph: bool | None = None
    ) -> dict[str, Tensor]:
        """Evaluate the requested ``outputs`` on the batch ``g``.

        Args:
            g: a (batched) graph from :func:`trustpot.data.graph.collate`.
            outputs: subset of ``energy``, ``forces``, ``stress``, ``virial``, ``energies``.
            create_graph: keep the graph of the force computation for training; defaults to
                ``self.training``.

        Returns:
            ``energy`` [n_graphs] eV (float64), ``forces`` [n_atoms, 3] eV/Å,
            ``stress`` [n_graphs, 3, 3] eV/Å^3, ``virial`` [n_graphs, 3, 3] eV,
            ``energies`` [n_atoms] eV, as requested.
        """
        wanted = self.check_outputs(outputs)
        return compute_outputs(
            self.node_energies, g, wanted, self.training if create_graph is None else create_graph
        )


def potential_from_meta(meta: ModelMeta) -> Potential:
    """A freshly initialised potential described by ``meta`` (backbone from the registry).

    ``meta.hypers`` is a stored, complete dict (every field, as
    :func:`trustpot.models.build.meta_from_data` writes it); a field missing from it is one
    added since it was written and takes the value the file was built with
    (``Hypers.LEGACY``)."""
    cls = lookup("backbone", meta.backbone)
    hypers = make_hypers(cls.Hypers, {**cls.Hypers.LEGACY, **meta.hypers})
    backbone = cls(hypers, meta.species, meta.avg_neighbors)
    return Potential(backbone, meta).to(meta.torch_dtype)


def compute_outputs(
    node_energy_fn: Any, g: Graph, wanted: frozenset[str], create_graph: bool
) -> dict[str, Tensor]:
    """Energies and their derivatives for any ``node_energy_fn(g) -> ([n_atoms], emb)``.

    Shared by :class:`Potential` and by wrappers (scale mixtures, perturbations, samplers that
    share one backbone pass) so that every model gets forces and stress the same way. Stress
    uses a symmetric strain applied to positions and cell: ``stress = (1/V) dE/d(strain)`` (ASE
    sign), ``virial = -dE/d(strain)``.

    When ``node_energy_fn`` returns ``[n_atoms, M]`` (M samples of the per-atom energies from
    one forward pass, e.g. M dropout masks or M last layers on one backbone), every output
    gains a sample axis after its first: ``energy`` [n_graphs, M], ``forces`` [n_atoms, M, 3],
    ``stress``/``virial`` [n_graphs, M, 3, 3], ``energies`` [n_atoms, M]. The M derivatives
    come from one vectorised backward pass (``is_grads_batched``), not M passes.
    """
    if functional_mode():  # a compiled training step (trustpot.models.functional)
        return functional_outputs(node_energy_fn, g, wanted)
    need_strain = bool(wanted & {K.STRESS, K.VIRIAL})
    need_grad = need_strain or K.FORCES in wanted
    n_graphs = int(g[K.N_ATOMS].shape[0])
    pos = g[K.POSITIONS]
    inputs: list[Tensor] = []
    g = dict(g)
    with torch.enable_grad():
        if need_grad:
            pos = pos.detach().requires_grad_(True)
            inputs.append(pos)
        if need_strain:
            strain = torch.zeros((n_graphs, 3, 3), dtype=pos.dtype, device=pos.device)
            strain.requires_grad_(True)
            inputs.append(strain)
            g = apply_strain(g, pos, strain)
        else:
            g[K.POSITIONS] = pos
        node_e, _ = node_energy_fn(g)
        energy = scatter_sum(node_e, g[K.BATCH], n_graphs)
        out: dict[str, Tensor] = {K.ENERGY: energy}
        if K.NODE_ENERGY in wanted:
            out[K.NODE_ENERGY] = node_e
        if need_grad:
            grads = _energy_gradients(energy, inputs, create_graph)
            if K.FORCES in wanted:
                out[K.FORCES] = -grads[0] if grads[0] is not None else _zeros(pos, energy)
            if need_strain:
                d_strain = grads[-1] if grads[-1] is not None else _zeros(strain, energy)
                out.update(strain_outputs(d_strain, g, wanted))
    return out


def _zeros(like: Tensor, energy: Tensor) -> Tensor:
    """Zero derivatives shaped as :func:`_energy_gradients` returns them."""
    if energy.dim() == 1:
        return torch.zeros_like(like)
    m = energy.shape[1]
    return torch.zeros((like.shape[0], m, *like.shape[1:]), dtype=like.dtype, device=like.device)


def _energy_gradients(
    energy: Tensor, inputs: list[Tensor], create_graph: bool
) -> tuple[Tensor | None, ...]:
    """d(sum of energies)/d(inputs); for [n_graphs, M] energies one vectorised backward pass
    gives each sample's derivative, moved to axis 1 ([n, M, ...])."""
    if energy.dim() == 1:
        return torch.autograd.grad(
            energy.sum(), inputs, create_graph=create_graph, allow_unused=True
        )
    totals = energy.sum(0)  # [M]
    eye = torch.eye(totals.shape[0], dtype=totals.dtype, device=totals.device)
    grads = torch.autograd.grad(
        totals,
        inputs,
        grad_outputs=eye,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
    return tuple(None if d is None else d.movedim(0, 1) for d in grads)
