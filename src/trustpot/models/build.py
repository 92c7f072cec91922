"""Build a potential or a scale mixture from registry names, hyper-parameters and training-set
statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import replace
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
from trustpot.models.electrostatics import ElectrostaticsConfig
from trustpot.models.mixture import ScaleMixtureMeta, ScaleMixturePotential, mixture_from_meta
from trustpot.models.potential import ModelMeta, Potential, potential_from_meta
from trustpot.registry import canonical_name, lookup

__all__ = [
    "build_potential",
    "build_scale_mixture",
    "meta_from_data",
    "mixture_from_meta",
    "potential_from_meta",
]


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
        hypers={f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed)},
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


def build_scale_mixture(
    structures: Sequence[Structure],
    short_backbone: str = "painn",
    short_hypers: dict[str, Any] | None = None,
    long_backbone: str = "painn",
    long_hypers: dict[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    reference_energies: dict[int, float] | None = None,
    electrostatics: ElectrostaticsConfig | None = None,
    use_electrostatics: bool = True,
    scale_mode: str = "fixed",
    scale: float = 0.5,
    router_hidden: int = 32,
    router_level: str = "atom",
) -> ScaleMixturePotential:
    """A new mixture whose branches are initialised from the statistics of ``structures``.

    Defaults, as ``trustpot scales run``: PaiNN branches with 4 Å (short) and 6 Å (long)
    cutoffs (``hypers["cutoff"]`` overrides them), so they differ only in range; a SchNet 8 Å
    long branch was far too weak in our NaCl(aq) runs (``docs/scales.md``). Both branches
    share the reference energies (fitted once, or given) and the force scale of the data.
    """
    short_h = {"cutoff": 4.0, **(short_hypers or {})}
    long_h = {"cutoff": 6.0, **(long_hypers or {})}
    if float(short_h["cutoff"]) > float(long_h["cutoff"]):
        raise ConfigError(
            f"the short cutoff ({short_h['cutoff']} Å) exceeds the long one ({long_h['cutoff']} Å)"
        )
    short_meta = meta_from_data(
        short_backbone, short_h, structures, dtype, reference_energies=reference_energies
    )
    long_meta = meta_from_data(
        long_backbone, long_h, structures, dtype, reference_energies=short_meta.reference_energies
    )
    long_meta = replace(long_meta, species=list(short_meta.species))
    meta = ScaleMixtureMeta(
        short=short_meta,
        long=long_meta,
        electrostatics=electrostatics or ElectrostaticsConfig(),
        use_electrostatics=use_electrostatics,
        scale_mode=scale_mode,
        scale=scale,
        router_hidden=router_hidden,
        router_level=router_level,
    )
    torch.manual_seed(seed)
    return mixture_from_meta(meta)
