"""Which structures each training step sees: the shuffled batches of every objective in an
epoch, as collated batches (the eager step) or as structure indices (the static-shape step,
which gathers its batches on the device). Both follow one order, so the two steps train on
the same batches.

Batches hold ``train.batch_size`` structures each, or (``train.batching=atoms``, and ``auto``
for a static-shape step) as many shuffled structures as fit budgets of ``batch_size`` times
the mean structure's atoms and edges (:class:`~trustpot.data.dataset.Packing`): about
``batch_size`` structures on average, but nearly the same number of atoms in every batch,
which is what a static-shape step pads to."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from trustpot.config import TrainConfig
from trustpot.data.dataset import GraphDataset, Packing, batch_slices
from trustpot.errors import ConfigError
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
        #: batches packed to atom and edge budgets (:meth:`choose` decides ``auto``)
        self.packed = cfg.batching == "atoms"

    def choose(self, train: Mapping[str, TrainerDataset], static_step: bool) -> None:
        """Decide :attr:`packed` for a run on ``train`` (``train.batching``: ``atoms``,
        ``structures``, or ``auto``: packed when the run takes a static-shape step,
        ``static_step``, and every training set is made of structures).

        Raises:
            ConfigError: ``atoms`` for a training set that is not made of structures.
        """
        unpackable = [(n, ds) for n, ds in train.items() if not hasattr(ds, "packing")]
        if self.cfg.batching == "atoms" and unpackable:
            name, ds = unpackable[0]
            raise ConfigError(
                f"train.batching=atoms cannot be used here: the training set '{name}' "
                f"({type(ds).__name__}) is not a dataset of structures"
            )
        auto = self.cfg.batching == "auto" and static_step and not unpackable
        self.packed = self.cfg.batching == "atoms" or auto

    def packing(self, ds: TrainerDataset) -> Packing | None:
        """The budgets ``ds``'s batches are packed to, or ``None`` (batches by count)."""
        return cast(GraphDataset, ds).packing(self.cfg.batch_size) if self.packed else None

    def batches(self, ds: TrainerDataset, epoch: int) -> Iterator[tuple[Any | None, int]]:
        """``ds``'s collated batches of ``epoch`` (``None`` for an empty slice) with the
        global batch sizes."""
        seed = seed_for(self.cfg.seed, epoch)
        rank, world = self.dist.rank, self.dist.world_size
        if self.packed:
            data = cast(GraphDataset, ds)
            return data.batches(self.cfg.batch_size, True, seed, rank, world, packed=True)
        return ds.batches(self.cfg.batch_size, shuffle=True, seed=seed, rank=rank, world_size=world)

    def slices(self, ds: TrainerDataset, epoch: int) -> Iterator[list[int]]:
        """The structures of each batch :meth:`batches` collates from a ``GraphDataset``
        (which cuts them with ``batch_slices``)."""
        for items, _ in batch_slices(
            len(ds), self.cfg.batch_size, True, seed_for(self.cfg.seed, epoch),
            self.dist.rank, self.dist.world_size, packing=self.packing(ds),
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
