"""Building scale mixtures: from metadata, or from training structures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.models.build import meta_from_data
from trustpot.scales.electrostatics import ElectrostaticsConfig
from trustpot.scales.mixture import ScaleMixtureMeta, ScaleMixturePotential, mixture_from_meta

__all__ = ["build_scale_mixture", "mixture_from_meta"]


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
