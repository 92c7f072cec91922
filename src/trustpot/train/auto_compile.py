"""``train.compile=auto``: compile the training step once the run has shown it is worth it.

The compiled step (:mod:`trustpot.train.compiled_step`) runs an epoch 1.4-3.2x faster on the
CPU (PaiNN 3.1-3.2x, ACE 1.4-1.9x with batches packed by size; README, "A compiled step"), but
its first step compiles for 40-90 s. Whether that pays depends on how long the run is and on
the model, so ``auto`` decides on measurements of the run itself:

1. The first epoch takes the eager step; its training time ``t_eager`` is measured.
2. If the run has at least :data:`MIN_REMAINING_S` of training left (the wall-clock budget's
   remainder, or the remaining epochs at ``t_eager`` each, whichever is shorter), the step is
   compiled from the next epoch on, its batches packed by size (``train.batching=auto``). At
   the smallest gain measured (1.4x) a 90-s compile is won back after about 5 minutes, so 10
   minutes leaves a margin for slower machines. A step the compiler cannot take ends the
   attempt: the trainer reruns that epoch eagerly and logs why.
3. The second compiled epoch (the first one includes the compile) is timed; unless it is at
   least :data:`MIN_SPEEDUP` times faster than ``t_eager``, the run goes back to the eager step
   for good.

Every decision is logged. ``auto`` acts only in a single CPU process: on a CUDA device the
recorded step (``train.cuda_graphs``) is planned before the first epoch, and switching it to a
compiled recording mid-run has not been measured on a GPU (``always`` compiles there from the
first step), and data-parallel training cannot compile.
"""

from __future__ import annotations

import dataclasses

#: seconds of training left after the first epoch for ``auto`` to compile
MIN_REMAINING_S = 600.0
#: a compiled epoch must be this many times faster than the eager one to be kept
MIN_SPEEDUP = 1.1


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the trainer does after an epoch.

    Attributes:
        action: ``"compile"`` (switch to the compiled step), ``"eager"`` (back to the eager
            step) or ``""`` (nothing).
        message: what to log (empty: nothing).
    """

    action: str = ""
    message: str = ""


class AutoCompile:
    """The epoch-by-epoch decision of ``train.compile=auto`` (module docstring).

    Args:
        mode: ``train.compile`` (only ``auto`` decides anything).
        device_type: the training device's type (``cpu``, ``cuda``...).
        distributed: data-parallel training.
    """

    def __init__(self, mode: str, device_type: str, distributed: bool) -> None:
        active = mode == "auto" and device_type == "cpu" and not distributed
        #: ``pending`` (eager, deciding after this epoch), ``trying`` (compiled, timing),
        #: ``on`` (compiled for good) or ``off`` (eager for good)
        self.state = "pending" if active else "off"
        self.eager_s = 0.0
        self.compiled_epochs = 0

    @property
    def first_compiled_epoch(self) -> bool:
        """The next epoch is the first with the compiled step (where a failure is caught)."""
        return self.state == "trying" and self.compiled_epochs == 0

    def after_epoch(self, train_s: float, remaining_s: float) -> Decision:
        """The decision after an epoch whose training steps took ``train_s`` seconds, with
        ``remaining_s`` seconds of training left at the eager pace."""
        if self.state == "pending":
            self.eager_s = train_s
            if remaining_s < MIN_REMAINING_S:
                self.state = "off"
                return Decision(
                    "", f"step not compiled: {remaining_s / 60:.1f} min of training left "
                    f"(train.compile=auto compiles when {MIN_REMAINING_S / 60:g} or more)",
                )  # fmt: skip
            self.state = "trying"
            return Decision(
                "compile", f"{remaining_s / 60:.1f} min of training left at "
                f"{train_s:.2f} s per epoch: compiling the step (train.compile=auto)",
            )  # fmt: skip
        if self.state != "trying":
            return Decision()
        self.compiled_epochs += 1
        if self.compiled_epochs < 2:  # this epoch included the compile
            return Decision()
        speedup = self.eager_s / max(train_s, 1e-9)
        keep = speedup >= MIN_SPEEDUP
        self.state = "on" if keep else "off"
        measured = (
            f"compiled epoch {train_s:.2f} s against {self.eager_s:.2f} s eager ({speedup:.2f}x"
        )
        if keep:
            return Decision("", measured + "): keeping the compiled step")
        return Decision("eager", measured + f", under {MIN_SPEEDUP:g}x): back to the eager step")

    def failed(self, reason: str) -> Decision:
        """The first compiled step failed with ``reason``: eager for good."""
        self.state = "off"
        return Decision("eager", f"step not compiled ({reason}); eager from here")
