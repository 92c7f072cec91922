"""Learned functional perturbations: a deterministic potential made probabilistic.

After every interaction layer ``k`` of the backbone, the hidden invariant features ``h``
[n_atoms, F] pass through a small noise-conditioned FiLM map (see
:class:`PerturbationModulator`)::

    (gamma, beta) = MLP_k([h, eps]),    h' = h * (1 + gamma) + beta

where ``eps`` [noise_dim] ~ N(0, 1) is drawn once per (structure, sample) and shared by every
atom of that structure. A sample is therefore one coherent function of all positions: its
forces are ``-dE/dr`` of its own energy (conservative, invariant, equivariant), and ``eps`` does
not depend on positions. The last layer of every MLP starts at zero, so the untrained wrapper
reproduces the base potential exactly; :func:`fit_perturbation` then trains the perturbations
(and optionally the base) end to end with the fair ensemble CRPS of energies and forces.

Evaluation (:meth:`PerturbedPotential.predict`) replicates the batch M times into one bigger
batch. With ``eval_seed`` set (the default, 0) the M noise vectors come from a generator seeded
with it and are shared by all structures: the M samples are M fixed functions, so repeated
calls, any batch composition and consecutive MD frames see the same functions (smooth
trajectories, reproducible uncertainties). ``eval_seed=None`` draws fresh noise per call, per
(structure, sample), as training does. Memory and time grow M-fold over the base potential.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import Graph, replicate_batch, to_device
from trustpot.data.stats import force_rms
from trustpot.data.structures import Structure, check_species
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.contract import Model
from trustpot.nn import MLP
from trustpot.train.objectives import CRPSLoss
from trustpot.train.run_folder import best_weights, run_folder, state_payload
from trustpot.uq.base import (
    Recalibration,
    UQModel,
    base_from_payload,
    sample_statistics,
    wrapper_extra,
)

SAMPLE_OUTPUTS = frozenset({K.ENERGY_STD, K.FORCES_STD, K.ENERGY_SAMPLES, K.FORCES_SAMPLES})
_GRAPH_LEVEL = (K.ENERGY, K.STRESS, K.VIRIAL)


class PerturbationModulator(nn.Module):
    """Noise-conditioned FiLM of hidden features, one small MLP per interaction layer.

    Implements the :class:`trustpot.models.base.Modulator` protocol. Set the noise of the
    current batch with :meth:`set_noise` before the backbone runs.

    Args:
        n_features: width F of the hidden features.
        n_layers: interaction layers of the backbone.
        noise_dim: dimension of the noise vector ``eps``.
        hidden: width of each MLP's hidden layer (default F).
    """

    def __init__(
        self, n_features: int, n_layers: int, noise_dim: int = 16, hidden: int | None = None
    ) -> None:
        super().__init__()
        if noise_dim < 1 or n_layers < 1 or n_features < 1:
            raise ConfigError("noise_dim, n_layers and n_features must be at least 1")
        self.n_features = int(n_features)
        self.noise_dim = int(noise_dim)
        self.hidden = int(hidden or n_features)
        sizes = [self.n_features + self.noise_dim, self.hidden, 2 * self.n_features]
        mlps = [MLP(sizes) for _ in range(n_layers)]
        for mlp in mlps:  # zero last layer: gamma = beta = 0, the base model exactly
            for p in mlp[-1].parameters():
                nn.init.zeros_(p)
        self.mlps = nn.ModuleList(mlps)
        self._noise: Tensor | None = None

    def set_noise(self, eps: Tensor | None) -> None:
        """Noise of the next calls: [n_graphs, noise_dim], one row per structure (None: clear)."""
        if eps is not None and (eps.dim() != 2 or eps.shape[1] != self.noise_dim):
            raise ConfigError(f"noise must be [n_graphs, {self.noise_dim}], got {tuple(eps.shape)}")
        self._noise = eps

    def forward(self, layer: int, h: Tensor, g: Graph) -> Tensor:
        """``h * (1 + gamma) + beta`` [n_atoms, F] for interaction ``layer``."""
        if self._noise is None:
            raise ConfigError("PerturbationModulator: no noise set (call set_noise first)")
        n_graphs = int(g[K.N_ATOMS].shape[0])
        if self._noise.shape[0] != n_graphs:
            raise ConfigError(f"noise has {self._noise.shape[0]} rows for {n_graphs} structures")
        if not 0 <= layer < len(self.mlps):
            raise ConfigError(f"modulator has {len(self.mlps)} layers, asked for layer {layer}")
        eps = self._noise.to(h.dtype)[g[K.BATCH]]
        film: Tensor = self.mlps[layer](torch.cat([h, eps], dim=-1))
        gamma, beta = film.chunk(2, dim=-1)
        return h * (1 + gamma) + beta


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def attached(model: Model, modulator: PerturbationModulator) -> Iterator[None]:
    """Attach ``modulator`` to ``model``'s modulation hook for the block, restoring the previous
    one after (:meth:`~trustpot.models.contract.Model.set_modulator`: a plain attribute, so the
    base's ``state_dict`` stays that of the plain model)."""
    previous = model.set_modulator(modulator)
    try:
        yield
    finally:
        model.set_modulator(previous)


def fair_crps_loss(samples: Tensor, target: Tensor) -> Tensor:
    """Fair (unbiased) ensemble CRPS of each item, differentiable.

    ``CRPS = mean_i |X_i - y| - 1 / (2 M (M - 1)) * sum_{i != j} |X_i - X_j|``, equal to
    :func:`trustpot.metrics.uncertainty.ensemble_crps`. Where samples coincide the spread term
    has zero (sub)gradient, so the loss is finite for a zero-spread start.

    Args:
        samples: [n, M] with M >= 2.
        target: [n], same units.

    Returns:
        [n] CRPS in the units of the inputs.
    """
    m = samples.shape[-1]
    if samples.dim() != 2 or m < 2:
        raise ConfigError(f"fair CRPS needs [n, M >= 2] samples, got {tuple(samples.shape)}")
    skill = (samples - target.unsqueeze(-1).to(samples.dtype)).abs().mean(dim=-1)
    spread = (samples.unsqueeze(-1) - samples.unsqueeze(-2)).abs().sum(dim=(-1, -2))
    return skill - spread / (2 * m * (m - 1))


class PerturbedPotential(UQModel):
    """A model whose hidden features carry learned, noise-conditioned perturbations.

    Args:
        base: any model with a modulation hook (:meth:`~trustpot.models.contract.Model.
            modulation_shape`): a trustpot potential, a pretrained adapter (SevenNet-0,
            CHGNet) or a fine-tune of either; its weights may be fine-tuned by
            :func:`fit_perturbation`.
        noise_dim: dimension of the noise vector per (structure, sample).
        hidden: hidden width of the modulator MLPs (default: the backbone's F).
        n_samples: M, samples per prediction.
        eval_seed: seed of the M noise vectors at inference (None: fresh noise every call).
        finetuned_backbone: whether the base weights were fine-tuned (recorded only).
    """

    kind: ClassVar[str] = "uq:perturb"
    method: ClassVar[str] = "perturb"
    provides: ClassVar[frozenset[str]] = SAMPLE_OUTPUTS

    def __init__(
        self,
        base: Model,
        noise_dim: int = 16,
        hidden: int | None = None,
        n_samples: int = 8,
        eval_seed: int | None = 0,
        finetuned_backbone: bool = False,
    ) -> None:
        super().__init__(base)
        if n_samples < 2:
            raise ConfigError(f"perturbations need at least 2 samples, got {n_samples}")
        shape = base.modulation_shape()
        if shape is None:
            raise ConfigError(
                f"learned perturbations need a model with a modulation hook; kind "
                f"'{base.kind}' has none"
            )
        n_layers, n_features = shape
        self.modulator = PerturbationModulator(n_features, n_layers, noise_dim, hidden)
        self.modulator.to(device=_device_of(base), dtype=base.dtype)
        self.n_samples = int(n_samples)
        self.eval_seed = eval_seed
        self.finetuned_backbone = bool(finetuned_backbone)
        self.fit_report: dict[str, Any] = {}

    def draw_noise(
        self, n_graphs: int, m: int, generator: torch.Generator | None = None, shared: bool = False
    ) -> Tensor:
        """Noise [m, n_graphs, noise_dim], drawn on the CPU (same values on every device).

        ``shared``: one vector per sample, the same for every structure (fixed functions).
        """
        d = self.modulator.noise_dim
        eps = torch.randn((m, 1 if shared else n_graphs, d), generator=generator, dtype=self.dtype)
        return eps.expand(m, n_graphs, d)

    def evaluate(
        self,
        g: Graph,
        noise: Tensor,
        wanted: frozenset[str] = frozenset({K.ENERGY, K.FORCES}),
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        """Outputs of every sample for a given noise.

        Args:
            g: batch with ``n_graphs`` structures and ``n_atoms`` atoms.
            noise: [M, noise_dim] (one vector per sample, shared by all structures) or
                [M, n_graphs, noise_dim].
            wanted: potential outputs (``energy``, ``forces``, ``stress``, ``virial``,
                ``energies``).
            create_graph: keep the graph for training.

        Returns:
            per sample: ``energy`` [n_graphs, M] eV, ``forces`` [n_atoms, M, 3] eV/Å,
            ``stress`` [n_graphs, M, 3, 3], ``virial`` [n_graphs, M, 3, 3], ``energies``
            [n_atoms, M], as asked.
        """
        n_graphs = int(g[K.N_ATOMS].shape[0])
        n_atoms = int(g[K.POSITIONS].shape[0])
        if noise.dim() == 2:
            noise = noise.unsqueeze(1).expand(-1, n_graphs, -1)
        m = int(noise.shape[0])
        if noise.shape[1:] != (n_graphs, self.modulator.noise_dim):
            raise ConfigError(f"noise of shape {tuple(noise.shape)} does not fit {n_graphs} graphs")
        big = replicate_batch(g, m)
        device = g[K.POSITIONS].device
        self.modulator.set_noise(noise.reshape(m * n_graphs, -1).to(device, self.dtype))
        try:
            with attached(self.base, self.modulator):
                out = self.base(big, wanted, create_graph=create_graph)
        finally:
            self.modulator.set_noise(None)
        result = {}
        for key, value in out.items():
            rows = n_graphs if key in _GRAPH_LEVEL else n_atoms
            result[key] = value.reshape(m, rows, *value.shape[1:]).transpose(0, 1)
        return result

    def sample(
        self,
        g: Graph,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
        create_graph: bool = False,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """M samples of energies [n_graphs, M] eV and forces [n_atoms, M, 3] eV/Å.

        Noise is drawn per (structure, sample) from ``generator`` (the global RNG when None)
        unless ``noise`` is given (see :meth:`evaluate`).
        """
        m = int(n_samples or self.n_samples)
        if noise is None:
            noise = self.draw_noise(int(g[K.N_ATOMS].shape[0]), m, generator)
        out = self.evaluate(g, noise, frozenset({K.ENERGY, K.FORCES}), create_graph)
        return out[K.ENERGY], out[K.FORCES]

    def eval_noise(self, n_graphs: int) -> Tensor:
        """Noise used by :meth:`predict`: fixed by ``eval_seed`` (shared), else fresh."""
        if self.eval_seed is None:
            return self.draw_noise(n_graphs, self.n_samples)
        gen = torch.Generator().manual_seed(int(self.eval_seed))
        return self.draw_noise(n_graphs, self.n_samples, gen, shared=True)

    def predict(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        wanted = frozenset(outputs & {K.STRESS, K.VIRIAL, K.NODE_ENERGY}) | {K.ENERGY, K.FORCES}
        per = self.evaluate(g, self.eval_noise(int(g[K.N_ATOMS].shape[0])), wanted)
        energies, forces = per[K.ENERGY].detach(), per[K.FORCES].detach()
        energy, force, energy_std, forces_std = sample_statistics(energies, forces)
        out = {K.ENERGY: energy, K.FORCES: force, K.ENERGY_STD: energy_std}
        out[K.FORCES_STD] = forces_std
        if K.ENERGY_SAMPLES in outputs:
            out[K.ENERGY_SAMPLES] = energies
        if K.FORCES_SAMPLES in outputs:
            out[K.FORCES_SAMPLES] = forces
        for key in wanted - {K.ENERGY, K.FORCES}:
            out[key] = per[key].detach().mean(dim=1)
        return out

    # -- persistence --------------------------------------------------------------------------
    def wrapper_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **self.base_fields(),
            "extra": {
                "hypers": {
                    "noise_dim": self.modulator.noise_dim,
                    "hidden": self.modulator.hidden,
                    "n_samples": self.n_samples,
                    "eval_seed": -1 if self.eval_seed is None else int(self.eval_seed),
                    "finetuned_backbone": self.finetuned_backbone,
                },
                "modulator": self.modulator.state_dict(),
                "recalibration": self.recalibration.to_dict(),
                "fit_report": dict(self.fit_report),
            },
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> PerturbedPotential:
        extra = wrapper_extra(data, path)
        base = base_from_payload(data, path)
        hypers, state = extra.get("hypers"), extra.get("modulator")
        if not isinstance(hypers, dict) or not isinstance(state, dict):
            raise CheckpointError(f"{path}: perturbation checkpoint lacks its hypers or modulator")
        try:
            seed = int(hypers.get("eval_seed", 0))
            model = cls(
                base,
                noise_dim=int(hypers["noise_dim"]),
                hidden=int(hypers["hidden"]),
                n_samples=int(hypers.get("n_samples", 8)),
                eval_seed=None if seed < 0 else seed,
                finetuned_backbone=bool(hypers.get("finetuned_backbone", False)),
            )
        except (ConfigError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed perturbation hypers: {err}") from None
        try:
            model.modulator.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = " ".join(str(err).strip().splitlines()[:2])
            raise CheckpointError(f"{path}: modulator weights do not fit: {first}") from None
        for name, tensor in model.modulator.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: modulator tensor '{name}' holds NaN or inf")
        model.recalibration = Recalibration.from_dict(extra.get("recalibration", {}))
        model.fit_report = dict(extra.get("fit_report", {}))
        return model


# -- training ---------------------------------------------------------------------------------
def _crps_terms(
    energies: Tensor, forces: Tensor, g: Graph, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted CRPS sums and label counts of per-atom energies and force components.

    Returns ``(energy_sum, energy_count, forces_sum, forces_count)``; sums are in units of
    ``scale`` (eV/atom / scale and eV/Å / scale).
    """
    n = g[K.N_ATOMS].to(energies.dtype)
    e = fair_crps_loss(energies / n.unsqueeze(-1), g[K.ENERGY] / n) / scale
    w_e = g[K.ENERGY_WEIGHT].to(e.dtype)
    m = forces.shape[1]
    f_samples = forces.permute(0, 2, 1).reshape(-1, m)
    f = fair_crps_loss(f_samples, g[K.FORCES].reshape(-1)) / scale
    w_f = g[K.FORCES_WEIGHT][g[K.BATCH]].repeat_interleave(3).to(f.dtype)
    return (e * w_e).sum(), w_e.sum(), (f * w_f).sum(), w_f.sum()


def crps_scores(
    model: PerturbedPotential, data: GraphDataset | Sequence[Structure], batch_size: int = 8
) -> dict[str, float]:
    """Validation scores of :meth:`PerturbedPotential.predict` (its eval noise, no rescaling).

    Returns:
        ``energy_crps`` (eV/atom, of per-atom energies), ``forces_crps`` (eV/Å, of force
        components) and ``forces_mae`` (eV/Å, of the predictive mean).
    """
    if not isinstance(data, GraphDataset):
        data = GraphDataset(data, model.neighbor_lists(), model.dtype, "validation")
    device = _device_of(model.base)
    wanted = frozenset({K.ENERGY, K.FORCES, K.ENERGY_SAMPLES, K.FORCES_SAMPLES})
    totals = torch.zeros(6, dtype=torch.float64)
    for batch, _ in data.batches(batch_size):
        assert batch is not None
        g = to_device(batch, device)
        out = model.predict(g, wanted)
        e_sum, e_n, f_sum, f_n = _crps_terms(out[K.ENERGY_SAMPLES], out[K.FORCES_SAMPLES], g, 1.0)
        w = g[K.FORCES_WEIGHT][g[K.BATCH]].unsqueeze(-1)
        mae = ((out[K.FORCES] - g[K.FORCES]).abs() * w).sum()
        part = [e_sum, e_n, f_sum, f_n, mae, f_n]
        totals += torch.stack([t.detach().double().cpu() for t in part])
    return {
        "energy_crps": float(totals[0] / totals[1].clamp_min(1)),
        "forces_crps": float(totals[2] / totals[3].clamp_min(1)),
        "forces_mae": float(totals[4] / totals[5].clamp_min(1)),
    }


class _SampleCRPS(CRPSLoss):
    """CRPS of a :class:`PerturbedPotential`'s samples: in training ``n_train`` samples with
    noise per (structure, sample) from a seeded generator (saved for resume); in validation
    the samples of :meth:`PerturbedPotential.predict` (its fixed ``eval_seed`` noise)."""

    def __init__(
        self, n_train: int, seed: int, energy_weight: float, forces_weight: float, scale: float
    ) -> None:
        super().__init__(self._samples, energy_weight, forces_weight, scale, fair_crps_loss)
        self.n_train = n_train
        self.generator = torch.Generator().manual_seed(seed)

    def _samples(self, model: nn.Module, g: Graph, training: bool) -> tuple[Tensor, Tensor]:
        assert isinstance(model, PerturbedPotential)
        if training:
            return model.sample(g, self.n_train, self.generator, create_graph=True)
        wanted = frozenset({K.ENERGY, K.FORCES, K.ENERGY_SAMPLES, K.FORCES_SAMPLES})
        out = model.predict(g, wanted)
        return out[K.ENERGY_SAMPLES], out[K.FORCES_SAMPLES]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def fit_perturbation(
    base: Model,
    train: Sequence[Structure],
    valid: Sequence[Structure],
    *,
    n_samples_train: int = 4,
    epochs: int = 100,
    max_minutes: float = 0.0,
    lr: float = 1e-3,
    backbone_lr: float = 1e-4,
    finetune_backbone: bool = True,
    batch_size: int = 8,
    energy_weight: float = 1.0,
    forces_weight: float = 10.0,
    noise_dim: int = 16,
    seed: int = 0,
    n_samples: int = 8,
    eval_seed: int | None = 0,
    clip_grad: float = 10.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    run_dir: str | Path | None = None,
    ema_decay: float = 0.0,
) -> PerturbedPotential:
    """Train perturbations (and optionally the base) by minimising the fair ensemble CRPS.

    Runs on :class:`trustpot.train.trainer.Trainer`. Loss per batch (a :class:`CRPSLoss`):
    ``energy_weight * mean CRPS(E_m / N) + forces_weight * mean CRPS(F_m)`` over labelled
    structures and force components, in units of the RMS training force (eV/Å), with
    ``n_samples_train`` samples whose noise is drawn per (structure, sample). AdamW with two
    parameter groups (modulator at ``lr``; base at ``backbone_lr`` when ``finetune_backbone``,
    else frozen), cosine decay per epoch to 1 % over the budget (epochs or ``max_minutes``,
    whichever is further), gradient-norm clipping. The validation loss is the same CRPS of
    :meth:`PerturbedPotential.predict` (fixed ``eval_seed`` noise); the best weights are kept,
    among trained epochs. The zero-initialised start (the base itself, zero spread) is
    measured but never returned: a wrapper without spread says nothing about trust; when no
    trained epoch beats its CRPS, the log and ``fit_report["worse_than_start"]`` say so. Without
    ``max_minutes`` a run is deterministic for a ``seed``.

    ``base`` is copied, never changed. To train a probabilistic model from scratch, train a
    base with trustpot's ordinary trainer (``trustpot train``), then call this function with
    ``finetune_backbone=True``.

    Args:
        run_dir: folder of the run (``metrics.csv``, ``best.ckpt``, ``last.ckpt``); a run
            killed there is resumed by calling again with the same options (other options:
            ConfigError). ``None``: a temporary folder.
        ema_decay: EMA of the weights (0: off, the default, as the run is short and the
            best epoch is selected by validation anyway).

    Returns:
        the wrapper in eval mode; ``fit_report`` holds ``epochs``, ``seconds``, ``best_epoch``
        (0: the start), ``val_energy_crps`` (eV/atom), ``val_forces_crps`` (eV/Å), their values
        before training, ``val_forces_mae`` and ``base_val_forces_mae`` (eV/Å).

    Raises:
        ConfigError: bad options. DataError: unknown elements. TrainingError: the loss is NaN.
    """
    from trustpot.config import TrainConfig
    from trustpot.train.distributed import init_distributed
    from trustpot.train.trainer import Objective, ParamGroup, Trainer

    if n_samples_train < 2 or epochs < 1 or batch_size < 1:
        raise ConfigError("fit_perturbation needs n_samples_train >= 2, epochs >= 1, batch >= 1")
    if not train or not valid:
        raise ConfigError("fit_perturbation needs training and validation structures")
    check_species(list(train), base.species, "training data")
    check_species(list(valid), base.species, "validation data")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PerturbedPotential(
            copy.deepcopy(base), noise_dim, None, n_samples, eval_seed, finetune_backbone
        )
    train_ds = GraphDataset(train, base.neighbor_lists(), base.dtype, "training data")
    valid_ds = GraphDataset(valid, base.neighbor_lists(), base.dtype, "validation data")
    scale = force_rms(list(train))  # the loss unit, eV/Å, as trustpot finetune uses
    options = dict(
        n_samples_train=n_samples_train, epochs=epochs, max_minutes=max_minutes, lr=lr,
        backbone_lr=backbone_lr, finetune_backbone=finetune_backbone, batch_size=batch_size,
        energy_weight=energy_weight, forces_weight=forces_weight, noise_dim=noise_dim, seed=seed,
        n_samples=n_samples, eval_seed=eval_seed, clip_grad=clip_grad, ema_decay=ema_decay,
        n_train=len(train_ds), n_valid=len(valid_ds),
    )  # fmt: skip
    cfg = TrainConfig(
        epochs=epochs, max_minutes=max_minutes, batch_size=batch_size, lr=lr, min_lr=0.01 * lr,
        schedule="cosine", warmup_epochs=0, ema_decay=ema_decay, clip_grad=clip_grad, seed=seed,
    )  # fmt: skip
    loss = _SampleCRPS(n_samples_train, seed + 1, energy_weight, forces_weight, scale)
    groups = [
        ParamGroup(list(model.modulator.parameters()), lr, name="modulator"),
        ParamGroup(list(model.base.parameters()), backbone_lr, not finetune_backbone, 0.0, "base"),
    ]

    def train_mode(m: nn.Module) -> None:
        m.eval()  # the base stays in eval mode: no dropout noise
        assert isinstance(m, PerturbedPotential)
        m.modulator.train()

    def on_epoch(trainer: Trainer, row: dict[str, Any]) -> None:
        start = trainer.user_state.get("start_metrics")
        if trainer.epoch == 1 and start is not None:
            e, f, mae = start["val_energy_crps"], start["val_forces_crps"], start["val_forces_mae"]
            log(
                f"perturb: start val CRPS energy {e:.4g} eV/atom, forces {f:.4g} eV/Å "
                f"(base force MAE {mae:.4g})"
            )
        log(
            f"perturb epoch {trainer.epoch}: train loss {row['train_loss']:.4g}, val CRPS energy "
            f"{row['val_energy_crps']:.4g} eV/atom, forces {row['val_forces_crps']:.4g} eV/Å"
        )

    trainer = Trainer(
        model,
        [Objective("crps", "main", loss=loss)],
        cfg,
        init_distributed(),
        run_config=options,
        param_groups=groups,
        payload_fn=state_payload("perturbation_fit"),
        train_mode=train_mode,
        amsgrad=False,
        on_epoch=on_epoch,
        validate_start=True,
        start_is_candidate=False,  # zero spread is no uncertainty: always a trained epoch
        progress=progress,
        desc="perturb",
    )
    with run_folder(run_dir) as folder, torch.random.fork_rng(devices=[]):
        if trainer.resume(folder):
            log(f"perturb: resuming {folder} at epoch {trainer.epoch}")
        result = trainer.fit({"main": train_ds}, {"main": valid_ds}, folder, log=lambda _: None)
        model.load_state_dict(best_weights(trainer, folder))
        start = trainer.user_state["start_metrics"]
    if result.stopped_by == "budget":
        log(f"perturb: wall-clock budget of {max_minutes} min reached")
    for p in model.parameters():
        p.requires_grad_(True)
    best = result.best_metrics
    worse = best["val_loss"] > start["val_loss"]
    if worse:
        log(
            f"perturb: the trained perturbations have a higher validation loss than none "
            f"({best['val_loss']:.4g} vs {start['val_loss']:.4g}; energy CRPS "
            f"{best['val_energy_crps']:.3g} vs {start['val_energy_crps']:.3g} eV/atom, forces "
            f"{best['val_forces_crps']:.3g} vs {start['val_forces_crps']:.3g} eV/Å): train "
            "longer, or validate on frames the base did not train on"
        )
    model.fit_report = {
        "worse_than_start": worse,
        "epochs": result.epochs,
        "seconds": round(time.perf_counter() - t0, 3),
        "best_epoch": result.best_epoch + 1,
        "val_energy_crps": best["val_energy_crps"],
        "val_forces_crps": best["val_forces_crps"],
        "val_forces_mae": best["val_forces_mae"],
        "initial_val_energy_crps": start["val_energy_crps"],
        "initial_val_forces_crps": start["val_forces_crps"],
        "base_val_forces_mae": start["val_forces_mae"],
        "n_train": len(train_ds),
        "n_valid": len(valid_ds),
        "n_samples_train": n_samples_train,
        "finetune_backbone": finetune_backbone,
        "stopped_by": "time" if result.stopped_by == "budget" else result.stopped_by,
    }
    return model.eval()
