"""The learned router: s_i from the local environment, trained with the branches frozen.

The router is the mixture's ``"router"`` scale mode (:class:`~trustpot.models.mixture.ScaleRouter`:
a small MLP on the short branch's invariant per-atom features, s_i = sigmoid(MLP(h_i))). It is the
only adaptive mode usable in deployment: it reads positions and species, never labels.

Training: the trained branches (and charges) are frozen; only the router's weights move. The loss
is the force MAE of the mixture itself (L1 over force components, the metric the report uses),
with forces from autograd of the mixed energy, so the dependence of s_i on the positions is part of
both the forces and the loss. It starts at ``init`` (the best fixed scale of the calibration set),
so before any step it reproduces that fixed scale. It trains on the calibration frames (held out
from branch training, as the oracle gain it must recover is the gain on unseen frames).

Warm start (:func:`pretrain_router`, optional and cheap): before the end-to-end stage the router
can be fitted, on frozen features, to the per-atom oracle scales of the same calibration frames
(a weighted binary cross-entropy; each atom weighs sum_k |F_long - F_short|_k, how much its error
can change with s). Per-atom oracle scales mix branch *forces*, which a conservative mixture does
not do exactly, so the warm start is kept only if the mixture's own calibration force MAE improves
on the starting point; the end-to-end stage then trains on the true forces.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trustpot import keys as K
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import to_device
from trustpot.io.checkpoint import load_model, save_model
from trustpot.models.build import mixture_from_meta
from trustpot.models.mixture import SHORT, ScaleMixturePotential, graph_for_list


def router_mixture(
    trained: ScaleMixturePotential, init: float, hidden: int = 32, level: str = "atom"
) -> ScaleMixturePotential:
    """A ``"router"``-mode copy of ``trained`` (same branch weights), its router starting at s =
    ``init`` for every atom; ``level`` ``"atom"`` or ``"structure"``."""
    meta = replace(
        trained.meta,
        scale_mode="router",
        scale=float(init),
        router_hidden=hidden,
        router_level=level,
    )
    model = mixture_from_meta(meta)
    own = model.state_dict()
    shared = {k: v for k, v in trained.state_dict().items() if k in own and k != "fixed_scale"}
    model.load_state_dict({**own, **shared}, strict=True)
    return model


@torch.no_grad()
def router_features(
    model: ScaleMixturePotential, data: GraphDataset, batch_size: int = 8
) -> Tensor:
    """[n_atoms_total, F] the router's input features (short branch embedding) of ``data``, in
    dataset order, with no gradients."""
    device = next(model.parameters()).device
    feats = []
    for batch, _ in data.batches(batch_size):
        assert batch is not None
        g = graph_for_list(to_device(batch, device), SHORT)
        feats.append(model.short.embed(g)["node"].detach())
    return torch.cat(feats)


def pretrain_router(
    model: ScaleMixturePotential,
    features: Tensor,
    targets: Tensor,
    weights: Tensor,
    steps: int = 300,
    lr: float = 1e-2,
    run_dir: str | Path | None = None,
) -> float:
    """Fit the router of ``model`` to per-atom ``targets`` in [0, 1] on frozen ``features``.

    Full-batch Adam on the trainer (:func:`trustpot.train.full_batch.minimise`, one step per
    epoch; ``run_dir`` ``None``: a temporary folder).

    Args:
        features: [n_atoms, F] (:func:`router_features`).
        targets: [n_atoms] per-atom oracle scales.
        weights: [n_atoms] non-negative weights of the atoms.

    Returns:
        The weighted binary cross-entropy of the last step (before its update).
    """
    from trustpot.train.full_batch import minimise

    if model.router is None:
        raise ValueError("pretrain_router needs a 'router'-mode mixture")
    router = model.router
    x = features.to(next(router.parameters()).dtype)
    y = targets.to(x.dtype).clamp(0.0, 1.0)
    w = weights.to(x.dtype)
    w = w / w.sum().clamp_min(1e-12)

    def loss(module: torch.nn.Module) -> Tensor:
        logits = module.mlp(x).squeeze(-1)  # type: ignore[operator]
        return (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum()

    def on_epoch(trainer: Any, row: dict[str, Any]) -> None:
        trainer.user_state["last_loss"] = float(row["train_loss"])

    _, trainer = minimise(
        router, loss, steps, lr, on_epoch=on_epoch, run_dir=run_dir, desc="router warm start"
    )
    return float(trainer.user_state.get("last_loss", math.nan))


def router_run_folder(out: str | Path) -> Path:
    """The step folder of the router whose final checkpoint is ``out`` (``state.json``,
    ``metrics.csv``, ``best.ckpt``, ``last.ckpt``)."""
    out = Path(out)
    return out.with_name(out.name + ".run")


def train_router(
    model: ScaleMixturePotential,
    data: GraphDataset,
    out: str | Path,
    epochs: int = 10,
    max_minutes: float = 0.0,
    lr: float = 3e-3,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    notes: dict[str, Any] | None = None,
    warm_start: Callable[[ScaleMixturePotential], dict[str, Any]] | None = None,
) -> tuple[ScaleMixturePotential, dict[str, Any]]:
    """Fit the router of ``model`` (branches frozen) on ``data``; a step under the one reuse
    rule (:func:`trustpot.train.reuse.run_step`) in :func:`router_run_folder` of ``out``.

    Runs on the trainer: AdamW without weight decay at a constant ``lr``, the router's weights
    the only trainable parameter group, the L1 force loss of the mixture (a
    :class:`~trustpot.train.objectives.CallableLoss`), no validation set (the last epoch is
    kept, as the frames are the calibration split), torchrun-aware.

    Args:
        model: a ``"router"``-mode mixture (:func:`router_mixture`).
        data: the frames to fit on (calibration split), with both neighbour lists.
        out: checkpoint written when done. A finished step with the same options is reused
            (``out`` loaded), an interrupted one resumes from its ``last.ckpt``, one with
            other options is a ConfigError.
        epochs, max_minutes: stop after this many passes or minutes (0: no time limit).
        notes: stored with the summary (e.g. the router level).
        warm_start: run on ``model`` before training when the step is not done yet; its
            dict is stored in the summary under ``warm_start``.

    Returns:
        The trained mixture (eval mode) and a summary (epochs, steps, minutes, loss per epoch).
    """
    from trustpot.train.reuse import run_step

    out = Path(out)
    if model.router is None:
        raise ValueError("train_router needs a 'router'-mode mixture (see router_mixture)")
    config = {
        "epochs": epochs,
        "max_minutes": max_minutes,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "n_frames": len(data),
        "router_level": model.meta.router_level,
        "router_hidden": model.meta.router_hidden,
        "init_scale": model.meta.scale,
        "out": out.name,
    }
    fresh: list[ScaleMixturePotential] = []

    def work(folder: Path, resuming: bool) -> dict[str, Any]:
        extra = dict(notes or {})
        if warm_start is not None:
            extra["warm_start"] = warm_start(model)
        trained, summary = _train_router(model, data, folder, config, device, log, extra)
        save_model(trained, out, extra={"router_training": summary})
        fresh.append(trained)
        return summary

    summary = run_step(router_run_folder(out), config, work)
    if fresh:
        return fresh[0], summary
    loaded = load_model(out, ScaleMixturePotential)
    log(f"router: reusing {out}")
    return loaded, summary


def _train_router(
    model: ScaleMixturePotential,
    data: GraphDataset,
    folder: Path,
    config: dict[str, Any],
    device: str | torch.device,
    log: Callable[[str], None],
    notes: dict[str, Any],
) -> tuple[ScaleMixturePotential, dict[str, Any]]:
    """The router's training run in ``folder`` (resumed from its ``last.ckpt`` if any)."""
    from trustpot.config import TrainConfig
    from trustpot.train.distributed import init_distributed
    from trustpot.train.objectives import CallableLoss
    from trustpot.train.trainer import Objective, ParamGroup, Trainer

    assert model.router is not None
    model = model.to(device)
    router = [p for n, p in model.named_parameters() if n.startswith("router.")]
    frozen = [p for n, p in model.named_parameters() if not n.startswith("router.")]
    cfg = TrainConfig(
        epochs=config["epochs"], max_minutes=config["max_minutes"],
        batch_size=config["batch_size"], lr=config["lr"], min_lr=config["lr"],
        schedule="plateau", lr_patience=10**9, ema_decay=0.0, clip_grad=0.0,
        seed=config["seed"],
    )  # fmt: skip

    def l1(m: torch.nn.Module, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        pred = m(batch, {K.ENERGY, K.FORCES}, create_graph=True)
        diff = (pred[K.FORCES] - batch[K.FORCES]).abs()
        n = torch.tensor(float(diff.numel()), dtype=torch.float64)
        return {"forces_l1": diff.sum()}, {"forces_l1": n}

    t0 = time.perf_counter()

    def on_epoch(trainer: Trainer, row: dict[str, Any]) -> None:
        trainer.user_state.setdefault("history", []).append(float(row["train_loss"]))
        assert model.router is not None
        mean_s = float(torch.sigmoid(model.router.output_bias()).mean())
        log(
            f"router epoch {trainer.epoch - 1}: train force MAE {row['train_loss']:.5f} eV/Å "
            f"({time.perf_counter() - t0:.0f} s, bias s {mean_s:.3f})"
        )

    trainer = Trainer(
        model,
        [Objective("forces_l1", "main", loss=CallableLoss(l1, {"forces_l1": 1.0}))],
        cfg,
        init_distributed(),
        run_config=config,
        param_groups=[
            ParamGroup(router, name="router"),
            ParamGroup(frozen, frozen=True, name="branches"),
        ],
        amsgrad=False,
        on_epoch=on_epoch,
        desc="router",
    )
    if trainer.resume(folder):
        log(f"router: resuming {folder} at epoch {trainer.epoch}")
    with torch.random.fork_rng(devices=[]):
        result = trainer.fit({"main": data}, {}, folder, log=lambda _: None)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    history = list(trainer.user_state.get("history", []))
    summary = {
        "epochs": result.epochs,
        "steps": trainer.step,
        "minutes": result.elapsed_s / 60.0,
        "stopped_by": result.stopped_by,
        "train_mae_per_epoch": history,
        "final_train_mae": history[-1] if history else math.nan,
        **notes,
    }
    return model, summary
