"""Objectives of the training loop: a loss kind, the dataset it reads and its weight.

Every loss kind turns ``(model, batch)`` into ``(sums, counts)``: per-term sums of errors and
the numbers they are averaged over (0-d tensors). The trainer adds the counts over
data-parallel ranks before dividing, so a batch split across ``torchrun`` processes gives the
loss of the whole batch. The same loss, on the validation set and with the model in eval mode,
is the validation loss (:meth:`ObjectiveLoss.combine` of the summed sums and counts).

Kinds:

* :class:`ForceFieldLoss` -- energy / force / stress MSE or Huber (a potential).
* :class:`CRPSLoss` -- fair ensemble CRPS of sampled energies and forces (a sampler).
* :class:`BCELoss` -- class-balanced binary cross-entropy of logits (a classifier).
* :class:`PropertyLoss` -- MSE of a predicted property on standardised targets.
* :class:`CallableLoss` -- any ``fn(model, batch) -> (sums, counts)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.errors import ConfigError
from trustpot.train.distributed import DistInfo, all_reduce_sum
from trustpot.train.losses import LossWeights, loss_sums, required_outputs

Sums = dict[str, Tensor]
LossFn = Callable[[nn.Module, Any], tuple[Sums, Sums]]


class ObjectiveLoss:
    """A loss kind. Subclasses set :attr:`weights` and implement :meth:`sums`.

    Attributes:
        weights: weight of every term; the term names are its keys (fixed, so that every
            data-parallel rank reduces the same vector).
    """

    weights: dict[str, float]
    metric_keys: tuple[str, ...] = ()  # keys of metric_sums (fixed: ranks reduce them together)

    def prepare(self, batch: Any | None, dist: DistInfo) -> None:
        """Called on every rank before each batch (``None`` on a rank with no share of it);
        may run collective reductions that all ranks must join."""

    def at_progress(self, progress: float) -> None:
        """Called before each training epoch with the budget's progress in [0, 1]."""

    def bind_data(self, datasets: Sequence[Any]) -> None:
        """Called once before training with the training and validation sets this loss
        reads (what is known about them on the host saves asking the device per batch)."""

    def sums(self, model: nn.Module, batch: Any, training: bool) -> tuple[Sums, Sums]:
        """Per-term error sums and counts of ``batch`` (keys a subset of :attr:`weights`)."""
        raise NotImplementedError

    def combine(self, sums: Mapping[str, Tensor], counts: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum of term means; a term with no count anywhere contributes zero."""
        total: Tensor | None = None
        for term, value in sums.items():
            part = self.weights[term] * (value / counts[term].clamp_min(1.0))
            total = part if total is None else total + part
        if total is None:
            raise ValueError("the loss has no term with a positive weight")
        return total

    def metric_sums(self, model: nn.Module, batch: Any, pred: Any) -> dict[str, Tensor]:
        """Extra validation sums (e.g. MAE); ``pred`` is what :meth:`sums` left in
        :attr:`last_pred`. Keys ending in ``_n`` are counts."""
        return {}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        """Extra validation columns from the summed :meth:`metric_sums`."""
        return {}

    # state that must survive a resume (e.g. a noise generator); empty by default
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class ForceFieldLoss(ObjectiveLoss):
    """Energy / force / stress loss of a potential (``mse`` or ``huber``, see
    :func:`trustpot.train.losses.loss_sums`), in units of the force scale ``scale`` (eV/Å;
    default the model's ``energy_scale``). Validation adds MAE / RMSE columns of per-atom
    energies (eV/atom) and force components (eV/Å).

    ``stage_two`` = ``(fraction, energy_weight, forces_weight)``: over the last ``fraction``
    of the budget, training weighs energies and forces with these instead (MACE's second
    stage, which moves weight to energies late in training); validation keeps the first
    weights, so the best epoch is chosen by one yardstick throughout.
    """

    def __init__(
        self,
        weights: LossWeights,
        scale: float | None = None,
        stage_two: tuple[float, float, float] | None = None,
    ) -> None:
        self.loss_weights = weights
        self.scale = scale
        terms = {"energy": weights.energy, "forces": weights.forces, "stress": weights.stress}
        self.weights = {k: float(v) for k, v in terms.items() if v > 0}
        self.stage_two = stage_two
        self.train_weights = dict(self.weights)
        if stage_two is not None and not {"energy", "forces"} <= set(self.weights):
            raise ValueError("a second stage needs positive energy and force weights")
        self.metric_keys = ("e_abs", "e_sq", "e_n", "f_abs", "f_sq", "f_n")
        self._has_stress = False
        self._stress_possible = True
        #: compute the stress term for every batch when it is possible at all, instead of
        #: asking each batch (a recorded CUDA-graph step cannot ask; an unlabelled
        #: structure's stress weight is zero, so the loss is the same)
        self.stress_every_batch = False
        self.last_pred: dict[str, Tensor] | None = None
        self._scales: dict[int, float] = {}

    def model_scale(self, model: nn.Module) -> float:
        """The model's ``energy_scale`` (a buffer, fixed during training), read from the
        device once per model rather than at every step."""
        key = id(model)
        if key not in self._scales:
            self._scales[key] = float(model.energy_scale)  # type: ignore[arg-type]
        return self._scales[key]

    def at_progress(self, progress: float) -> None:
        self.train_weights = dict(self.weights)
        if self.stage_two is not None and progress >= 1.0 - self.stage_two[0]:
            self.train_weights.update(energy=self.stage_two[1], forces=self.stage_two[2])

    def combine(self, sums: Mapping[str, Tensor], counts: Mapping[str, Tensor]) -> Tensor:
        """Training loss with the weights of the current stage."""
        first, self.weights = self.weights, self.train_weights
        try:
            return super().combine(sums, counts)
        finally:
            self.weights = first

    def bind_data(self, datasets: Sequence[Any]) -> None:
        """Whether any structure of these sets has a stress label (known from the host-side
        structures where a set has them; assumed possible otherwise)."""
        self._stress_possible = any(
            not hasattr(ds, "structures")
            or any(getattr(s, "stress", None) is not None for s in ds.structures)
            for ds in datasets
        )

    @property
    def stress_term_possible(self) -> bool:
        """Whether some batch may need the stress term: a positive stress weight and data
        that may hold stress labels (:meth:`bind_data`)."""
        return self.loss_weights.stress > 0 and self._stress_possible

    def prepare(self, batch: Any | None, dist: DistInfo) -> None:
        """Whether any structure of the global batch has a stress label. Only asked of the
        batch (so only waited for on an accelerator) when :attr:`stress_term_possible` and
        not :attr:`stress_every_batch`."""
        if self.stress_every_batch or (not self.stress_term_possible and not dist.active):
            self._has_stress = self.stress_term_possible
            return
        local = batch is not None and bool((batch[K.STRESS_WEIGHT] > 0).any())
        flag = all_reduce_sum(torch.tensor([float(local)]), dist)
        self._has_stress = bool(flag.item() > 0)

    def sums(self, model: nn.Module, batch: Any, training: bool) -> tuple[Sums, Sums]:
        outputs = required_outputs(self.loss_weights, self._has_stress)
        if not training:
            outputs = outputs | {K.FORCES}  # the MAE / RMSE columns need forces
        pred = model(batch, outputs, create_graph=training)
        scale = self.scale if self.scale is not None else self.model_scale(model)
        if not training:  # for metric_sums; a (compiled) training step keeps no state
            self.last_pred = pred
        return loss_sums(pred, batch, self.loss_weights, scale)

    def metric_sums(self, model: nn.Module, batch: Any, pred: Any) -> dict[str, Tensor]:
        ew = batch[K.ENERGY_WEIGHT].double()
        de = ((pred[K.ENERGY].detach() - batch[K.ENERGY]) / batch[K.N_ATOMS]).double()
        fw = batch[K.FORCES_WEIGHT][batch[K.BATCH]].double().unsqueeze(-1)
        df = (pred[K.FORCES].detach() - batch[K.FORCES]).double()
        return {
            "e_abs": (de.abs() * ew).sum(),
            "e_sq": (de**2 * ew).sum(),
            "e_n": ew.sum(),
            "f_abs": (df.abs() * fw).sum(),
            "f_sq": (df**2 * fw).sum(),
            "f_n": fw.sum() * 3,
        }

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        e_n, f_n = max(totals["e_n"], 1.0), max(totals["f_n"], 1.0)
        return {
            "val_energy_mae_per_atom": totals["e_abs"] / e_n,
            "val_energy_rmse_per_atom": (totals["e_sq"] / e_n) ** 0.5,
            "val_forces_mae": totals["f_abs"] / f_n,
            "val_forces_rmse": (totals["f_sq"] / f_n) ** 0.5,
        }


class CRPSLoss(ObjectiveLoss):
    """Fair ensemble CRPS of sampled per-atom energies and force components.

    Args:
        samples: ``samples(model, batch, training) -> (energies [n_graphs, M] eV,
            forces [n_atoms, M, 3] eV/Å)``; with ``training`` it must keep the graph for
            backpropagation.
        energy_weight, forces_weight: weights of the two terms.
        scale: force scale (eV/Å) dividing both terms (dimensionless loss).
        crps: the CRPS of ``[n, M]`` samples against ``[n]`` targets, returning ``[n]`` (e.g.
            :func:`trustpot.uq.perturb.fair_crps_loss`).
    """

    def __init__(
        self,
        samples: Callable[[nn.Module, Any, bool], tuple[Tensor, Tensor]],
        energy_weight: float,
        forces_weight: float,
        scale: float,
        crps: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        self.samples = samples
        self.scale = float(scale)
        self.crps = crps
        self.weights = {"energy": float(energy_weight), "forces": float(forces_weight)}
        self.metric_keys = ("e_crps", "e_n", "f_crps", "f_mae", "f_n")
        self.last_pred: tuple[Tensor, Tensor] | None = None

    def sums(self, model: nn.Module, batch: Any, training: bool) -> tuple[Sums, Sums]:
        energies, forces = self.samples(model, batch, training)
        self.last_pred = (energies, forces)
        n = batch[K.N_ATOMS].to(energies.dtype)
        e = self.crps(energies / n.unsqueeze(-1), batch[K.ENERGY] / n) / self.scale
        w_e = batch[K.ENERGY_WEIGHT].to(e.dtype)
        m = forces.shape[1]
        f = self.crps(forces.permute(0, 2, 1).reshape(-1, m), batch[K.FORCES].reshape(-1))
        f = f / self.scale
        w_f = batch[K.FORCES_WEIGHT][batch[K.BATCH]].repeat_interleave(3).to(f.dtype)
        return (
            {"energy": (e * w_e).sum(), "forces": (f * w_f).sum()},
            {"energy": w_e.sum(), "forces": w_f.sum()},
        )

    def metric_sums(self, model: nn.Module, batch: Any, pred: Any) -> dict[str, Tensor]:
        energies, forces = pred
        n = batch[K.N_ATOMS].to(energies.dtype)
        e = self.crps(energies.detach() / n.unsqueeze(-1), batch[K.ENERGY] / n).double()
        w_e = batch[K.ENERGY_WEIGHT].double()
        m = forces.shape[1]
        flat = forces.detach().permute(0, 2, 1).reshape(-1, m)
        f = self.crps(flat, batch[K.FORCES].reshape(-1)).double()
        w_f = batch[K.FORCES_WEIGHT][batch[K.BATCH]].repeat_interleave(3).double()
        mae = (flat.mean(-1) - batch[K.FORCES].reshape(-1)).abs().double()
        return {
            "e_crps": (e * w_e).sum(),
            "e_n": w_e.sum(),
            "f_crps": (f * w_f).sum(),
            "f_mae": (mae * w_f).sum(),
            "f_n": w_f.sum(),
        }

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        e_n, f_n = max(totals["e_n"], 1.0), max(totals["f_n"], 1.0)
        return {
            "val_energy_crps": totals["e_crps"] / e_n,
            "val_forces_crps": totals["f_crps"] / f_n,
            "val_forces_mae": totals["f_mae"] / f_n,
        }


class BCELoss(ObjectiveLoss):
    """Binary cross-entropy of logits, positives weighted by ``pos_weight``.

    Args:
        logits: ``logits(model, batch) -> (logits [n], targets [n] in [0, 1])``.
        pos_weight: weight of the positive class (class balance: n_neg / n_pos).
    """

    def __init__(
        self, logits: Callable[[nn.Module, Any], tuple[Tensor, Tensor]], pos_weight: float = 1.0
    ) -> None:
        self.logits = logits
        self.pos_weight = float(pos_weight)
        self.weights = {"bce": 1.0}

    def sums(self, model: nn.Module, batch: Any, training: bool) -> tuple[Sums, Sums]:
        logits, y = self.logits(model, batch)
        y = y.to(logits.dtype)
        pw = torch.tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
        value = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, pos_weight=pw, reduction="sum"
        )
        return {"bce": value}, {"bce": torch.tensor(float(y.numel()), device=logits.device)}


class PropertyLoss(ObjectiveLoss):
    """Mean squared error of a property output against the reference values the batch holds
    under the same key, divided by ``scale`` (and, for an extensive structure property, by
    each structure's atom count), so dimensionless: the MSE on standardised targets.

    Validation adds ``val_<name>_mae`` and ``val_<name>_rmse`` over every component, in the
    property's unit (total, not per atom).

    Args:
        output: the model output and batch key (``property:<name>``).
        scale: the target's scale, in its unit (per atom when ``per_atom``).
        per_atom: divide each structure's error by its atom count (extensive targets; the
            output must be per structure).
        name: the metric columns' name (default: ``output`` without its prefix).
    """

    def __init__(self, output: str, scale: float, per_atom: bool = False, name: str = "") -> None:
        if not scale > 0:
            raise ValueError(f"PropertyLoss: scale must be positive, got {scale}")
        self.output = output
        self.scale = float(scale)
        self.per_atom = per_atom
        self.name = name or output.removeprefix(K.PROPERTY_PREFIX)
        self.weights = {"property": 1.0}
        self.metric_keys = ("p_abs", "p_sq", "p_n")
        self.last_pred: Tensor | None = None

    def sums(self, model: nn.Module, batch: Any, training: bool) -> tuple[Sums, Sums]:
        pred = model(batch, {self.output}, create_graph=training)[self.output]
        self.last_pred = pred
        err = (pred - batch[self.output].to(pred.dtype)) / self.scale
        if self.per_atom:
            n = batch[K.N_ATOMS].to(pred.dtype)
            err = err / n.reshape(-1, *([1] * (err.dim() - 1)))
        count = torch.tensor(float(err.numel()), device=err.device)
        return {"property": (err**2).sum()}, {"property": count}

    def metric_sums(self, model: nn.Module, batch: Any, pred: Any) -> dict[str, Tensor]:
        err = (pred.detach() - batch[self.output].to(pred.dtype)).double()
        n = torch.tensor(float(err.numel()), dtype=torch.float64, device=err.device)
        return {"p_abs": err.abs().sum(), "p_sq": (err**2).sum(), "p_n": n}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        n = max(totals["p_n"], 1.0)
        return {
            f"val_{self.name}_mae": totals["p_abs"] / n,
            f"val_{self.name}_rmse": (totals["p_sq"] / n) ** 0.5,
        }


@dataclass
class CallableLoss(ObjectiveLoss):
    """Any loss: ``fn(model, batch) -> (sums, counts)`` with the term weights ``weights``."""

    fn: LossFn
    weights: dict[str, float]

    def sums(self, model: nn.Module, batch: Any, training: bool) -> tuple[Sums, Sums]:
        return self.fn(model, batch)


@dataclass(frozen=True)
class Objective:
    """A loss on one dataset.

    Attributes:
        name: shown in logs and ``metrics.csv`` column prefixes.
        dataset: key of the training and validation datasets it uses.
        weights: weights of its energy, force and stress terms (force-field objectives).
        weight: weight of the whole objective in the total loss.
        loss: the loss kind; ``None`` means :class:`ForceFieldLoss` with ``weights`` (and
            ``stage_two``).
        stage_two: ``(fraction, energy_weight, forces_weight)`` of :class:`ForceFieldLoss`.
    """

    name: str
    dataset: str
    weights: LossWeights = field(default_factory=LossWeights)
    weight: float = 1.0
    loss: ObjectiveLoss | None = None
    stage_two: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.loss is None:
            loss = ForceFieldLoss(self.weights, stage_two=self.stage_two)
            object.__setattr__(self, "loss", loss)

    @property
    def kind(self) -> ObjectiveLoss:
        """The loss kind (never ``None`` after construction)."""
        assert self.loss is not None
        return self.loss


@dataclass
class ParamGroup:
    """Parameters sharing a peak learning rate.

    Attributes:
        params: the parameters.
        lr: peak learning rate (``None``: ``cfg.lr``); the schedule scales every group by the
            same factor, so each group follows the schedule relative to its own peak.
        frozen: keep these parameters fixed (``requires_grad`` off while training).
        weight_decay: AdamW weight decay (``None``: ``cfg.weight_decay``).
        name: shown in errors.
    """

    params: Sequence[nn.Parameter]
    lr: float | None = None
    frozen: bool = False
    weight_decay: float | None = None
    name: str = "params"


def resolve_param_groups(model: nn.Module, groups: Sequence[ParamGroup] | None) -> list[ParamGroup]:
    """The optimiser's groups: ``groups`` checked (every tensor in ``model``, none twice, at
    least one trainable) with ``requires_grad`` set from ``frozen``; ``None``: one group of
    every trainable parameter.

    Raises:
        ConfigError: a tensor outside the model or in two groups, or nothing to train.
    """
    if groups is None:
        return [ParamGroup([p for p in model.parameters() if p.requires_grad])]
    owned = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    for g in groups:
        for p in g.params:
            if id(p) not in owned:
                raise ConfigError(f"parameter group '{g.name}' holds a tensor not in the model")
            if id(p) in seen:
                raise ConfigError(f"a parameter is in two groups (second: '{g.name}')")
            seen.add(id(p))
            p.requires_grad_(not g.frozen)
    if not any(g.params and not g.frozen for g in groups):
        raise ConfigError("no trainable parameters: every parameter group is frozen or empty")
    return list(groups)


@dataclass
class TrainResult:
    """What a finished run reports."""

    epochs: int
    best_epoch: int
    best_val_loss: float
    elapsed_s: float
    stopped_by: str
    best_metrics: dict[str, float]
