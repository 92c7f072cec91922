"""Data-parallel helpers for ``torchrun`` (gloo on CPU); single-process runs pass through.

Gradients are summed across ranks with one flat all-reduce per step. Each rank's loss is
already divided by the global counts of the batch, so the summed gradient equals the
gradient of the single-process loss on the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def all_reduce_sum(values: Tensor, info: DistInfo) -> Tensor:
    """Sum ``values`` over ranks (in place on a copy); identity in one process."""
    if not info.active:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(values: Tensor, info: DistInfo) -> Tensor:
    """Maximum of ``values`` over ranks; identity in one process."""
    if not info.active:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def sync_gradients(model: nn.Module, info: DistInfo) -> None:
    """Sum parameter gradients over ranks (missing gradients count as zero)."""
    if not info.active:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_model(model: nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights."""
    if not info.active:
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()
