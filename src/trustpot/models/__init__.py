"""Backbones, heads and the potential that combines them."""

from trustpot.models.base import Backbone, BackboneHypers, Embedding
from trustpot.models.build import build_potential, meta_from_data, potential_from_meta
from trustpot.models.potential import ModelMeta, Potential

__all__ = [
    "Backbone",
    "BackboneHypers",
    "Embedding",
    "ModelMeta",
    "Potential",
    "build_potential",
    "meta_from_data",
    "potential_from_meta",
]
