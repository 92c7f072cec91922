"""A training step on batches of one static shape: recorded once as a CUDA graph and
replayed for every batch (``train.cuda_graphs``), and/or its loss and gradient compiled whole
(``train.compile``, :mod:`trustpot.train.compiled_step`).

A PaiNN training step (forward, forces by autograd with the graph kept, backward, clipping,
AdamW) is about 1,100 small kernels; on a GPU the host takes several times longer to issue
them than the GPU takes to run them (``benchmarks/results/gpu_check``). A CUDA graph issues
the whole step at once. It needs fixed shapes, so every batch is padded to one static shape
(:mod:`trustpot.train.graph_batches`): the real graphs first, then padding graphs with zero
label weights, whose atoms and edges touch no real atom. The loss, its gradient and the
update are those of the real batch (checked by ``tests/test_static_step.py``). The static shape
is the most any batch of the training set can need: the ``batch_size`` largest structures'
atoms plus two, and per neighbour list the ``batch_size`` largest edge counts; with
packed batches (``train.batching``) the packing's atom and edge budgets, which pad far less where
structures differ in size (:func:`~trustpot.train.graph_batches.packed_shape`).

The recorded step also gathers its batch: each training set lives on the device as one flat
store, an epoch's batches are planned on the host as integer rows copied there once, and a
step costs the host one small copy (the step's row) and the replay.

A step of several objectives (fine-tuning with replay: the new data and the replayed frames)
is one graph over one padded batch per objective, each with its own store and shape. Where
the data hold stress labels the recorded step always computes the stress term (the eager step
decides batch by batch, which would wait for the device): a structure without a stress label
has weight zero, so the loss and its gradient are the same.

Before capture the step runs twice on a side stream (lazy initialisation), after which the
weights and the optimiser state are put back exactly, so the graph's first replay is the run's
first step. The optimiser must be fused AdamW with tensor learning rates (which the trainer
sets up when a graph may be used); EMA and the loss check stay outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.config import TrainConfig
from trustpot.data.graph import Graph
from trustpot.errors import ConfigError
from trustpot.train.compiled_step import LossAndGrads, compiled_loss_and_grads
from trustpot.train.graph_batches import (
    FlatStore,
    StaticShape,
    packed_shape,
    plain_force_field_keys,
    static_shape,
)
from trustpot.train.objectives import ForceFieldLoss, Objective, ObjectiveLoss


class StaticStep:
    """One training step (gather, loss, gradient, clipping, optimiser step) on static shapes.

    Args:
        loss_fn: the step's loss from one padded batch per objective; it must not wait for
            the device.
        model: the trained module.
        optimizer: fused AdamW whose groups hold tensor learning rates.
        stores: each objective's training set on the device.
        clip_grad: gradient-norm clipping threshold (0: none).
        key_fn: what the recording depends on besides the shapes (e.g. the loss weights of
            the current stage); a new value records the step again.
        record: record the step as a CUDA graph and replay it (a CUDA device only).
        compiled: the compiled loss and gradients (:func:`compiled_loss_and_grads`) in
            place of ``loss_fn`` and autograd.
    """

    def __init__(
        self,
        loss_fn: Callable[[list[Graph]], Tensor],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stores: Sequence[FlatStore],
        clip_grad: float,
        key_fn: Callable[[], object] = lambda: None,
        record: bool = True,
        compiled: LossAndGrads | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.record = record
        self.compiled = compiled
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.key_fn = key_fn
        self.model = model
        self.optimizer = optimizer
        self.stores = list(stores)
        self.clip_grad = clip_grad
        device = next(model.parameters()).device
        #: the recorded step's inputs: one plan row per objective
        self.rows = [torch.zeros(s.row_length, dtype=torch.long, device=device) for s in stores]
        self.tables: list[Tensor] = []  # this epoch's plan rows, [n_steps, row_length] each
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None
        self.key: object = None

    @property
    def shapes(self) -> list[StaticShape]:
        """Each objective's static batch shape."""
        return [store.shape for store in self.stores]

    @property
    def how(self) -> str:
        """How the step runs, for the log (e.g. "compiled and recorded as a CUDA graph")."""
        parts = ["compiled (the first step compiles)"] if self.compiled is not None else []
        parts += ["recorded as a CUDA graph"] if self.record else []
        return " and ".join(parts) or "on static shapes"

    @property
    def atoms_per_step(self) -> int:
        """Atoms of one recorded step, padding included (every objective's batch)."""
        return sum(store.shape.n_atoms for store in self.stores)

    def start_epoch(self, items: Sequence[Sequence[Sequence[int]]]) -> int:
        """Plan an epoch: ``items[o][s]`` lists the structures of objective ``o``'s batch at
        step ``s``. Copies the plan to the device once; returns the number of steps.

        Raises:
            ValueError: objectives with different step counts, or a batch that does not fit.
        """
        if len(items) != len(self.stores):
            raise ValueError(f"{len(items)} objectives' batches for a step of {len(self.stores)}")
        steps = {len(batches) for batches in items}
        if len(steps) != 1:
            raise ValueError(f"the objectives have different numbers of steps: {sorted(steps)}")
        device = self.rows[0].device
        self.tables = [
            torch.from_numpy(np.stack([store.plan(b) for b in batches])).to(device)
            for store, batches in zip(self.stores, items)
        ]
        return steps.pop()

    def _body(self) -> Tensor:
        if self.compiled is not None:
            loss, grads = self.compiled(self.rows)
            for p, grad in zip(self.trainable, grads):
                p.grad = grad
        else:
            loss = self.loss_fn([store.gather(row) for store, row in zip(self.stores, self.rows)])
            torch.autograd.backward(loss)
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def _saved(self) -> list[tuple[Tensor, Tensor]]:
        tensors = [p.data for p in self.model.parameters()]
        for state in self.optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, Tensor))
        return [(t, t.detach().clone()) for t in tensors]

    def capture(self, key: object = None) -> None:
        """Record the step (its inputs, :attr:`rows`, must hold a real step's rows); ``key``
        names what the recording depends on besides the shapes (e.g. loss weights)."""
        saved = self._saved()
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:  # the warm-up's side stream is meant (PyTorch's own recipe)
            quiet(False)
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (optimiser state, library handles)
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        fresh = {id(t) for t, _ in saved}
        with torch.no_grad():
            for tensor, copy in saved:
                tensor.copy_(copy)
            for state in self.optimizer.state.values():  # state created by the warm-up
                for v in state.values():
                    if isinstance(v, Tensor) and id(v) not in fresh:
                        v.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body()
        self.key = key

    def __call__(self, step: int) -> Tensor:
        """Step ``step`` of the planned epoch (:meth:`start_epoch`); returns the loss (0-d, on
        the device)."""
        for row, table in zip(self.rows, self.tables):
            row.copy_(table[step], non_blocking=True)
        if not self.record:
            self.optimizer.zero_grad(set_to_none=True)
            return self._body()
        key = self.key_fn()
        if self.graph is None or key != self.key:
            self.capture(key)
        assert self.graph is not None and self.loss is not None
        self.graph.replay()
        return self.loss.clone()


