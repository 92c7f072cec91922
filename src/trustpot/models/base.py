"""The backbone contract: per-atom invariant features from a graph, with public ``embed``.

A backbone turns a graph into an :class:`Embedding`; heads turn embeddings into per-atom
energies; :class:`trustpot.models.potential.Potential` sums them and differentiates.

Extension points used by the reliability wrappers:
- ``Embedding["layers"]``: invariant features after every interaction layer (PROBE reads them);
- :meth:`Backbone.modulate`: every backbone passes its hidden features through it after each
  interaction layer; it is the identity unless a modulator is attached (learned functional
  perturbations attach one).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, TypedDict

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.errors import ConfigError

#: named parameter groups, ordered from the input to the output (see ``Model.layer_groups``)
LayerGroups = list[tuple[str, list[nn.Parameter]]]


def group_parameters(
    root: nn.Module, named: Sequence[tuple[str, Sequence[nn.Module | None]]], rest: str
) -> LayerGroups:
    """Partition the parameters of ``root`` into the ``named`` groups of submodules, in order.

    A parameter reachable from several groups goes to the first; every parameter of ``root``
    that no group reaches goes to the group called ``rest`` (which must be one of ``named``).
    Empty groups are dropped, so every group returned holds at least one parameter and every
    parameter of ``root`` is in exactly one group.
    """
    seen: set[int] = set()
    out: list[tuple[str, list[nn.Parameter]]] = []
    for name, modules in named:
        params: list[nn.Parameter] = []
        for module in modules:
            for p in module.parameters() if module is not None else ():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        out.append((name, params))
    leftover = [p for p in root.parameters() if id(p) not in seen]
    names = [name for name, _ in out]
    if rest not in names:
        raise ValueError(f"group_parameters: '{rest}' is not one of {names}")
    out[names.index(rest)][1].extend(leftover)
    return [(name, params) for name, params in out if params]


class Embedding(TypedDict, total=False):
    """What a backbone returns.

    Attributes:
        node: [n_atoms, F] invariant per-atom features of the last layer.
        layers: list of [n_atoms, F] invariant features after each interaction layer.
        node_equivariant: [n_atoms, 3, F] vector features, where the backbone has them.
    """

    node: Tensor
    layers: list[Tensor]
    node_equivariant: Tensor


class Modulator(Protocol):
    """Changes hidden features ``h`` [n_atoms, F] after interaction layer ``layer``."""

    def __call__(self, layer: int, h: Tensor, g: Graph) -> Tensor: ...


@dataclasses.dataclass(frozen=True)
class BackboneHypers:
    """Hyper-parameters every backbone has.

    Attributes:
        cutoff: neighbour-list radius in Å.
        n_features: width of the per-atom features.
        n_layers: number of interaction layers.
    """

    cutoff: float = 5.0
    n_features: int = 64
    n_layers: int = 3

    #: Fields added after checkpoints were written, with the value those checkpoints were
    #: built with: a stored hypers dict without the field gets it from here
    #: (:func:`trustpot.models.potential.potential_from_meta`), a new model the field's default.
    LEGACY: ClassVar[dict[str, Any]] = {}

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values no model can use."""
        if self.cutoff <= 0:
            raise ConfigError(f"cutoff must be positive, got {self.cutoff}")
        if self.n_features < 1 or self.n_layers < 1:
            raise ConfigError("n_features and n_layers must be at least 1")


