"""Datasets the trainer reads besides :class:`trustpot.data.dataset.GraphDataset`.

A trainer dataset is anything with ``__len__`` and ``batches(batch_size, shuffle=..., seed=...,
rank=..., world_size=...)`` yielding ``(batch_or_None, n_global)`` with the semantics of
:meth:`GraphDataset.batches`: every rank gets a slice of the same global batch, and ``None``
where its slice is empty, so that all ranks take the same number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from trustpot.data.dataset import batch_slices
from trustpot.data.graph import to_device
from trustpot.errors import ConfigError

T = TypeVar("T")


class TrainerDataset(Protocol):
    """What :class:`trustpot.train.trainer.Trainer` needs from a dataset.

    A dataset may also have ``to(device)`` returning the same data kept on ``device`` (as
    :meth:`trustpot.data.dataset.GraphDataset.to` does); the trainer then collates batches
    there instead of copying each one from the host. Only a dataset with
    ``packing(batch_size)`` and ``batches(..., packed=True)`` (a ``GraphDataset``) can be
    packed by size (``train.batching``)."""

    def __len__(self) -> int: ...

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[Any | None, int]]: ...


class ItemDataset(Generic[T]):
    """Items (e.g. cached per-structure feature tensors) collated into batches on demand.

    Args:
        items: the items, e.g. indices into a feature cache.
        collate: builds one batch from a list of items.
        name: shown in errors.
    """

    def __init__(
        self, items: Sequence[T], collate: Callable[[list[T]], Any], name: str = "items"
    ) -> None:
        if len(items) == 0:
            raise ConfigError(f"{name}: no items (empty dataset)")
        self.items = list(items)
        self.collate = collate
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[Any | None, int]]:
        """Yield ``(batch, n_global)``; ``batch`` is ``None`` on a rank with an empty slice."""
        for mine, n_global in batch_slices(
            len(self.items), batch_size, shuffle, seed, rank, world_size
        ):
            yield (self.collate([self.items[k] for k in mine]) if mine else None), n_global


def full_batch(item: Any, name: str = "full batch") -> ItemDataset[Any]:
    """A dataset of one item whose every batch is that item: one optimiser step per epoch
    (full-batch optimisation of a small problem, e.g. a scalar)."""
    return ItemDataset([item], lambda items: items[0], name)


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``: a graph dict, a tensor, or a tuple / list of tensors (a batch
    already there is returned as it is, without a copy)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return to_device(batch, device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device) for b in batch)
    return batch
