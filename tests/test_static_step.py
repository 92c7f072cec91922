"""The CUDA-graph training step: padding every batch to one shape changes nothing the loss or
its gradient sees (checked on the CPU for every model family), the plan says why a run cannot
be graphed, and ``train.cuda_graphs`` is honoured. Recording and replay need CUDA."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trustpot import keys as K
from trustpot.config import TrainConfig, load_config
from trustpot.data.dataset import GraphDataset, batch_slices
from trustpot.data.graph import collate
from trustpot.errors import ConfigError, TrainingError
from trustpot.models.build import build_potential, build_scale_mixture
from trustpot.train.graph_batches import FlatStore, static_shape
from trustpot.train.losses import LossWeights
from trustpot.train.objectives import BCELoss, ForceFieldLoss
from trustpot.train.static_step import StaticStep, static_step_for
from trustpot.train.trainer import Objective, Trainer


def _store(data: GraphDataset, batch_size: int) -> FlatStore:
    graphs = [data.host_graph(k) for k in range(len(data))]
    keys = [k for k in graphs[0] if k.startswith(K.EDGE_INDEX_PREFIX)]
    shape = static_shape(
        [s.n_atoms for s in data.structures],
        {key: [g[key].shape[1] for g in graphs] for key in keys},
        batch_size,
        int(data.structures[0].numbers[0]),
        max(spec.cutoff for spec in data.specs),
    )
    return FlatStore(graphs, shape, torch.device("cpu"))


def _padded(store: FlatStore, items: list[int]) -> dict:
    return store.gather(torch.from_numpy(store.plan(items)))


def test_a_gathered_batch_is_the_collated_batch_then_padding(
    ethanol_structures: list, bulk_structures: list
) -> None:
    """Structures of different sizes and edge counts, full and partial batches: the real part
    of the gathered batch equals ``collate`` exactly; padding atoms and edges touch no real
    atom, padding graphs have zero weights, and nothing of it lies within a cutoff."""
    mixed = [ethanol_structures[0], *bulk_structures[:3], *ethanol_structures[1:4]]
    model = build_potential("painn", {}, mixed, dtype="float64")
    data = GraphDataset(mixed, model.neighbor_lists(), model.dtype)
    store = _store(data, 3)
    shape = store.shape
    for items, _ in batch_slices(len(data), 3, shuffle=True, seed=4):  # batches of 3, 3 and 1
        real = collate([data.graph(k) for k in items])
        got = _padded(store, items)
        n_atoms, n_graphs = real[K.POSITIONS].shape[0], real[K.N_ATOMS].shape[0]
        assert got[K.POSITIONS].shape[0] == shape.n_atoms
        assert got[K.N_ATOMS].shape[0] == shape.n_graphs
        assert int(got[K.N_ATOMS].sum()) == shape.n_atoms
        for key, value in real.items():
            if key.startswith(K.EDGE_INDEX_PREFIX):
                n_edges = value.shape[1]
                assert torch.equal(got[key][:, :n_edges], value)
                assert got[key].shape[1] == shape.n_edges[key]
                assert bool((got[key][:, n_edges:] >= n_atoms).all())  # padding atoms only
            elif key.startswith(K.EDGE_SHIFT_PREFIX):
                assert torch.equal(got[key][: value.shape[0]], value)
                assert not bool(got[key][value.shape[0] :].any())
            else:
                per_atom = key in (K.POSITIONS, K.ATOMIC_NUMBERS, K.FORCES, K.BATCH)
                rows = n_atoms if per_atom else n_graphs
                assert torch.equal(got[key][:rows], value), key
        assert bool((got[K.BATCH][n_atoms:] >= n_graphs).all())
        for key in (K.ENERGY_WEIGHT, K.FORCES_WEIGHT, K.STRESS_WEIGHT):
            assert not bool(got[key][n_graphs:].any())
        pad_x = got[K.POSITIONS][n_atoms:, 0]
        assert bool((pad_x.diff() >= shape.spacing - 1e-9).all())


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
    store = _store(data, 4)
    for items, _ in batch_slices(len(data), 4):  # a full batch of 4 and a partial one of 3
        batch = collate([data.graph(k) for k in items])
        padded = _padded(store, items)
        loss, grads = _loss_and_grads(model, batch)
        loss_p, grads_p = _loss_and_grads(model, padded)
        assert loss_p == pytest.approx(loss, rel=1e-12)
        assert len(grads) == len(grads_p)
        for g, gp in zip(grads, grads_p):
            torch.testing.assert_close(gp, g, rtol=1e-10, atol=1e-12)


def _sum(batches: list) -> torch.Tensor:
    return torch.zeros(())


def test_the_stress_term_at_every_batch_changes_neither_loss_nor_gradient(
    ethanol_structures: list, bulk_structures: list
) -> None:
    """The recorded step computes the stress term for every batch (it cannot ask a batch on
    the device whether it has stress labels): for a batch without stress labels, and for a
    padded batch with them, loss and gradient are those of the eager step."""
    from trustpot.train.distributed import DistInfo

    mixed = ethanol_structures[:3] + bulk_structures[:3]
    model = build_potential("painn", {}, mixed, dtype="float64", seed=2)
    data = GraphDataset(mixed, model.neighbor_lists(), model.dtype)
    store = _store(data, 3)
    weights = LossWeights(energy=1.0, forces=10.0, stress=5.0)
    results = {}
    for every in (False, True):
        loss_kind = ForceFieldLoss(weights)
        loss_kind.bind_data([data])
        loss_kind.stress_every_batch = every
        for name, items in (("molecules", [0, 1, 2]), ("bulk", [3, 4, 5])):
            g = collate([data.graph(k) for k in items])
            for padded in (False, True):
                b = _padded(store, items) if padded else g
                loss_kind.prepare(b, DistInfo())
                model.zero_grad(set_to_none=True)
                sums, counts = loss_kind.sums(model, b, True)
                loss = loss_kind.combine(sums, counts)
                loss.backward()
                grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
                results[every, name, padded] = (float(loss), grads, "stress" in sums)
    for name in ("molecules", "bulk"):
        loss, grads, has = results[False, name, False]
        assert has == (name == "bulk")  # the eager step asks the batch
        for key in ((True, name, False), (True, name, True), (False, name, True)):
            loss_k, grads_k, has_k = results[key]
            assert has_k == (key[0] or name == "bulk")
            assert loss_k == pytest.approx(loss, rel=1e-12)
            for g, gk in zip(grads, grads_k):
                torch.testing.assert_close(gk, g, rtol=1e-10, atol=1e-12)


def test_a_batch_that_does_not_fit_is_an_error(ethanol_structures: list) -> None:
    model = build_potential("painn", {}, ethanol_structures[:4], dtype="float64")
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    store = _store(data, 2)
    with pytest.raises(ValueError, match="does not fit the static shape"):
        store.plan([0, 1, 2, 3])


def test_the_plan_names_why_a_run_is_not_graphed(
    ethanol_structures: list, bulk_structures: list
) -> None:
    model = build_potential("painn", {}, ethanol_structures[:4], dtype="float64")
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    opt = torch.optim.AdamW(model.parameters(), capturable=True)
    cfg = TrainConfig()
    ff = ForceFieldLoss(LossWeights())
    step, why = static_step_for([ff], [data], _sum, model, opt, cfg)
    assert step is not None and why == ""
    assert step.shapes[0].n_graphs == cfg.batch_size + 1
    assert not ff.stress_every_batch  # molecules: no stress term is possible
    bulk = build_potential("painn", {}, bulk_structures, dtype="float64")
    periodic = GraphDataset(bulk_structures, bulk.neighbor_lists(), bulk.dtype)
    stressed = ForceFieldLoss(LossWeights(stress=1.0))
    stressed.bind_data([periodic])
    step, why = static_step_for([stressed], [periodic], _sum, bulk, opt, cfg)
    assert step is not None and stressed.stress_every_batch  # the stress term at every step
    replay = ForceFieldLoss(LossWeights(0.0, 1.0, 0.0))
    step, why = static_step_for([ff, replay], [data, data.subset([0, 1])], _sum, model, opt, cfg)
    assert step is not None and len(step.shapes) == 2
    assert step.shapes[1].n_atoms == 2 * ethanol_structures[0].n_atoms + 2  # 2 frames + padding
    bce = BCELoss(lambda m, b: (torch.zeros(1), torch.zeros(1)))
    step, why = static_step_for([ff, bce], [data, data], _sum, model, opt, cfg)
    assert step is None and why == "objective 2 of 2: a BCELoss objective"
    labelled = GraphDataset(
        ethanol_structures[:4], model.neighbor_lists(), model.dtype,
        labels={"property:q": [torch.zeros(1).numpy()] * 4},
    )  # fmt: skip
    step, why = static_step_for([ForceFieldLoss(LossWeights())], [labelled], _sum, model, opt, cfg)
    assert step is None and "plain force-field dataset" in why
    plain = torch.optim.AdamW(model.parameters())
    step, why = static_step_for([ForceFieldLoss(LossWeights())], [data], _sum, model, plain, cfg)
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
    assert trainer._static is None and trainer.step == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs CUDA")
def test_graphed_training_matches_the_eager_loop_on_cuda(
    ethanol_structures: list, tmp_path: Path
) -> None:
    losses = {}
    for mode in ("never", "always"):
        model = build_potential("painn", {}, ethanol_structures[:12], "float64", seed=0).cuda()
        data = GraphDataset(ethanol_structures[:12], model.neighbor_lists(), model.dtype)
        # batches by count in both (auto would pack the recorded step's)
        cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, cuda_graphs=mode, batching="structures")
        trainer = Trainer(model, [Objective("main", "main", LossWeights())], cfg, progress=False)
        rows: list[float] = []
        trainer.on_epoch = lambda _t, row, rows=rows: rows.append(row["train_loss"])  # type: ignore[misc]
        trainer.fit({"main": data}, {}, tmp_path / mode)
        assert (trainer._static is not None) == (mode == "always")
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


def _stress_and_replay(
    model: Any, main_set: list, replay_set: list
) -> tuple[dict[str, GraphDataset], list[Objective]]:
    """A fine-tuning-like run: energies, forces and stress on ``main_set``, forces of
    ``replay_set`` replayed at half weight."""
    specs = model.neighbor_lists()
    train = {
        "main": GraphDataset(main_set, specs, model.dtype),
        "replay": GraphDataset(replay_set, specs, model.dtype),
    }
    objectives = [
        Objective("main", "main", LossWeights(energy=1.0, forces=10.0, stress=5.0)),
        Objective("replay", "replay", LossWeights(0.0, 1.0, 0.0), weight=0.5),
    ]
    return train, objectives


class _EagerReplay:
    """Stands in for a recorded CUDA graph on the CPU: a replay runs the recorded body."""

    def __init__(self, step: StaticStep) -> None:
        self.step = step

    def replay(self) -> None:
        self.step.optimizer.zero_grad(set_to_none=True)  # a recorded step's fresh gradients
        self.step.loss = self.step._body()


@pytest.mark.parametrize("batching", ["structures", "atoms"])
def test_the_planned_gathered_step_trains_as_the_eager_loop(
    batching: str,
    ethanol_structures: list,
    bulk_structures: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Everything of the graphed path but the recording, on the CPU: each epoch planned as
    index rows, batches gathered from the flat stores (structures of different sizes, stress
    labels, a second objective cycling through its own shuffles; batches by count or packed
    by size) train exactly as the eager loop's collated batches do."""

    def capture(self: StaticStep, key: object = None) -> None:
        self.graph, self.key = _EagerReplay(self), key  # type: ignore[assignment]
        self.loss = torch.zeros(())

    monkeypatch.setattr(StaticStep, "capture", capture)
    main_set = [*ethanol_structures[:5], *bulk_structures[:4]]
    runs = {}
    for graphed in (False, True):
        model = build_potential("painn", {}, main_set, "float64", seed=3)
        train, objectives = _stress_and_replay(model, main_set, ethanol_structures[5:12])
        cfg = TrainConfig(epochs=3, batch_size=3, lr=1e-3, ema_decay=0.9, batching=batching)
        trainer = Trainer(model, objectives, cfg, progress=False)
        for obj in objectives:
            obj.kind.bind_data([train[obj.dataset]])
        if graphed:
            for group in trainer.optimizer.param_groups:  # the check only: CPU AdamW steps
                group["capturable"] = True
            trainer._static, why = static_step_for(
                [o.kind for o in objectives], [train["main"], train["replay"]],
                trainer._step_loss, model, trainer.optimizer, cfg,
            )  # fmt: skip
            assert trainer._static is not None, why
            for group in trainer.optimizer.param_groups:
                group["capturable"] = False
        losses = []
        for _ in range(3):
            losses.append(trainer.train_epoch(train))
            trainer.epoch += 1
        runs[graphed] = (losses, [p.detach().clone() for p in model.parameters()], trainer.step)
    assert runs[True][2] == runs[False][2]
    if batching == "structures":
        assert runs[True][2] == 9  # 3 steps (9 structures, batches of 3) x 3
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-10)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _losses_by_mode(
    build: Callable[[], Any],
    datasets: Callable[[Any], dict[str, GraphDataset]],
    objectives: list[tuple[str, str, LossWeights]],
    tmp_path: Path,
) -> dict[str, list[float]]:
    """Training losses per epoch of the eager and the recorded step from the same start."""
    losses = {}
    for mode in ("never", "always"):
        model = build().cuda()
        # packed batches in both (auto packs only the recorded step's)
        cfg = TrainConfig(epochs=3, batch_size=3, lr=1e-3, cuda_graphs=mode, batching="atoms")
        objs = [Objective(name, ds, w) for name, ds, w in objectives]
        trainer = Trainer(model, objs, cfg, progress=False)
        rows: list[float] = []
        trainer.on_epoch = lambda _t, row, rows=rows: rows.append(row["train_loss"])  # type: ignore[misc]
        trainer.fit(datasets(model), {}, tmp_path / mode)
        assert (trainer._static is not None) == (mode == "always")
        losses[mode] = rows
    return losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs CUDA")
