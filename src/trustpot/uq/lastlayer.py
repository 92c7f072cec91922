"""Uncertainty from the last layer: last-layer prediction rigidity (LLPR).

LLPR (Bigi, Chong, Ceriotti, Grasselli, *A prediction rigidity formalism for low-cost
uncertainties in trained neural networks*, 2024; the method metatrain and PET-MAD ship) treats
the last linear layer of a trained potential's energy head as a Bayesian linear regression on
the features below it. A structure's feature is ``phi = scale * sum_i f_i`` [H] (``f_i`` the
atom's penultimate head features, ``scale`` the potential's energy scale), so its energy is
``w . phi`` plus terms that do not depend on ``w``. With the training structures' features
stacked in ``Phi`` [N, H]:

- posterior covariance of ``w``: ``Sigma = sigma^2 (Phi^T Phi + lambda I)^-1``, with
  ``sigma^2`` the mean squared energy residual on the training data (eV^2) and ``lambda`` a
  regulariser (relative to the mean eigenvalue of ``Phi^T Phi``);
- energy std of a structure: ``sqrt(phi^T Sigma phi)`` (eV), exact, at the cost of one model;
- force std, ``force_std="samples"``: M last layers ``w + dw_m`` with ``dw_m ~ N(0, Sigma)``
  drawn once (seeded) and stored; the M force fields come from one backbone pass and one
  vectorised backward pass (:func:`trustpot.models.potential.compute_outputs` with a sample
  axis), which still costs M backward passes of compute;
- force std, ``force_std="distance"``: each atom's Mahalanobis distance from the training
  atoms of its element in the same feature space, ``|| L_e^T (f_i - mu_e) ||`` with ``mu_e``
  the element's mean training feature and ``L_e L_e^T = (C_e + lambda_e I)^-1`` its
  regularised inverse covariance (``C_e`` over every training atom of element ``e``,
  ``lambda_e`` = :data:`DISTANCE_REGULARIZER` times its mean eigenvalue). The recalibration
  on held-out forces turns this dimensionless score into eV/Å (so this mode needs calibration
  data). No extra backward pass: about one model's cost, no samples. It is the rigidity an
  atom's contribution would have if atoms were observed one at a time; the per-structure
  rigidity ``sqrt(f_i^T Sigma f_i)`` (the local prediction rigidity of Chong et al. 2023, this
  module's earlier ``local`` mode) is dominated, in datasets of one composition, by the
  per-element directions that energies of sums cannot determine and that no force depends
  on, and it ranked force errors in reverse on three of four datasets (``docs/uq.md``).

The predicted energy and forces are the trained model's own (``w``), not the samples' mean.

``lambda`` is chosen on the calibration data when given (the value of a grid that minimises
the Gaussian NLL of the calibration energies with the best global scale), else
``DEFAULT_REGULARIZER``. The standard deviations are then recalibrated like every method's.
Works on trustpot potentials whose head is an :class:`~trustpot.models.potential.EnergyHead`
(every backbone but DeepSet-MoE, whose head is not a per-atom MLP).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import Graph, collate
from trustpot.data.structures import Structure
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Embedding
from trustpot.models.potential import EnergyHead, Potential, compute_outputs
from trustpot.nn import scatter_sum
from trustpot.uq.base import Recalibration, UQModel, wrapper_extra
from trustpot.uq.ensemble import SAMPLE_OUTPUTS

#: ``lambda`` without calibration data, relative to the mean eigenvalue of ``Phi^T Phi``.
DEFAULT_REGULARIZER = 1e-4
#: how the force std is made (see the module docstring).
FORCE_STD = ("samples", "distance")
#: ``lambda_e`` of the distance mode, relative to the mean eigenvalue of ``C_e`` (fixed, not tuned).
DISTANCE_REGULARIZER = 1e-3
#: the grid ``lambda`` is chosen from on calibration data.
REGULARIZER_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def last_layer(base: Potential, what: str = "LLPR") -> tuple[nn.Sequential, nn.Linear]:
    """The energy head's layers below the last linear layer, and that layer.

    Raises:
        ConfigError: the head is not an :class:`EnergyHead` ending in a 1-output linear layer.
    """
    head = base.head
    mlp = getattr(head, "mlp", None)
    if not isinstance(head, EnergyHead) or not isinstance(mlp, nn.Sequential):
        raise ConfigError(
            f"{what} needs a trustpot potential with a per-atom energy head (an EnergyHead); "
            f"{type(head).__name__} of backbone {base.meta.backbone} is not one"
        )
    last = mlp[-1]
    if not isinstance(last, nn.Linear) or last.out_features != 1:
        raise ConfigError(f"{what}: the energy head does not end in a linear layer to 1 output")
    below = nn.Sequential(*[m for m in list(mlp)[:-1] if not isinstance(m, nn.Dropout)])
    return below, last


def _scaled(base: Potential, f: Tensor) -> Tensor:
    """[n_atoms, H] float64 ``scale * f_i``: each atom's share of its structure feature."""
    return f.detach().double() * base.energy_scale.double()


