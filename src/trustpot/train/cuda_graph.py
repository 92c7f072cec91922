"""A training step recorded once as a CUDA graph and replayed for every batch.

A PaiNN training step (forward, forces by autograd with the graph kept, backward, clipping,
AdamW) is about 1,100 small kernels; on a GPU the host takes several times longer to issue
them than the GPU takes to run them (``benchmarks/results/gpu_check``). A CUDA graph issues
the whole step at once. It needs fixed shapes, so every batch is padded to one shape:

* the real graphs of the batch come first, unchanged;
* then padding graphs: the first holds the spare atoms (at least two), the others one atom
  each, so that every batch has ``batch_size + 1`` graphs and the same number of atoms;
* padding edges join the first two padding atoms, which sit farther apart than any cutoff.

Padding structures carry zero energy, force and stress weights, and every padding atom and
edge belongs to a padding graph, so the loss, its gradient and the update are those of the
real batch (checked by ``tests/test_cuda_graph.py``). The static shape is the most any batch
of the training set can need: the ``batch_size`` largest structures' atoms plus two, and per
neighbour list the ``batch_size`` largest edge counts.

Before capture the step runs twice on a side stream (lazy initialisation), after which the
weights and the optimiser state are put back exactly, so the graph's first replay is the run's
first step. The optimiser must be fused AdamW with tensor learning rates (which the trainer
sets up when a graph may be used); EMA and the loss check stay outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.config import TrainConfig
from trustpot.data.graph import Graph
from trustpot.train.objectives import ForceFieldLoss, ObjectiveLoss

#: per-structure keys with one row per graph (positions, numbers, forces and batch: per atom)
GRAPH_ROWS = (
    K.CELL, K.PBC, K.N_ATOMS, K.ENERGY, K.ENERGY_WEIGHT, K.FORCES_WEIGHT, K.STRESS,
    K.STRESS_WEIGHT,
)  # fmt: skip


@dataclass(frozen=True)
class StaticShape:
    """The one shape every padded batch has.

    Attributes:
        n_graphs: graphs per batch (the batch size plus one padding graph at least).
        n_atoms: atoms per batch.
        n_edges: edges per batch for each ``edge_index:<name>`` key.
        pad_number: atomic number of padding atoms (one the model knows).
        spacing: Å between consecutive padding atoms (more than any cutoff).
    """

    n_graphs: int
    n_atoms: int
    n_edges: dict[str, int]
    pad_number: int
    spacing: float


def static_shape(
    atom_counts: Sequence[int],
    edge_counts: dict[str, Sequence[int]],
    batch_size: int,
    pad_number: int,
    cutoff: float,
) -> StaticShape:
    """The shape that holds any batch of ``batch_size`` of these structures.

    Args:
        atom_counts: atoms of each structure.
        edge_counts: per ``edge_index:<name>`` key, edges of each structure.
        batch_size: structures per batch.
        pad_number: atomic number given to padding atoms.
        cutoff: the largest cutoff of the model (Å).
    """
    b = min(batch_size, len(atom_counts))
    largest = sorted(atom_counts, reverse=True)[:b]
    edges = {key: sum(sorted(c, reverse=True)[:b]) for key, c in edge_counts.items()}
    return StaticShape(b + 1, sum(largest) + 2, edges, int(pad_number), 2.0 * cutoff + 1.0)


def pad_batch(batch: Graph, shape: StaticShape) -> Graph:
    """``batch`` padded to ``shape`` (no value is read back from the batch's device).

    Raises:
        ValueError: the batch does not fit (more graphs, atoms or edges than ``shape``).
    """
    n_real = batch[K.N_ATOMS].shape[0]
    atoms = batch[K.POSITIONS].shape[0]
    n_pad, spare = shape.n_graphs - n_real, shape.n_atoms - atoms
    if n_pad < 1 or spare < n_pad + 1:
        raise ValueError(
            f"a batch of {n_real} structures and {atoms} atoms does not fit the static shape "
            f"({shape.n_graphs} graphs, {shape.n_atoms} atoms)"
        )
    device, dtype = batch[K.POSITIONS].device, batch[K.POSITIONS].dtype
    ar = torch.arange(spare, device=device)
    first = spare - n_pad + 1  # atoms of the first padding graph (>= 2)
    pad: Graph = {
        K.POSITIONS: torch.zeros((spare, 3), dtype=dtype, device=device),
        K.ATOMIC_NUMBERS: torch.full((spare,), shape.pad_number, device=device),
        K.FORCES: torch.zeros((spare, 3), dtype=batch[K.FORCES].dtype, device=device),
        K.BATCH: n_real + (ar - (first - 1)).clamp_min(0),
        K.N_ATOMS: torch.cat(
            [
                torch.full((1,), first, dtype=torch.long, device=device),
                torch.ones(n_pad - 1, dtype=torch.long, device=device),
            ]
        ),
    }
    pad[K.POSITIONS][:, 0] = ar.to(dtype) * shape.spacing
    for key in GRAPH_ROWS:
        if key != K.N_ATOMS:
            ref = batch[key]
            pad[key] = torch.zeros((n_pad, *ref.shape[1:]), dtype=ref.dtype, device=device)
    out: Graph = {}
    for key, value in batch.items():
        if key.startswith(K.EDGE_INDEX_PREFIX):
            extra = shape.n_edges[key] - value.shape[1]
            if extra < 0:
                raise ValueError(f"a batch has {value.shape[1]} edges in '{key}', the static "
                                 f"shape {shape.n_edges[key]}")  # fmt: skip
            ends = torch.stack(  # filled on the device: nothing is copied from the host
                [torch.full((extra,), atoms, device=device), torch.full((extra,), atoms + 1,
                 device=device)]
            )  # fmt: skip
            out[key] = torch.cat([value, ends.to(value.dtype)], 1)
        elif key.startswith(K.EDGE_SHIFT_PREFIX):
            index_key = K.EDGE_INDEX_PREFIX + key[len(K.EDGE_SHIFT_PREFIX) :]
            extra = shape.n_edges[index_key] - value.shape[0]
            out[key] = torch.cat([value, value.new_zeros((extra, 3))], 0)
        elif key in pad:
            out[key] = torch.cat([value, pad[key]], 0)
        else:
            raise ValueError(f"cannot pad the batch field '{key}' (not a force-field field)")
    return out


class GraphedStep:
    """One training step (loss, backward, clipping, optimiser step) as a CUDA graph.

    Args:
        loss_fn: the step's loss from a (padded) batch; it must not wait for the device.
        model: the trained module.
        optimizer: fused AdamW whose groups hold tensor learning rates.
        shape: the static batch shape.
        clip_grad: gradient-norm clipping threshold (0: none).
        key_fn: what the recording depends on besides the shape (e.g. the loss weights of
            the current stage); a new value records the step again.
    """

    def __init__(
        self,
        loss_fn: Callable[[Graph], Tensor],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        shape: StaticShape,
        clip_grad: float,
        key_fn: Callable[[], object] = lambda: None,
    ) -> None:
        self.loss_fn = loss_fn
        self.key_fn = key_fn
        self.model = model
        self.optimizer = optimizer
        self.shape = shape
        self.clip_grad = clip_grad
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Graph = {}
        self.loss: Tensor | None = None
        self.key: object = None

    def _body(self) -> Tensor:
        loss = self.loss_fn(self.static)
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

    def capture(self, batch: Graph, key: object = None) -> None:
        """Record the step for batches like ``batch`` (already padded); ``key`` names what
        the recording depends on besides the shape (e.g. the loss weights)."""
        self.static = {k: v.clone() for k, v in batch.items()}
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

    def __call__(self, batch: Graph) -> Tensor:
        """One step on ``batch`` (padded here); returns the loss (0-d, on the device)."""
        padded = pad_batch(batch, self.shape)
        key = self.key_fn()
        if self.graph is None or key != self.key:
            self.capture(padded, key)
        for k, v in padded.items():
            self.static[k].copy_(v, non_blocking=True)
        assert self.graph is not None and self.loss is not None
        self.graph.replay()
        return self.loss.clone()


def graphed_step_for(
    kind: ObjectiveLoss,
    data: Any,
    loss_fn: Callable[[Graph], Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
) -> tuple[GraphedStep | None, str]:
    """The graphed step of a run with one objective ``kind`` on the training set ``data``,
    or ``None`` and the reason it cannot be graphed.

    A graph needs a force-field loss, a :class:`~trustpot.data.dataset.GraphDataset` without
    extra labels, and no stress term (whether a batch has stress labels is decided per batch).
    """
    if not isinstance(kind, ForceFieldLoss):
        return None, f"a {type(kind).__name__} objective"
    if not all(group.get("capturable") for group in optimizer.param_groups):
        return None, "the optimiser cannot be recorded (e.g. resumed from a run without graphs)"
    structures = getattr(data, "structures", None)
    if structures is None or getattr(data, "labels", None):
        return None, "the training set is not a plain force-field dataset"
    if kind.stress_term_possible:
        return None, "stress labels (the stress term is decided batch by batch)"
    graphs = [data.graph(k) for k in range(len(structures))]
    keys = [k for k in graphs[0] if k.startswith(K.EDGE_INDEX_PREFIX)]
    shape = static_shape(
        [s.n_atoms for s in structures],
        {key: [g[key].shape[1] for g in graphs] for key in keys},
        cfg.batch_size,
        int(structures[0].numbers[0]),
        max(spec.cutoff for spec in data.specs),
    )
    force_field: ForceFieldLoss = kind  # a second stage changes the weights: record again
    step = GraphedStep(
        loss_fn, model, optimizer, shape, cfg.clip_grad,
        lambda: tuple(force_field.train_weights.items()),
    )  # fmt: skip
    return step, ""
