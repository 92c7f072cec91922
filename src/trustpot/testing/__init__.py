"""Contract checks every backbone and wrapper must pass; shipped so plug-ins can reuse them."""

from trustpot.testing.contracts import (
    check_batch_equals_single,
    check_cutoff_smoothness,
    check_forces_finite_difference,
    check_invariances,
    check_save_load,
    check_stress_finite_difference,
    random_rotation,
)

__all__ = [
    "check_batch_equals_single",
    "check_cutoff_smoothness",
    "check_forces_finite_difference",
    "check_invariances",
    "check_save_load",
    "check_stress_finite_difference",
    "random_rotation",
]
