"""Structures to graphs (flat ``dict[str, Tensor]``) and batching."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from trustpot import keys as K
from trustpot.data.neighbors import NeighborListSpec, neighbor_pairs
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError

Graph = dict[str, Tensor]
#: ``pairs(positions [n, 3], cell [3, 3], pbc [3], cutoff) -> (i, j, shifts)`` as
#: :func:`~trustpot.data.neighbors.neighbor_pairs` returns them (a
#: :class:`~trustpot.data.neighbors.VerletNeighbors` reuses lists between MD steps).
PairSource = Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[np.ndarray, ...]]


def _fresh_pairs(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, ...]:
    return neighbor_pairs(positions, cell, pbc, cutoff)[:3]


def structure_to_graph(
    s: Structure,
    specs: Sequence[NeighborListSpec],
    dtype: torch.dtype = torch.float32,
    pairs: PairSource | None = None,
) -> Graph:
    """One structure as a graph with one neighbour list per spec.

    Labels that are absent become zeros with a zero weight, so that batches of partly
    labelled data stay rectangular and the losses skip them. ``pairs`` finds the neighbour
    pairs (default: a fresh vesin list per cutoff).
    """
    find = pairs or _fresh_pairs
    n = s.n_atoms
    g: Graph = {
        K.POSITIONS: torch.as_tensor(s.positions, dtype=dtype),
        K.ATOMIC_NUMBERS: torch.as_tensor(s.numbers, dtype=torch.long),
        K.CELL: torch.as_tensor(s.cell, dtype=dtype).unsqueeze(0),
        K.PBC: torch.as_tensor(s.pbc, dtype=torch.bool).unsqueeze(0),
        K.N_ATOMS: torch.tensor([n], dtype=torch.long),
        K.ENERGY: torch.tensor([0.0 if s.energy is None else s.energy], dtype=torch.float64),
        K.ENERGY_WEIGHT: torch.tensor([0.0 if s.energy is None else 1.0], dtype=dtype),
        K.FORCES: torch.as_tensor(np.zeros((n, 3)) if s.forces is None else s.forces, dtype=dtype),
        K.FORCES_WEIGHT: torch.tensor([0.0 if s.forces is None else 1.0], dtype=dtype),
        K.STRESS: torch.as_tensor(
            np.zeros((3, 3)) if s.stress is None else s.stress, dtype=dtype
        ).unsqueeze(0),
        K.STRESS_WEIGHT: torch.tensor([0.0 if s.stress is None else 1.0], dtype=dtype),
    }
    g.update(edge_tensors(find, s.positions, s.cell, s.pbc, specs, dtype))
    return g


def edge_tensors(
    pairs: PairSource,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    specs: Sequence[NeighborListSpec],
    dtype: torch.dtype = torch.float32,
) -> Graph:
    """The edges of one structure, one neighbour list per spec (specs sharing a cutoff share
    one list).

    Args:
        pairs: where the pairs come from (``pairs(positions, cell, pbc, cutoff)``).
        positions: [n_atoms, 3] Å; cell: [3, 3] Å; pbc: [3] bool.
        specs: the model's neighbour lists.
        dtype: dtype of the shifts.

    Returns:
        ``edge_index:<name>`` [2, n_edges] int64 (rows i, j) and ``edge_shift:<name>``
        [n_edges, 3] (integer image shifts, in ``dtype``) for each spec.
    """
    g: Graph = {}
    done: dict[float, tuple[Tensor, Tensor]] = {}
    for spec in specs:
        if spec.cutoff not in done:
            i, j, shifts = pairs(positions, cell, pbc, spec.cutoff)
            done[spec.cutoff] = (
                torch.from_numpy(np.stack([i, j])),
                torch.as_tensor(shifts, dtype=dtype),
            )
        g[K.edge_index_key(spec.name)], g[K.edge_shift_key(spec.name)] = done[spec.cutoff]
    return g


def collate(graphs: Sequence[Graph], n_atoms: Sequence[int] | None = None) -> Graph:
    """Concatenate graphs into one batch; edge indices are offset, ``batch`` is added.

    Args:
        graphs: the graphs, all on one device.
        n_atoms: their atom counts, known on the host; given, collating graphs that live on
            an accelerator never waits for it (no device-to-host copy).
    """
    if not graphs:
        raise ValueError("cannot collate an empty list of graphs")
    counts = [int(g[K.N_ATOMS][0]) for g in graphs] if n_atoms is None else list(n_atoms)
    if len(counts) != len(graphs):
        raise ValueError(f"{len(counts)} atom counts for {len(graphs)} graphs")
    offsets = [0]
    for n in counts[:-1]:
        offsets.append(offsets[-1] + n)
    out: Graph = {}
    for key in graphs[0]:
        if key.startswith(K.EDGE_INDEX_PREFIX):
            out[key] = torch.cat([g[key] + off for g, off in zip(graphs, offsets)], 1)
        else:
            out[key] = torch.cat([g[key] for g in graphs], 0)
    device = graphs[0][K.N_ATOMS].device
    out[K.BATCH] = torch.repeat_interleave(
        torch.arange(len(graphs), device=device), out[K.N_ATOMS], output_size=sum(counts)
    )
    return out


def to_device(g: Graph, device: torch.device | str, non_blocking: bool = False) -> Graph:
    """Move every tensor of ``g`` to ``device`` (``non_blocking`` for pinned host tensors)."""
    return {k: v.to(device, non_blocking=non_blocking) for k, v in g.items()}


def n_graphs(g: Graph) -> int:
    """Number of structures in a batch."""
    return int(g[K.N_ATOMS].shape[0])


def replicate_batch(g: Graph, m: int) -> Graph:
    """``m`` copies of the batch ``g`` as one batch, sample-major.

    Structure ``b`` of copy ``s`` becomes structure ``s * n_graphs + b``, atom ``a`` of copy
    ``s`` becomes atom ``s * n_atoms + a``: the result equals ``collate`` of the structures of
    ``g`` listed ``m`` times in a row. Edge indices are offset, ``batch`` is renumbered and every
    other field (node, edge or graph level) is tiled along its first dimension.
    """
    if m < 1:
        raise ConfigError(f"cannot replicate a batch {m} times")
    n_atoms = int(g[K.POSITIONS].shape[0])
    n_graphs = int(g[K.N_ATOMS].shape[0])
    batch = g.get(K.BATCH)
    if batch is None:
        batch = torch.zeros(n_atoms, dtype=torch.long, device=g[K.POSITIONS].device)
    out: Graph = {}
    for key, value in g.items():
        if key.startswith(K.EDGE_INDEX_PREFIX):
            offsets = torch.arange(m, device=value.device) * n_atoms
            out[key] = (value.unsqueeze(0) + offsets.view(m, 1, 1)).permute(1, 0, 2).reshape(2, -1)
        elif key != K.BATCH and value.dim() > 0:
            out[key] = value.repeat(m, *([1] * (value.dim() - 1)))
        elif key != K.BATCH:
            out[key] = value
    offsets = torch.arange(m, device=batch.device) * n_graphs
    out[K.BATCH] = (batch.unsqueeze(0) + offsets.view(m, 1)).reshape(-1)
    return out
