"""A :class:`~trustpot.policy.TrustPolicy` in any ASE dynamics: an observer that warns,
harvests and halts.

Use in your own ASE script (any dynamics or optimizer; attach the monitor *before* anything
that writes frames, so a halted or non-finite frame is never written)::

    from ase.md.langevin import Langevin
    from trustpot import TrustpotCalculator
    from trustpot.monitor import TrustHalt, TrustMonitor
    from trustpot.policy import TrustPolicy

    atoms.calc = TrustpotCalculator.from_checkpoint("runs/ens/uq.ckpt")
    policy = TrustPolicy.from_specs(warn=["force-std>0.05"], harvest=["force-std>0.1"],
                                    halt=["force-error>0.3@0.95"])
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs)
    monitor = TrustMonitor(policy, atoms, dyn, harvest_file="uncertain.xyz")
    dyn.attach(monitor, interval=1)
    dyn.attach(Trajectory("md.traj", "w", atoms).write, interval=10)
    try:
        dyn.run(10000)
    except TrustHalt as halt:
        print(halt)  # one line: step, atom, value and the rule

The monitor reads the calculator's ``results`` (computed anyway for the step; nothing is
evaluated twice), so it also works with another calculator that returns ``forces_std`` or
``reliability`` (whose std is then taken as calibrated).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import write

from trustpot.calculator import TrustpotCalculator
from trustpot.errors import ConfigError
from trustpot.policy import Action, TrustEvent, TrustPolicy
from trustpot.uq.base import UQModel


class TrustHalt(Exception):
    """Raised by a :class:`TrustMonitor` when a halt rule fires or a value is not finite.

    Attributes:
        event: what fired (step, atom, value, rule).
        stats: filled by :func:`trustpot.md.run_md` with the run's statistics so far.
    """

    def __init__(self, event: TrustEvent) -> None:
        super().__init__(event.message())
        self.event = event
        self.stats: dict[str, float] = {}


def capabilities(calc: Any) -> tuple[frozenset[str], str, bool]:
    """What a calculator's results hold, the model kind for messages, and whether its
    ``forces_std`` is recalibrated (a trustpot wrapper with a fitted
    :class:`~trustpot.uq.base.Recalibration`; assumed for a foreign calculator)."""
    if isinstance(calc, TrustpotCalculator):
        model = calc.predictor.model
        kind = model.kind
        calibrated = False
        if isinstance(model, UQModel):
            kind += f" (base {model.base.kind})"
            calibrated = bool(model.recalibration.fitted_on)
        return frozenset(calc.implemented_properties), kind, calibrated
    props = frozenset(getattr(calc, "implemented_properties", ()))
    return props, type(calc).__name__, True


def append_frame(path: str | Path, atoms: Atoms) -> None:
    """Append one extended-XYZ frame to ``path`` in a single ``write`` and ``fsync`` it: a
    kill can cut at most the frame being written, never an earlier one."""
    buffer = io.StringIO()
    write(buffer, atoms, format="extxyz")
    data = memoryview(buffer.getvalue().encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class TrustMonitor:
    """ASE observer that applies a :class:`TrustPolicy` at every call.

    Halt rules and the non-finite check are evaluated on every call; warn and harvest rules on
    the steps that are multiples of ``sample_interval`` (so harvested frames are as far apart
    as the trajectory's). Harvested frames (also the frame that halts, when a harvest file is
    set) go to ``harvest_file`` as extended XYZ, appended: positions, cell, pbc; arrays
    ``pred_forces`` [n_atoms, 3] eV/Å and the per-atom uncertainties (``forces_std`` eV/Å,
    ``atom_importance``); info ``trust_step``, ``trust_rules`` (the rules that fired),
    ``trust_score`` (the first rule's value), ``trust_atom`` (-1: none), ``trust_source``,
    ``pred_energy`` eV and the frame uncertainties (``energy_std`` eV, ``reliability``).
    Predictions carry a ``pred_`` prefix so that no reader takes them for labels.

    Args:
        policy: the rules.
        atoms: the atoms the dynamics moves (their calculator's results are read).
        dyn: the dynamics, for its step counter; without it, calls are counted from 0.
        harvest_file: extxyz file for harvested frames (needed by harvest rules).
        log: where warnings go (one line each; default: standard error).
        sample_interval: steps between warn/harvest checks.
        source: provenance stored in harvested frames (a trajectory or checkpoint name).
        check: refuse rules the calculator cannot evaluate, at construction (ConfigError).
    """

    def __init__(
        self,
        policy: TrustPolicy,
        atoms: Atoms,
        dyn: Any = None,
        harvest_file: str | Path | None = None,
        log: Callable[[str], None] | None = None,
        sample_interval: int = 1,
        source: str = "",
        check: bool = True,
    ) -> None:
        if sample_interval < 1:
            raise ConfigError(f"sample_interval must be positive, got {sample_interval}")
        if policy.of("harvest") and harvest_file is None:
            raise ConfigError(f"{policy.of('harvest')[0].label}: harvest rules need a harvest file")
        if check:
            if atoms.calc is None:
                raise ConfigError("the trust monitor needs atoms with a calculator")
            policy.check_model(*capabilities(atoms.calc))
        self.policy = policy
        self.atoms = atoms
        self.dyn = dyn
        self.harvest_file = None if harvest_file is None else Path(harvest_file)
        self.log = log or _stderr
        self.sample_interval = sample_interval
        self.source = source
        self.calls = 0
        #: how often each action fired (``warn``, ``harvest``; a halt ends the run)
        self.counts: dict[Action, int] = {"warn": 0, "harvest": 0, "halt": 0}
        #: the first step each rule fired at, by its label
        self.first_fired: dict[str, int] = {}

    def step(self) -> int:
        """The current step: the dynamics' counter, else the number of earlier calls."""
        return int(self.dyn.nsteps) if self.dyn is not None else self.calls

    def __call__(self) -> None:
        step = self.step()
        self.calls += 1
        atoms = self.atoms
        atoms.get_forces()  # the step's results (cached: no second evaluation)
        results = atoms.calc.results
        bad = self.policy.non_finite(results, atoms.numbers, step)
        if bad is not None:
            raise TrustHalt(bad)
        actions: tuple[Action, ...] = ("halt",)
        if step % self.sample_interval == 0:
            actions = ("warn", "harvest", "halt")
        events = self.policy.evaluate(results, atoms.numbers, step, actions)
        for event in events:
            assert event.rule is not None
            self.first_fired.setdefault(event.rule.label, step)
            self.counts[event.action] += 1
            if event.action == "warn":
                self.log(f"trustpot: warning: {event.message()}")
        keep = [e for e in events if e.action in ("harvest", "halt")]
        if self.harvest_file is not None and keep:
            append_frame(self.harvest_file, self.frame(results, keep))
        halts = [e for e in events if e.action == "halt"]
        if halts:
            raise TrustHalt(halts[0])

    def frame(self, results: dict[str, Any], events: list[TrustEvent]) -> Atoms:
        """The harvested copy of the current frame (see the class docstring)."""
        a = self.atoms
        out = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
        out.arrays["pred_forces"] = np.asarray(results["forces"], dtype=np.float64)
        for key in ("forces_std", "atom_importance"):
            if key in results:
                out.arrays[key] = np.asarray(results[key], dtype=np.float64)
        first = events[0]
        out.info.update(
            trust_step=first.step,
            trust_rules=";".join(e.rule.label for e in events if e.rule is not None),
            trust_score=first.value,
            trust_atom=-1 if first.atom is None else first.atom,
            trust_source=self.source,
            pred_energy=float(results["energy"]),
        )
        for key in ("energy_std", "reliability"):
            if key in results:
                out.info[key] = float(results[key])
        return out
