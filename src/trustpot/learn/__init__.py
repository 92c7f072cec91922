"""Active learning with a reference engine as the oracle (``trustpot learn``)."""

from trustpot.learn.loop import run_learn
from trustpot.learn.options import LearnOptions

__all__ = ["LearnOptions", "run_learn"]
