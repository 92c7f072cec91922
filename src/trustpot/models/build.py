"""Build a potential from a registry name, hyper-parameters and training-set statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trustpot.data.stats import (
    average_neighbors,
    fit_reference_energies,
    force_rms,
    residual_energy_stats,
)
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.models.base import make_hypers
from trustpot.models.potential import ModelMeta, Potential, potential_from_meta
from trustpot.registry import canonical_name, lookup

__all__ = ["build_potential", "meta_from_data", "potential_from_meta"]


def meta_from_data(
    backbone: str,
    hypers: dict[str, Any],
    structures: Sequence[Structure],
    dtype: str = "float32",
    reference_energies: dict[int, float] | None = None,
    extra_species: Sequence[int] = (),
    head_dropout: float = 0.0,
) -> ModelMeta:
    """Metadata of a new potential from its training structures.

    Reference energies are fitted by least squares unless given (e.g. from isolated atoms);
    the head's output is scaled by the RMS of the training forces, as MACE does.
    """
    cls = lookup("backbone", backbone)
    parsed = make_hypers(cls.Hypers, hypers)
    species = sorted({int(z) for s in structures for z in s.numbers} | set(extra_species))
    if reference_energies is None:
        e0 = fit_reference_energies(structures, species)
    else:
        missing = [z for z in species if z not in reference_energies]
        if missing:
            raise ConfigError(f"no isolated-atom energy for element(s) {missing}")
        e0 = {z: reference_energies[z] for z in species}
    shift, _ = residual_energy_stats(structures, e0)
    return ModelMeta(
        backbone=canonical_name("backbone", backbone),
        hypers={k: getattr(parsed, k) for k in parsed.__dataclass_fields__},
        species=species,
        reference_energies=e0,
        energy_scale=force_rms(structures),
        energy_shift=shift,
        avg_neighbors=average_neighbors(structures, parsed.cutoff),
        dtype=dtype,
        head_dropout=head_dropout,
    )


def build_potential(
    backbone: str,
    hypers: dict[str, Any],
    structures: Sequence[Structure],
    dtype: str = "float32",
    seed: int = 0,
    **kwargs: Any,
) -> Potential:
    """Metadata from ``structures``, then a potential initialised with ``seed``."""
    meta = meta_from_data(backbone, hypers, structures, dtype, **kwargs)
    torch.manual_seed(seed)
    return potential_from_meta(meta)