def test_graphed_stress_and_replay_match_the_eager_loop_on_cuda(
    ethanol_structures: list, bulk_structures: list, tmp_path: Path
) -> None:
    """Stress labels (the stress term at every step) and a second objective (replay)."""
    mixed = ethanol_structures[:4] + bulk_structures[:5]

    def build() -> Any:
        return build_potential("painn", {}, mixed, "float64", seed=0)

    def one(model: Any) -> dict[str, GraphDataset]:
        return {"main": GraphDataset(mixed, model.neighbor_lists(), model.dtype)}

    stress = LossWeights(energy=1.0, forces=10.0, stress=5.0)
    losses = _losses_by_mode(build, one, [("main", "main", stress)], tmp_path / "stress")
    assert losses["always"] == pytest.approx(losses["never"], rel=1e-9)

    def two(model: Any) -> dict[str, GraphDataset]:
        return {
            "main": GraphDataset(bulk_structures[:5], model.neighbor_lists(), model.dtype),
            "replay": GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype),
        }

    replay = LossWeights(0.0, 1.0, 0.0)
    objectives = [("main", "main", stress), ("replay", "replay", replay)]
    losses = _losses_by_mode(build, two, objectives, tmp_path / "replay")
    assert losses["always"] == pytest.approx(losses["never"], rel=1e-9)