def _summed(f_scaled: Tensor, g: Graph) -> Tensor:
    """[n_graphs, H] ``phi``: the scaled atom features summed per structure."""
    return scatter_sum(f_scaled, g[K.BATCH], int(g[K.N_ATOMS].shape[0]))


def structure_features(base: Potential, g: Graph) -> Tensor:
    """[n_graphs, H] float64 ``phi = scale * sum_i f_i`` of each structure (no gradients)."""
    below, _ = last_layer(base)
    with torch.no_grad():
        return _summed(_scaled(base, below(base.backbone(g)["node"])), g)


@dataclass(frozen=True)
class FeaturePass:
    """One pass of a potential over labelled structures: what LLPR is fitted from.

    Attributes:
        phi: [N, H] structure features ``scale * sum_i f_i``.
        predicted: [N] the potential's energies, eV.
        reference: [N] reference energies, eV (NaN: no label).
        atom_features: [n_atoms, H] every atom's scaled features ``scale * f_i``.
        numbers: [n_atoms] their atomic numbers.
    """

    phi: np.ndarray
    predicted: np.ndarray
    reference: np.ndarray
    atom_features: np.ndarray
    numbers: np.ndarray


def _feature_pass(
    base: Potential, structures: Sequence[Structure], batch_size: int, what: str
) -> FeaturePass:
    """Features and energies of ``structures`` under ``base`` (no gradients)."""
    data = GraphDataset(list(structures), base.neighbor_lists(), base.dtype, what)
    below, _ = last_layer(base)
    phis, pred, ref, atoms, numbers = [], [], [], [], []
    for start in range(0, len(data), batch_size):
        g = collate([data.graph(i) for i in range(start, min(start + batch_size, len(data)))])
        with torch.no_grad():  # one backbone pass gives both the features and the energies
            node_e, emb = base.node_energies(g)
            f = _scaled(base, below(emb["node"]))
        pred.append(scatter_sum(node_e, g[K.BATCH], int(g[K.N_ATOMS].shape[0])).double().numpy())
        phis.append(_summed(f, g).numpy())
        atoms.append(f.numpy())
        numbers.append(g[K.ATOMIC_NUMBERS].numpy())
        weight = g[K.ENERGY_WEIGHT].double().numpy()
        ref.append(np.where(weight > 0, g[K.ENERGY].double().numpy(), np.nan))
    return FeaturePass(
        np.concatenate(phis),
        np.concatenate(pred),
        np.concatenate(ref),
        np.concatenate(atoms),
        np.concatenate(numbers),
    )


