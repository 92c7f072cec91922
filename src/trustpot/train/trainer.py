"""The training loop: several objectives, AdamW, schedules, EMA, budget, atomic checkpoints.

Every optimiser loop of trustpot runs here: force fields (``trustpot train``), perturbation
fine-tuning, PROBE classifiers, the scale router and scalar scale fits. What differs between
them is the model, its :class:`Objective` losses (:mod:`trustpot.train.objectives`), its
parameter groups and its checkpoint payload; the loop, the schedule, EMA, the wall-clock
budget, ``best.ckpt`` / ``last.ckpt`` and bit-identical resume are shared.

One epoch is one pass over the first objective's training set; other objectives (replay
data, auxiliary tasks) contribute one batch each per step, cycling through their sets. With
``torchrun`` every rank takes a slice of each global batch and gradients are summed, which
reproduces the single-process step up to floating-point rounding.

The validation loss is the training loss: every objective's own loss on its validation set,
with the inference weights in eval mode and no ``create_graph``, weighted as in training.
Without any validation set the last epoch counts as the best one.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from trustpot.config import TrainConfig
from trustpot.errors import ConfigError, TrainingError
from trustpot.io.checkpoint import read_checkpoint
from trustpot.train.auto_compile import AutoCompile, Decision
from trustpot.train.datasets import TrainerDataset, move_batch
from trustpot.train.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    sync_gradients,
)
from trustpot.train.ema import EMA
from trustpot.train.epoch_order import EpochOrder, seed_for
from trustpot.train.metrics_log import MetricsLog, budget_bar
from trustpot.train.objectives import (
    Objective,
    ObjectiveLoss,
    ParamGroup,
    TrainResult,
    resolve_param_groups,
)
from trustpot.train.schedule import Schedule
from trustpot.train.static_step import StaticStep, plan_static_step
from trustpot.train.trainer_state import restore_state, state_of, write_checkpoints
from trustpot.train.validation import validation_totals

# Objective, ParamGroup and TrainResult live in trustpot.train.objectives; they are
# re-exported here, next to the loop that uses them.
__all__ = [
    "EpochHook",
    "Objective",
    "ParamGroup",
    "TrainResult",
    "Trainer",
    "TrainingError",
]


EpochHook = Callable[["Trainer", dict[str, Any]], "str | None"]


def _zero_loss(model: nn.Module) -> Tensor:
    """A zero that depends on every trainable parameter (a rank without data this step)."""
    return sum(
        (p.sum() * 0.0 for p in model.parameters() if p.requires_grad), start=torch.zeros(())
    )


class Trainer:
    """Fits a model with one or more objectives.

    Args:
        model: the model (trained in place); a potential unless every objective has its own
            loss kind and ``payload_fn`` is given.
        objectives: losses; the first defines an epoch.
        cfg: training options (epochs, budget, lr, schedule, EMA, seed, ...).
        dist: rank and world size (single process by default).
        extra_payload: called at each checkpoint; its dict is stored under ``extra``.
        run_config: stored with the training state; :meth:`resume` refuses a different one.
        param_groups: AdamW groups (default: every trainable parameter at ``cfg.lr``).
        payload_fn: checkpoint fields from the inference weights (default ``model.payload``).
        train_mode: puts the model in training mode (default ``model.train()``; e.g. keep a
            frozen backbone in eval mode).
        amsgrad: AdamW's AMSGrad variant.
        on_epoch: called after every epoch with the metrics row; a non-empty string return
            stops training with that reason (must be the same on every rank).
        validate_start: validate the starting weights first (``user_state["start_metrics"]``).
        start_is_candidate: with ``validate_start``, the starting weights are the best so far
            (``best_epoch`` -1) until an epoch beats them; when false the result is always a
            trained epoch (the start is only measured).
        progress: show a progress bar.
        desc: name of the progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        objectives: Sequence[Objective],
        cfg: TrainConfig,
        dist: DistInfo | None = None,
        extra_payload: Callable[[], dict[str, Any]] | None = None,
        run_config: dict[str, Any] | None = None,
        *,
        param_groups: Sequence[ParamGroup] | None = None,
        payload_fn: Callable[[dict[str, Tensor]], dict[str, Any]] | None = None,
        train_mode: Callable[[nn.Module], Any] | None = None,
        amsgrad: bool = True,
        on_epoch: EpochHook | None = None,
        validate_start: bool = False,
        start_is_candidate: bool = True,
        progress: bool = True,
        desc: str = "train",
    ) -> None:
        if not objectives:
            raise TrainingError("at least one objective is needed")
        if cfg.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {cfg.lr}")
        if payload_fn is None and not callable(getattr(model, "payload", None)):
            raise ConfigError(f"{type(model).__name__} has no payload(); pass payload_fn")
        self.model = model
        self.objectives = list(objectives)
        self.cfg = cfg
        self.dist = dist or DistInfo()
        self.order = EpochOrder(cfg, self.dist)
        self.extra_payload = extra_payload
        self.run_config = run_config or {}
        self.payload_fn = payload_fn
        self.train_mode = train_mode or (lambda m: m.train())
        self.on_epoch = on_epoch
        self.validate_start = validate_start
        self.start_is_candidate = start_is_candidate
        self.progress = progress
        self.desc = desc
        self.param_groups = resolve_param_groups(model, param_groups)
        self.device = next(model.parameters()).device
        # a CUDA graph of the step may be used (decided in fit(), once the data is known)
        self._graph_wanted = (
            cfg.cuda_graphs != "never" and self.device.type == "cuda" and not self.dist.active
        )
        self._static: StaticStep | None = None  # a CUDA graph and/or the compiled step
        self.auto_compile = AutoCompile(cfg.compile, self.device.type, self.dist.active)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": list(g.params), "lr": self._peak(g), "weight_decay": self._wd(g)}
                for g in self.param_groups
                if not g.frozen
            ],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            amsgrad=amsgrad,
            # on CUDA one fused kernel updates every tensor (the same arithmetic as the loop);
            # capturable: the step can be recorded in a CUDA graph (tensor learning rates)
            fused=True if self.device.type == "cuda" else None,
            capturable=self._graph_wanted,
        )
        self.peaks = [self._peak(g) for g in self.param_groups if not g.frozen]
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
        self.user_state: dict[str, Any] = {}  # hooks keep what must survive a resume here
        self._best_state: dict[str, Tensor] | None = None
        self._best_dirty = False

    # -- parameter groups -------------------------------------------------------------------
    def _peak(self, group: ParamGroup) -> float:
        return float(self.cfg.lr if group.lr is None else group.lr)

    def _wd(self, group: ParamGroup) -> float:
        return float(self.cfg.weight_decay if group.weight_decay is None else group.weight_decay)

    def _set_lr(self, rate: float) -> None:
        """Every group at ``rate / cfg.lr`` of its own peak (a tensor filled in place when a
        CUDA graph may read it)."""
        factor = rate / self.cfg.lr
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            if self._graph_wanted:
                if not isinstance(group["lr"], Tensor):  # float32: all fused AdamW takes
                    group["lr"] = torch.tensor(peak * factor, device=self.device)
                group["lr"].fill_(peak * factor)
            else:
                group["lr"] = peak * factor

    def current_lr(self) -> float:
        """The first group's learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    # -- state ------------------------------------------------------------------------------
    def inference_state(self) -> dict[str, Tensor]:
        """Weights used for evaluation: the EMA shadow when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.model.state_dict()

    def best_state(self) -> dict[str, Tensor] | None:
        """Inference weights of the best epoch of this process's run (``None`` after a resume
        that has not improved yet: read ``best.ckpt`` then)."""
        return self._best_state

    def training_state(self) -> dict[str, Any]:
        """Everything a resumed run needs (:func:`trustpot.train.trainer_state.state_of`)."""
        return state_of(self)

    def load_training_state(self, path: Path) -> None:
        """Continue from ``last.ckpt`` written by an earlier (possibly killed) run."""
        restore_state(self, path)

    def resume(self, run_dir: Path) -> bool:
        """Resume from ``run_dir/last.ckpt`` if there is one; ``False`` when starting afresh.

        Raises:
            ConfigError: the saved run was made with another ``run_config`` (names the keys).
        """
        last = Path(run_dir) / "last.ckpt"
        if not last.is_file():
            return False
        saved = read_checkpoint(last).get("training", {}).get("config", {})
        from trustpot.train.reuse import config_differences

        diff = config_differences(saved, self.run_config)
        if diff:
            raise ConfigError(
                f"{run_dir}: holds a run with other settings ({', '.join(diff)} differ); "
                "use another folder or delete it"
            )
        self.load_training_state(last)
        return True

    # -- loop ---------------------------------------------------------------------------------
    def _on_device(self, ds: TrainerDataset) -> TrainerDataset:
        """``ds`` with its data kept on the training device, when it can (``ds.to(device)``,
        e.g. :meth:`~trustpot.data.dataset.GraphDataset.to`); else batches are copied there
        step by step."""
        to = getattr(ds, "to", None)
        return to(self.device) if callable(to) else ds

    def _steps(self, train: Mapping[str, TrainerDataset]) -> Iterator[Callable[[], Tensor]]:
        """This epoch's steps: each runs one and returns its loss (on the device)."""
        static = self._static
        if static is not None:  # the static-shape step, batches planned for the epoch
            plan = self.order.items(self.objectives, train, self.epoch)
            for k in range(static.start_epoch(plan)):
                yield lambda k=k: self._static_step(static, k)  # type: ignore[misc]
            return
        first, *others = self.objectives
        order = self.order
        other_iters = [order.cycle(train[o.dataset], self.epoch, order.batches) for o in others]
        for batch, _ in order.batches(train[first.dataset], self.epoch):
            batches = [batch, *(next(it)[0] for it in other_iters)]
            yield lambda batches=batches: self.train_step(batches)  # type: ignore[misc]

    def _static_step(self, static: StaticStep, step: int) -> Tensor:
        loss = static(step)
        self._finish_step()
        return loss

    def _reduce_counts(
        self, loss: ObjectiveLoss, counts: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Global counts of every term (zeros for terms this rank did not compute).

        In a single process the counts stay where they are (no device-to-host copy)."""
        names = list(loss.weights)
        if not self.dist.active:
            zero = torch.zeros((), dtype=torch.float32, device=self.device)
            return {n: counts[n].detach().float() if n in counts else zero for n in names}
        local = torch.stack(
            [
                counts[n].detach().double() if n in counts else torch.zeros((), dtype=torch.float64)
                for n in names
            ]
        ).float()
        total = all_reduce_sum(local.cpu(), self.dist)
        return {n: total[k] for k, n in enumerate(names)}

    def _step_loss(self, batches: Sequence[Any | None]) -> Tensor:
        """The step's loss: every objective's weighted loss on its batch, added in order
        (the eager and the recorded step both)."""
        return sum(
            (self._objective_loss(obj, b) for obj, b in zip(self.objectives, batches)),
            start=torch.zeros((), device=self.device),
        )

    def _objective_loss(self, obj: Objective, batch: Any | None) -> Tensor:
        loss = obj.kind
        if batch is not None:
            batch = move_batch(batch, self.device)
        loss.prepare(batch, self.dist)
        if batch is None:
            # a rank with no structures in this step still joins the reductions with zeros
            self._reduce_counts(loss, {})
            return _zero_loss(self.model)
        sums, counts = loss.sums(self.model, batch, True)
        total = self._reduce_counts(loss, counts)
        counts = {n: total[n].to(sums[n].device) for n in sums}
        return obj.weight * loss.combine(sums, counts)

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

    def _check_finite(self, value: float, steps: str) -> None:
        if not math.isfinite(value):
            raise TrainingError(
                f"{self.desc}: loss became {value} at epoch {self.epoch}, {steps}; "
                "lower the learning rate(s) or check the data (trustpot data stats)"
            )

    def _host_checks(self) -> bool:
        """Whether each step's loss is read on the host (and checked) as it is taken: on the
        CPU, or across processes (their reductions pass through the host anyway). On a single
        accelerator the losses stay there and are checked once per epoch, so that no step
        waits for the device."""
        return self.device.type == "cpu" or self.dist.active

    def train_step(self, batches: Sequence[Any | None]) -> Tensor:
        """One optimiser step on one batch per objective (in ``self.objectives`` order).

        A rank may pass ``None`` for an objective whose slice of the global batch is empty.
        Returns the loss summed over processes, 0-d: on the training device in a single
        process, where it is not read (so not waited for) unless the loss is checked on the
        host (:meth:`_host_checks`).
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._step_loss(batches)
        torch.autograd.backward(loss)
        sync_gradients(self.model, self.dist)
        if self.dist.active:
            total = all_reduce_sum(loss.detach().reshape(1).cpu(), self.dist)[0]
        else:
            total = loss.detach()
        if self._host_checks():
            self._check_finite(float(total), f"step {self.step}")
        if self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self._finish_step()
        return total

    def _finish_step(self) -> None:
        """EMA and the step count, after an eager or a graphed step."""
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

    def _static_plan(self, train: Mapping[str, TrainerDataset]) -> str:
        """Set up the static-shape step when the run asks for one (:func:`plan_static_step`);
        returns why there is none (empty when there is)."""
        self.order.choose(train, static_step=self._graph_wanted or self._compile_now)
        self._static, reason = plan_static_step(
            self.objectives, train, self._step_loss, self.model, self.optimizer, self.cfg,
            record=self._graph_wanted, distributed=self.dist.active, packed=self.order.packed,
            compile=self._compile_now,
        )  # fmt: skip
        if self._static is None and self.cfg.batching == "auto":
            self.order.packed = False  # the eager step: batches by count
        return reason

    def train_epoch(self, train: Mapping[str, TrainerDataset]) -> float:
        """One pass over the first objective's data; returns the mean training loss.

        On a single accelerator the step losses are added up there and read once, at the
        end of the epoch (a non-finite loss then stops training at the end of that epoch)."""
        self.train_mode(self.model)
        torch.manual_seed(seed_for(self.cfg.seed + 17, self.epoch))
        self._set_lr(self.schedule.rate(self.epoch, self._progress()))
        for obj in self.objectives:
            obj.kind.at_progress(self._progress())
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_steps, first_step = 0, self.step
        t0 = time.perf_counter()
        start_elapsed = self.elapsed
        for step in self._steps(train):
            loss_sum += step().to(torch.float64)
            n_steps += 1
            self.elapsed = start_elapsed + time.perf_counter() - t0
            if self._budget_spent():
                break
        mean = float(loss_sum) / max(n_steps, 1)
        self.elapsed = start_elapsed + time.perf_counter() - t0  # the device has caught up
        self._check_finite(mean, f"steps {first_step}-{self.step - 1}")
        return mean

    @property
    def _compile_now(self) -> bool:
        """The step is compiled: ``always``, or ``auto`` once it has decided to try."""
        return self.cfg.compile == "always" or self.auto_compile.state in ("trying", "on")

    def _left_s(self, epoch_s: float) -> float:
        """Seconds of training left at ``epoch_s`` per epoch (epochs or budget, the shorter)."""
        left = (self.cfg.epochs - self.epoch) * epoch_s
        return min(left, 60 * self.cfg.max_minutes - self.elapsed) if self.cfg.max_minutes else left

    def _auto_compile(
        self, decision: Decision, train: Mapping[str, TrainerDataset], log: Callable[[str], None]
    ) -> None:
        """Act on ``train.compile=auto``'s decision (:mod:`trustpot.train.auto_compile`)."""
        if decision.action:  # the decision has set the state: plan the step it asks for
            why_not = self._static_plan(train)
            if self._compile_now and self._static is None:
                decision = self.auto_compile.failed(why_not)
                self._static_plan(train)
        if decision.message and self.dist.is_main:
            log(f"{self.desc}: {decision.message}")

    def _train_epoch_or_eager(
        self, train: Mapping[str, TrainerDataset], log: Callable[[str], None]
    ) -> float:
        """:meth:`train_epoch`; where ``auto`` has just compiled the step and its first step
        fails to compile, the epoch again with the eager step (the attempt's time counts)."""
        if not self.auto_compile.first_compiled_epoch:
            return self.train_epoch(train)
        step, t0 = self.step, time.perf_counter()
        try:
            return self.train_epoch(train)
        except TrainingError as err:
            if self.step != step:  # steps ran: not a failure to compile
                raise
            self.elapsed += time.perf_counter() - t0
            self._auto_compile(self.auto_compile.failed(str(err)), train, log)
            return self.train_epoch(train)

    def validate(self, val: Mapping[str, TrainerDataset]) -> dict[str, float]:
        """Every objective's own loss (and extra metric columns) of the inference weights on
        its validation set, in eval mode; ``val_loss`` is their weighted sum."""
        self.eval_model.load_state_dict(self.inference_state())
        self.eval_model.eval()
        metrics: dict[str, float] = {}
        total = 0.0
        several = len(self.objectives) > 1
        for obj in self.objectives:
            ds = val.get(obj.dataset)
            if ds is None:
                continue
            loss = obj.kind
            names, keys = list(loss.weights), list(loss.metric_keys)
            glob = validation_totals(
                loss, self.eval_model, ds, 4 * self.cfg.batch_size, self.dist, self.device
            )
            k = len(names)
            value = sum(
                loss.weights[n] * glob[i] / max(glob[k + i], 1.0) for i, n in enumerate(names)
            )
            prefix = f"{obj.name}_" if several else ""
            if several:
                metrics[f"{prefix}val_loss"] = value
            if keys:
                totals = dict(zip(keys, glob[2 * k :]))
                metrics.update({prefix + m: v for m, v in loss.metrics(totals).items()})
            total += obj.weight * value
        metrics["val_loss"] = total
        return metrics

    def _record_best(self, val_metrics: dict[str, float], has_val: bool) -> bool:
        improved = (not has_val) or val_metrics["val_loss"] < self.best_val
        if improved:
            self.best_val = val_metrics["val_loss"] if has_val else math.nan
            self.best_epoch = self.epoch
            self.best_metrics = dict(val_metrics)
            self.bad_epochs = 0
            self._best_state = {k: v.detach().clone() for k, v in self.inference_state().items()}
            self._best_dirty = True
        else:
            self.bad_epochs += 1
        return improved

    def _bar(self) -> tqdm:
        """Progress by budget: seconds of ``max_minutes`` when set, else epochs."""
        return budget_bar(
            self.desc,
            self.cfg.max_minutes,
            self.cfg.epochs,
            self.elapsed,
            self.epoch,
            enabled=self.dist.is_main and self.progress,
        )

    def fit(
        self,
        train: Mapping[str, TrainerDataset],
        val: Mapping[str, TrainerDataset],
        run_dir: Path,
        log: Callable[[str], None] = print,
    ) -> TrainResult:
        """Train until epochs, budget, patience or ``on_epoch`` stop; writes ``best.ckpt``,
        ``last.ckpt`` (atomically) and ``metrics.csv`` in ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        main = self.dist.is_main
        train = {k: self._on_device(ds) for k, ds in train.items()}
        val = {k: self._on_device(ds) for k, ds in val.items()}
        for obj in self.objectives:
            obj.kind.bind_data([d[obj.dataset] for d in (train, val) if obj.dataset in d])
        why_not = self._static_plan(train)
        if (self._graph_wanted or self._compile_now) and main:
            static = self._static
            log(f"{self.desc}: training step " + (
                f"{static.how} ({static.atoms_per_step} atoms per step"
                + (", batches packed by size)" if self.order.packed else ")")
                if static is not None else f"not graphed: {why_not}"
            ))  # fmt: skip
        metrics = MetricsLog(run_dir / "metrics.csv")
        has_val = any(o.dataset in val for o in self.objectives)
        by_time = self.cfg.max_minutes > 0
        stopped_by = "epochs"
        if main:
            metrics.drop_from(self.epoch)
        if self.validate_start and has_val and "start_metrics" not in self.user_state:
            start = self.validate(val)
            self.user_state["start_metrics"] = dict(start)
            if self.start_is_candidate:
                self.best_val, self.best_metrics = start["val_loss"], dict(start)
                state = self.inference_state()
                self._best_state = {k: v.detach().clone() for k, v in state.items()}
                self._best_dirty = True
        bar = self._bar()
        if self.epoch >= self.cfg.epochs:
            stopped_by = "epochs"
        elif self._out_of_time():
            stopped_by = "budget"
        while self.epoch < self.cfg.epochs and not self._out_of_time():
            t_epoch = time.perf_counter()
            base_elapsed = self.elapsed
            train_loss = self._train_epoch_or_eager(train, log)
            train_s = time.perf_counter() - t_epoch
            val_metrics = self.validate(val) if has_val else {}
            self.elapsed = base_elapsed + time.perf_counter() - t_epoch
            self._budget_spent()
            if has_val:
                self.schedule.observe(val_metrics["val_loss"])
            else:
                self.schedule.observe(train_loss)
            row: dict[str, Any] = {
                "epoch": self.epoch,
                "step": self.step,
                "elapsed_s": round(self.elapsed, 2),
                "epoch_s": round(time.perf_counter() - t_epoch, 3),
                "lr": self.current_lr(),
                "train_loss": train_loss,
                **val_metrics,
            }
            self._record_best(val_metrics, has_val)
            self.epoch += 1
            self._auto_compile(
                self.auto_compile.after_epoch(train_s, self._left_s(train_s)), train, log
            )
            hook_stop = self.on_epoch(self, row) if self.on_epoch is not None else None
            if main:
                metrics.append(row)
                if self.epoch % self.cfg.checkpoint_every == 0 or self._out_of_time():
                    write_checkpoints(self, run_dir)
                post = {"loss": f"{train_loss:.3g}", "lr": f"{row['lr']:.2g}"}
                if "val_forces_mae" in val_metrics:
                    post["val_F_mae"] = f"{val_metrics['val_forces_mae']:.4f}"
                elif has_val:
                    post["val"] = f"{val_metrics['val_loss']:.4g}"
                if by_time:
                    post["epoch"] = str(self.epoch)
                    bar.update(max(min(self.elapsed, bar.total) - bar.n, 0))
                else:
                    bar.update(1)
                bar.set_postfix(post, refresh=False)
            barrier(self.dist)
            if hook_stop:
                stopped_by = hook_stop
                break
            if self.cfg.patience > 0 and self.bad_epochs >= self.cfg.patience:
                stopped_by = "patience"
                break
            if self._out_of_time():
                stopped_by = "budget"
        bar.close()
        if main:
            write_checkpoints(self, run_dir)
            log(
                f"{self.desc}: stopped by {stopped_by} after {self.epoch} epochs, "
                f"{self.elapsed / 60:.1f} min; best epoch {self.best_epoch}: "
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
