"""Trust policies: calibrated thresholds that warn, harvest or halt a simulation.

A :class:`TrustPolicy` is a set of :class:`TrustRule`, each an action (``warn``, ``harvest``,
``halt``) and a condition on the uncertainty a reliability wrapper returns. Conditions are
written as text (the same grammar on the command line and in Python)::

    force-error>T@P     per atom: P(|force error| > T) >= P    T in eV/Å, P in (0, 1)
    force-std>T         per atom: calibrated force std > T     eV/Å (per component)
    frame-force-std>T   the frame's mean calibrated std > T    eV/Å (per component)
    reliability<R       the frame's reliability < R            R in (0, 1]

Every policy also halts on a non-finite energy, force or uncertainty.

The error model behind ``force-error`` (stated, not fitted here): the error of each force
component of atom ``i`` is Gaussian with mean 0 and standard deviation ``sigma_i``, the
wrapper's recalibrated ``forces_std`` (a wrapper's per-atom std is the root mean of its three
component variances, so the components are taken as independent with that one variance). The
length of the force-error vector ``|e_i|`` is then ``sigma_i`` times a chi variable with 3
degrees of freedom, and

    P(|e_i| > T) = erfc(x / sqrt 2) + sqrt(2 / pi) x exp(-x^2 / 2),   x = T / sigma_i.

``force-error>0.15@0.95`` fires when some atom's force error exceeds 0.15 eV/Å with probability
at least 0.95, i.e. when ``sigma_i >= 0.15 / chi3.isf(0.95) = 0.15 / 0.593 = 0.253`` eV/Å. The
rule reports the worst atom (atoms are not combined: under independence the probability that
*any* atom exceeds T would be ``1 - prod(1 - p_i)``).

``reliability`` (PROBE, or the logistic map of a recalibrated std method) is the probability
that the frame's force MAE is within the wrapper's stored tolerance; ``reliability<0.5`` fires
when an error above that tolerance is more likely than not.

A rule the model cannot evaluate is refused by :meth:`TrustPolicy.check_model`, naming the model
kind and the quantity (PROBE gives no ``forces_std``; an ensemble without a recalibration gives
no ``reliability`` and no calibrated std). The ASE side (an observer for any dynamics, the
harvest file and :class:`TrustHalt`) is in :mod:`trustpot.monitor`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from ase.data import chemical_symbols
from scipy import special, stats

from trustpot.errors import ConfigError

Action = Literal["warn", "harvest", "halt"]
ACTIONS: tuple[Action, ...] = ("warn", "harvest", "halt")


@dataclass(frozen=True)
class Quantity:
    """A quantity a rule can test.

    Attributes:
        name: its name in the grammar.
        op: the comparison that fires (``>`` or ``<``).
        needs: the calculator result (ASE property name) it reads.
        per_atom: tested per atom (the worst atom fires) or once per frame.
        unit: unit of the threshold.
        probability: whether the rule takes ``@P``.
        calibrated: whether it is only meaningful on a recalibrated std.
        doc: one line for ``--help``.
    """

    name: str
    op: str
    needs: str
    per_atom: bool
    unit: str
    probability: bool
    calibrated: bool
    doc: str


QUANTITIES: dict[str, Quantity] = {
    q.name: q
    for q in (
        Quantity("force-error", ">", "forces_std", True, "eV/Å", True, True,
                 "per atom: P(|force error| > T) >= P, from the calibrated std (chi, 3 dof)"),
        Quantity("force-std", ">", "forces_std", True, "eV/Å", False, False,
                 "per atom: calibrated force std (per component) above T"),
        Quantity("frame-force-std", ">", "forces_std", False, "eV/Å", False, False,
                 "mean calibrated force std of the frame above T"),
        Quantity("reliability", "<", "reliability", False, "", False, False,
                 "the frame's reliability (P(force MAE <= tolerance)) below R"),
    )
}  # fmt: skip

#: the grammar, for ``--help`` and error messages
GRAMMAR = "; ".join(
    f"{q.name}{q.op}{'R' if q.name == 'reliability' else 'T'}{'@P' if q.probability else ''}"
    f" ({q.doc}{', T in ' + q.unit if q.unit else ''})"
    for q in QUANTITIES.values()
)

_RULE = re.compile(r"^\s*([a-z][a-z-]*)\s*([<>])\s*([^@\s]+)\s*(?:@\s*(\S+))?\s*$")


def force_error_exceedance(threshold: float, sigma: np.ndarray) -> np.ndarray:
    """P(|e| > threshold) for a 3-vector error ``e ~ N(0, sigma^2 I)``.

    Args:
        threshold: T in eV/Å (positive).
        sigma: [n] per-component standard deviations in eV/Å (0 gives probability 0).

    Returns:
        [n] probabilities in [0, 1]: the chi (3 degrees of freedom) survival function at
        ``T / sigma``.
    """
    s = np.asarray(sigma, dtype=np.float64)
    with np.errstate(divide="ignore"):
        x = np.where(s > 0, threshold / np.where(s > 0, s, 1.0), np.inf)
    finite = np.isfinite(x)
    xf = np.where(finite, x, 0.0)
    p = special.erfc(xf / math.sqrt(2.0)) + math.sqrt(2.0 / math.pi) * xf * np.exp(-0.5 * xf**2)
    return np.where(finite, np.clip(p, 0.0, 1.0), 0.0)


def sigma_for_exceedance(threshold: float, probability: float) -> float:
    """The std (eV/Å per component) at which ``P(|e| > threshold) = probability``.

    ``force-error>T@P`` fires exactly when an atom's calibrated std reaches this value.
    """
    return float(threshold / stats.chi(3).isf(probability))


@dataclass(frozen=True)
class TrustRule:
    """One condition and what to do when it holds.

    Attributes:
        action: ``warn``, ``harvest`` or ``halt``.
        quantity: a key of :data:`QUANTITIES`.
        threshold: T (eV/Å) or R (reliability, dimensionless).
        probability: P of ``force-error`` rules, else None.
        origin: where the rule was given (``--halt``), named in messages; default: the action.
    """

    action: Action
    quantity: str
    threshold: float
    probability: float | None = None
    origin: str = ""

    @property
    def spec(self) -> str:
        """The rule in the grammar (``force-error>0.15@0.95``)."""
        q = QUANTITIES[self.quantity]
        text = f"{self.quantity}{q.op}{_num(self.threshold)}"
        return text + (f"@{_num(self.probability)}" if self.probability is not None else "")

    @property
    def label(self) -> str:
        """``--halt force-error>0.15@0.95`` (or ``halt ...`` for a rule made in Python)."""
        return f"{self.origin or self.action} {self.spec}"


def parse_rule(text: str, action: Action, origin: str = "") -> TrustRule:
    """The :class:`TrustRule` that ``text`` describes (grammar in the module docstring).

    Raises:
        ConfigError: naming ``origin`` (or the action) and what is wrong.
    """
    where = f"{origin or action} '{text}'"
    m = _RULE.match(text)
    if m is None:
        hint = ""
        if text.strip() in QUANTITIES:  # what an unquoted rule leaves after the shell
            hint = " (quote the rule: a shell reads an unquoted > or < as a redirection)"
        raise ConfigError(f"{where}: not a rule{hint}; expected one of: {GRAMMAR}")
    name, op, value, prob = m.groups()
    if name not in QUANTITIES:
        raise ConfigError(f"{where}: unknown quantity '{name}'; known: {', '.join(QUANTITIES)}")
    q = QUANTITIES[name]
    if op != q.op:
        raise ConfigError(f"{where}: {name} takes '{q.op}' (the rule fires when it is {q.op} the "
                          "threshold)")  # fmt: skip
    threshold = _number(value, where, "threshold")
    if name == "reliability":
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"{where}: a reliability threshold must be in (0, 1], got {value}")
    elif threshold <= 0.0:
        raise ConfigError(f"{where}: the threshold must be a positive {q.unit}, got {value}")
    probability = None
    if q.probability:
        if prob is None:
            raise ConfigError(f"{where}: {name} needs a probability, e.g. {name}>{value}@0.95")
        probability = _number(prob, where, "probability")
        if not 0.0 < probability < 1.0:
            raise ConfigError(f"{where}: the probability must be in (0, 1), got {prob}")
    elif prob is not None:
        raise ConfigError(f"{where}: {name} takes no '@' probability")
    return TrustRule(action, name, threshold, probability, origin)


def _num(x: float) -> str:
    """Shortest text that reads back as ``x`` (``0.15``, ``1``, ``1e-06``)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _number(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: the {what} '{text}' is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: the {what} must be finite, got {text}")
    return value


@dataclass(frozen=True)
class TrustEvent:
    """A rule that fired (or the non-finite check) at one step.

    Attributes:
        rule: the rule; None for the non-finite check.
        step: the dynamics step.
        value: the tested value: a probability (``force-error``), a std in eV/Å or a
            reliability; NaN for the non-finite check.
        atom: index of the atom at fault (the worst one), or None for a frame without one.
        text: what happened, in words.
    """

    rule: TrustRule | None
    step: int
    value: float
    atom: int | None
    text: str

    @property
    def action(self) -> Action:
        return "halt" if self.rule is None else self.rule.action

    def message(self) -> str:
        """One line: ``step 57: atom 3 (O): ... [--halt force-error>0.15@0.95]``."""
        label = "non-finite check" if self.rule is None else self.rule.label
        return f"step {self.step}: {self.text} [{label}]"


def _atom(index: int, numbers: Sequence[int] | np.ndarray) -> str:
    return f"atom {index} ({chemical_symbols[int(numbers[index])]})"


@dataclass(frozen=True)
class TrustPolicy:
    """Rules evaluated on a calculator's results, plus a halt on non-finite values.

    Attributes:
        rules: the rules, in the order given.
    """

    rules: tuple[TrustRule, ...] = ()

    @classmethod
    def from_specs(
        cls,
        warn: Iterable[str] = (),
        harvest: Iterable[str] = (),
        halt: Iterable[str] = (),
        flags: bool = False,
    ) -> TrustPolicy:
        """Parse rules per action; ``flags=True`` names them ``--warn``/``--harvest``/``--halt``
        in messages (the command line)."""
        rules: list[TrustRule] = []
        for action, texts in (("warn", warn), ("harvest", harvest), ("halt", halt)):
            for text in texts:
                origin = f"--{action}" if flags else ""
                rules.append(parse_rule(text, action, origin))  # type: ignore[arg-type]
        return cls(tuple(rules))

    def of(self, action: Action) -> tuple[TrustRule, ...]:
        """The rules of one action."""
        return tuple(r for r in self.rules if r.action == action)

    def check_model(self, provides: Iterable[str], kind: str, calibrated: bool) -> None:
        """Refuse a rule the model cannot evaluate.

        Args:
            provides: ASE property names the calculator returns.
            kind: the model kind, for the message (``uq:probe (base chgnet)``).
            calibrated: whether its ``forces_std`` carries a fitted recalibration.

        Raises:
            ConfigError: naming the rule, the kind and the missing quantity.
        """
        have = set(provides)
        for rule in self.rules:
            q = QUANTITIES[rule.quantity]
            if q.needs not in have:
                extra = sorted(have & {"energy_std", "forces_std", "reliability"})
                gives = ", ".join(extra) if extra else "no uncertainty"
                hint = {
                    "forces_std": "a std method (ensemble, mc-dropout, perturb)",
                    "reliability": "PROBE, or a std method recalibrated with --calibration",
                }[q.needs]
                wrap = (
                    "; wrap the model first: trustpot uq fit METHOD --from MODEL (a checkpoint "
                    "or a pretrained name such as chgnet)"
                    if not extra
                    else ""
                )
                raise ConfigError(
                    f"{rule.label}: a model of kind {kind} gives no {q.needs} (it gives "
                    f"{gives}); {rule.quantity} needs {hint}{wrap}"
                )
            if q.calibrated and not calibrated:
                raise ConfigError(
                    f"{rule.label}: the forces_std of this {kind} model is not recalibrated, so "
                    "no error probability can be derived from it (fit the wrapper with "
                    "--calibration DATA, or use force-std>T on the raw std)"
                )

    def non_finite(
        self, results: Mapping[str, Any], numbers: Sequence[int] | np.ndarray, step: int
    ) -> TrustEvent | None:
        """The halt event of a non-finite energy, force or uncertainty, or None."""
        for key in ("energy", "forces", "forces_std", "energy_std", "reliability"):
            if key not in results:
                continue
            value = np.asarray(results[key], dtype=np.float64)
            bad = ~np.isfinite(value)
            if not bad.any():
                continue
            if value.ndim >= 1 and value.shape[0] == len(numbers):
                row = int(np.argwhere(bad.reshape(len(numbers), -1).any(axis=1))[0, 0])
                return TrustEvent(None, step, math.nan, row,
                                  f"{_atom(row, numbers)}: non-finite {key}")  # fmt: skip
            return TrustEvent(None, step, math.nan, None, f"non-finite {key}")
        return None

    def evaluate(
        self,
        results: Mapping[str, Any],
        numbers: Sequence[int] | np.ndarray,
        step: int,
        actions: Iterable[Action] = ACTIONS,
    ) -> list[TrustEvent]:
        """The rules of ``actions`` that fire on ``results`` (ASE property names: per-atom
        ``forces_std`` [n_atoms] eV/Å, ``reliability`` scalar, optional ``atom_importance``
        [n_atoms]), in rule order.

        Raises:
            ConfigError: when ``results`` lack a quantity a rule needs.
        """
        wanted = set(actions)
        events = []
        for rule in self.rules:
            if rule.action in wanted:
                event = self._test(rule, results, numbers, step)
                if event is not None:
                    events.append(event)
        return events

    def _test(
        self,
        rule: TrustRule,
        results: Mapping[str, Any],
        numbers: Sequence[int] | np.ndarray,
        step: int,
    ) -> TrustEvent | None:
        q = QUANTITIES[rule.quantity]
        if q.needs not in results:
            raise ConfigError(f"{rule.label}: the calculator's results hold no {q.needs}")
        if q.needs == "reliability":
            rel = float(results["reliability"])
            if not rel < rule.threshold:
                return None
            importance = results.get("atom_importance")
            atom = None if importance is None else int(np.argmax(importance))
            where = "" if atom is None else f" (most important: {_atom(atom, numbers)})"
            text = f"reliability {rel:.3g} < {rule.threshold:g}{where}"
            return TrustEvent(rule, step, rel, atom, text)
        std = np.asarray(results["forces_std"], dtype=np.float64).reshape(-1)
        worst = int(np.argmax(std))
        if rule.quantity == "force-error":
            assert rule.probability is not None
            p = float(force_error_exceedance(rule.threshold, std[worst : worst + 1])[0])
            if not p >= rule.probability:
                return None
            text = (
                f"{_atom(worst, numbers)}: P(|force error| > {rule.threshold:g} eV/Å) = {p:.3g} "
                f">= {rule.probability:g} (calibrated std {std[worst]:.3g} eV/Å)"
            )
            return TrustEvent(rule, step, p, worst, text)
        if rule.quantity == "force-std":
            if not std[worst] > rule.threshold:
                return None
            text = f"{_atom(worst, numbers)}: force std {std[worst]:.3g} eV/Å > {rule.threshold:g}"
            return TrustEvent(rule, step, float(std[worst]), worst, text)
        mean = float(std.mean())
        if not mean > rule.threshold:
            return None
        text = (
            f"mean force std {mean:.3g} eV/Å > {rule.threshold:g} (largest: "
            f"{_atom(worst, numbers)}, {std[worst]:.3g} eV/Å)"
        )
        return TrustEvent(rule, step, mean, worst, text)
