"""The learned router: s_i from the local environment, trained with the branches frozen.

The router is the mixture's ``"router"`` scale mode (:class:`~trustpot.scales.mixture.ScaleRouter`:
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
from trustpot.io.checkpoint import read_checkpoint
from trustpot.scales.build import mixture_from_meta
from trustpot.scales.io import save_scale_mixture
from trustpot.scales.mixture import SHORT, ScaleMixturePotential, graph_for_list


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
) -> float:
    """Fit the router of ``model`` to per-atom ``targets`` in [0, 1] on frozen ``features``.

    Args:
        features: [n_atoms, F] (:func:`router_features`).
        targets: [n_atoms] per-atom oracle scales.
        weights: [n_atoms] non-negative weights of the atoms.

    Returns:
        The final weighted binary cross-entropy.
    """
    if model.router is None:
        raise ValueError("pretrain_router needs a 'router'-mode mixture")
    router = model.router
    x = features.to(next(router.parameters()).dtype)
    y = targets.to(x.dtype).clamp(0.0, 1.0)
    w = weights.to(x.dtype)
    w = w / w.sum().clamp_min(1e-12)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    value = torch.zeros(())
    for _ in range(steps):
        optimizer.zero_grad()
        logits = router.mlp(x).squeeze(-1)
        value = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum()
        value.backward()
        optimizer.step()
    return float(value.detach())


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
) -> tuple[ScaleMixturePotential, dict[str, Any]]:
    """Fit the router of ``model`` (branches frozen) on ``data``; resumable by file.

    Args:
        model: a ``"router"``-mode mixture (:func:`router_mixture`).
        data: the frames to fit on (calibration split), with both neighbour lists.
        out: checkpoint written when done; if it exists it is loaded instead of training.
        epochs, max_minutes: stop after this many passes or minutes (0: no time limit).
        notes: stored with the summary (e.g. how the router was warm-started).

    Returns:
        The trained mixture (eval mode) and a summary (epochs, steps, minutes, loss per epoch).
    """
    out = Path(out)
    if out.is_file():
        data = read_checkpoint(out)
        loaded = ScaleMixturePotential.from_payload(data, str(out)).eval()
        log(f"router: reusing {out}")
        extra = data.get("extra") or {}
        return loaded, {**extra.get("router_training", {}), "reused": True}
    if model.router is None:
        raise ValueError("train_router needs a 'router'-mode mixture (see router_mixture)")
    model = model.to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("router."))
    params = [p for p in model.router.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    history: list[float] = []
    t0 = time.perf_counter()
    steps = 0
    stopped_by = "epochs"
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch, _ in data.batches(batch_size, shuffle=True, seed=seed * 7919 + epoch):
            assert batch is not None
            batch = to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            pred = model(batch, {K.ENERGY, K.FORCES}, create_graph=True)
            diff = (pred[K.FORCES] - batch[K.FORCES]).abs()
            loss = diff.mean()
            loss.backward()
            optimizer.step()
            total += float(diff.sum().detach())
            count += diff.numel()
            steps += 1
            if max_minutes > 0 and time.perf_counter() - t0 > 60 * max_minutes:
                stopped_by = "budget"
                break
        history.append(total / max(count, 1))
        mean_s = float(torch.sigmoid(model.router.mlp[-1].bias.detach()).mean())  # type: ignore[index]
        log(
            f"router epoch {epoch}: train force MAE {history[-1]:.5f} eV/Å "
            f"({time.perf_counter() - t0:.0f} s, bias s {mean_s:.3f})"
        )
        if stopped_by == "budget":
            break
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    summary = {
        "epochs": len(history),
        "steps": steps,
        "minutes": (time.perf_counter() - t0) / 60.0,
        "stopped_by": stopped_by,
        "train_mae_per_epoch": history,
        "final_train_mae": history[-1] if history else math.nan,
        **(notes or {}),
    }
    save_scale_mixture(model, out, extra={"router_training": summary})
    return model, summary
