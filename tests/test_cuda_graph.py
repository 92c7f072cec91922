"""The CUDA-graph training step: padding every batch to one shape changes nothing the loss or
its gradient sees (checked on the CPU for every model family), the plan says why a run cannot
be graphed, and ``train.cuda_graphs`` is honoured. Recording and replay need CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trustpot import keys as K
from trustpot.config import TrainConfig, load_config
from trustpot.data.dataset import GraphDataset
from trustpot.errors import ConfigError
from trustpot.models.build import build_potential, build_scale_mixture
from trustpot.train.cuda_graph import graphed_step_for, pad_batch, static_shape
from trustpot.train.losses import LossWeights
from trustpot.train.objectives import ForceFieldLoss
from trustpot.train.trainer import Objective, Trainer


def _shape(data: GraphDataset, batch_size: int) -> object:
    graphs = [data.graph(k) for k in range(len(data))]
    keys = [k for k in graphs[0] if k.startswith(K.EDGE_INDEX_PREFIX)]
    return static_shape(
        [s.n_atoms for s in data.structures],
        {key: [g[key].shape[1] for g in graphs] for key in keys},
        batch_size,
        int(data.structures[0].numbers[0]),
        max(spec.cutoff for spec in data.specs),
    )


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, list[torch.Tensor]]:
    loss_kind = ForceFieldLoss(LossWeights(energy=1.0, forces=10.0, stress=0.0))
    model.zero_grad(set_to_none=True)
    sums, counts = loss_kind.sums(model, batch, True)
    loss = loss_kind.combine(sums, counts)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return float(loss), grads


@pytest.mark.parametrize("backbone", ["schnet", "painn", "egnn", "deepset-moe", "ace", "mixture"])
def test_padding_changes_neither_loss_nor_gradient(backbone: str, ethanol_structures: list) -> None:
    structures = ethanol_structures[:7]
    if backbone == "mixture":
        model = build_scale_mixture(structures, dtype="float64")
    else:
        model = build_potential(backbone, {}, structures, dtype="float64", seed=1)
    data = GraphDataset(structures, model.neighbor_lists(), model.dtype)
    shape = _shape(data, 4)
    for batch, _ in data.batches(4):  # a full batch of 4 and a partial one of 3
        assert batch is not None
        padded = pad_batch(batch, shape)
        assert padded[K.POSITIONS].shape[0] == shape.n_atoms
        assert padded[K.N_ATOMS].shape[0] == shape.n_graphs
        assert int(padded[K.N_ATOMS].sum()) == shape.n_atoms
        loss, grads = _loss_and_grads(model, batch)
        loss_p, grads_p = _loss_and_grads(model, padded)
        assert loss_p == pytest.approx(loss, rel=1e-12)
        assert len(grads) == len(grads_p)
        for g, gp in zip(grads, grads_p):
            torch.testing.assert_close(gp, g, rtol=1e-10, atol=1e-12)


def test_a_batch_that_does_not_fit_is_an_error(ethanol_structures: list) -> None:
    model = build_potential("painn", {}, ethanol_structures[:4], dtype="float64")
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    shape = _shape(data, 2)
    batch = next(iter(data.batches(4)))[0]
    assert batch is not None
    with pytest.raises(ValueError, match="does not fit the static shape"):
        pad_batch(batch, shape)


def test_the_plan_names_why_a_run_is_not_graphed(
    ethanol_structures: list, bulk_structures: list
) -> None:
    model = build_potential("painn", {}, ethanol_structures[:4], dtype="float64")
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    opt = torch.optim.AdamW(model.parameters(), capturable=True)
    cfg = TrainConfig()
    step, why = graphed_step_for(ForceFieldLoss(LossWeights()), data, lambda b: b, model, opt, cfg)
    assert step is not None and why == ""
    assert step.shape.n_graphs == cfg.batch_size + 1
    bulk = build_potential("painn", {}, bulk_structures, dtype="float64")
    periodic = GraphDataset(bulk_structures, bulk.neighbor_lists(), bulk.dtype)
    stressed = ForceFieldLoss(LossWeights(stress=1.0))
    step, why = graphed_step_for(stressed, periodic, lambda b: b, bulk, opt, cfg)
    assert step is None and "stress labels" in why
    labelled = GraphDataset(
        ethanol_structures[:4], model.neighbor_lists(), model.dtype,
        labels={"property:q": [torch.zeros(1).numpy()] * 4},
    )  # fmt: skip
    step, why = graphed_step_for(
        ForceFieldLoss(LossWeights()), labelled, lambda b: b, model, opt, cfg
    )
    assert step is None and "plain force-field dataset" in why
    plain = torch.optim.AdamW(model.parameters())
    step, why = graphed_step_for(
        ForceFieldLoss(LossWeights()), data, lambda b: b, model, plain, cfg
    )
    assert step is None and "optimiser cannot be recorded" in why


def test_cuda_graphs_option_is_checked(ethanol_structures: list, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs must be auto, always or never"):
        load_config(None, ["train.cuda_graphs=maybe"])
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        load_config(None, ["train.cuda_graphs=always"])
    model = build_potential("painn", {}, ethanol_structures[:4], dtype="float64")
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    cfg = TrainConfig(epochs=1, cuda_graphs="always")
    trainer = Trainer(model, [Objective("main", "main", LossWeights())], cfg, progress=False)
    with pytest.raises(ConfigError, match="cannot be used here: not a single CUDA device"):
        trainer.fit({"main": data}, {}, tmp_path / "on")
    trainer = Trainer(
        model, [Objective("main", "main", LossWeights())], TrainConfig(epochs=1), progress=False
    )
    trainer.fit({"main": data}, {}, tmp_path / "auto")  # auto on the CPU: the eager step
    assert trainer._graphed is None and trainer.step == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs CUDA")
def test_graphed_training_matches_the_eager_loop_on_cuda(
    ethanol_structures: list, tmp_path: Path
) -> None:
    losses = {}
    for mode in ("never", "always"):
        model = build_potential("painn", {}, ethanol_structures[:12], "float64", seed=0).cuda()
        data = GraphDataset(ethanol_structures[:12], model.neighbor_lists(), model.dtype)
        cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, cuda_graphs=mode)
        trainer = Trainer(model, [Objective("main", "main", LossWeights())], cfg, progress=False)
        rows: list[float] = []
        trainer.on_epoch = lambda _t, row, rows=rows: rows.append(row["train_loss"])  # type: ignore[misc]
        trainer.fit({"main": data}, {}, tmp_path / mode)
        assert (trainer._graphed is not None) == (mode == "always")
        losses[mode] = rows
    assert losses["always"] == pytest.approx(losses["never"], rel=1e-9)


def test_stress_presence_is_known_from_the_host(
    ethanol_structures: list, bulk_structures: list
) -> None:
    """With molecules only, the loss never asks a batch (on a GPU: the device) whether it has
    stress labels; with stress labels it does."""
    from trustpot.train.distributed import DistInfo

    loss = ForceFieldLoss(LossWeights(stress=1.0))
    molecules = GraphDataset(ethanol_structures[:3], [], torch.float64)
    loss.bind_data([molecules])
    loss.prepare({}, DistInfo())  # an empty batch: reading it would raise KeyError
    assert loss._has_stress is False
    periodic = GraphDataset(bulk_structures[:2], [], torch.float64)
    loss.bind_data([molecules, periodic])
    with pytest.raises(KeyError):
        loss.prepare({}, DistInfo())
