"""trustpot: machine-learned interatomic potentials that say how far to trust each prediction.

Public API::

    from trustpot import TrustpotCalculator, Predictor, load_potential
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trustpot.version import __version__

if TYPE_CHECKING:
    from trustpot.calculator import Predictor, TrustpotCalculator
    from trustpot.io.checkpoint import load_potential

__all__ = ["Predictor", "TrustpotCalculator", "__version__", "load_potential"]


def __getattr__(name: str) -> Any:
    # lazy, so that `import trustpot` stays cheap for the command line
    if name in ("Predictor", "TrustpotCalculator"):
        from trustpot import calculator

        return getattr(calculator, name)
    if name == "load_potential":
        from trustpot.io.checkpoint import load_potential

        return load_potential
    raise AttributeError(f"module 'trustpot' has no attribute '{name}'")
