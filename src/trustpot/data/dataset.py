"""A dataset of structures whose graphs (neighbour lists included) are built once."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trustpot import keys as K
from trustpot.data.graph import Graph, collate, structure_to_graph, to_device
from trustpot.data.neighbors import NeighborListSpec
from trustpot.data.structures import Structure
from trustpot.errors import DataError


@dataclass(frozen=True)
class Packing:
    """Batches packed by size instead of cut by count (``train.batching=atoms``).

    Attributes:
        sizes: [n, k] sizes of each structure: atoms, then edges of each neighbour list.
        budget: [k] the most of each size a batch may hold.
    """

    sizes: np.ndarray
    budget: np.ndarray

    @staticmethod
    def for_mean(sizes: np.ndarray, batch_size: int) -> Packing:
        """Budgets of ``batch_size`` times the mean structure's sizes (rounded up), at least
        the largest structure's, so that batches hold ``batch_size`` structures on average
        and every structure fits alone."""
        sizes = np.asarray(sizes, dtype=np.int64).reshape(len(sizes), -1)
        mean = np.ceil(batch_size * sizes.mean(axis=0)).astype(np.int64)
        return Packing(sizes, np.maximum(mean, sizes.max(axis=0)))

    def chunks(self, order: np.ndarray) -> list[np.ndarray]:
        """``order`` cut into consecutive batches, each as long as the budget allows
        (next fit: a batch closes when the next structure would not fit)."""
        out: list[np.ndarray] = []
        start, used = 0, np.zeros_like(self.budget)
        for pos, item in enumerate(order):
            size = self.sizes[item]
            if pos > start and np.any(used + size > self.budget):
                out.append(order[start:pos])
                start, used = pos, np.zeros_like(self.budget)
            used = used + size
        if len(order) > start:
            out.append(order[start:])
        return out

    def most_structures(self) -> int:
        """The most structures a batch can hold (the smallest ones, within the atom budget)."""
        atoms = np.sort(self.sizes[:, 0])
        return max(1, int(np.searchsorted(np.cumsum(atoms), self.budget[0], side="right")))


def batch_slices(
    n: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    packing: Packing | None = None,
) -> Iterator[tuple[list[int], int]]:
    """The items of this rank in each global batch, and the global batch size.

    Items ``0..n-1`` (shuffled with ``seed`` when asked) are cut into global batches of
    ``batch_size``, or packed to the budgets of ``packing`` (then ``batch_size`` is not
    used and ``drop_last`` may not be set); rank ``r`` of ``world_size`` takes every
    ``world_size``-th item of each, so the ranks' slices make up the single-process batch. A
    rank may get an empty slice.
    """
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    if packing is not None:
        if drop_last:
            raise ValueError("packed batches have no fixed size to drop a last one by")
        chunks = packing.chunks(order)
    else:
        stop = n - (n % batch_size if drop_last else 0)
        chunks = [order[start : start + batch_size] for start in range(0, stop, batch_size)]
    for chunk in chunks:
        yield [int(k) for k in chunk[rank::world_size]], len(chunk)


class GraphDataset:
    """Structures with their graphs, built once for the neighbour lists a model asks for.

    Args:
        structures: the structures.
        specs: neighbour lists to build (all a model's ``neighbor_lists()``).
        dtype: float dtype of positions and labels (the model's dtype).
        name: shown in errors and progress bars (usually the file path).
        labels: extra fields of each graph, one array per structure under each key (e.g. a
            property's reference values under ``property:<key>``), its first axis 1 for a
            per-structure field ([1, ...], batched to [n_graphs, ...]) or n_atoms for a
            per-atom one; cast to ``dtype``.
    """

    def __init__(
        self,
        structures: Sequence[Structure],
        specs: Sequence[NeighborListSpec],
        dtype: torch.dtype = torch.float32,
        name: str = "dataset",
        labels: Mapping[str, Sequence[np.ndarray]] | None = None,
    ) -> None:
        if len(structures) == 0:
            raise DataError(name, "no structures (empty dataset)")
        self.structures = list(structures)
        self.specs = tuple(specs)
        self.dtype = dtype
        self.name = name
        self.labels = {k: list(v) for k, v in (labels or {}).items()}
        for key, values in self.labels.items():
            if len(values) != len(self.structures):
                raise ValueError(f"{name}: {len(values)} values of '{key}' for "
                                 f"{len(self.structures)} structures")  # fmt: skip
        self._graphs: list[Graph | None] = [None] * len(self.structures)
        self.device = torch.device("cpu")
        self._host: GraphDataset | None = None  # the host dataset of a copy on a device
        self._packing: dict[int, Packing] = {}  # per batch size

    def __len__(self) -> int:
        return len(self.structures)

    def graph(self, index: int) -> Graph:
        """Graph of structure ``index`` on :attr:`device` (built on first use, then cached)."""
        g = self._graphs[index]
        if g is None:
            if self._host is not None:
                g = to_device(self._host.graph(index), self.device)
            else:
                g = structure_to_graph(self.structures[index], self.specs, self.dtype)
                for key, values in self.labels.items():
                    g[key] = torch.as_tensor(values[index], dtype=self.dtype)
            self._graphs[index] = g
        return g

    def host_graph(self, index: int) -> Graph:
        """Graph of structure ``index`` on the host (built on first use, then cached), also
        for a dataset kept on a device."""
        return self._host.graph(index) if self._host is not None else self.graph(index)

    def to(self, device: torch.device | str) -> GraphDataset:
        """This dataset with its graphs kept on ``device`` (each copied once, on first use),
        so that batches are collated there and training never waits for a host-to-device
        copy; ``self`` when it is already there."""
        device = torch.device(device)
        if device == self.device:
            return self
        host = self._host if self._host is not None else self
        if device.type == "cpu":
            return host
        out = GraphDataset(host.structures, host.specs, host.dtype, host.name, host.labels)
        out.device, out._host = device, host
        return out

    def subset(self, indices: Sequence[int], name: str | None = None) -> GraphDataset:
        """A dataset of some of the structures, sharing already-built graphs."""
        labels = {k: [v[i] for i in indices] for k, v in self.labels.items()}
        out = GraphDataset(
            [self.structures[i] for i in indices], self.specs, self.dtype, name or self.name,
            labels,
        )  # fmt: skip
        out._graphs = [self._graphs[i] for i in indices]
        if self._host is not None:
            out.device, out._host = self.device, self._host.subset(indices, name)
        return out

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        packed: bool = False,
    ) -> Iterator[tuple[Graph | None, int]]:
        """Yield ``(batch, n_global)`` pairs; with ``packed``, batches packed to
        :meth:`packing` ``(batch_size)`` instead of ``batch_size`` structures each.

        With ``world_size > 1`` every rank gets a slice of the same global batch, so the sum of
        per-rank losses divided by ``n_global`` equals the single-process loss. A rank whose slice
        is empty gets ``None`` so that every rank takes the same number of steps.
        """
        for mine, n_global in batch_slices(
            len(self), batch_size, shuffle, seed, rank, world_size, drop_last,
            self.packing(batch_size) if packed else None,
        ):  # fmt: skip
            if not mine:
                yield None, n_global
                continue
            counts = [self.structures[k].n_atoms for k in mine]
            yield collate([self.graph(k) for k in mine], counts), n_global

    def packing(self, batch_size: int) -> Packing:
        """Budgets of batches that hold ``batch_size`` structures on average
        (:meth:`Packing.for_mean`): atoms, then edges of each neighbour list, in the order of
        :attr:`specs`. Builds every graph (on the host) on first use."""
        cached = self._packing.get(batch_size)
        if cached is None:
            host = self._host if self._host is not None else self
            sizes = np.array(
                [
                    [s.n_atoms]
                    + [
                        host.graph(k)[K.EDGE_INDEX_PREFIX + spec.name].shape[1]
                        for spec in self.specs
                    ]
                    for k, s in enumerate(self.structures)
                ],
                dtype=np.int64,
            )
            cached = self._packing[batch_size] = Packing.for_mean(sizes, batch_size)
        return cached

    def species(self) -> list[int]:
        """Sorted atomic numbers present."""
        return sorted({int(z) for s in self.structures for z in np.unique(s.numbers)})
