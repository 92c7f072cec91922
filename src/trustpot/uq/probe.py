"""PROBE: Post-hoc Reliability frOm Backbone Embeddings.

A small classifier reads the frozen per-atom features of a trained potential (every
interaction layer, plus a one-hot of the element) and predicts the log-odds that the
structure's force MAE exceeds a tolerance. Per-atom MLP -> self-attention over the atoms of
each structure -> attention pooling (whose weights are the per-atom importance) -> MLP -> logit.

The classifier is fitted on labelled data the potential did not train on (:func:`fit_probe`),
then calibrated by temperature scaling on a held-out part of that data. Energies and forces are
the base potential's, computed in the same forward pass as the embedding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph, collate, structure_to_graph, to_device
from trustpot.data.structures import Structure, check_species
from trustpot.errors import CheckpointError, ConfigError
from trustpot.metrics.uncertainty import auroc
from trustpot.models.base import Embedding
from trustpot.models.contract import Model
from trustpot.models.potential import SUPPORTED_OUTPUTS
from trustpot.nn import MLP, scatter_sum
from trustpot.uq.base import Recalibration, UQModel, base_from_payload, wrapper_extra
from trustpot.uq.manifold import EmbeddingDistance, load_reference, off_manifold_factor

#: Fewest labelled structures :func:`fit_probe` accepts.
MIN_STRUCTURES = 10


@dataclass(frozen=True)
class ProbeHypers:
    """Hyper-parameters of the PROBE classifier (stored in the checkpoint).

    Attributes:
        width: hidden width d of the per-atom MLP, the attention and the pooling.
        heads: attention heads (must divide ``width``).
        dropout: dropout probability during training.
        layers: indices of the backbone's interaction layers whose features are read
            (negative indices count from the last); empty means all of them.
    """

    width: int = 64
    heads: int = 4
    dropout: float = 0.1
    layers: tuple[int, ...] = ()

    def resolve(self, n_layers: int) -> list[int]:
        """Validated, non-negative layer indices for a backbone with ``n_layers`` layers."""
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ConfigError(f"PROBE width {self.width} must be a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"PROBE dropout must be in [0, 1), got {self.dropout}")
        chosen = list(self.layers) or list(range(n_layers))
        bad = [k for k in chosen if not -n_layers <= k < n_layers]
        if bad:
            raise ConfigError(f"PROBE layers {bad} out of range for a {n_layers}-layer backbone")
        return [k % n_layers for k in chosen]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeHypers:
        return cls(
            width=int(d["width"]),
            heads=int(d["heads"]),
            dropout=float(d["dropout"]),
            layers=tuple(int(k) for k in d.get("layers", ())),
        )


def _slot(batch: Tensor, n_atoms: Tensor) -> Tensor:
    """[n_atoms] position of each atom inside its structure (atoms of a graph are contiguous)."""
    start = torch.cumsum(n_atoms, 0) - n_atoms
    return torch.arange(batch.shape[0], device=batch.device) - start[batch]


class ProbeClassifier(nn.Module):
    """Per-atom features of a batch -> one "unreliable" logit per structure.

    The layer features are standardised per element (mean and std of that element's atoms in
    the fit data), so that what the classifier sees is how unusual an atom's environment is for
    its element; the element itself enters as a one-hot.

    Args:
        n_features: width of the per-atom layer features (layers x backbone width).
        n_species: number of elements the potential knows.
        hypers: width, heads, dropout.
    """

    feature_mean: Tensor  # buffers [n_species, n_features]
    feature_std: Tensor

    def __init__(self, n_features: int, n_species: int, hypers: ProbeHypers) -> None:
        super().__init__()
        d = hypers.width
        self.n_species = n_species
        self.register_buffer("feature_mean", torch.zeros(n_species, n_features))
        self.register_buffer("feature_std", torch.ones(n_species, n_features))
        self.encoder = MLP([n_features + n_species, d, d], dropout=hypers.dropout)
        self.attention = nn.MultiheadAttention(
            d, hypers.heads, dropout=hypers.dropout, batch_first=True
        )
        self.dropout = nn.Dropout(hypers.dropout)
        self.norm = nn.LayerNorm(d)
        self.score = nn.Linear(d, 1)  # the learned pooling query
        self.head = MLP([d, d, 1], dropout=hypers.dropout)

    @torch.no_grad()
    def standardise(self, x: Tensor, types: Tensor) -> None:
        """Set the per-element mean and std from features ``x`` of atoms of element ``types``."""
        count = scatter_sum(torch.ones_like(types, dtype=x.dtype), types, self.n_species)
        mean = scatter_sum(x, types, self.n_species) / count.clamp_min(1).unsqueeze(1)
        var = scatter_sum((x - mean[types]) ** 2, types, self.n_species)
        std = (var / count.clamp_min(1).unsqueeze(1)).sqrt()
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(
        self, x: Tensor, types: Tensor, batch: Tensor, n_atoms: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Logits and pooling weights.

        Args:
            x: [n_atoms, n_features] raw layer features (standardised here).
            types: [n_atoms] index of each atom's element in the species list.
            batch: [n_atoms] structure index of each atom (atoms of a structure contiguous).
            n_atoms: [n_graphs] atoms per structure.

        Returns:
            ``logit`` [n_graphs] (log-odds of "unreliable") and ``weights`` [n_atoms] (softmax
            over the atoms of each structure, summing to 1 per structure).
        """
        n_graphs, length = int(n_atoms.shape[0]), int(n_atoms.max())
        slot = _slot(batch, n_atoms)
        x = (x - self.feature_mean[types]) / self.feature_std[types]
        one_hot = nn.functional.one_hot(types, self.n_species).to(x.dtype)
        h = self.encoder(torch.cat([x, one_hot], dim=1))
        dense = h.new_zeros((n_graphs, length, h.shape[1])).index_put((batch, slot), h)
        pad = torch.ones((n_graphs, length), dtype=torch.bool, device=h.device)
        pad[batch, slot] = False
        mixed, _ = self.attention(dense, dense, dense, key_padding_mask=pad, need_weights=False)
        h = self.norm(h + self.dropout(mixed[batch, slot]))
        score = h.new_full((n_graphs, length), -math.inf).index_put(
            (batch, slot), self.score(h).squeeze(-1)
        )
        weights = torch.softmax(score, dim=1)[batch, slot]
        pooled = scatter_sum(weights.unsqueeze(-1) * h, batch, n_graphs)
        return self.head(pooled).squeeze(-1), weights