def fit_feature_distance(
    atom_features: np.ndarray, numbers: np.ndarray, relative: float = DISTANCE_REGULARIZER
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element mean and whitening of training atoms' features (the distance mode).

    Args:
        atom_features: [n_atoms, H] features of every training atom.
        numbers: [n_atoms] their atomic numbers.
        relative: ``lambda_e`` relative to the mean eigenvalue of the element's covariance.

    Returns:
        ``(elements [E] int64, means [E, H], whitening [E, H, H])`` float64, with
        ``whitening_e whitening_e^T = (C_e + lambda_e I)^-1``, for every element with at
        least 2 training atoms.

    Raises:
        ConfigError: no element has 2 training atoms.
    """
    h = atom_features.shape[1]
    elements, means, whitening = [], [], []
    for z in np.unique(numbers):
        x = atom_features[numbers == z]
        if len(x) < 2:
            continue
        mean = x.mean(axis=0)
        cov = (x - mean).T @ (x - mean) / len(x)
        lam = relative * max(float(np.trace(cov)) / h, 1e-300)
        precision = np.linalg.inv(cov + lam * np.eye(h))
        elements.append(int(z))
        means.append(mean)
        whitening.append(np.linalg.cholesky(0.5 * (precision + precision.T)))
    if not elements:
        raise ConfigError("LLPR --force-std distance needs 2 training atoms of some element")
    return (
        torch.tensor(elements, dtype=torch.int64),
        torch.from_numpy(np.stack(means)),
        torch.from_numpy(np.stack(whitening)),
    )


def _inverse(gram: np.ndarray, relative: float) -> np.ndarray:
    """``(gram + lambda I)^-1`` with ``lambda = relative * mean eigenvalue``, symmetric."""
    h = gram.shape[0]
    lam = relative * max(float(np.trace(gram)) / h, 1e-300)
    inv = np.linalg.inv(gram + lam * np.eye(h))
    return 0.5 * (inv + inv.T)


def _energy_nll(residual: np.ndarray, var: np.ndarray) -> float:
    """Mean Gaussian NLL of ``residual`` under ``a^2 var`` with the best global ``a^2``."""
    var = np.clip(var, 1e-300, None)
    a2 = float(np.mean(residual**2 / var))
    return float(np.mean(0.5 * np.log(2 * math.pi * a2 * var) + residual**2 / (2 * a2 * var)))


class LLPR(UQModel):
    """Last-layer prediction rigidity around a trained potential (see the module docstring).

    Args:
        base: the trained potential (its head must be an :class:`EnergyHead`).
        covariance: [H, H] posterior covariance ``Sigma`` of the last layer's weights, eV^2
            per unit feature.
        n_samples: M, last layers drawn for the force std (``force_std="samples"``).
        seed: seed of the drawn last layers.
        force_std: ``samples`` or ``distance`` (see the module docstring).
        distance: ``(elements [E], means [E, H], whitening [E, H, H])`` of
            :func:`fit_feature_distance`; required by ``force_std="distance"``.
    """

    base: Potential
    kind: ClassVar[str] = "uq:llpr"
    method: ClassVar[str] = "llpr"
    provides: ClassVar[frozenset[str]] = SAMPLE_OUTPUTS
    covariance: Tensor
    deltas: Tensor
    elements: Tensor
    means: Tensor
    whitening: Tensor

    def __init__(
        self,
        base: Potential,
        covariance: Tensor,
        n_samples: int = 8,
        seed: int = 0,
        force_std: str = "samples",
        distance: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__(base)
        if force_std not in FORCE_STD:
            raise ConfigError(f"--force-std must be samples or distance, got '{force_std}'")
        self.force_std = force_std
        _, last = last_layer(base)
        h = last.in_features
        if tuple(covariance.shape) != (h, h):
            raise ConfigError(f"LLPR covariance must be [{h}, {h}], got {list(covariance.shape)}")
        if (force_std == "distance") != (distance is not None):
            raise ConfigError("LLPR: the feature-distance statistics go with --force-std distance")
        elements, means, whitening = distance or (
            torch.zeros(0, dtype=torch.int64),
            torch.zeros((0, h), dtype=torch.float64),
            torch.zeros((0, h, h), dtype=torch.float64),
        )
        e = elements.shape[0]
        if elements.dim() != 1 or tuple(means.shape) != (e, h) or whitening.shape != (e, h, h):
            raise ConfigError(
                f"LLPR feature-distance statistics must be [E], [E, {h}], [E, {h}, {h}]; got "
                f"{list(elements.shape)}, {list(means.shape)}, {list(whitening.shape)}"
            )
        self.register_buffer("elements", elements.long())
        self.register_buffer("means", means.double())
        self.register_buffer("whitening", whitening.double())
        if n_samples < 2:
            raise ConfigError(f"LLPR needs at least 2 samples, got {n_samples}")
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        cov = covariance.double()
        self.register_buffer("covariance", cov)
        # dw_m = L z_m with L L^T = Sigma (jitter only for a numerically singular Sigma)
        jitter = 1e-12 * float(cov.diagonal().abs().mean().clamp_min(1e-300))
        chol = torch.linalg.cholesky(cov + jitter * torch.eye(h, dtype=torch.float64))
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randn((h, self.n_samples), generator=gen, dtype=torch.float64)
        self.register_buffer("deltas", chol @ z)  # [H, M]

    def supported_outputs(self) -> frozenset[str]:
        """Samples only with ``force_std="samples"``."""
        out = super().supported_outputs()
        if self.force_std == "distance":
            out -= {K.ENERGY_SAMPLES, K.FORCES_SAMPLES}
        return out

    def feature_distance(self, f_scaled: Tensor, numbers: Tensor) -> Tensor:
        """[n_atoms] each atom's Mahalanobis distance from its element's training atoms.

        Args:
            f_scaled: [n_atoms, H] float64 scaled last-layer features ``scale * f_i``.
            numbers: [n_atoms] atomic numbers.

        Raises:
            ConfigError: an atom of an element with fewer than 2 training atoms.
        """
        known = numbers.unsqueeze(1) == self.elements.unsqueeze(0)
        missing = ~known.any(dim=1)
        if bool(missing.any()):
            absent = sorted({int(z) for z in numbers[missing].tolist()})
            raise ConfigError(
                f"LLPR --force-std distance: no training statistics for element(s) {absent} "
                "(fewer than 2 of their atoms in the data LLPR was fitted on)"
            )
        which = known.long().argmax(dim=1)  # [n_atoms] row of each atom's element
        diff = f_scaled - self.means[which]
        white = torch.einsum("ah,ahk->ak", diff, self.whitening[which])
        return white.pow(2).sum(dim=1).sqrt()

    def _energy_std(self, f_scaled: Tensor, g: Graph) -> Tensor:
        """[n_graphs] exact ``sqrt(phi^T Sigma phi)``, eV."""
        phi = _summed(f_scaled, g)
        return torch.einsum("gh,hk,gk->g", phi, self.covariance, phi).sqrt()

    def _predict_distance(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        """One model's pass; each atom's feature distance as the force-std score."""
        base = self.base
        below, _ = last_layer(base)
        seen: dict[str, Tensor] = {}

        def node_energies(graph: Graph) -> tuple[Tensor, Embedding]:
            energies, emb = base.node_energies(graph)
            seen["node"] = emb["node"]
            return energies, emb

        wanted = frozenset(outputs & {K.STRESS, K.VIRIAL, K.NODE_ENERGY}) | {K.ENERGY, K.FORCES}
        out = {k: v.detach() for k, v in compute_outputs(node_energies, g, wanted, False).items()}
        with torch.no_grad():
            f = _scaled(base, below(seen["node"]))  # [n_atoms, H]
            out[K.FORCES_STD] = self.feature_distance(f, g[K.ATOMIC_NUMBERS])
            out[K.ENERGY_STD] = self._energy_std(f, g)
        return out

    def predict(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        if self.force_std == "distance":
            return self._predict_distance(g, outputs)
        base = self.base
        below, last = last_layer(base)
        dtype = base.dtype
        seen: dict[str, Tensor] = {}

        def node_energies(graph: Graph) -> tuple[Tensor, Embedding]:
            emb = base.backbone(graph)
            f = below(emb["node"])  # [n_atoms, H]
            seen["f"] = f
            w = last.weight.T.to(dtype)  # [H, 1]
            weights = torch.cat([w, w + self.deltas.to(dtype)], dim=1)  # [H, 1 + M]
            raw = f @ weights + (last.bias.to(dtype) if last.bias is not None else 0.0)
            return base.energies_from_raw(raw, graph), emb

        wanted = frozenset(outputs & {K.STRESS, K.VIRIAL, K.NODE_ENERGY}) | {K.ENERGY, K.FORCES}
        out = {k: v.detach() for k, v in compute_outputs(node_energies, g, wanted, False).items()}
        energies, forces = out[K.ENERGY][:, 1:], out[K.FORCES][:, 1:]
        result = {k: v[:, 0] for k, v in out.items()}  # the trained model's own prediction
        result[K.ENERGY_STD] = self._energy_std(_scaled(base, seen["f"]), g)
        result[K.FORCES_STD] = forces.var(dim=1, unbiased=True).mean(dim=-1).sqrt()
        if K.ENERGY_SAMPLES in outputs:
            result[K.ENERGY_SAMPLES] = energies
        if K.FORCES_SAMPLES in outputs:
            result[K.FORCES_SAMPLES] = forces
        return result

    def wrapper_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **self.base_fields(),
            "extra": {
                "n_samples": self.n_samples,
                "seed": self.seed,
                "force_std": self.force_std,
                "covariance": self.covariance.tolist(),
                "distance": {
                    "elements": self.elements.tolist(),
                    "means": self.means.tolist(),
                    "whitening": self.whitening.tolist(),
                },
                "recalibration": self.recalibration.to_dict(),
                "fit_report": dict(self.fit_report),
            },
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> LLPR:
        extra = wrapper_extra(data, path)
        base = Potential.from_payload(data, path)
        force_std = str(extra.get("force_std", "samples"))
        if force_std == "local":
            raise CheckpointError(
                f"{path}: an LLPR wrapper with --force-std local, a score that ranked force "
                "errors in reverse and was replaced by --force-std distance; fit it again "
                "(trustpot uq fit llpr, seconds, no training)"
            )
        try:
            cov = torch.tensor(extra["covariance"], dtype=torch.float64)
            tensors = [cov]
            distance = None
            if force_std == "distance":
                stats = extra["distance"]
                distance = (
                    torch.tensor(stats["elements"], dtype=torch.int64),
                    torch.tensor(stats["means"], dtype=torch.float64),
                    torch.tensor(stats["whitening"], dtype=torch.float64),
                )
                tensors += distance[1:]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise ValueError("a statistic is not finite")
            model = cls(
                base,
                cov,
                int(extra.get("n_samples", 8)),
                int(extra.get("seed", 0)),
                force_std,
                distance,
            )
        except (KeyError, ConfigError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: malformed LLPR wrapper: {err}") from None
        model.recalibration = Recalibration.from_dict(extra.get("recalibration", {}))
        model.fit_report = dict(extra.get("fit_report", {}))
        return model


def fit_llpr(
    base: Potential,
    train: Sequence[Structure],
    calibration: Sequence[Structure] | None = None,
    *,
    regularizer: float | None = None,
    n_samples: int = 8,
    seed: int = 0,
    batch_size: int = 32,
    force_std: str = "samples",
    log: Callable[[str], None] = print,
) -> LLPR:
    """Fit LLPR around ``base`` from the structures it trained on (one pass, no training).

    Args:
        base: trained potential.
        train: its training structures (energies needed for ``sigma^2``).
        calibration: held-out labelled structures that choose ``lambda`` (energy NLL).
        regularizer: ``lambda`` relative to the mean eigenvalue of ``Phi^T Phi``; ``None``:
            chosen on ``calibration`` from :data:`REGULARIZER_GRID`, else
            :data:`DEFAULT_REGULARIZER`.
        n_samples: last layers drawn for the force std.
        force_std: ``samples`` or ``distance`` (needs ``calibration`` to give it force units;
            its statistics come from every atom of ``train``).

    Raises:
        ConfigError: no training energies, a head LLPR cannot use, bad options.
    """
    last_layer(base)
    if force_std not in FORCE_STD:
        raise ConfigError(f"--force-std must be samples or distance, got '{force_std}'")
    if force_std == "distance" and not calibration:
        raise ConfigError(
            "LLPR --force-std distance needs --calibration: the per-atom feature distance "
            "becomes a force std (eV/Å) only through the recalibration on held-out forces"
        )
    if regularizer is not None and not regularizer > 0:
        raise ConfigError(f"--regularizer must be > 0, got {regularizer}")
    t0 = time.perf_counter()
    base = base.eval()
    seen = _feature_pass(base, train, batch_size, "LLPR training data")
    phi, pred, ref = seen.phi, seen.predicted, seen.reference
    labelled = np.isfinite(ref)
    if labelled.sum() < 2:
        raise ConfigError("LLPR needs at least 2 training structures with energies")
    sigma2 = float(np.mean((pred[labelled] - ref[labelled]) ** 2))
    gram = phi.T @ phi
    chosen = regularizer if regularizer is not None else DEFAULT_REGULARIZER
    scores: dict[str, float] = {}
    if regularizer is None and calibration:
        cal = _feature_pass(base, calibration, batch_size, "calibration")
        ok = np.isfinite(cal.reference)
        if ok.sum() >= 2:
            for rel in REGULARIZER_GRID:
                var = np.einsum("gh,hk,gk->g", cal.phi[ok], _inverse(gram, rel), cal.phi[ok])
                scores[f"{rel:g}"] = _energy_nll(cal.predicted[ok] - cal.reference[ok], var)
            chosen = float(min(scores, key=lambda k: scores[k]))
    covariance = sigma2 * _inverse(gram, chosen)
    distance = None
    if force_std == "distance":
        distance = fit_feature_distance(seen.atom_features, seen.numbers)
    model = LLPR(base, torch.from_numpy(covariance), n_samples, seed, force_std, distance).eval()
    model.fit_report = {
        "n_train": int(labelled.sum()),
        "features": int(phi.shape[1]),
        "regularizer": chosen,
        "force_std": force_std,
        "train_energy_rmse": math.sqrt(sigma2),
        "seconds": time.perf_counter() - t0,
    }
    if scores:
        model.fit_report["regularizer_nll"] = min(scores.values())
    if distance is not None:
        model.fit_report["distance_elements"] = distance[0].tolist()
        model.fit_report["distance_atoms"] = len(seen.numbers)
    log(
        f"LLPR: {int(labelled.sum())} training structures, {phi.shape[1]} last-layer features, "
        f"energy RMSE {math.sqrt(sigma2):.4g} eV, regularizer {chosen:g}"
        + (" (chosen on the calibration energies)" if scores else "")
    )
    return model