def make_hypers(cls: type[BackboneHypers], values: dict[str, Any]) -> BackboneHypers:
    """Build hypers of ``cls`` from a dict; unknown keys and wrong types are errors."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown model option(s) {unknown} for {cls.__qualname__}; known: {sorted(known)}"
        )
    converted: dict[str, Any] = {}
    for key, value in values.items():
        default = getattr(cls, key, None)
        kind = type(default) if default is not None else None
        try:
            if kind is bool and isinstance(value, str):
                converted[key] = value.lower() in ("1", "true", "yes")
            elif kind in (int, float, str, bool):
                converted[key] = kind(value)
            else:
                converted[key] = value
        except (TypeError, ValueError):
            raise ConfigError(f"model option '{key}' expects {kind}, got {value!r}") from None
    hypers = cls(**converted)
    hypers.validate()
    return hypers


class Backbone(nn.Module, ABC):
    """Maps a graph to per-atom invariant features.

    Subclasses set ``Hypers`` and implement :meth:`forward`; they look up atom types with
    :meth:`type_index` so that the model's species list stays in one place.

    Args:
        hypers: the backbone's hyper-parameters.
        species: atomic numbers the model knows.
        avg_neighbors: mean neighbour count within the cutoff, to normalise message sums.
    """

    Hypers: ClassVar[type[BackboneHypers]] = BackboneHypers
    type_table: Tensor

    def __init__(self, hypers: BackboneHypers, species: list[int], avg_neighbors: float) -> None:
        super().__init__()
        self.hypers = hypers
        self.species = list(species)
        self.avg_neighbors = float(max(avg_neighbors, 1.0))
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(self.species, dtype=torch.long)] = torch.arange(len(self.species))
        self.register_buffer("type_table", table, persistent=False)
        self.modulator: Modulator | None = None

    @property
    def n_types(self) -> int:
        return len(self.species)

    @property
    def n_features(self) -> int:
        return self.hypers.n_features

    def neighbor_lists(self) -> list[NeighborListSpec]:
        """The neighbour lists this backbone needs (one by default)."""
        return [NeighborListSpec("main", self.hypers.cutoff)]

    def type_index(self, g: Graph) -> Tensor:
        """[n_atoms] index of each atom in ``species``; raises on unknown elements."""
        index = self.type_table[g[K.ATOMIC_NUMBERS]]
        if index.device.type != "cpu" or torch.compiler.is_compiling():
            # checked without waiting for the device (or breaking a compiled graph)
            torch._assert_async(
                (index >= 0).all(), f"an element unknown to this model (knows {self.species})"
            )
        elif bool((index < 0).any()):
            unknown = sorted({int(z) for z in g[K.ATOMIC_NUMBERS][index < 0]})
            raise ValueError(f"element(s) {unknown} unknown to this model (knows {self.species})")
        return index

    def modulate(self, layer: int, h: Tensor, g: Graph) -> Tensor:
        """Hidden features after interaction ``layer``; identity unless a modulator is set."""
        return h if self.modulator is None else self.modulator(layer, h, g)

    def layer_groups(self) -> LayerGroups:
        """The backbone's parameters by depth: ``embedding`` (type embedding, radial basis),
        then one group per interaction layer (``interaction_k``). Every parameter is in exactly
        one group; by default one group ``backbone`` holds them all."""
        return [("backbone", list(self.parameters()))]

    def interaction_layers(self, layers: Sequence[nn.Module | Sequence[nn.Module]]) -> LayerGroups:
        """:meth:`layer_groups` of a backbone whose interaction layer ``k`` is ``layers[k]``
        (a module or several); every other parameter counts as the embedding."""
        named: list[tuple[str, Sequence[nn.Module | None]]] = [("embedding", [])]
        for k, layer in enumerate(layers):
            named.append((f"interaction_{k}", [layer] if isinstance(layer, nn.Module) else layer))
        return group_parameters(self, named, rest="embedding")

    @abstractmethod
    def forward(self, g: Graph) -> Embedding:
        """Per-atom features of the batch ``g``."""


def edge_vectors(g: Graph, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Vectors from each centre atom to its neighbour, for neighbour list ``name``.

    Returns:
        ``edge_index`` [2, n_edges] (rows i, j), ``vectors`` [n_edges, 3] Å
        (``r_j - r_i + shift @ cell``) and ``lengths`` [n_edges] Å.

    On the CPU the cell term is left out when every shift is zero (molecules): adding zeros
    changes no value and no derivative, and it saves two gathers and an einsum per call (and
    their backward) in MD. On other devices, and under ``torch.compile`` (one graph, no
    break), it is always added (the test would synchronise).
    """
    index = g[K.edge_index_key(name)]
    shifts = g[K.edge_shift_key(name)]
    pos = g[K.POSITIONS]
    i, j = index[0], index[1]
    vectors = torch.index_select(pos, 0, j) - torch.index_select(pos, 0, i)
    if torch.compiler.is_compiling() or shifts.device.type != "cpu" or bool(shifts.any()):
        cell = g[K.CELL][g[K.BATCH][i]]
        vectors = vectors + torch.einsum("ek,ekl->el", shifts.to(pos.dtype), cell)
    lengths = torch.sqrt((vectors * vectors).sum(-1) + torch.finfo(pos.dtype).tiny)
    return index, vectors, lengths