class Probe(UQModel):
    """A frozen potential plus a PROBE classifier on its embeddings.

    Args:
        base: the trained potential (its parameters are frozen here).
        hypers: classifier hyper-parameters.
        tolerance: force MAE (eV/Å) above which a structure counts as unreliable.
        temperature: T of ``reliability = 1 - sigmoid(logit / T)``.
    """

    kind: ClassVar[str] = "uq:probe"
    method: ClassVar[str] = "probe"
    provides: ClassVar[frozenset[str]] = frozenset({K.RELIABILITY, K.ATOM_IMPORTANCE})

    temperature: Tensor  # buffer, float64 scalar

    def __init__(
        self,
        base: Model,
        hypers: ProbeHypers | None = None,
        tolerance: float = float("nan"),
        temperature: float = 1.0,
    ) -> None:
        super().__init__(base)
        for p in base.parameters():
            p.requires_grad_(False)
        self.hypers = hypers or ProbeHypers()
        widths = base.embedding_widths()
        if not widths:
            raise ConfigError(f"{base.kind} returns no per-layer features for PROBE to read")
        self.layer_index = self.hypers.resolve(len(widths))
        n_features = sum(widths[k] for k in self.layer_index)
        self.classifier = ProbeClassifier(n_features, len(base.species), self.hypers)
        self.classifier.to(base.dtype)
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float64))
        #: kNN distance of the (standardised) features to the calibration atoms; with a finite
        #: ``ood_onset`` it lowers the reliability off the manifold (``off_manifold_factor``)
        self.manifold = EmbeddingDistance(n_features, len(base.species))
        self.ood_onset = math.inf
        self.tolerance = float(tolerance)
        self.recalibration.tolerance = self.tolerance
        self.fit_report: dict[str, Any] = {}

    def features(self, g: Graph, emb: Embedding) -> tuple[Tensor, Tensor]:
        """Detached layer features [n_atoms, n_features] and element index [n_atoms] of ``g``."""
        layers = emb.get("layers")
        if not layers:
            raise ConfigError(f"{self.base.kind} returns no per-layer features")
        x = torch.cat([layers[k].detach() for k in self.layer_index], dim=1)
        return x, self.base.species_index(g)

    def standardised(self, x: Tensor, types: Tensor) -> Tensor:
        """[n_atoms, F] features standardised per element by the classifier's statistics."""
        clf = self.classifier
        return (x - clf.feature_mean[types]) / clf.feature_std[types]

    @property
    def uses_manifold(self) -> bool:
        return self.manifold.is_set and math.isfinite(self.ood_onset)

    def supported_outputs(self) -> frozenset[str]:
        extra = {K.EMBEDDING_DISTANCE} if self.uses_manifold else set()
        return super().supported_outputs() | extra

    def predict(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        wanted = frozenset(outputs & SUPPORTED_OUTPUTS) | {K.ENERGY, K.FORCES}
        out, emb = self.base.outputs_and_embedding(g, wanted)
        x, types = self.features(g, emb)
        with torch.no_grad():
            logit, weights = self.classifier(x, types, g[K.BATCH], g[K.N_ATOMS])
        out[K.RELIABILITY] = torch.sigmoid(-logit.double() / self.temperature.double())
        if self.uses_manifold:
            with torch.no_grad():
                n = int(g[K.N_ATOMS].shape[0])
                distance = self.manifold(self.standardised(x, types), types, g[K.BATCH], n)
            out[K.RELIABILITY] = out[K.RELIABILITY] * off_manifold_factor(distance, self.ood_onset)
            if K.EMBEDDING_DISTANCE in outputs:
                out[K.EMBEDDING_DISTANCE] = distance
        if K.ATOM_IMPORTANCE in outputs:
            out[K.ATOM_IMPORTANCE] = weights
        return out

    def wrapper_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **self.base_fields(),
            "extra": {
                "hypers": self.hypers.to_dict(),
                "classifier": self.classifier.state_dict(),
                "temperature": float(self.temperature),
                "tolerance": self.tolerance,
                "manifold": dict(self.manifold.state_dict()),
                "ood_onset": self.ood_onset,
                "recalibration": self.recalibration.to_dict(),
                "fit_report": dict(self.fit_report),
            },
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> Probe:
        extra = wrapper_extra(data, path)
        missing = [
            k for k in ("hypers", "classifier", "temperature", "tolerance") if k not in extra
        ]
        if missing:
            raise CheckpointError(f"{path}: PROBE checkpoint lacks {missing}")
        base = base_from_payload(data, path)
        try:
            hypers = ProbeHypers.from_dict(extra["hypers"])
            temperature, tolerance = float(extra["temperature"]), float(extra["tolerance"])
            model = cls(base, hypers, tolerance, temperature)
        except (ConfigError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed PROBE settings: {err}") from None
        if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(tolerance)):
            raise CheckpointError(f"{path}: PROBE temperature/tolerance not finite and positive")
        state = extra["classifier"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: PROBE 'classifier' is not a state dict")
        try:
            model.classifier.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = " ".join(str(err).strip().splitlines()[:2])
            raise CheckpointError(f"{path}: PROBE classifier weights do not fit: {first}") from None
        for name, tensor in model.classifier.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: PROBE tensor '{name}' holds NaN or inf")
        model.recalibration = Recalibration.from_dict(extra.get("recalibration", {}))
        model.recalibration.tolerance = tolerance
        if "manifold" in extra:  # absent in files written before the off-manifold term
            load_reference(model.manifold, extra["manifold"], path)
            model.ood_onset = float(extra.get("ood_onset", math.inf))
        model.fit_report = dict(extra.get("fit_report", {}))
        return model


def binary_nll(logits: np.ndarray, positive: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of ``positive`` under ``sigmoid(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(positive, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, positive: np.ndarray, bounds: float = 10.0) -> float:
    """T in [1/bounds, bounds] minimising :func:`binary_nll`; never worse than T = 1.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search finds it.
    """
    lo, hi = -math.log(bounds), math.log(bounds)
    phi = (math.sqrt(5.0) - 1.0) / 2.0

    def f(t: float) -> float:
        return binary_nll(logits, positive, math.exp(t))

    a, b = lo + (1 - phi) * (hi - lo), lo + phi * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - phi) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = f(b)
    best = math.exp(a if fa <= fb else b)
    return best if binary_nll(logits, positive, best) <= binary_nll(logits, positive) else 1.0


def fit_manifold(
    probe: Probe, feats: Cached, train: np.ndarray, held: np.ndarray, seed: int
) -> float:
    """Set PROBE's off-manifold reference and onset; returns the onset.

    The onset is the largest distance of a held-out calibration structure to the reference of
    the training part (at least 1); the stored reference then holds every calibration atom.
    Without held-out structures the term stays off (onset ``inf``).
    """
    with torch.no_grad():
        x, types = _gather(feats, train)[:2]
        probe.manifold.set_reference(probe.standardised(x, types), types, seed=seed)
        onset = math.inf
        if len(held):
            xh, th, batch, n_atoms = _gather(feats, held)
            d = probe.manifold(probe.standardised(xh, th), th, batch, int(n_atoms.shape[0]))
            onset = max(1.0, float(d.max()))
        x, types = _gather(feats, np.arange(len(feats)))[:2]
        probe.manifold.set_reference(probe.standardised(x, types), types, seed=seed)
    probe.ood_onset = onset
    return onset


def _stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): ``fraction`` of each class held out, each class kept in both."""
    train, held = [], []
    for value in (False, True):
        idx = rng.permutation(np.flatnonzero(labels == value))
        k = 0
        if fraction > 0 and len(idx) >= 2:
            k = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


Cached = list[tuple[Tensor, Tensor]]  # per structure: layer features, element index


def _gather(
    cache: Cached, idx: Sequence[int] | np.ndarray
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Classifier inputs of structures ``idx``: features, types, ``batch``, ``n_atoms``."""
    parts = [cache[int(i)] for i in idx]
    device = parts[0][0].device
    n = torch.tensor([p[1].shape[0] for p in parts], device=device)
    batch = torch.repeat_interleave(torch.arange(len(parts), device=device), n)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), batch, n


@torch.no_grad()
def _all_logits(clf: ProbeClassifier, cache: Cached, idx: np.ndarray, bs: int) -> Tensor:
    clf.eval()
    chunks = [clf(*_gather(cache, idx[s : s + bs]))[0] for s in range(0, len(idx), bs)]
    return torch.cat(chunks).double() if chunks else torch.zeros(0, dtype=torch.float64)


def _errors_and_features(
    probe: Probe, structures: list[Structure], batch_size: int, device: torch.device
) -> tuple[np.ndarray, Cached]:
    """Force MAE [n] (eV/Å) of the base potential and the classifier inputs of each structure."""
    errors: list[Tensor] = []
    cache: Cached = []
    specs = probe.neighbor_lists()
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        graphs = [structure_to_graph(s, specs, probe.dtype) for s in chunk]
        g = to_device(collate(graphs), device)
        out, emb = probe.base.outputs_and_embedding(g, frozenset({K.ENERGY, K.FORCES}))
        diff = (out[K.FORCES] - g[K.FORCES]).abs().double().sum(-1)
        errors.append(scatter_sum(diff, g[K.BATCH], len(chunk)) / (3 * g[K.N_ATOMS]))
        x, types = probe.features(g, emb)
        sizes = g[K.N_ATOMS].tolist()
        cache.extend(zip(torch.split(x, sizes), torch.split(types, sizes), strict=True))
    return torch.cat(errors).cpu().numpy(), cache


def fit_probe(
    base: Model,
    structures: Sequence[Structure],
    *,
    tolerance: float | None = None,
    top_fraction: float = 0.2,
    hypers: ProbeHypers | None = None,
    epochs: int = 200,
    max_minutes: float = 0.0,
    lr: float = 1e-3,
    batch_size: int = 16,
    temperature_fraction: float = 0.25,
    seed: int = 0,
    log: Callable[[str], None] = print,
    source: str = "calibration data",
    run_dir: str | Path | None = None,
    ema_decay: float = 0.0,
    errors: Sequence[float] | np.ndarray | None = None,
) -> Probe:
    """Fit a PROBE classifier on labelled structures the base potential did not train on.

    A structure is unreliable when its force MAE (mean |F_pred - F_ref| over atoms and
    components, eV/Å) exceeds ``tolerance`` (default: the ``1 - top_fraction`` quantile of the
    errors). ``temperature_fraction`` of the structures (stratified, seeded) are held out: they
    select the best epoch (by the weighted BCE) and fit the temperature. Training uses
    class-balanced BCE; the ``log(pos_weight)`` offset it adds to the logits is removed from the
    output bias afterwards, so that probabilities refer to the true class frequencies.

    Training runs on :class:`trustpot.train.trainer.Trainer` (a :class:`BCELoss` objective on
    the cached per-atom features, AdamW at a constant ``lr``, weight decay 0.01); the
    validation loss is the same weighted BCE on the held-out structures.

    Args:
        epochs: most epochs; ``max_minutes`` (> 0) also stops training on wall-clock time.
        run_dir: folder of the classifier's run (``metrics.csv``, ``best.ckpt``,
            ``last.ckpt``); a run killed there resumes when called again with the same
            options (other options: ConfigError). ``None``: a temporary folder.
        ema_decay: EMA of the classifier weights; 0 (off) by default: the classifier is tiny,
            trains in seconds and its best epoch is chosen on held-out data.
        errors: [n_structures] force MAE (eV/Å) to learn instead of the base's own error on
            ``structures``: the out-of-fold errors of models trained like the base
            (:func:`trustpot.uq.calibration.out_of_fold`) make every training frame a
            labelled example without holding frames out of the base's training.

    Raises:
        ConfigError: fewer than :data:`MIN_STRUCTURES` structures, missing force labels,
            invalid options, or a tolerance that leaves only one class.
    """
    from trustpot.config import TrainConfig
    from trustpot.train.datasets import ItemDataset
    from trustpot.train.distributed import init_distributed
    from trustpot.train.objectives import BCELoss
    from trustpot.train.run_folder import best_weights, run_folder, state_payload
    from trustpot.train.trainer import Objective, Trainer

    structures = list(structures)
    if len(structures) < MIN_STRUCTURES:
        raise ConfigError(
            f"{source}: PROBE needs at least {MIN_STRUCTURES} labelled structures, "
            f"got {len(structures)}"
        )
    unlabelled = [k for k, s in enumerate(structures) if s.forces is None]
    if unlabelled:
        raise ConfigError(
            f"{source}: PROBE needs force labels; {len(unlabelled)} structure(s) have none "
            f"(first: frame {unlabelled[0]})"
        )
    if epochs < 1 or batch_size < 1 or not 0.0 <= temperature_fraction < 1.0:
        raise ConfigError(
            "PROBE needs epochs >= 1, batch_size >= 1, temperature_fraction in [0, 1)"
        )
    if tolerance is None and not 0.0 < top_fraction < 1.0:
        raise ConfigError(f"top_fraction must be in (0, 1), got {top_fraction}")
    check_species(structures, base.species, source)
    t0 = time.perf_counter()
    device = next(base.parameters()).device
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        probe = Probe(base, hypers).to(device).eval()
        error, feats = _errors_and_features(probe, structures, batch_size, device)
        if errors is not None:  # e.g. out-of-fold errors of models like the base
            error = np.asarray(errors, dtype=np.float64)
            if error.shape != (len(structures),) or not np.all(np.isfinite(error)):
                raise ConfigError(
                    f"{source}: errors must be {len(structures)} finite force MAEs (eV/Å), "
                    f"got shape {error.shape}"
                )
        tol = float(np.quantile(error, 1 - top_fraction) if tolerance is None else tolerance)
        labels = error > tol
        n_pos = int(labels.sum())
        if n_pos in (0, len(labels)):
            side = "above" if n_pos else "at or below"
            raise ConfigError(
                f"{source}: all {len(labels)} structures have force MAE {side} the tolerance "
                f"{tol:.4g} eV/Å (range {error.min():.4g}-{error.max():.4g}); PROBE needs both "
                "reliable and unreliable examples: choose another tolerance or top_fraction"
            )
        train, held = _stratified_split(labels, temperature_fraction, rng)
        y = torch.as_tensor(labels, dtype=probe.dtype, device=device)
        clf = probe.classifier
        clf.standardise(*_gather(feats, train)[:2])
        pos_weight = float((~labels[train]).sum()) / float(labels[train].sum())
        select = held if len(held) else train

        def collate(idx: list[int]) -> tuple[tuple[Tensor, ...], Tensor]:
            return _gather(feats, idx), y[torch.as_tensor(idx, device=device)]

        loss = BCELoss(lambda m, b: (m(*b[0])[0], b[1]), pos_weight)
        cfg = TrainConfig(
            epochs=epochs, max_minutes=max_minutes, batch_size=batch_size, lr=lr, min_lr=lr,
            weight_decay=0.01, schedule="plateau", lr_patience=10**9, ema_decay=ema_decay,
            clip_grad=0.0, seed=seed,
        )  # fmt: skip
        options = dict(
            epochs=epochs, max_minutes=max_minutes, lr=lr, batch_size=batch_size, seed=seed,
            ema_decay=ema_decay, tolerance=tol, n_pos=n_pos, n_structures=len(labels),
            temperature_fraction=temperature_fraction, hypers=probe.hypers.to_dict(),
        )  # fmt: skip
        trainer = Trainer(
            clf,
            [Objective("bce", "main", loss=loss)],
            cfg,
            init_distributed(),
            run_config=options,
            payload_fn=state_payload("probe_fit"),
            amsgrad=False,
            desc="probe",
        )
        with run_folder(run_dir) as folder:
            if trainer.resume(folder):
                log(f"PROBE: resuming {folder} at epoch {trainer.epoch}")
            result = trainer.fit(
                {"main": ItemDataset([int(i) for i in train], collate, "PROBE training set")},
                {"main": ItemDataset([int(i) for i in select], collate, "PROBE held-out set")},
                folder,
                log=lambda _: None,
            )
            best_state = best_weights(trainer, folder)
        epoch, best_epoch = result.epochs, result.best_epoch + 1
        stopped_by = "time" if result.stopped_by == "budget" else result.stopped_by
        clf.load_state_dict(best_state)
        last = clf.head[-1]
        assert isinstance(last, nn.Linear), "the classifier head ends with a linear layer"
        with torch.no_grad():
            last.bias.sub_(math.log(pos_weight))
        clf.eval()
        held_logits = _all_logits(clf, feats, held, batch_size).cpu().numpy()
        train_logits = _all_logits(clf, feats, train, batch_size).cpu().numpy()
    both_held = len(held) > 0 and 0 < labels[held].sum() < len(held)
    temperature = fit_temperature(held_logits, labels[held]) if both_held else 1.0
    probe.temperature.fill_(temperature)
    onset = fit_manifold(probe, feats, train, held, seed)
    probe.tolerance = tol
    probe.recalibration = Recalibration(
        tolerance=tol, fitted_on=f"{source} ({len(labels)} structures)"
    )
    nan = float("nan")
    report: dict[str, Any] = {
        "source": source,
        "n_structures": len(labels),
        "tolerance": tol,
        "n_pos": n_pos,
        "n_neg": len(labels) - n_pos,
        "n_train": len(train),
        "n_heldout": len(held),
        "train_auroc": auroc(train_logits, labels[train]),
        "val_auroc": auroc(held_logits, labels[held]) if both_held else nan,
        "temperature": temperature,
        "prior_shift": math.log(pos_weight),
        "heldout_nll_before": binary_nll(held_logits, labels[held]) if len(held) else nan,
        "heldout_nll_after": (
            binary_nll(held_logits, labels[held], temperature) if len(held) else nan
        ),
        "ood_onset": onset,
        "manifold_atoms": int(probe.manifold.points.shape[0]),
        "epochs": epoch,
        "best_epoch": best_epoch,
        "stopped_by": stopped_by,
        "seconds": time.perf_counter() - t0,
        "hypers": probe.hypers.to_dict(),
    }
    probe.fit_report = report
    log(
        f"PROBE on {source}: tolerance {tol:.4g} eV/Å, {n_pos}/{len(labels)} unreliable, "
        f"AUROC train {report['train_auroc']:.3f} held-out {report['val_auroc']:.3f}, "
        f"T {temperature:.3g}, best epoch {best_epoch}/{epoch} ({report['seconds']:.1f} s)"
    )
    return probe
