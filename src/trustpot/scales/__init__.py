"""Adaptive scale refinement (seed 000): short- and long-range experts mixed per atom.

- :mod:`~trustpot.scales.electrostatics`: learned charges and Ewald/PME/direct Coulomb energies;
- :mod:`~trustpot.scales.mixture`: the two-expert potential, its router and scale modes;
- :mod:`~trustpot.scales.build`: mixtures from metadata or from training structures;
- :mod:`~trustpot.scales.oracle`: oracle routing and interpolation from branch forces;
- :mod:`~trustpot.scales.refine`: loss-guided pool refinement and a differentiable scale;
- :mod:`~trustpot.scales.io`: ``"scale-mixture"`` checkpoints;
- :mod:`~trustpot.scales.contacts`: close-contact distances (minimum image) and binned errors;
- :mod:`~trustpot.scales.branches`: training each branch separately with the Trainer;
- :mod:`~trustpot.scales.router`: the learned router (per atom or per structure);
- :mod:`~trustpot.scales.analysis`: the seed's modes on branch forces, rows of the table;
- :mod:`~trustpot.scales.testbeds`: the DFT and OpenMM NaCl(aq) testbeds and their manifests;
- :mod:`~trustpot.scales.options`, :mod:`~trustpot.scales.pipeline`,
  :mod:`~trustpot.scales.report`: ``trustpot scales run`` and its report.
"""

from trustpot.scales.build import build_scale_mixture, mixture_from_meta
from trustpot.scales.electrostatics import (
    COULOMB_EV_A,
    TOTAL_CHARGE,
    ElectrostaticEnergy,
    ElectrostaticsConfig,
    LearnedCharges,
    coulomb_direct,
    neutralise,
)
from trustpot.scales.io import (
    load_scale_mixture,
    save_scale_mixture,
)
from trustpot.scales.mixture import (
    MIXTURE_OUTPUTS,
    ScaleMixtureMeta,
    ScaleMixturePotential,
    ScaleRouter,
    graph_for_list,
)
from trustpot.scales.oracle import (
    BranchForces,
    OracleSummary,
    oracle_gain_recovered,
    oracle_scale_l2,
    oracle_scale_mae,
    oracle_summary,
    route_atoms,
    route_structure,
)
from trustpot.scales.refine import (
    DifferentiableScale,
    RefinementResult,
    RefinementRound,
    ScaleOptimisation,
    optimise_scale,
    refine_pool,
    refine_scale_pool,
)

__all__ = [
    "COULOMB_EV_A",
    "MIXTURE_OUTPUTS",
    "TOTAL_CHARGE",
    "BranchForces",
    "DifferentiableScale",
    "ElectrostaticEnergy",
    "ElectrostaticsConfig",
    "LearnedCharges",
    "OracleSummary",
    "RefinementResult",
    "RefinementRound",
    "ScaleMixtureMeta",
    "ScaleMixturePotential",
    "ScaleOptimisation",
    "ScaleRouter",
    "build_scale_mixture",
    "coulomb_direct",
    "graph_for_list",
    "load_scale_mixture",
    "mixture_from_meta",
    "neutralise",
    "optimise_scale",
    "oracle_gain_recovered",
    "oracle_scale_l2",
    "oracle_scale_mae",
    "oracle_summary",
    "refine_pool",
    "refine_scale_pool",
    "route_atoms",
    "route_structure",
    "save_scale_mixture",
]
