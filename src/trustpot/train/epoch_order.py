"""Which structures each training step sees: the shuffled batches of every objective in an
epoch, as collated batches (the eager step) or as structure indices (the recorded CUDA-graph
step, which gathers its batches on the device). Both follow one order, so the two steps train
on the same batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from trustpot.config import TrainConfig
from trustpot.data.dataset import batch_slices
from trustpot.train.datasets import TrainerDataset
from trustpot.train.distributed import DistInfo
from trustpot.train.objectives import Objective

T = TypeVar("T")


def seed_for(seed: int, epoch: int) -> int:
    """The shuffling (and dropout) seed of ``epoch`` in a run of ``seed``."""
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


class EpochOrder:
    """The batches of a run's epochs.

    Args:
        cfg: batch size and seed.
        dist: this process's rank (each rank takes its slice of every global batch).
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist

    def batches(self, ds: TrainerDataset, epoch: int) -> Iterator[tuple[Any | None, int]]:
        """``ds``'s collated batches of ``epoch`` (``None`` for an empty slice) with the
        global batch sizes."""
        return ds.batches(
            self.cfg.batch_size,
            shuffle=True,
            seed=seed_for(self.cfg.seed, epoch),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def slices(self, ds: TrainerDataset, epoch: int) -> Iterator[list[int]]:
        """The structures of each batch :meth:`batches` collates from a ``GraphDataset``
        (which cuts them with ``batch_slices``)."""
        for items, _ in batch_slices(
            len(ds), self.cfg.batch_size, True, seed_for(self.cfg.seed, epoch),
            self.dist.rank, self.dist.world_size,
        ):  # fmt: skip
            yield items

    @staticmethod
    def cycle(
        ds: TrainerDataset, epoch: int, source: Callable[[TrainerDataset, int], Iterator[T]]
    ) -> Iterator[T]:
        """``source``'s batches of ``ds`` (:meth:`batches` or :meth:`slices`) for an
        objective that is not the first: as many as the first needs, in new shuffles."""
        round_ = 0
        while True:
            yield from source(ds, epoch * 1000 + round_)
            round_ += 1

    def items(
        self, objectives: Sequence[Objective], train: Mapping[str, TrainerDataset], epoch: int
    ) -> list[list[list[int]]]:
        """Every objective's batches of ``epoch`` as structure indices (one list per step)."""
        first, *others = objectives
        main = list(self.slices(train[first.dataset], epoch))
        items = [main]
        for obj in others:
            cycle = self.cycle(train[obj.dataset], epoch, self.slices)
            items.append([next(cycle) for _ in main])
        return items