NO_CXX = not any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(
                NO_CXX, reason="torch.compile on the CPU needs a C++ compiler"
            ),
        ),
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_the_compiled_step_trains_as_the_eager_loop(
    device: str, ethanol_structures: list, bulk_structures: list, tmp_path: Path
) -> None:
    """``train.compile``: the loss and gradient compiled whole (torch.func forces and weight
    gradient through torch.compile), with stress labels and a second objective, give the
    eager loop's losses and weights in float64 (on CUDA also recorded as a CUDA graph)."""
    main_set = [*ethanol_structures[:3], *bulk_structures[:3]]
    runs = {}
    for compiled in (False, True):
        model = build_potential(
            "painn", {"n_features": 8, "n_layers": 1, "n_rbf": 4}, main_set, "float64", seed=5
        ).to(device)
        train, objectives = _stress_and_replay(model, main_set, ethanol_structures[3:7])
        graphs = "auto" if compiled else "never"
        cfg = TrainConfig(
            epochs=2, batch_size=3, lr=1e-3, compile="always" if compiled else "never",
            cuda_graphs=graphs,
            batching="atoms",  # packed in both runs (auto packs only the compiled step's)
        )  # fmt: skip
        trainer = Trainer(model, objectives, cfg, progress=False)
        rows: list[float] = []
        trainer.on_epoch = lambda _t, row, rows=rows: rows.append(row["train_loss"])  # type: ignore[misc]
        trainer.fit(train, {}, tmp_path / str(compiled))
        assert (trainer._static is not None) == compiled
        if compiled:
            assert trainer._static is not None and trainer._static.record == (device == "cuda")
        runs[compiled] = (rows, [p.detach().clone() for p in model.parameters()])
    # float64; on CUDA the recorded step's float32 tensor learning rate (see the module doc)
    rel = 1e-10 if device == "cpu" else 1e-7
    assert runs[True][0] == pytest.approx(runs[False][0], rel=rel)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-9 if device == "cpu" else 1e-6, atol=1e-10)


