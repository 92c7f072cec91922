"""The seed's modes on a trained two-expert mixture: every one yields forces on the test frames.

Inputs are the branch forces of a trained mixture on two sets of frames: the *calibration* set
(held out from branch training; used to pick, fit or refine anything) and the *test* set (only
reported). Per frame, :class:`FrameSet` keeps ``f_short``, ``f_long`` and ``f_ref`` ([n, 3] eV/Å),
the frame's nearest cation-anion distance and each ion's nearest counter-ion distance (Å).

Modes (all force MAEs over force components, eV/Å):

- fixed scale s: (1 - s) F_short + s F_long (exactly the forces of the mixture at that s);
- oracle hard routing per structure / per atom, continuous oracle per structure (exact MAE
  minimiser) and per atom: :mod:`trustpot.bench.scales.oracle`, on the test labels (upper bounds);
- pool with oracle selection: each structure uses the pool member with its lowest MAE; the pool is
  refined on the calibration set (:func:`~trustpot.bench.scales.refine.refine_pool`);
- differentiable scale: one s = sigmoid(theta) fitted by Adam on the calibration MAE (with frozen
  branches this is exactly training the ``"parameter"`` mode of the mixture), and a
  differentiable pool (the interior pool values trained on the calibration pool loss);
- learned router: trained separately (:func:`train_router`); its forces come from the router
  mixture itself (conservative, the dependence of s on positions included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustpot import keys as K
from trustpot.bench.scales.contacts import (
    CONTACT_THRESHOLD,
    ContactErrors,
    contact_errors,
    frame_distance,
    ion_distances,
)
from trustpot.bench.scales.oracle import (
    mixed_forces,
    oracle_scale_l2,
    oracle_scale_mae,
    route_atoms,
    route_structure,
)
from trustpot.bench.scales.refine import optimise_scale
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import to_device
from trustpot.metrics.accuracy import pooled_mae
from trustpot.models.mixture import (
    FORCES_LONG,
    FORCES_SHORT,
    SCALE,
    DifferentiableScale,
    ScaleMixturePotential,
)
from trustpot.train.full_batch import minimise
from trustpot.units import EV_PER_A_IN_KJ_PER_MOL_PER_NM

Log = Callable[[str], None]


@dataclass
class FrameSet:
    """Branch forces, labels and ion distances of a set of frames.

    Attributes:
        short, long, reference: per frame, [n_atoms, 3] eV/Å.
        frame_d: [n_frames] nearest cation-anion distance of each frame (Å).
        atom_d: per frame, [n_atoms] nearest counter-ion distance of each ion (NaN otherwise).
        scale: per frame, [n_atoms] the per-atom scale a router gave (when collected from one).
        forces: per frame, [n_atoms, 3] the mixture's own forces (when collected from a router).
    """

    short: list[np.ndarray]
    long: list[np.ndarray]
    reference: list[np.ndarray]
    frame_d: np.ndarray
    atom_d: list[np.ndarray]
    scale: list[np.ndarray] = field(default_factory=list)
    forces: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.reference)

    def errors(self, predictions: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per frame, predicted minus reference forces (eV/Å)."""
        return [p - r for p, r in zip(predictions, self.reference)]

    def mixed(self, s: float | Sequence[float] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Forces at one scale for all frames, one per frame, or one per atom."""
        if np.ndim(s) == 0:
            return [mixed_forces(a, b, float(s)) for a, b in zip(self.short, self.long)]  # type: ignore[arg-type]
        return [mixed_forces(a, b, w) for a, b, w in zip(self.short, self.long, s)]  # type: ignore[arg-type]


def collect(
    model: ScaleMixturePotential,
    dataset: GraphDataset,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    with_model_forces: bool = False,
    log: Log | None = None,
) -> FrameSet:
    """Evaluate both branches (and, with ``with_model_forces``, the mixture's own forces and
    scales) on every frame of ``dataset``."""
    model.eval()
    short: list[np.ndarray] = []
    long: list[np.ndarray] = []
    forces: list[np.ndarray] = []
    scales: list[np.ndarray] = []
    wanted = {K.ENERGY, FORCES_SHORT, FORCES_LONG}
    if with_model_forces:
        wanted.add(K.FORCES)
    t0 = time.perf_counter()
    done = 0
    for batch, _ in dataset.batches(batch_size):
        assert batch is not None
        batch = to_device(batch, device)
        out = model(batch, wanted, create_graph=False)
        splits = batch[K.N_ATOMS].tolist()
        short += [x.detach().double().cpu().numpy() for x in out[FORCES_SHORT].split(splits)]
        long += [x.detach().double().cpu().numpy() for x in out[FORCES_LONG].split(splits)]
        if with_model_forces:
            forces += [x.detach().double().cpu().numpy() for x in out[K.FORCES].split(splits)]
            scales += [x.detach().double().cpu().numpy() for x in out[SCALE].split(splits)]
        done += len(splits)
        if log is not None and (done == len(dataset) or done % (8 * batch_size) == 0):
            log(f"  evaluated {done}/{len(dataset)} frames ({time.perf_counter() - t0:.0f} s)")
    structures = dataset.structures
    reference = []
    for k, s in enumerate(structures):
        if s.forces is None:
            raise ValueError(f"{dataset.name}: frame {k} has no force labels")
        reference.append(np.asarray(s.forces, dtype=np.float64))
    return FrameSet(
        short,
        long,
        reference,
        np.array([frame_distance(s) for s in structures]),
        [ion_distances(s) for s in structures],
        scales,
        forces,
    )


def total_mae(frames: FrameSet, predictions: Sequence[np.ndarray]) -> float:
    """Force MAE (eV/Å) over all components of all frames."""
    return pooled_mae(p - r for p, r in zip(predictions, frames.reference))


# -- oracles and pools ------------------------------------------------------------------------
def frame_scale_errors(frames: FrameSet, pool: Sequence[float]) -> np.ndarray:
    """[n_frames, n_pool] summed absolute force error of each frame at each pool scale (eV/Å)."""
    out = np.empty((len(frames), len(pool)))
    for k, (a, b, r) in enumerate(zip(frames.short, frames.long, frames.reference)):
        for j, s in enumerate(pool):
            out[k, j] = np.abs((1.0 - s) * a + s * b - r).sum()
    return out


def pool_selection(frames: FrameSet, pool: Sequence[float]) -> np.ndarray:
    """[n_frames] the pool member each frame's oracle picks (lowest MAE; smallest on ties)."""
    errs = frame_scale_errors(frames, pool)
    picked: np.ndarray = np.asarray(pool, dtype=np.float64)[np.argmin(errs, axis=1)]
    return picked


def pool_loss(frames: FrameSet, pool: Sequence[float]) -> float:
    """Force MAE (eV/Å) when every frame uses its best pool member (oracle selection)."""
    errs = frame_scale_errors(frames, pool)
    return float(errs.min(axis=1).sum()) / max(sum(r.size for r in frames.reference), 1)


class PoolScorer:
    """:func:`pool_loss` with each scale's per-frame errors computed once (refinement asks for
    many pools that share members)."""

    def __init__(self, frames: FrameSet) -> None:
        self.frames = frames
        self.n_components = max(sum(r.size for r in frames.reference), 1)
        self._cache: dict[float, np.ndarray] = {}

    def frame_errors(self, s: float) -> np.ndarray:
        """[n_frames] summed absolute force error of each frame at scale ``s`` (eV/Å)."""
        key = float(s)
        if key not in self._cache:
            self._cache[key] = frame_scale_errors(self.frames, [key])[:, 0]
        return self._cache[key]

    def __call__(self, pool: Sequence[float]) -> float:
        errs = np.stack([self.frame_errors(s) for s in pool], axis=1)
        return float(errs.min(axis=1).sum()) / self.n_components


def oracle_predictions(frames: FrameSet) -> dict[str, list[np.ndarray]]:
    """Forces of every oracle on ``frames`` (they read the labels)."""
    hard_s = [
        b if route_structure(a, b, r) else a
        for a, b, r in zip(frames.short, frames.long, frames.reference)
    ]
    hard_a = [
        mixed_forces(a, b, route_atoms(a, b, r))
        for a, b, r in zip(frames.short, frames.long, frames.reference)
    ]
    cont_s = [
        mixed_forces(a, b, oracle_scale_mae(a, b, r))
        for a, b, r in zip(frames.short, frames.long, frames.reference)
    ]
    cont_l2 = [
        mixed_forces(a, b, oracle_scale_l2(a, b, r))
        for a, b, r in zip(frames.short, frames.long, frames.reference)
    ]
    cont_a = [
        mixed_forces(a, b, oracle_scale_mae(a, b, r, per_atom=True))
        for a, b, r in zip(frames.short, frames.long, frames.reference)
    ]
    return {
        "oracle_hard_structure": hard_s,
        "oracle_hard_atom": hard_a,
        "oracle_continuous_structure": cont_s,
        "oracle_continuous_structure_l2": cont_l2,
        "oracle_continuous_atom": cont_a,
    }


def oracle_frame_scales(frames: FrameSet) -> np.ndarray:
    """[n_frames] the continuous (MAE) oracle's s of each frame."""
    return np.array(
        [oracle_scale_mae(a, b, r) for a, b, r in zip(frames.short, frames.long, frames.reference)]
    )


# -- differentiable scale and pool ----------------------------------------------------------
def _stack(frames: FrameSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(np.concatenate(frames.short))
    b = torch.as_tensor(np.concatenate(frames.long))
    r = torch.as_tensor(np.concatenate(frames.reference))
    index = torch.as_tensor(np.repeat(np.arange(len(frames)), [len(x) for x in frames.reference]))
    return a, b, r, index


def fit_differentiable_scale(
    frames: FrameSet,
    init: float = 0.5,
    steps: int = 400,
    lr: float = 0.05,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """One trainable s = sigmoid(theta) minimising the force MAE of ``frames`` (Adam).

    With frozen branches and one s for all atoms the mixture's forces are exactly
    (1 - s) F_short + s F_long, so this is the ``"parameter"`` scale mode trained on ``frames``.
    """
    a, b, r, _ = _stack(frames)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return ((1.0 - s) * a + s * b - r).abs().mean()

    result = optimise_scale(loss, init=init, steps=steps, lr=lr, run_dir=run_dir)
    return {
        "scale": result.scale,
        "calibration_mae": result.loss,
        "steps": len(result.history),
        "converged": result.converged,
        "trajectory": [h[0] for h in result.history[:: max(1, len(result.history) // 50)]],
    }


def fit_differentiable_pool(
    frames: FrameSet,
    pool: Sequence[float],
    steps: int = 300,
    lr: float = 0.05,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The interior members of ``pool`` as trainable scales (the anchors 0 and 1 stay), trained
    with Adam on the pool loss of ``frames`` (each frame's lowest error over the pool; its
    gradient flows to the member each frame selects). Runs on the trainer, one full-batch step
    per epoch (:func:`trustpot.train.full_batch.minimise`; ``run_dir`` ``None``: temporary)."""
    anchors = [s for s in pool if s in (0.0, 1.0)]
    inner = [s for s in pool if s not in (0.0, 1.0)]
    if not inner:
        return {"pool": sorted(pool), "calibration_loss": pool_loss(frames, pool), "steps": 0}
    a, b, r, index = _stack(frames)
    n_frames, n_comp = len(frames), float(r.numel())
    scales = [DifferentiableScale(s) for s in inner]
    params = nn.ModuleList(scales)
    fixed = torch.tensor(anchors, dtype=torch.float64)

    def loss(module: nn.Module) -> torch.Tensor:
        members = torch.cat([fixed, torch.stack([p() for p in scales]).double()])
        pred = (1.0 - members)[None, None, :] * a[..., None] + members[None, None, :] * b[..., None]
        per_atom = (pred - r[..., None]).abs().sum(dim=1)  # [n_atoms, n_pool]
        per_frame = torch.zeros(n_frames, len(members), dtype=per_atom.dtype)
        per_frame.index_add_(0, index, per_atom)
        return per_frame.min(dim=1).values.sum() / n_comp

    minimise(params, loss, steps, lr, run_dir=run_dir, desc="scale pool")
    tuned = sorted([*anchors, *(p.value for p in scales)])
    return {"pool": tuned, "calibration_loss": pool_loss(frames, tuned), "steps": steps}


# -- rows -----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the report's table: a mode and its test force errors (eV/Å)."""

    key: str
    label: str
    errors: ContactErrors
    deployable: bool
    seed: float | None = None
    seed_contact: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        e = self.errors
        out: dict[str, Any] = {
            "key": self.key,
            "label": self.label,
            "deployable": self.deployable,
            "note": self.note,
            "seed": self.seed,
            "seed_contact": self.seed_contact,
            "n_contact_frames": e.n_contact_frames,
            "n_contact_atoms": e.n_contact_atoms,
        }
        for name in ("overall", "contact_frames", "contact_atoms", "far_frames"):
            value = float(getattr(e, name))
            out[f"{name}_ev_a"] = value
            out[f"{name}_kjmolnm"] = value * EV_PER_A_IN_KJ_PER_MOL_PER_NM
        return out


def make_row(
    key: str,
    label: str,
    frames: FrameSet,
    predictions: Sequence[np.ndarray],
    deployable: bool,
    threshold: float = CONTACT_THRESHOLD,
    **extra: Any,
) -> Row:
    """A table row from per-frame predicted forces on ``frames``."""
    errors = contact_errors(frames.errors(predictions), frames.frame_d, frames.atom_d, threshold)
    return Row(key, label, errors, deployable, **extra)


def gain_recovered(baseline: float, oracle: float, achieved: float) -> float:
    """(baseline - achieved) / (baseline - oracle); NaN when the oracle gains nothing."""
    gain = baseline - oracle
    return (baseline - achieved) / gain if gain > 0 else math.nan


def reduction_percent(before: float, after: float) -> float:
    """100 (before - after) / before."""
    return 100.0 * (before - after) / before if before > 0 else math.nan
