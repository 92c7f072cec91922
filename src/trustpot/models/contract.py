"""The one model contract: what every kind of model answers, whatever it wraps.

A plain :class:`~trustpot.models.potential.Potential`, a scale mixture, every reliability
wrapper and every pretrained adapter is a :class:`Model`. Everything that evaluates, saves or
loads a model (the :class:`~trustpot.calculator.Predictor`, the ASE calculator, ``trustpot
eval``/``md``, :func:`trustpot.io.checkpoint.load_model`, the trainer) talks to this contract
only, never to a concrete class.

A model

- declares the neighbour lists it needs (:meth:`Model.neighbor_lists`);
- declares each output it can return with its field spec (level, per-item shape, unit)
  exactly once (:meth:`Model.output_specs`), so batched outputs can be cut per structure and
  shown with their units without a global table;
- evaluates a batched graph (:meth:`Model.forward`) and, where it has them, exposes per-atom
  invariant embeddings per layer (:meth:`Model.embed`);
- where it has one, offers a modulation hook (:meth:`Model.modulation_shape`,
  :meth:`Model.set_modulator`): its hidden invariant features after each interaction layer pass
  through an attached modulator (learned functional perturbations, :mod:`trustpot.uq.perturb`);
- names its parameters by depth (:meth:`Model.layer_groups`: embedding, each interaction
  layer, readout), which fine-tuning strategies freeze or give their own learning rates;
- writes its checkpoint fields (:meth:`Model.payload`) and is rebuilt from them
  (:meth:`Model.from_payload`); its ``kind`` is the registry name
  (:mod:`trustpot.registry`, kind ``"model"``) that the checkpoint stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Embedding, LayerGroups, Modulator

#: outputs computed when a caller names none
DEFAULT_OUTPUTS: frozenset[str] = frozenset({K.ENERGY, K.FORCES})


class Model(nn.Module, ABC):
    """Base class of every model kind (see the module docstring).

    Subclasses set ``kind`` and implement the abstract members.
    """

    #: checkpoint kind, the model's name in the registry (kind ``"model"``)
    kind: ClassVar[str] = ""

    # -- what the data pipeline and callers need ------------------------------------------
    @property
    @abstractmethod
    def species(self) -> list[int]:
        """Atomic numbers the model knows."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating-point type of positions and features."""

    @abstractmethod
    def neighbor_lists(self) -> list[NeighborListSpec]:
        """The neighbour lists the data pipeline must build for this model."""

    @abstractmethod
    def output_specs(self) -> dict[str, K.FieldSpec]:
        """Every output the model can return, with its level, per-item shape and unit."""

    def supported_outputs(self) -> frozenset[str]:
        """Names of :meth:`output_specs`."""
        return frozenset(self.output_specs())

    def check_outputs(self, outputs: Iterable[str]) -> frozenset[str]:
        """``outputs`` as a set; raises :class:`ConfigError` naming any unsupported one."""
        wanted = frozenset(outputs)
        unknown = wanted - self.supported_outputs()
        if unknown:
            raise ConfigError(
                f"{self.kind or type(self).__name__} does not provide {sorted(unknown)}; "
                f"it provides {sorted(self.supported_outputs())}"
            )
        return wanted

    # -- evaluation -----------------------------------------------------------------------
    @abstractmethod
    def forward(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS, create_graph: bool | None = None
    ) -> dict[str, Tensor]:
        """The requested outputs of the batch ``g`` (shapes and units as :meth:`output_specs`).

        ``create_graph`` keeps the graph of derivatives for training (default: training mode).
        """

    def embed(self, g: Graph) -> Embedding:
        """Per-atom invariant features (``node`` [n_atoms, F], ``layers``: one [n_atoms, F_l]
        per interaction layer) for the methods that read them (PROBE, drift reports).

        Raises:
            ConfigError: the model exposes none (the default).
        """
        raise ConfigError(f"{self.kind or type(self).__name__} exposes no per-atom embeddings")

    def outputs_and_embedding(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS
    ) -> tuple[dict[str, Tensor], Embedding]:
        """Detached outputs (no training graph) and the embedding of ``g``.

        By default two passes (:meth:`forward`, then :meth:`embed`); models that compute both
        in one pass override it (a :class:`~trustpot.models.potential.Potential` does).
        """
        out = self(g, outputs, create_graph=False)
        return {k: v.detach() for k, v in out.items()}, self.embed(g)

    def embedding_widths(self) -> list[int]:
        """Width F_l of the invariant features after each layer (``embed(g)["layers"]``),
        measured on a two-atom graph of the model's first element."""
        with torch.no_grad():
            layers = self.embed(self._two_atoms()).get("layers", [])
        return [int(h.shape[-1]) for h in layers]

    def node_width(self) -> int:
        """Width F of the per-atom features ``embed(g)["node"]`` [n_atoms, F] (what a property
        head reads), measured on a two-atom graph of the model's first element."""
        with torch.no_grad():
            return int(self.embed(self._two_atoms())["node"].shape[-1])

    def _two_atoms(self) -> Graph:
        """Two atoms of the first element 1.2 Å apart, neighbours in every list, on the
        model's device."""
        z = int(self.species[0])
        pos = torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0]], dtype=self.dtype)
        g: Graph = {
            K.POSITIONS: pos,
            K.ATOMIC_NUMBERS: torch.tensor([z, z]),
            K.CELL: torch.zeros((1, 3, 3), dtype=self.dtype),
            K.PBC: torch.zeros((1, 3), dtype=torch.bool),
            K.BATCH: torch.zeros(2, dtype=torch.long),
            K.N_ATOMS: torch.tensor([2]),
        }
        for spec in self.neighbor_lists():
            g[K.edge_index_key(spec.name)] = torch.tensor([[0, 1], [1, 0]])
            g[K.edge_shift_key(spec.name)] = torch.zeros((2, 3), dtype=self.dtype)
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return {k: v.to(device) for k, v in g.items()}

    def species_index(self, g: Graph) -> Tensor:
        """[n_atoms] index of each atom's element in :attr:`species`.

        Raises:
            ConfigError: an element the model does not know.
        """
        table = torch.full((119,), -1, dtype=torch.long, device=g[K.ATOMIC_NUMBERS].device)
        known = torch.tensor(self.species, dtype=torch.long, device=table.device)
        table[known] = torch.arange(len(self.species), device=table.device)
        index = table[g[K.ATOMIC_NUMBERS]]
        if index.device.type != "cpu" or torch.compiler.is_compiling():
            # checked without waiting for the device (or breaking a compiled graph)
            torch._assert_async(
                (index >= 0).all(), f"an element unknown to this model (knows {self.species})"
            )
        elif bool((index < 0).any()):
            unknown = sorted({int(z) for z in g[K.ATOMIC_NUMBERS][index < 0]})
            raise ConfigError(f"element(s) {unknown} unknown to this model (knows {self.species})")
        return index

    def layer_groups(self) -> LayerGroups:
        """The model's parameters in named groups ordered from the input to the output
        (embedding, each interaction layer, readout/head); every parameter is in exactly one
        group. Fine-tuning freezes the first groups or decays learning rates along them.

        By default one group, ``all``, holding every parameter.
        """
        return [("all", list(self.parameters()))]

    # -- modulation hook --------------------------------------------------------------------
    def modulation_shape(self) -> tuple[int, int] | None:
        """``(n_layers, F)``: the interaction layers whose hidden invariant features [n_atoms, F]
        an attached modulator changes (:meth:`set_modulator`), or None when the model has no
        modulation hook (the default)."""
        return None

    def set_modulator(self, modulator: Modulator | None) -> Modulator | None:
        """Attach ``modulator`` (None: detach) and return the one attached before.

        Once attached, the features ``h`` [n_atoms, F] after interaction layer ``k`` become
        ``modulator(k, h, g)`` in every evaluation. The modulator is held as a plain attribute,
        not a submodule, so the model's ``state_dict`` does not change.

        Raises:
            ConfigError: the model has no modulation hook (the default).
        """
        raise ConfigError(
            f"model kind '{self.kind}' has no modulation hook (learned perturbations need one)"
        )

    # -- persistence ----------------------------------------------------------------------
    @abstractmethod
    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Checkpoint fields: ``kind``, ``meta``, ``model`` (weights, from ``state`` when
        given, e.g. EMA weights) and, where needed, ``extra``."""

    def checkpoint_fields(
        self, meta: dict[str, Any], state: Mapping[str, Tensor] | None
    ) -> dict[str, Any]:
        """``kind``, ``meta`` and ``model``: ``state`` when given, else the current weights (the
        common body of :meth:`payload`)."""
        weights = dict(state) if state is not None else self.state_dict()
        return {"kind": self.kind, "meta": meta, "model": weights}

    @classmethod
    @abstractmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> Model:
        """Rebuild the model from validated checkpoint fields; raises
        :class:`~trustpot.errors.CheckpointError` naming ``path`` on malformed content."""


def load_state_checked(model: nn.Module, state: Any, path: str, what: str) -> None:
    """Load ``state`` into ``model`` after checking every tensor's name, shape and finiteness.

    Raises:
        CheckpointError: naming ``path`` and the first offending tensor.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the weights of the {what} are not a state dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the {what}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, tensor in expected.items():
        value = state[name]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: '{name}' of the {what} is not a tensor")
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: weights do not fit the {what}: tensor '{name}' has shape "
                f"{tuple(value.shape)}, the model expects {tuple(tensor.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: tensor '{name}' of the {what} holds NaN or inf")
    model.load_state_dict(dict(state), strict=True)
