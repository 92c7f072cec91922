"""Shallow ensembles: M last layers on one backbone, trained with a likelihood on forces.

After Kellner and Ceriotti (*Uncertainty quantification by direct propagation of shallow
ensembles*, 2024), the way PET-MAD and metatrain give uncertainties at about one model's cost:
the last linear layer of a trained potential's energy head becomes M heads on the same
features; the prediction is the heads' mean, the spread their standard deviation. The heads
(and, unless frozen, the backbone at a lower learning rate) are fine-tuned so that the heads'
spread is the error it predicts, with the Gaussian negative log-likelihood of the heads' mean
and variance (``--loss nll``, the paper's choice) or the fair ensemble CRPS (``--loss crps``),
on per-atom energies and force components. All M force fields come from one backbone pass and
one vectorised backward pass (:func:`trustpot.models.potential.compute_outputs` with a sample
axis), in training and at inference.

The heads start as copies of the trained last layer plus Gaussian noise of ``spread`` times
the RMS of its weights, so the start predicts what the potential did, with a small spread.
Works on potentials with an :class:`~trustpot.models.potential.EnergyHead` (every backbone but
DeepSet-MoE).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import Graph
from trustpot.data.stats import force_rms
from trustpot.data.structures import Structure, check_species
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Embedding
from trustpot.models.potential import Potential, compute_outputs
from trustpot.train.objectives import CRPSLoss
from trustpot.train.run_folder import best_weights, run_folder, state_payload
from trustpot.uq.base import Recalibration, UQModel, wrapper_extra
from trustpot.uq.ensemble import SAMPLE_OUTPUTS, samples_output
from trustpot.uq.lastlayer import last_layer
from trustpot.uq.perturb import fair_crps_loss

LOSSES = ("nll", "crps")


def gaussian_nll_of_samples(samples: Tensor, target: Tensor, floor: float = 1e-6) -> Tensor:
    """Gaussian NLL of ``target`` under the samples' mean and (unbiased) variance.

    Args:
        samples: [n, M], M >= 2.
        target: [n], same unit.
        floor: variance floor (unit squared) that keeps the loss finite where heads agree.

    Returns:
        [n] ``0.5 log(2 pi var) + (target - mean)^2 / (2 var)``.
    """
    if samples.dim() != 2 or samples.shape[-1] < 2:
        raise ConfigError(f"the NLL needs [n, M >= 2] samples, got {tuple(samples.shape)}")
    mean = samples.mean(dim=-1)
    var = samples.var(dim=-1, unbiased=True) + floor
    diff = target.to(samples.dtype) - mean
    return 0.5 * torch.log(2 * math.pi * var) + diff**2 / (2 * var)


class ShallowEnsemble(UQModel):
    """M last layers on one potential's backbone (see the module docstring).

    Args:
        base: the trained potential (its head must be an EnergyHead).
        n_heads: M.
        spread: noise of the initial heads, relative to the RMS of the last layer's weights.
        seed: seed of that noise.
    """

    base: Potential
    kind: ClassVar[str] = "uq:shallow-ensemble"
    method: ClassVar[str] = "shallow-ensemble"
    provides: ClassVar[frozenset[str]] = SAMPLE_OUTPUTS

    def __init__(
        self, base: Potential, n_heads: int = 8, spread: float = 0.1, seed: int = 0
    ) -> None:
        super().__init__(base)
        _, last = last_layer(base, "a shallow ensemble")
        if n_heads < 2:
            raise ConfigError(f"a shallow ensemble needs at least 2 heads, got {n_heads}")
        self.n_heads = int(n_heads)
        self.heads = nn.Linear(last.in_features, self.n_heads).to(base.dtype)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            w = last.weight.detach()
            noise = torch.randn(self.heads.weight.shape, generator=gen, dtype=torch.float64)
            rms = float(w.pow(2).mean().sqrt())
            self.heads.weight.copy_(w.expand(self.n_heads, -1) + spread * rms * noise.to(w.dtype))
            bias = last.bias.detach() if last.bias is not None else torch.zeros(1)
            self.heads.bias.copy_(bias.expand(self.n_heads).to(self.heads.bias.dtype))

    def _node_energies(self, graph: Graph) -> tuple[Tensor, Embedding]:
        """[n_atoms, M] per-atom energies of the M heads (eV) and the embedding."""
        base = self.base
        below, _ = last_layer(base, "a shallow ensemble")
        emb = base.backbone(graph)
        raw = self.heads(below(emb["node"]))  # [n_atoms, M]
        return base.energies_from_raw(raw, graph), emb

    def sample(self, g: Graph, create_graph: bool) -> tuple[Tensor, Tensor]:
        """Every head's ``energy`` [n_graphs, M] (eV) and ``forces`` [n_atoms, M, 3] (eV/Å)."""
        out = compute_outputs(self._node_energies, g, frozenset({K.ENERGY, K.FORCES}), create_graph)
        return out[K.ENERGY], out[K.FORCES]

    def predict(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        wanted = frozenset(outputs & {K.STRESS, K.VIRIAL, K.NODE_ENERGY}) | {K.ENERGY, K.FORCES}
        out = compute_outputs(self._node_energies, g, wanted, False)
        out = {k: v.detach() for k, v in out.items()}
        means = {k: out[k].mean(1) for k in wanted - {K.ENERGY, K.FORCES}}
        return samples_output(out[K.ENERGY], out[K.FORCES], outputs, means)

    def wrapper_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **self.base_fields(),
            "extra": {
                "n_heads": self.n_heads,
                "heads": self.heads.state_dict(),
                "recalibration": self.recalibration.to_dict(),
                "fit_report": dict(self.fit_report),
            },
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> ShallowEnsemble:
        extra = wrapper_extra(data, path)
        base = Potential.from_payload(data, path)
        state = extra.get("heads")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: shallow-ensemble checkpoint lacks its heads")
        try:
            model = cls(base, int(extra.get("n_heads", 0)))
            model.heads.load_state_dict(state, strict=True)
        except (ConfigError, TypeError, ValueError, RuntimeError) as err:
            first = " ".join(str(err).strip().splitlines()[:2])
            raise CheckpointError(f"{path}: malformed shallow-ensemble heads: {first}") from None
        for name, tensor in model.heads.state_dict().items():
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: head tensor '{name}' holds NaN or inf")
        model.recalibration = Recalibration.from_dict(extra.get("recalibration", {}))
        model.fit_report = dict(extra.get("fit_report", {}))
        return model


def _samples(model: nn.Module, g: Graph, training: bool) -> tuple[Tensor, Tensor]:
    assert isinstance(model, ShallowEnsemble)
    return model.sample(g, create_graph=training)


def fit_shallow_ensemble(
    base: Potential,
    train: Sequence[Structure],
    valid: Sequence[Structure],
    *,
    n_heads: int = 8,
    loss: str = "nll",
    epochs: int = 50,
    max_minutes: float = 0.0,
    lr: float = 1e-3,
    backbone_lr: float = 1e-4,
    finetune_backbone: bool = True,
    batch_size: int = 8,
    energy_weight: float = 1.0,
    forces_weight: float = 10.0,
    spread: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    run_dir: str | Path | None = None,
) -> ShallowEnsemble:
    """Fine-tune ``n_heads`` last layers (and the backbone unless frozen) of ``base``.

    Runs on :class:`trustpot.train.trainer.Trainer` with a :class:`CRPSLoss` objective whose
    per-item score is :func:`gaussian_nll_of_samples` (``loss="nll"``) or the fair CRPS:
    ``energy_weight * mean score(E_m / N) + forces_weight * mean score(F_m)`` over labelled
    structures and force components (forces in units of the RMS training force). AdamW with two
    parameter groups (heads at ``lr``, backbone at ``backbone_lr`` or frozen), cosine decay,
    the best validation epoch kept. ``base`` is copied, never changed. A run killed in
    ``run_dir`` resumes when called again with the same options.

    Raises:
        ConfigError: bad options or a head a shallow ensemble cannot use.
    """
    from trustpot.config import TrainConfig
    from trustpot.train.distributed import init_distributed
    from trustpot.train.trainer import Objective, ParamGroup, Trainer

    if loss not in LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    if epochs < 1 or batch_size < 1:
        raise ConfigError("fit_shallow_ensemble needs epochs >= 1 and batch_size >= 1")
    if not train or not valid:
        raise ConfigError("fit_shallow_ensemble needs training and validation structures")
    check_species(list(train), base.species, "training data")
    check_species(list(valid), base.species, "validation data")
    t0 = time.perf_counter()
    model = ShallowEnsemble(copy.deepcopy(base), n_heads, spread, seed)
    train_ds = GraphDataset(train, base.neighbor_lists(), base.dtype, "training data")
    valid_ds = GraphDataset(valid, base.neighbor_lists(), base.dtype, "validation data")
    scale = force_rms(list(train))
    score = gaussian_nll_of_samples if loss == "nll" else fair_crps_loss
    objective = CRPSLoss(_samples, energy_weight, forces_weight, scale, score)
    options = dict(
        n_heads=n_heads, loss=loss, epochs=epochs, max_minutes=max_minutes, lr=lr,
        backbone_lr=backbone_lr, finetune_backbone=finetune_backbone, batch_size=batch_size,
        energy_weight=energy_weight, forces_weight=forces_weight, spread=spread, seed=seed,
        n_train=len(train_ds), n_valid=len(valid_ds),
    )  # fmt: skip
    cfg = TrainConfig(
        epochs=epochs, max_minutes=max_minutes, batch_size=batch_size, lr=lr, min_lr=0.01 * lr,
        schedule="cosine", warmup_epochs=0, clip_grad=10.0, seed=seed,
    )  # fmt: skip
    groups = [
        ParamGroup(list(model.heads.parameters()), lr, name="heads"),
        ParamGroup(list(model.base.parameters()), backbone_lr, not finetune_backbone, 0.0, "base"),
    ]

    def train_mode(m: nn.Module) -> None:
        m.eval()  # no dropout noise in the base; the heads have none

    def on_epoch(trainer: Trainer, row: dict[str, Any]) -> None:
        log(
            f"shallow-ensemble epoch {trainer.epoch}: train loss {row['train_loss']:.4g}, val "
            f"loss {row['val_loss']:.4g}, val force MAE {row['val_forces_mae']:.4g} eV/Å"
        )

    trainer = Trainer(
        model,
        [Objective(loss, "main", loss=objective)],
        cfg,
        init_distributed(),
        run_config=options,
        param_groups=groups,
        payload_fn=state_payload("shallow_ensemble_fit"),
        train_mode=train_mode,
        amsgrad=False,
        on_epoch=on_epoch,
        progress=progress,
        desc="shallow-ensemble",
    )
    with run_folder(run_dir) as folder, torch.random.fork_rng(devices=[]):
        if trainer.resume(folder):
            log(f"shallow-ensemble: resuming {folder} at epoch {trainer.epoch}")
        result = trainer.fit({"main": train_ds}, {"main": valid_ds}, folder, log=lambda _: None)
        model.load_state_dict(best_weights(trainer, folder))
    for p in model.parameters():
        p.requires_grad_(True)
    best = result.best_metrics
    model.fit_report = {
        "epochs": result.epochs,
        "best_epoch": result.best_epoch + 1,
        "seconds": round(time.perf_counter() - t0, 3),
        "loss": loss,
        "val_loss": best["val_loss"],
        "val_forces_mae": best["val_forces_mae"],
        "n_train": len(train_ds),
        "n_valid": len(valid_ds),
        "finetune_backbone": finetune_backbone,
        "stopped_by": "time" if result.stopped_by == "budget" else result.stopped_by,
    }
    return model.eval()
