"""Full-batch minimisation of a small problem (a scalar scale, a router on frozen features) on
the :class:`~trustpot.train.trainer.Trainer`: one epoch is one optimiser step on the whole
problem, so these loops get the trainer's budget, resume, checkpoints and ``metrics.csv``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trustpot.config import TrainConfig
from trustpot.train.datasets import full_batch
from trustpot.train.distributed import DistInfo
from trustpot.train.objectives import CallableLoss
from trustpot.train.run_folder import best_weights, run_folder, state_payload
from trustpot.train.trainer import EpochHook, Objective, Trainer, TrainResult


def minimise(
    module: nn.Module,
    loss: Callable[[nn.Module], Tensor],
    steps: int,
    lr: float,
    *,
    on_epoch: EpochHook | None = None,
    run_dir: str | Path | None = None,
    max_minutes: float = 0.0,
    desc: str = "minimise",
    checkpoint_every: int = 50,
) -> tuple[TrainResult, Trainer]:
    """Adam (AdamW without weight decay or AMSGrad) at a constant ``lr`` on ``loss(module)``
    (a differentiable 0-d tensor), ``steps`` full-batch steps; ``module`` ends with its last
    weights (there is no validation set, so the last epoch is the best one).

    Args:
        on_epoch: trainer hook after every step (its row's ``train_loss`` is the loss before
            the step); returning a string stops with that reason.
        run_dir: run folder (resumable); ``None``: a temporary folder.
        checkpoint_every: steps between ``last.ckpt`` writes.

    Returns:
        The trainer's result and the trainer (its ``user_state`` holds what the hook kept).
    """
    cfg = TrainConfig(
        epochs=steps, max_minutes=max_minutes, batch_size=1, lr=lr, min_lr=lr,
        schedule="plateau", lr_patience=10**9, ema_decay=0.0, clip_grad=0.0,
        checkpoint_every=checkpoint_every,
    )  # fmt: skip

    def terms(model: nn.Module, _: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        value = loss(model)
        return {"loss": value}, {"loss": torch.ones((), dtype=torch.float64)}

    trainer = Trainer(
        module,
        [Objective("loss", "main", loss=CallableLoss(terms, {"loss": 1.0}))],
        cfg,
        DistInfo(),
        run_config={"steps": steps, "lr": lr, "max_minutes": max_minutes},
        payload_fn=state_payload(desc),
        amsgrad=False,
        on_epoch=on_epoch,
        progress=False,
        desc=desc,
    )
    with run_folder(run_dir) as folder, torch.random.fork_rng(devices=[]):
        trainer.resume(folder)
        result = trainer.fit({"main": full_batch(0)}, {}, folder, log=lambda _: None)
        module.load_state_dict(best_weights(trainer, folder))
    return result, trainer
