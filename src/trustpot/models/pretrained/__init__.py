"""Pretrained foundation models behind the one model contract.

A pretrained model is known by name (``sevennet-0``, ``chgnet``...) in the registry (kind
``"pretrained"``); the name works wherever a checkpoint path does
(:func:`trustpot.io.checkpoint.load_model`). Each entry is a :class:`Pretrained`: it describes
the model (:class:`PretrainedInfo`, printed by ``trustpot pretrained list``) and loads it as an
adapter, a :class:`~trustpot.models.contract.Model` whose weights come from the package that
ships them (optional extras: ``pip install "trustpot[sevennet]"``). Nothing is downloaded.

An adapter saved to a checkpoint (after fine-tuning, or inside a wrapper) stores its name, the
package version and its weights; reading it needs the same package installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Protocol

from trustpot.errors import ConfigError
from trustpot.models.contract import Model


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
    """What ``trustpot pretrained list`` prints for a pretrained model.

    Attributes:
        name: the registry name (``sevennet-0``).
        package: the Python package that ships the weights (``sevenn``).
        package_version: its installed version (``"not installed"`` when absent).
        n_parameters: number of weights (0 when the package is absent).
        elements: atomic numbers it was trained on.
        cutoff: neighbour-list radius, Å.
        reference: the reference method and data set (``PBE, MPtrj``).
        licence: the weights' licence.
        extra: the trustpot extra that installs the package (``sevennet``).
    """

    name: str
    package: str
    package_version: str
    n_parameters: int
    elements: tuple[int, ...]
    cutoff: float
    reference: str
    licence: str
    extra: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Pretrained(Protocol):
    """A registry entry of kind ``"pretrained"``."""

    name: str
    #: the model kind of its adapter (``pretrained:...``), as checkpoints store it
    kind: str
    package: str
    extra: str

    def info(self) -> PretrainedInfo:
        """The model card line (loads the package, not necessarily the weights)."""
        ...

    def load(self) -> Model:
        """The adapter with the package's weights, in eval mode, on the CPU."""
        ...


def package_available(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def require_package(package: str, extra: str, name: str) -> None:
    """Raise a one-line :class:`ConfigError` naming the extra to install when ``package`` is
    missing."""
    if not package_available(package):
        raise ConfigError(
            f"pretrained model '{name}' needs the '{package}' package: "
            f'pip install "trustpot[{extra}]"'
        )