def _store_of(data: Any, batch_size: int, packed: bool, device: torch.device) -> FlatStore | str:
    """``data`` as a flat store on ``device`` whose shape holds its batches (of
    ``batch_size`` structures, or ``packed`` to ``data.packing(batch_size)``), or why they
    cannot be padded."""
    structures = getattr(data, "structures", None)
    host_graph = getattr(data, "host_graph", None)
    if structures is None or host_graph is None:
        return "the training set is not a plain force-field dataset"
    graphs = [host_graph(k) for k in range(len(structures))]
    problem = plain_force_field_keys(graphs[0])
    if problem:
        return "the training set is not a plain force-field dataset: " + problem
    pad_number, cutoff = int(structures[0].numbers[0]), max(spec.cutoff for spec in data.specs)
    if packed:
        keys = [K.EDGE_INDEX_PREFIX + spec.name for spec in data.specs]
        shape = packed_shape(data.packing(batch_size), keys, pad_number, cutoff)
    else:
        keys = [k for k in graphs[0] if k.startswith(K.EDGE_INDEX_PREFIX)]
        shape = static_shape(
            [s.n_atoms for s in structures],
            {key: [g[key].shape[1] for g in graphs] for key in keys},
            batch_size, pad_number, cutoff,
        )  # fmt: skip
    return FlatStore(graphs, shape, device)


