"""``trustpot md --compile auto``: compile the calculator mid-run once the run shows it pays.

The compiled evaluation (``TrustpotCalculator(..., compile=True)``) runs a small molecule's MD
step 1.6x faster on one CPU thread (PaiNN on ethanol; README, "Speed against MACE and
SchNetPack"), but its first call compiles for 9-45 s, and its forces equal the eager ones only
to float rounding. Whether that pays depends on the model, the machine and the run's length, so
``auto`` (the default of ``trustpot md``) decides on the run itself, as ``train.compile=auto``
does for training (:mod:`trustpot.train.auto_compile`):

1. The first :data:`TIMED_STEPS` steps after a warm-up run eagerly and are timed (whole MD
   steps: integrator, neighbour lists and writing included).
2. If the steps left would take at least :data:`MIN_REMAINING_S` at that pace, the calculator
   compiles, at the current positions: the compiled forces must equal the eager ones of the
   same positions to :data:`FORCE_RTOL` of the largest force (else a log line, and eager for
   good). A compiler error is caught there, before any step used the compiled path: the run
   goes on eagerly with a log line.
3. The next :data:`TIMED_STEPS` compiled steps are timed; unless they are at least
   :data:`MIN_SPEEDUP` times faster than the eager ones, the run goes back to eager for good.

Every decision is one log line. Only a plain potential or a deep ensemble whose members stack
has a compiled path; for any other model ``auto`` stays eager and says so. Trajectories of an
``auto`` run equal an eager run's to float rounding from the switch on; ``--compile never`` gives
the eager ones to the last bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import numpy as np
from ase import Atoms

from trustpot.calculator import TrustpotCalculator

#: eager steps run before timing starts (the first calls allocate and build caches)
WARMUP_STEPS: Final = 5
#: steps timed on each path
TIMED_STEPS: Final = 20
#: seconds of MD left at the eager pace for ``auto`` to compile: at the smallest gain measured
#: (1.6x on ethanol), a 45-s compilation (no on-disk cache) is won back after about 2 minutes
MIN_REMAINING_S: Final = 300.0
#: compiled steps must be this many times faster than eager ones to be kept
MIN_SPEEDUP: Final = 1.1
#: the compiled forces must equal the eager ones to this fraction of the largest force
#: (float32 rounding of fused kernels is about 1e-7 relative; a wrong kernel is far above)
FORCE_RTOL: Final = 1e-4


class AutoCompileMD:
    """An ASE observer (attach with ``interval=1``) that makes the ``auto`` decision.

    Args:
        calculator: the run's calculator (eager when attached).
        atoms: the atoms being integrated (their calculator is ``calculator``).
        steps: the run's total number of steps.
        log: where the decisions go.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        calculator: TrustpotCalculator,
        atoms: Atoms,
        steps: int,
        log: Callable[[str], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.calculator, self.atoms, self.steps = calculator, atoms, int(steps)
        self.log, self.clock = log, clock
        #: ``pending`` (eager, timing), ``trying`` (compiled, timing), ``on`` or ``off``
        self.state = "on" if calculator.compiled else "pending"
        self.calls = 0
        self.mark: tuple[int, float] | None = None
        self.eager_step_s = float("nan")
        self.compiled_step_s = float("nan")

    def __call__(self) -> None:
        """Called after every step (and once before the first): count, time, decide."""
        if self.state in ("on", "off"):
            return
        done, now = self.calls, self.clock()
        self.calls += 1
        if self.state == "pending" and done == WARMUP_STEPS:
            self.mark = (done, now)
        elif self.mark is not None and done - self.mark[0] == TIMED_STEPS:
            per_step = (now - self.mark[1]) / TIMED_STEPS
            if self.state == "pending":
                self._decide(per_step, done)
            else:
                self._keep_or_revert(per_step)

    def _decide(self, eager_s: float, done: int) -> None:
        """After ``done`` eager steps at ``eager_s`` seconds each: compile or not."""
        self.eager_step_s = eager_s
        remaining = eager_s * (self.steps - done)
        if remaining < MIN_REMAINING_S:
            self.state = "off"
            self.log(
                f"md: not compiled: {remaining:.0f} s of MD left at {1e3 * eager_s:.2f} ms per "
                f"step (--compile auto compiles when {MIN_REMAINING_S:g} s or more are left)"
            )
            return
        problem = self.calculator.compile_problem()
        if problem is not None:
            self.state = "off"
            self.log(f"md: not compiled: {problem} (--compile auto)")
            return
        eager_forces = np.array(self.calculator.results["forces"], copy=True)
        eager_results = dict(self.calculator.results)
        start = self.clock()
        try:
            self.calculator.set_compiled(True)
            self.calculator.calculate(self.atoms, ["energy", "forces"], ["positions"])
        except Exception as failure:  # the compiler's errors have no common type
            self._back_to_eager(eager_results)
            self.log(f"md: compiling failed, staying eager ({type(failure).__name__}: {failure})")
            return
        compile_s = self.clock() - start
        compiled_forces = np.asarray(self.calculator.results["forces"])
        scale = max(float(np.abs(eager_forces).max()), 1e-12)
        error = float(np.abs(compiled_forces - eager_forces).max())
        if not error <= FORCE_RTOL * scale:
            self._back_to_eager(eager_results)
            self.log(
                f"md: compiled forces differ from the eager ones by {error:.3g} eV/Å (largest "
                f"force {scale:.3g} eV/Å, tolerance {FORCE_RTOL:g} of it): staying eager"
            )
            return
        self.state = "trying"
        self.mark = (done, self.clock())  # compiled steps are timed from here
        self.log(
            f"md: {remaining / 60:.1f} min of MD left at {1e3 * eager_s:.2f} ms per step: "
            f"compiled in {compile_s:.1f} s (forces equal to {error:.2g} eV/Å; --compile auto)"
        )

    def _keep_or_revert(self, compiled_s: float) -> None:
        """After the timed compiled steps (``compiled_s`` seconds each): keep them or not."""
        self.compiled_step_s = compiled_s
        speedup = self.eager_step_s / compiled_s
        if speedup >= MIN_SPEEDUP:
            self.state = "on"
            self.log(
                f"md: compiled step {1e3 * compiled_s:.2f} ms against "
                f"{1e3 * self.eager_step_s:.2f} ms eager ({speedup:.2f}x): keeping it"
            )
        else:
            self.state = "off"
            self.calculator.set_compiled(False)
            self.log(
                f"md: compiled step {1e3 * compiled_s:.2f} ms against "
                f"{1e3 * self.eager_step_s:.2f} ms eager ({speedup:.2f}x, below "
                f"{MIN_SPEEDUP:g}x): back to the eager step"
            )

    def _back_to_eager(self, results: dict[str, object]) -> None:
        """Eager for good, with the eager results of the current positions restored."""
        self.state = "off"
        self.calculator.set_compiled(False)
        self.calculator.results = results
