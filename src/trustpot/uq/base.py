"""One interface for every reliability method, and the recalibration they all share.

A :class:`UQModel` wraps one or more trained potentials and answers the same call as a
:class:`~trustpot.models.potential.Potential` (``model(g, outputs)``), adding the uncertainty
vocabulary of :mod:`trustpot.keys`:

- ``energy_std`` [n_graphs] eV and ``forces_std`` [n_atoms] eV/Å: predictive standard
  deviations (the force std of an atom is the root mean of its three component variances);
- ``reliability`` [n_graphs] in [0, 1]: probability that the structure's force MAE is at most
  the tolerance stored in the :class:`Recalibration`;
- ``energy_samples`` [n_graphs, M] and ``forces_samples`` [n_atoms, M, 3] where samples exist;
- ``atom_importance`` [n_atoms] (PROBE's attention pooling weights, summing to 1 per structure).

``energy`` and ``forces`` are the predictive means. Every method says what it returns in
:meth:`UQModel.supported_outputs`, and the :class:`~trustpot.calculator.Predictor` and the ASE
calculator expose exactly that.

Recalibration (fitted on calibration data the models did not train on, saved with the wrapper):
``std`` values are multiplied by factors that minimise the Gaussian NLL of energies and of
force components; ``reliability`` of standard-deviation methods comes from a logistic map of
``log(mean forces_std)`` fitted to the event "force MAE <= tolerance".
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Embedding
from trustpot.models.contract import DEFAULT_OUTPUTS, Model
from trustpot.models.potential import SUPPORTED_OUTPUTS
from trustpot.nn import scatter_sum
from trustpot.registry import lookup, names

#: Uncertainty outputs a wrapper may add to a potential's outputs.
UQ_OUTPUTS = frozenset(
    {
        K.ENERGY_STD,
        K.FORCES_STD,
        K.RELIABILITY,
        K.ENERGY_SAMPLES,
        K.FORCES_SAMPLES,
        K.ATOM_IMPORTANCE,
    }
)


StdArray = TypeVar("StdArray", Tensor, np.ndarray)


@dataclass
class Recalibration:
    """Post-hoc calibration of a wrapper, fitted on held-out data and stored with it.

    Attributes:
        energy_std_scale: factor ``a`` of ``energy_std' = sqrt((a * energy_std)^2 + b^2)``.
        forces_std_scale: the same factor for ``forces_std`` (per component, eV/Å).
        energy_std_floor: floor ``b`` (eV) of the same map: the error the wrapper cannot
            see (0 when the calibration data show none).
        forces_std_floor: floor ``b`` (eV/Å per component) for ``forces_std``. It matters
            where members agree on a wrong answer, e.g. an atom beyond every model's cutoff
            whose force all members predict as zero. Samples are never rescaled.
        tolerance: force MAE (eV/Å) that defines a reliable structure; NaN until fitted.
        logistic_a: slope of ``logit(reliability) = -(a * log(u) + b)``, ``u`` the mean
            per-atom ``forces_std_raw`` of a structure in eV/Å (before the std map, so the
            reliability keeps the method's ranking whatever the std map does).
        logistic_b: intercept of the same map.
        fitted_on: description of the calibration data (file and size).
    """

    energy_std_scale: float = 1.0
    forces_std_scale: float = 1.0
    energy_std_floor: float = 0.0
    forces_std_floor: float = 0.0
    tolerance: float = float("nan")
    logistic_a: float = 1.0
    logistic_b: float = 0.0
    fitted_on: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recalibration:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def has_reliability_map(self) -> bool:
        return math.isfinite(self.tolerance)

    def reliability_from_std(self, score: Tensor) -> Tensor:
        """[n_graphs] reliability from the mean per-atom raw force std (eV/Å) of each structure."""
        z = self.logistic_a * torch.log(score.clamp_min(1e-12)) + self.logistic_b
        return torch.sigmoid(-z)


def recalibrated_std(std: StdArray, scale: float, floor: float) -> StdArray:
    """``sqrt((scale * std)^2 + floor^2)``, elementwise (a tensor or an array, same shape and
    unit as ``std``)."""
    if floor == 0.0:
        return std * scale
    return ((std * scale) ** 2 + floor**2) ** 0.5


def fit_logistic(score: np.ndarray, positive: np.ndarray, n_iter: int = 200) -> tuple[float, float]:
    """Fit ``P(positive) = sigmoid(a * log(score) + b)`` by Newton's method (L2 1e-6).

    Args:
        score: [n] positive uncertainty scores.
        positive: [n] booleans, the event the probability is of (e.g. "error above tolerance").

    Returns:
        ``(a, b)``. With only one class present the slope is 0 and ``b`` the clipped log-odds.
    """
    x = np.log(np.clip(np.asarray(score, dtype=np.float64), 1e-12, None))
    y = np.asarray(positive, dtype=np.float64)
    if y.min() == y.max():
        p = np.clip(y.mean(), 1e-3, 1 - 1e-3)
        return 0.0, float(np.log(p / (1 - p)))
    mu, sd = x.mean(), max(x.std(), 1e-12)
    xs = (x - mu) / sd
    design = np.stack([xs, np.ones_like(xs)], axis=1)
    w = np.zeros(2)
    for _ in range(n_iter):
        p = 1 / (1 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + 1e-6 * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    a = w[0] / sd
    return float(a), float(w[1] - a * mu)


class UQModel(Model):
    """Base class of reliability wrappers.

    Subclasses set ``method`` (the ``uq fit`` method name) and ``kind`` (``"uq:" + method``,
    the checkpoint kind), implement :meth:`predict`, :meth:`wrapper_payload` and
    :meth:`~trustpot.models.contract.Model.from_payload`, and list their outputs in
    ``provides``.

    Args:
        base: the potential whose species, dtype and neighbour lists the wrapper uses (for an
            ensemble, its first member).
    """

    kind: ClassVar[str] = ""
    #: the reliability method's name (``trustpot uq fit METHOD``)
    method: ClassVar[str] = ""
    #: uncertainty outputs the method returns (a subset of :data:`UQ_OUTPUTS`).
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, base: Model) -> None:
        super().__init__()
        self.base = base
        self.recalibration = Recalibration()
        #: what fitting the wrapper measured (stored in its checkpoint)
        self.fit_report: dict[str, Any] = {}

    # -- what a Predictor needs ---------------------------------------------------------------
    @property
    def species(self) -> list[int]:
        return self.base.species

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def neighbor_lists(self) -> list[NeighborListSpec]:
        return self.base.neighbor_lists()

    def supported_outputs(self) -> frozenset[str]:
        out = set(self.provides)
        if K.FORCES_STD in out and self.recalibration.has_reliability_map:
            out.add(K.RELIABILITY)
        if K.ENERGY_STD in out:
            out.add(K.ENERGY_STD_RAW)
        if K.FORCES_STD in out:
            out.add(K.FORCES_STD_RAW)
        return frozenset(SUPPORTED_OUTPUTS - {K.VIRIAL} | out)

    def embed(self, g: Graph) -> Embedding:
        """The base potential's per-atom embeddings."""
        return self.base.embed(g)

    def output_specs(self) -> dict[str, K.FieldSpec]:
        """The base potential's outputs (but ``virial``) and the method's uncertainties."""
        return K.specs_of(self.supported_outputs())

    # -- evaluation ---------------------------------------------------------------------------
    def predict(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        """Raw predictions (before recalibration) of the requested outputs.

        Must return ``energy`` and ``forces`` (means) and every requested uncertainty output
        the method provides. Called without gradients for the parameters.
        """
        raise NotImplementedError

    def forward(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS, create_graph: bool | None = None
    ) -> dict[str, Tensor]:
        """Predictive means plus the uncertainty outputs asked for, recalibrated.

        Args:
            g: batched graph.
            outputs: any of the potential's outputs and of :data:`UQ_OUTPUTS`.
            create_graph: unused (wrappers are evaluated, not trained, through this call).
        """
        wanted = self.check_outputs(outputs)
        inner = set(wanted) - {K.ENERGY_STD_RAW, K.FORCES_STD_RAW}
        if K.ENERGY_STD_RAW in wanted:
            inner.add(K.ENERGY_STD)
        if K.FORCES_STD_RAW in wanted:
            inner.add(K.FORCES_STD)
        if K.RELIABILITY in wanted and K.RELIABILITY not in self.provides:
            inner.add(K.FORCES_STD)
            inner.discard(K.RELIABILITY)
        out = self.predict(g, frozenset(inner) | {K.ENERGY, K.FORCES})
        cal = self.recalibration
        if K.ENERGY_STD in out:
            out[K.ENERGY_STD_RAW] = out[K.ENERGY_STD]
        if K.FORCES_STD in out:
            out[K.FORCES_STD_RAW] = out[K.FORCES_STD]
        if K.RELIABILITY in wanted and K.RELIABILITY not in self.provides:
            n = int(g[K.N_ATOMS].shape[0])
            raw = scatter_sum(out[K.FORCES_STD].double(), g[K.BATCH], n) / g[K.N_ATOMS]
            out[K.RELIABILITY] = cal.reliability_from_std(raw)
        if K.ENERGY_STD in out:
            out[K.ENERGY_STD] = recalibrated_std(
                out[K.ENERGY_STD], cal.energy_std_scale, cal.energy_std_floor
            )
        if K.FORCES_STD in out:
            out[K.FORCES_STD] = recalibrated_std(
                out[K.FORCES_STD], cal.forces_std_scale, cal.forces_std_floor
            )
        return {k: v for k, v in out.items() if k in wanted}

    # -- persistence --------------------------------------------------------------------------
    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Checkpoint fields (``kind``, ``meta``, ``model``, ``extra``) of this wrapper, with
        the weights ``state`` (e.g. EMA weights) when given."""
        if state is None:
            return self.wrapper_payload()
        clone = copy.deepcopy(self)
        clone.load_state_dict(dict(state))
        return clone.wrapper_payload()

    def wrapper_payload(self) -> dict[str, Any]:
        """Checkpoint fields of this wrapper with its current weights."""
        raise NotImplementedError

    def base_fields(self) -> dict[str, Any]:
        """``meta``, ``model`` and ``base_kind`` of the base model, for :meth:`wrapper_payload`."""
        fields = self.base.payload()
        return {"meta": fields["meta"], "model": fields["model"], "base_kind": self.base.kind}


def base_from_payload(data: Mapping[str, Any], path: str) -> Model:
    """The base model of a wrapper checkpoint: ``meta``/``model`` rebuilt as ``base_kind``
    (absent in files written before wrappers could hold any model: a plain potential)."""
    kind = str(data.get("base_kind", "potential"))
    if kind not in names("model") or kind.startswith("uq:"):
        raise CheckpointError(f"{path}: wrapper base of unknown or wrapper kind '{kind}'")
    base: Model = lookup("model", kind).from_payload(
        {"kind": kind, "meta": data["meta"], "model": data["model"]}, path
    )
    return base


def wrapper_extra(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The ``extra`` payload of a wrapper checkpoint; raises naming ``path`` when absent."""
    extra = data.get("extra")
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: wrapper checkpoint lacks its 'extra' payload")
    return extra


def sample_statistics(energies: Tensor, forces: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Means and standard deviations of M samples.

    Args:
        energies: [n_graphs, M] eV.
        forces: [n_atoms, M, 3] eV/Å.

    Returns:
        ``energy`` [n_graphs], ``forces`` [n_atoms, 3], ``energy_std`` [n_graphs] and
        ``forces_std`` [n_atoms] (root mean of the three component variances), with the
        unbiased (M - 1) variance.
    """
    m = energies.shape[1]
    if m < 2:
        raise ConfigError("uncertainty from samples needs at least 2 samples")
    energy_std = energies.std(dim=1, unbiased=True)
    forces_std = forces.var(dim=1, unbiased=True).mean(dim=-1).sqrt()
    return energies.mean(dim=1), forces.mean(dim=1), energy_std, forces_std