def static_step_for(
    kinds: Sequence[ObjectiveLoss],
    datasets: Sequence[Any],
    loss_fn: Callable[[list[Graph]], Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    record: bool = True,
    compile: bool = False,
    packed: bool = False,
) -> tuple[StaticStep | None, str]:
    """The static-shape step of a run whose objectives have the losses ``kinds`` on the
    training sets ``datasets`` (one each), recorded as a CUDA graph (``record``) and/or
    compiled (``compile``), its batches ``packed`` by size or of ``cfg.batch_size``
    structures; or ``None`` and the reason it cannot be.

    It needs force-field losses on :class:`~trustpot.data.dataset.GraphDataset` s without
    extra labels. A loss that may have a stress term computes it at every step from then on
    (:attr:`ForceFieldLoss.stress_every_batch`).
    """
    if len(kinds) != len(datasets) or not kinds:
        raise ValueError(f"{len(kinds)} objectives and {len(datasets)} training sets")
    if record and not all(group.get("capturable") for group in optimizer.param_groups):
        return None, "the optimiser cannot be recorded (e.g. resumed from a run without graphs)"
    device = next(model.parameters()).device
    stores: list[FlatStore] = []
    for k, (kind, data) in enumerate(zip(kinds, datasets)):
        which = f"objective {k + 1} of {len(kinds)}: " if len(kinds) > 1 else ""
        if not isinstance(kind, ForceFieldLoss):
            return None, f"{which}a {type(kind).__name__} objective"
        store = _store_of(data, cfg.batch_size, packed, device)
        if isinstance(store, str):
            return None, which + store
        stores.append(store)
    force_fields = [kind for kind in kinds if isinstance(kind, ForceFieldLoss)]
    for kind in force_fields:  # no batch is asked whether it has stress labels
        kind.stress_every_batch = kind.stress_term_possible
    compiled = None
    if compile:
        for kind in force_fields:  # read once here: the compiled step then has no side effect
            kind.model_scale(model)
        compiled = compiled_loss_and_grads(model, loss_fn, stores)
    step = StaticStep(
        loss_fn, model, optimizer, stores, cfg.clip_grad,
        # a second stage changes the weights: record again
        lambda: tuple(tuple(ff.train_weights.items()) for ff in force_fields),
        record=record, compiled=compiled,
    )  # fmt: skip
    return step, ""


def plan_static_step(
    objectives: Sequence[Objective],
    train: Mapping[str, Any],
    loss_fn: Callable[[list[Graph]], Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    record: bool,
    distributed: bool,
    packed: bool = False,
    compile: bool = False,
) -> tuple[StaticStep | None, str]:
    """The trainer's static-shape step: recorded as a CUDA graph when ``record`` (a single
    CUDA device and ``train.cuda_graphs`` not ``never``), compiled when ``compile``
    (``train.compile=always``, or ``auto`` once it has decided to); or ``None`` and why not.

    Raises:
        ConfigError: ``train.cuda_graphs=always`` or ``train.compile=always`` for a run that
            cannot have the step (the message names why).
    """
    if compile and distributed:
        raise ConfigError("train.compile cannot be used here: data-parallel training")
    step: StaticStep | None = None
    if not (record or compile):
        reason = "not a single CUDA device" if cfg.cuda_graphs != "never" else "never"
    else:
        step, reason = static_step_for(
            [o.kind for o in objectives], [train[o.dataset] for o in objectives], loss_fn,
            model, optimizer, cfg, record=record, compile=compile, packed=packed,
        )  # fmt: skip
    if reason and cfg.cuda_graphs == "always":
        raise ConfigError(f"train.cuda_graphs=always cannot be used here: {reason}")
    if reason and compile and cfg.compile == "always":
        raise ConfigError(f"train.compile cannot be used here: {reason}")
    return step, reason
