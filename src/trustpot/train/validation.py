"""Validation sums of one objective: its loss terms and metric columns over a dataset, added
up on the training device and read once (then summed over data-parallel ranks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from trustpot.errors import TrainingError
from trustpot.train.datasets import move_batch
from trustpot.train.distributed import DistInfo, all_reduce_sum
from trustpot.train.objectives import ObjectiveLoss


def validation_totals(
    loss: ObjectiveLoss,
    model: nn.Module,
    data: Any,
    batch_size: int,
    dist: DistInfo,
    device: torch.device,
) -> list[float]:
    """Global sums of ``loss`` on ``data`` with ``model`` (in eval mode, no ``create_graph``).

    Returns:
        ``[sums of loss.weights' terms..., their counts..., loss.metric_keys' sums...]``,
        added over every rank.

    Raises:
        TrainingError: the loss returned a metric it did not declare in ``metric_keys``.
    """
    names, keys = list(loss.weights), list(loss.metric_keys)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums: dict[str, Tensor] = {n: zero for n in names}
    counts: dict[str, Tensor] = {n: zero for n in names}
    extra: dict[str, Tensor] = {}
    for batch, _ in data.batches(batch_size, rank=dist.rank, world_size=dist.world_size):
        if batch is not None:
            batch = move_batch(batch, device)
        loss.prepare(batch, dist)
        if batch is None:
            continue
        s, c = loss.sums(model, batch, False)
        for n in s:  # added up on the device, read once at the end
            sums[n] = sums[n] + s[n].detach().double()
            counts[n] = counts[n] + c[n].detach().double()
        pred = getattr(loss, "last_pred", None)
        for key, value in loss.metric_sums(model, batch, pred).items():
            if key not in keys:
                raise TrainingError(f"{type(loss).__name__}: metric '{key}' undeclared")
            value = value.detach().double().to(device)
            extra[key] = extra[key] + value if key in extra else value
    local = torch.stack(
        [sums[n] for n in names]
        + [counts[n] for n in names]
        + [extra.get(k, zero).reshape(()) for k in keys]
    ).cpu()
    totals: list[float] = all_reduce_sum(local, dist).tolist()
    return totals
