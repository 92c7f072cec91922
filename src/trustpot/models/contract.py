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
from trustpot.models.base import Embedding

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

    # -- persistence ----------------------------------------------------------------------
    @abstractmethod
    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Checkpoint fields: ``kind``, ``meta``, ``model`` (weights, from ``state`` when
        given, e.g. EMA weights) and, where needed, ``extra``."""

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
