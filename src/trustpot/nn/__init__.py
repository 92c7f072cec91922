"""Reusable layers with no knowledge of configs: radial bases, cutoffs, MLPs, scatter."""

from trustpot.nn.layers import (
    MLP,
    BesselBasis,
    CosineCutoff,
    GaussianBasis,
    ShiftedSoftplus,
    cell_volume,
    scatter_sum,
)

__all__ = [
    "MLP", "BesselBasis", "CosineCutoff", "GaussianBasis", "ShiftedSoftplus", "cell_volume",
    "scatter_sum",
]  # fmt: skip
