"""The training loop: several objectives, AdamW, schedules, EMA, budget, atomic checkpoints.

One epoch is one pass over the first objective's training set; other objectives (replay
data, auxiliary tasks) contribute one batch each per step, cycling through their sets. With
``torchrun`` every rank takes a slice of each global batch and gradients are summed, which
reproduces the single-process step up to floating-point rounding.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trustpot import keys as K
from trustpot.config import TrainConfig
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import Graph, to_device
from trustpot.errors import TrustpotError
from trustpot.io.checkpoint import read_checkpoint, save_checkpoint
from trustpot.models.potential import Potential
from trustpot.train.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    sync_gradients,
)
from trustpot.train.ema import EMA
from trustpot.train.losses import LossWeights, combine, loss_sums, required_outputs
from trustpot.train.schedule import Schedule


class TrainingError(TrustpotError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass(frozen=True)
class Objective:
    """A loss on one dataset.

    Attributes:
        name: shown in logs and ``metrics.csv`` column prefixes.
        dataset: key of the training and validation datasets it uses.
        weights: weights of its energy, force and stress terms.
        weight: weight of the whole objective in the total loss.
    """

    name: str
    dataset: str
    weights: LossWeights = field(default_factory=LossWeights)
    weight: float = 1.0


@dataclass
class TrainResult:
    """What a finished run reports."""

    epochs: int
    best_epoch: int
    best_val_loss: float
    elapsed_s: float
    stopped_by: str
    best_metrics: dict[str, float]


def _seed_for(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


class Trainer:
    """Fits a potential.

    Args:
        model: the potential (trained in place).
        objectives: losses; the first defines an epoch.
        cfg: training options.
        dist: rank and world size (single process by default).
        extra_payload: called at each checkpoint; its dict is stored under ``extra``.
    """

    def __init__(
        self,
        model: Potential,
        objectives: Sequence[Objective],
        cfg: TrainConfig,
        dist: DistInfo | None = None,
        extra_payload: Callable[[], dict[str, Any]] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        if not objectives:
            raise TrainingError("at least one objective is needed")
        self.model = model
        self.objectives = list(objectives)
        self.cfg = cfg
        self.dist = dist or DistInfo()
        self.extra_payload = extra_payload
        self.run_config = run_config or {}
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True
        )
        self.schedule = Schedule(
            cfg.schedule, cfg.lr, cfg.min_lr, cfg.lr_factor, cfg.lr_patience, cfg.warmup_epochs
        )
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.eval_model = copy.deepcopy(model)
        self.epoch = 0
        self.step = 0
        self.elapsed = 0.0
        self.best_val = math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.bad_epochs = 0
        self.scale = float(model.energy_scale)
        self.device = next(model.parameters()).device

    # -- state ------------------------------------------------------------------------------
    def inference_state(self) -> dict[str, torch.Tensor]:
        """Weights used for evaluation: the EMA shadow when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.model.state_dict()

    def training_state(self) -> dict[str, Any]:
        return {
            "raw_model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": dict(self.schedule.state),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "elapsed": self.elapsed,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_metrics": dict(self.best_metrics),
            "config": self.run_config,
        }

    def load_training_state(self, path: Path) -> None:
        """Continue from ``last.ckpt`` written by an earlier (possibly killed) run."""
        data = read_checkpoint(path)
        state = data.get("training")
        if not isinstance(state, dict):
            raise TrainingError(f"{path}: holds no training state to resume from")
        self.model.load_state_dict(state["raw_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.state = dict(state["schedule"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.best_val = float(state["best_val"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.best_metrics = {k: float(v) for k, v in state["best_metrics"].items()}

    def _payload(self, with_training: bool) -> dict[str, Any]:
        payload = self.model.payload(self.inference_state())  # each model knows its kind
        if with_training:
            payload["training"] = self.training_state()
        if self.extra_payload is not None:
            payload["extra"] = self.extra_payload()
        return payload

    # -- loop ---------------------------------------------------------------------------------
    def _batches(self, ds: GraphDataset, epoch: int) -> Iterator[tuple[Graph | None, int]]:
        return ds.batches(
            self.cfg.batch_size,
            shuffle=True,
            seed=_seed_for(self.cfg.seed, epoch),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def _cycle(self, ds: GraphDataset, epoch: int) -> Iterator[tuple[Graph | None, int]]:
        round_ = 0
        while True:
            yield from self._batches(ds, epoch * 1000 + round_)
            round_ += 1

    def _objective_loss(self, obj: Objective, batch: Graph | None) -> torch.Tensor:
        if batch is not None:
            batch = to_device(batch, self.device)
        has_stress = batch is not None and bool((batch[K.STRESS_WEIGHT] > 0).any())
        has_stress_t = all_reduce_sum(torch.tensor([float(has_stress)]), self.dist)
        outputs = required_outputs(obj.weights, bool(has_stress_t.item() > 0))
        if batch is None:
            # a rank with no structures in this step still joins the reductions with zeros
            w = obj.weights
            n_terms = (w.energy > 0) + (w.forces > 0) + (w.stress > 0 and K.STRESS in outputs)
            all_reduce_sum(torch.zeros(n_terms), self.dist)
            return sum(p.sum() * 0.0 for p in self.model.parameters())  # type: ignore[return-value]
        pred = self.model(batch, outputs, create_graph=True)
        sums, counts = loss_sums(pred, batch, obj.weights, self.scale)
        names = list(counts)
        total_counts = all_reduce_sum(
            torch.stack([counts[n].double() for n in names]).float(), self.dist
        )
        counts = {n: total_counts[k] for k, n in enumerate(names)}
        return obj.weight * combine(sums, counts, obj.weights)

    def _progress(self) -> float:
        by_epoch = self.epoch / self.cfg.epochs
        by_time = self.elapsed / (60 * self.cfg.max_minutes) if self.cfg.max_minutes > 0 else 0.0
        return max(by_epoch, by_time)

    def _out_of_time(self) -> bool:
        return self.cfg.max_minutes > 0 and self.elapsed >= 60 * self.cfg.max_minutes

    def _budget_spent(self) -> bool:
        """Budget check that all ranks agree on (they must stop at the same step)."""
        if not self.dist.active:
            return self._out_of_time()
        self.elapsed = float(all_reduce_max(torch.tensor([self.elapsed]), self.dist).item())
        return self._out_of_time()

    def train_step(self, batches: Sequence[Graph | None]) -> float:
        """One optimiser step on one batch per objective (in ``self.objectives`` order).

        Returns the loss summed over processes. A rank may pass ``None`` for an objective
        whose slice of the global batch is empty.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(
            (self._objective_loss(obj, b) for obj, b in zip(self.objectives, batches)),
            start=torch.zeros(()),
        )
        loss.backward()
        sync_gradients(self.model, self.dist)
        global_loss = float(all_reduce_sum(loss.detach().reshape(1), self.dist).item())
        if not math.isfinite(global_loss):
            raise TrainingError(
                f"loss became {global_loss} at epoch {self.epoch}, step {self.step}; "
                "lower train.lr or check the data (trustpot data stats)"
            )
        if self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return global_loss

    def train_epoch(self, train: Mapping[str, GraphDataset]) -> float:
        """One pass over the first objective's data; returns the mean training loss."""
        self.model.train()
        torch.manual_seed(_seed_for(self.cfg.seed + 17, self.epoch))
        lr = self.schedule.rate(self.epoch, self._progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first, *others = self.objectives
        other_iters = [self._cycle(train[o.dataset], self.epoch) for o in others]
        loss_sum, n_steps = 0.0, 0
        t0 = time.perf_counter()
        start_elapsed = self.elapsed
        for batch, _ in self._batches(train[first.dataset], self.epoch):
            extra = [next(it)[0] for it in other_iters]
            loss_sum += self.train_step([batch, *extra])
            n_steps += 1
            self.elapsed = start_elapsed + time.perf_counter() - t0
            if self._budget_spent():
                break
        return loss_sum / max(n_steps, 1)

    def validate(self, val: Mapping[str, GraphDataset]) -> dict[str, float]:
        """Metrics of the inference weights on every objective's validation set."""
        self.eval_model.load_state_dict(self.inference_state())
        self.eval_model.eval()
        metrics: dict[str, float] = {}
        total = 0.0
        for obj in self.objectives:
            ds = val.get(obj.dataset)
            if ds is None:
                continue
            sums = torch.zeros(6, dtype=torch.float64)
            for batch, _ in ds.batches(
                4 * self.cfg.batch_size, rank=self.dist.rank, world_size=self.dist.world_size
            ):
                if batch is None:
                    continue
                batch = to_device(batch, self.device)
                pred = self.eval_model(batch, {K.ENERGY, K.FORCES}, create_graph=False)
                ew = batch[K.ENERGY_WEIGHT].double()
                de = (pred[K.ENERGY].detach() - batch[K.ENERGY]) / batch[K.N_ATOMS]
                fw = batch[K.FORCES_WEIGHT][batch[K.BATCH]].double().unsqueeze(-1)
                df = (pred[K.FORCES].detach() - batch[K.FORCES]).double()
                sums += torch.stack(
                    [
                        (de.abs() * ew).sum(),
                        (de**2 * ew).sum(),
                        ew.sum(),
                        (df.abs() * fw).sum(),
                        (df**2 * fw).sum(),
                        fw.sum() * 3,
                    ]
                ).cpu()
            sums = all_reduce_sum(sums, self.dist)
            e_n, f_n = max(float(sums[2]), 1.0), max(float(sums[5]), 1.0)
            prefix = "" if len(self.objectives) == 1 else f"{obj.name}_"
            m = {
                f"{prefix}val_energy_mae_per_atom": float(sums[0]) / e_n,
                f"{prefix}val_energy_rmse_per_atom": math.sqrt(float(sums[1]) / e_n),
                f"{prefix}val_forces_mae": float(sums[3]) / f_n,
                f"{prefix}val_forces_rmse": math.sqrt(float(sums[4]) / f_n),
            }
            metrics.update(m)
            w = obj.weights
            total += obj.weight * (
                w.energy * float(sums[1]) / e_n / self.scale**2
                + w.forces * float(sums[4]) / f_n / self.scale**2
            )
        metrics["val_loss"] = total
        return metrics

    def fit(
        self,
        train: Mapping[str, GraphDataset],
        val: Mapping[str, GraphDataset],
        run_dir: Path,
        log: Callable[[str], None] = print,
    ) -> TrainResult:
        """Train until epochs, budget or patience run out; writes checkpoints and metrics."""
        run_dir = Path(run_dir)
        main = self.dist.is_main
        metrics_path = run_dir / "metrics.csv"
        stopped_by = "epochs"
        bar = tqdm(
            total=self.cfg.epochs,
            initial=self.epoch,
            desc="train",
            unit="epoch",
            disable=not main,
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        writer_fields: list[str] | None = None
        if main and metrics_path.exists():
            _drop_rows_from(metrics_path, self.epoch)
        if self.epoch >= self.cfg.epochs:
            stopped_by = "epochs"
        elif self._out_of_time():
            stopped_by = "budget"
        while self.epoch < self.cfg.epochs and not self._out_of_time():
            t_epoch = time.perf_counter()
            base_elapsed = self.elapsed
            train_loss = self.train_epoch(train)
            val_metrics = self.validate(val)
            self.elapsed = base_elapsed + time.perf_counter() - t_epoch
            self._budget_spent()
            self.schedule.observe(val_metrics["val_loss"])
            row = {
                "epoch": self.epoch,
                "step": self.step,
                "elapsed_s": round(self.elapsed, 2),
                "epoch_s": round(time.perf_counter() - t_epoch, 3),
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                **val_metrics,
            }
            improved = val_metrics["val_loss"] < self.best_val
            if improved:
                self.best_val = val_metrics["val_loss"]
                self.best_epoch = self.epoch
                self.best_metrics = dict(val_metrics)
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            self.epoch += 1
            if main:
                new_file = not metrics_path.exists()
                with open(metrics_path, "a", newline="") as handle:
                    if writer_fields is None:
                        writer_fields = list(row)
                    writer = csv.DictWriter(handle, fieldnames=writer_fields, extrasaction="ignore")
                    if new_file:
                        writer.writeheader()
                    writer.writerow(row)
                if improved:
                    save_checkpoint(self._payload(with_training=False), run_dir / "best.ckpt")
                if self.epoch % self.cfg.checkpoint_every == 0 or self._out_of_time():
                    save_checkpoint(self._payload(with_training=True), run_dir / "last.ckpt")
                fmae = val_metrics.get("val_forces_mae", float("nan"))
                bar.set_postfix(
                    loss=f"{train_loss:.3g}", val_F_mae=f"{fmae:.4f}", lr=f"{row['lr']:.2g}"
                )
                bar.update(1)
            barrier(self.dist)
            if self.cfg.patience > 0 and self.bad_epochs >= self.cfg.patience:
                stopped_by = "patience"
                break
            if self._out_of_time():
                stopped_by = "budget"
        bar.close()
        if main:
            save_checkpoint(self._payload(with_training=True), run_dir / "last.ckpt")
            log(
                f"stopped by {stopped_by} after {self.epoch} epochs, {self.elapsed / 60:.1f} min; "
                f"best epoch {self.best_epoch}: "
                + ", ".join(f"{k}={v:.5g}" for k, v in self.best_metrics.items())
            )
        barrier(self.dist)
        return TrainResult(
            epochs=self.epoch,
            best_epoch=self.best_epoch,
            best_val_loss=self.best_val,
            elapsed_s=self.elapsed,
            stopped_by=stopped_by,
            best_metrics=self.best_metrics,
        )


def _drop_rows_from(path: Path, epoch: int) -> None:
    """Remove ``metrics.csv`` rows of epochs >= ``epoch`` (written after the last checkpoint
    of a killed run, and about to be redone)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if r and int(r[0]) < epoch]
    if len(kept) == len(body):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *kept])
    tmp.replace(path)
