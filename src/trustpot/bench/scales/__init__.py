"""The adaptive-scale study (``trustpot scales run``): short- and long-range experts mixed per
atom, and how well a scale can be chosen.

The model code lives with the models: :mod:`trustpot.models.mixture` (the two-expert potential,
its router and scale modes), :mod:`trustpot.models.electrostatics` (learned charges and Ewald,
PME or direct Coulomb energies) and :func:`trustpot.models.build.build_scale_mixture`. This
package holds the study:

- :mod:`~trustpot.bench.scales.oracle`: oracle routing and interpolation from branch forces;
- :mod:`~trustpot.bench.scales.refine`: loss-guided pool refinement and scale optimisation;
- :mod:`~trustpot.bench.scales.contacts`: close-contact distances (minimum image), binned errors;
- :mod:`~trustpot.bench.scales.branches`: training each branch separately with the Trainer;
- :mod:`~trustpot.bench.scales.router`: training the learned router (per atom or per structure);
- :mod:`~trustpot.bench.scales.analysis`: the study's modes on branch forces, rows of the table;
- :mod:`~trustpot.bench.scales.testbeds`: the DFT and OpenMM NaCl(aq) testbeds, their manifests;
- :mod:`~trustpot.bench.scales.options`, :mod:`~trustpot.bench.scales.pipeline`,
  :mod:`~trustpot.bench.scales.report`: ``trustpot scales run`` and its report.
"""

from trustpot.bench.scales.oracle import (
    BranchForces,
    OracleSummary,
    oracle_gain_recovered,
    oracle_scale_l2,
    oracle_scale_mae,
    oracle_summary,
    route_atoms,
    route_structure,
)
from trustpot.bench.scales.refine import (
    RefinementResult,
    RefinementRound,
    ScaleOptimisation,
    optimise_scale,
    refine_pool,
    refine_scale_pool,
)

__all__ = [
    "BranchForces",
    "OracleSummary",
    "RefinementResult",
    "RefinementRound",
    "ScaleOptimisation",
    "optimise_scale",
    "oracle_gain_recovered",
    "oracle_scale_l2",
    "oracle_scale_mae",
    "oracle_summary",
    "refine_pool",
    "refine_scale_pool",
    "route_atoms",
    "route_structure",
]
