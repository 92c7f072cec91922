"""Reusable layers with no knowledge of configs: radial bases, cutoffs, MLPs, scatter."""

from trustpot.nn.layers import (
    MLP,
    BesselBasis,
    CosineCutoff,
    GaussianBasis,
    ShiftedSoftplus,
    scatter_sum,
)

__all__ = ["MLP", "BesselBasis", "CosineCutoff", "GaussianBasis", "ShiftedSoftplus", "scatter_sum"]