def test_compile_is_refused_where_it_cannot_serve(ethanol_structures: list, tmp_path: Path) -> None:
    model = build_potential("painn", {}, ethanol_structures[:4], dtype="float64")
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    bce = BCELoss(lambda m, b: (torch.zeros(1), torch.zeros(1)))
    trainer = Trainer(
        model, [Objective("p", "main", loss=bce)], TrainConfig(epochs=1, compile="always"),
        progress=False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.compile cannot be used here: a BCELoss"):
        trainer.fit({"main": data}, {}, tmp_path / "bce")


def test_a_step_that_cannot_compile_is_a_clear_error(
    ethanol_structures: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trustpot.train.compiled_step as compiled_step

    def no_compiler(fn: Callable, **_kw: Any) -> Callable:
        def fail(*_a: Any) -> None:
            raise RuntimeError("no C++ compiler found\n(long inductor trace)")

        return fail

    monkeypatch.setattr(compiled_step.torch, "compile", no_compiler)
    model = build_potential("painn", {}, ethanol_structures[:4], dtype="float64")
    data = GraphDataset(ethanol_structures[:4], model.neighbor_lists(), model.dtype)
    objectives = [Objective("main", "main", LossWeights())]
    trainer = Trainer(model, objectives, TrainConfig(epochs=1, compile="always"), progress=False)
    with pytest.raises(TrainingError, match=r"could not compile this training step "
                       r"\(RuntimeError: no C\+\+ compiler found\); train without"):  # fmt: skip
        trainer.fit({"main": data}, {}, tmp_path / "run")
