"""``trustpot-mol``: trustpot's own pretrained molecular potential (registry name).

An ordinary trustpot :class:`~trustpot.models.potential.Potential` (PaiNN) trained by
``trustpot pretrain`` (:mod:`trustpot.pretrain`) on GFN2-xTB energies and forces of small
organic molecules (H, C, N, O, F, S, Cl). Its weights ship as package data,
``trustpot/pretrained_weights/trustpot-mol.ckpt``, next to its model card (``trustpot-mol.md``,
``trustpot-mol.json``) and data manifest (``trustpot-mol.manifest.json``: SMILES, temperatures,
frames, seeds, options, data SHA-256) with which the one command reproduces it. No extra
package is needed.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from trustpot.errors import ConfigError
from trustpot.models.potential import Potential
from trustpot.models.pretrained import PretrainedInfo

NAME = "trustpot-mol"
#: package-data folder of the shipped weights, card and manifest
FOLDER = "pretrained_weights"


def _resource(suffix: str) -> Any:
    """``trustpot/pretrained_weights/trustpot-mol{suffix}`` as an ``importlib.resources``
    Traversable."""
    return resources.files("trustpot").joinpath(FOLDER, NAME + suffix)


def card() -> dict[str, Any]:
    """The shipped model card (``trustpot-mol.json``).

    Raises:
        ConfigError: the package data is missing (a broken install).
    """
    path = _resource(".json")
    if not path.is_file():
        raise ConfigError(f"{NAME}: its model card {FOLDER}/{NAME}.json is not installed")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class TrustpotMolEntry:
    """The registry entry ``trustpot-mol`` (a :class:`~trustpot.models.pretrained.Pretrained`)."""

    name = NAME
    kind = "potential"
    package = "trustpot"
    extra = ""

    def info(self) -> PretrainedInfo:
        """The model card line, read from the shipped card (the weights are not loaded)."""
        from ase.data import atomic_numbers

        from trustpot import __version__

        c = card()
        data, training = c["data"], c["training"]
        temps = "/".join(f"{t:g}" for t in data["temperatures"])
        return PretrainedInfo(
            name=NAME,
            package=self.package,
            package_version=__version__,
            n_parameters=int(training["parameters"]),
            elements=tuple(atomic_numbers[e] for e in data["elements"]),
            cutoff=float(training["hypers"]["cutoff"]),
            reference=f"GFN2-xTB (tblite), {data['train_molecules']} molecules at {temps} K",
            licence="MIT",
            extra=self.extra,
        )

    def load(self) -> Potential:
        """The potential with the shipped weights, in eval mode, on the CPU."""
        from trustpot.io.checkpoint import load_model

        weights = _resource(".ckpt")
        if not weights.is_file():
            raise ConfigError(f"{NAME}: its weights {FOLDER}/{NAME}.ckpt are not installed")
        with resources.as_file(weights) as path:
            return load_model(path, Potential).eval()


#: the registry entry ``"trustpot-mol"``
TRUSTPOT_MOL = TrustpotMolEntry()
