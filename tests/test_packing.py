"""Batches packed by size (``train.batching=atoms``): every structure once per epoch, in the
shuffled order, no batch over its budgets, about ``batch_size`` structures on average; the
static shape of packed batches holds every one of them and pads far less than the shape of
batches by count; a dataset that is not made of structures is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trustpot import keys as K
from trustpot.config import RunConfig, TrainConfig
from trustpot.data.dataset import GraphDataset, Packing, batch_slices
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.models.build import build_potential
from trustpot.train.datasets import ItemDataset
from trustpot.train.distributed import DistInfo
from trustpot.train.epoch_order import EpochOrder
from trustpot.train.graph_batches import FlatStore, packed_shape, static_shape
from trustpot.train.losses import LossWeights
from trustpot.train.trainer import Objective, Trainer


def _sizes(seed: int, n: int = 200) -> np.ndarray:
    """Structures of 15 to 48 atoms with about 12 edges per atom: the zeolites' spread."""
    rng = np.random.default_rng(seed)
    atoms = rng.integers(15, 49, size=n)
    return np.stack([atoms, atoms * rng.integers(10, 15, size=n)], axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_batches_cover_the_order_within_budget(seed: int) -> None:
    sizes = _sizes(seed)
    packing = Packing.for_mean(sizes, 5)
    assert np.array_equal(packing.budget, np.ceil(5 * sizes.mean(axis=0)).astype(np.int64))
    order = np.random.default_rng(seed).permutation(len(sizes))
    chunks = packing.chunks(order)
    assert np.array_equal(np.concatenate(chunks), order)  # each once, in the shuffled order
    for k, chunk in enumerate(chunks):
        used = sizes[chunk].sum(axis=0)
        assert bool((used <= packing.budget).all())
        if k + 1 < len(chunks):  # closed because the next structure did not fit
            nxt = sizes[chunks[k + 1][0]]
            assert bool((used + nxt > packing.budget).any())
    mean = len(order) / len(chunks)
    assert 4.0 < mean <= 5.0  # next fit leaves about half a structure unused per batch
    assert max(len(c) for c in chunks) <= packing.most_structures()


def test_a_structure_larger_than_the_mean_budget_gets_a_batch_of_its_own() -> None:
    sizes = np.array([[2, 4], [2, 4], [40, 90], [2, 4]])
    packing = Packing.for_mean(sizes, 2)
    assert list(packing.budget) == [40, 90]  # raised to the largest structure
    chunks = packing.chunks(np.array([0, 2, 1, 3]))
    assert [list(c) for c in chunks] == [[0], [2], [1, 3]]
    assert packing.most_structures() == 3  # three of 2 atoms, then 40 does not fit


def test_batch_slices_packed_split_ranks_and_refuse_drop_last() -> None:
    packing = Packing.for_mean(_sizes(3, 40), 4)
    whole = list(batch_slices(40, 4, True, 7, packing=packing))
    ranks = [list(batch_slices(40, 4, True, 7, r, 2, packing=packing)) for r in range(2)]
    for k, (items, n_global) in enumerate(whole):
        assert n_global == len(items)
        assert sorted(ranks[0][k][0] + ranks[1][k][0]) == sorted(items)
    with pytest.raises(ValueError, match="drop"):
        list(batch_slices(40, 4, True, 7, drop_last=True, packing=packing))


def _mixed(ethanol: list[Structure], bulk: list[Structure]) -> list[Structure]:
    return [*ethanol[:8], *bulk[:4]]


def test_the_packed_shape_holds_every_batch_and_pads_less(
    ethanol_structures: list, bulk_structures: list
) -> None:
    mixed = _mixed(ethanol_structures, bulk_structures)
    model = build_potential("painn", {}, mixed, dtype="float64")
    data = GraphDataset(mixed, model.neighbor_lists(), model.dtype)
    graphs = [data.host_graph(k) for k in range(len(data))]
    keys = [K.EDGE_INDEX_PREFIX + spec.name for spec in data.specs]
    packing = data.packing(3)
    packed = packed_shape(packing, keys, 1, 5.0)
    by_count = static_shape(
        [s.n_atoms for s in mixed], {k: [g[k].shape[1] for g in graphs] for k in keys}, 3, 1, 5.0
    )
    store = FlatStore(graphs, packed, torch.device("cpu"))
    batches = 0
    for epoch in range(20):
        for items, _ in batch_slices(len(data), 3, True, epoch, packing=packing):
            store.plan(items)  # raises when a batch does not fit
            batches += 1
    assert batches > 0
    # the shape of batches by count holds the 3 largest structures: more than packed batches
    assert packed.n_atoms < by_count.n_atoms
    for key in keys:
        assert packed.n_edges[key] < by_count.n_edges[key]
    with pytest.raises(ValueError, match="sizes"):
        packed_shape(packing, [], 1, 5.0)


def test_the_trainer_packs_its_batches(
    ethanol_structures: list, bulk_structures: list, tmp_path: Path
) -> None:
    """The eager loop trains on packed batches: fewer structures per step where they are large,
    the same epoch for every run of one seed, and other batching than by count."""
    mixed = _mixed(ethanol_structures, bulk_structures)
    steps = {}
    for batching in ("structures", "atoms"):
        model = build_potential("painn", {"n_features": 8, "n_layers": 1}, mixed, "float64")
        data = GraphDataset(mixed, model.neighbor_lists(), model.dtype)
        cfg = TrainConfig(epochs=2, batch_size=3, lr=1e-3, batching=batching)
        objective = Objective("ff", "train", LossWeights(1.0, 10.0, 0.0))
        trainer = Trainer(model, [objective], cfg, progress=False)
        trainer.fit({"train": data}, {}, tmp_path / batching)
        steps[batching] = trainer.step
        expected = sum(1 for _ in trainer.order.slices(data, 0)) + sum(
            1 for _ in trainer.order.slices(data, 1)
        )
        assert trainer.step == expected
    assert steps["structures"] == 2 * 4  # 12 structures in batches of 3, two epochs
    assert steps["atoms"] != steps["structures"]


def test_packing_needs_structures_and_a_known_mode(
    tmp_path: Path, ethanol_structures: list
) -> None:
    model = build_potential("painn", {"n_features": 8, "n_layers": 1}, ethanol_structures[:4])
    cfg = TrainConfig(epochs=1, batching="atoms")
    objective = Objective("ff", "items", LossWeights(1.0, 10.0, 0.0))
    trainer = Trainer(model, [objective], cfg, progress=False)
    items = ItemDataset([0, 1], lambda batch: batch, "items")
    with pytest.raises(ConfigError, match=r"batching=atoms .* 'items' \(ItemDataset\) is not"):
        trainer.fit({"items": items}, {}, tmp_path)
    with pytest.raises(ConfigError, match=r"train\.batching must be"):
        RunConfig(train=TrainConfig(batching="molecules")).validate()


def test_auto_packs_for_a_static_step_only(ethanol_structures: list) -> None:
    """``train.batching=auto`` (the default) packs where a static-shape step pads (compiled or
    recorded) and every training set is made of structures; the eager step keeps batches of
    ``batch_size`` structures."""
    model = build_potential("painn", {"n_features": 8, "n_layers": 1}, ethanol_structures[:4])
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    items = ItemDataset([0, 1], lambda batch: batch, "items")
    assert TrainConfig().batching == "auto"
    for batching, static, train, packed in [
        ("auto", True, {"a": data}, True),
        ("auto", False, {"a": data}, False),
        ("auto", True, {"a": data, "b": items}, False),
        ("structures", True, {"a": data}, False),
        ("atoms", False, {"a": data}, True),
    ]:
        order = EpochOrder(TrainConfig(batching=batching), DistInfo())
        order.choose(train, static_step=static)
        assert order.packed == packed, (batching, static, list(train))
