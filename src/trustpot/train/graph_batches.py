"""Padded batches of the CUDA-graph step, gathered on the device from one flat copy of the data.

Collating a batch from per-structure graphs and padding it to the static shape took the host
about 80 small operations per step, and on a GPU, where each costs the host tens of
microseconds, that was as long as the replayed step itself. Here a training set is
concatenated once on the device (:class:`FlatStore`, with padding rows appended), and each
epoch's batches are written on the host, all at once, as integer rows (:meth:`FlatStore.plan`):
which rows of the store fill each slot of the static batch, the batch index of each atom and
the batch's edge indices. One copy takes an epoch's rows to the device; the recorded step
gathers its batch from the store with its row (:meth:`FlatStore.gather`, a dozen kernels
inside the graph), so a step costs the host one small device-to-device copy and the replay.

A gathered batch (the step that uses it: :mod:`trustpot.train.static_step`) holds:

* the real graphs of the batch first, unchanged, edge indices offset as in ``collate``;
* then padding graphs: the first holds the spare atoms (at least two), the others one atom
  each, so that every batch has ``shape.n_graphs`` graphs and ``shape.n_atoms`` atoms;
  padding atoms sit ``shape.spacing`` apart on the x axis and carry ``shape.pad_number``;
* padding edges join the first two padding atoms (farther apart than any cutoff), with zero
  shifts; every label and label weight of a padding graph is zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trustpot import keys as K
from trustpot.data.dataset import Packing
from trustpot.data.graph import Graph

#: per-atom keys of a force-field graph
ATOM_KEYS = (K.POSITIONS, K.ATOMIC_NUMBERS, K.FORCES)
#: per-structure keys with one row per graph
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


def packed_shape(
    packing: Packing, edge_keys: Sequence[str], pad_number: int, cutoff: float
) -> StaticShape:
    """The shape that holds any batch packed to ``packing`` (``train.batching=atoms``): its
    atom and edge budgets, room for the most structures a batch can hold, and a padding atom
    for each padding graph.

    Args:
        packing: the budgets; its size columns are atoms, then the edges of ``edge_keys``.
        edge_keys: the ``edge_index:<name>`` keys, in the order of the packing's columns.
        pad_number: atomic number given to padding atoms.
        cutoff: the largest cutoff of the model (Å).
    """
    if packing.sizes.shape[1] != len(edge_keys) + 1:
        raise ValueError(f"a packing of {packing.sizes.shape[1]} sizes for {len(edge_keys)} lists")
    most = packing.most_structures()
    edges = {key: int(packing.budget[j + 1]) for j, key in enumerate(edge_keys)}
    return StaticShape(
        most + 1, int(packing.budget[0]) + most + 2, edges, int(pad_number), 2.0 * cutoff + 1.0
    )


def plain_force_field_keys(g: Graph) -> str:
    """Empty when ``g`` holds only force-field fields (which a padded batch knows how to
    fill), else a sentence naming the first field that is not."""
    for key in g:
        edge = key.startswith(K.EDGE_INDEX_PREFIX) or key.startswith(K.EDGE_SHIFT_PREFIX)
        if not edge and key not in ATOM_KEYS and key not in GRAPH_ROWS:
            return f"the graphs hold the field '{key}' (not a force-field field)"
    return ""


class FlatStore:
    """One training set's graphs concatenated on ``device``, padding rows appended.

    Args:
        graphs: the structures' graphs on the host (``GraphDataset.host_graph``), each with
            the force-field fields only (:func:`plain_force_field_keys`).
        shape: the static shape of its batches.
        device: where the store lives.

    Attributes:
        atoms: per-atom fields [n_atoms_total + shape.n_atoms, ...] (real atoms, then padding
            atoms at ``spacing`` apart).
        rows: per-graph fields [n_graphs + shape.n_atoms, ...]: real graphs, then padding
            graphs whose ``n_atoms`` is 1, 2, ... (every other field zero).
        shifts: per ``edge_shift:<name>`` key [n_edges_total + 1, 3] (the last row: zeros).
    """

    def __init__(self, graphs: Sequence[Graph], shape: StaticShape, device: torch.device) -> None:
        if not graphs:
            raise ValueError("a store needs at least one graph")
        self.shape = shape
        self.n_graphs = len(graphs)
        counts = np.array([int(g[K.N_ATOMS][0]) for g in graphs], dtype=np.int64)
        self.atom_count = counts
        self.atom_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.pad_atom = int(counts.sum())  # first padding atom of the store
        self.pad_row = self.n_graphs  # the padding graph row with one atom
        first = graphs[0]
        spare = shape.n_atoms  # more padding atoms and rows than any batch needs
        dtype = first[K.POSITIONS].dtype
        ar = torch.arange(spare)
        pad_atoms: Graph = {
            K.POSITIONS: torch.zeros((spare, 3), dtype=dtype),
            K.ATOMIC_NUMBERS: torch.full((spare,), shape.pad_number, dtype=torch.long),
            K.FORCES: torch.zeros((spare, 3), dtype=first[K.FORCES].dtype),
        }
        pad_atoms[K.POSITIONS][:, 0] = ar.to(dtype) * shape.spacing
        self.atoms = {
            key: torch.cat([*(g[key] for g in graphs), pad_atoms[key]]).to(device)
            for key in ATOM_KEYS
        }
        pad_rows = {
            key: torch.zeros((spare, *first[key].shape[1:]), dtype=first[key].dtype)
            for key in GRAPH_ROWS
        }
        pad_rows[K.N_ATOMS] = ar + 1
        self.rows = {
            key: torch.cat([*(g[key] for g in graphs), pad_rows[key]]).to(device)
            for key in GRAPH_ROWS
        }
        self.edge_keys = [k for k in first if k.startswith(K.EDGE_INDEX_PREFIX)]
        self.local: dict[str, np.ndarray] = {}  # [2, n_edges_total] indices within each graph
        self.edge_start: dict[str, np.ndarray] = {}
        self.edge_count: dict[str, np.ndarray] = {}
        self.shifts: dict[str, Tensor] = {}
        for key in self.edge_keys:
            shift_key = K.EDGE_SHIFT_PREFIX + key[len(K.EDGE_INDEX_PREFIX) :]
            n_edges = np.array([g[key].shape[1] for g in graphs], dtype=np.int64)
            self.edge_count[key] = n_edges
            self.edge_start[key] = np.concatenate([[0], np.cumsum(n_edges)[:-1]]).astype(np.int64)
            self.local[key] = np.concatenate([g[key].numpy() for g in graphs], axis=1)
            zero = torch.zeros((1, 3), dtype=first[shift_key].dtype)
            self.shifts[shift_key] = torch.cat([*(g[shift_key] for g in graphs), zero]).to(device)
        # where each part sits in a plan row
        a, n = shape.n_atoms, shape.n_graphs
        self._layout: dict[str, tuple[int, int]] = {"atoms": (0, a), "batch": (a, 2 * a)}
        self._layout["rows"] = (2 * a, 2 * a + n)
        end = 2 * a + n
        for key in self.edge_keys:
            e = shape.n_edges[key]
            self._layout[key] = (end, end + 2 * e)
            self._layout["sel:" + key] = (end + 2 * e, end + 3 * e)
            end += 3 * e
        self.row_length = end

    def plan(self, items: Sequence[int]) -> np.ndarray:
        """The integer row [row_length] that gathers the padded batch of structures ``items``.

        Raises:
            ValueError: the batch does not fit the static shape (more graphs, atoms or edges).
        """
        shape = self.shape
        items_arr = np.asarray(items, dtype=np.int64)
        n_real = len(items_arr)
        counts = self.atom_count[items_arr]
        atoms = int(counts.sum())
        n_pad, spare = shape.n_graphs - n_real, shape.n_atoms - atoms
        if n_pad < 1 or spare < n_pad + 1:
            raise ValueError(
                f"a batch of {n_real} structures and {atoms} atoms does not fit the static "
                f"shape ({shape.n_graphs} graphs, {shape.n_atoms} atoms)"
            )
        first = spare - n_pad + 1  # atoms of the first padding graph (>= 2)
        row = np.empty(self.row_length, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        starts = self.atom_start[items_arr]
        ar = np.arange(spare)
        self._put(row, "atoms", np.concatenate([_ranges(starts, counts), self.pad_atom + ar]))
        real_batch = np.repeat(np.arange(n_real), counts)
        self._put(
            row, "batch", np.concatenate([real_batch, n_real + np.clip(ar - (first - 1), 0, None)])
        )
        pad_rows = np.full(n_pad, self.pad_row)  # padding graphs of one atom
        pad_rows[0] = self.pad_row + first - 1
        self._put(row, "rows", np.concatenate([items_arr, pad_rows]))
        for key in self.edge_keys:
            e_starts, e_counts = self.edge_start[key][items_arr], self.edge_count[key][items_arr]
            sel = _ranges(e_starts, e_counts)
            extra = shape.n_edges[key] - len(sel)
            if extra < 0:
                raise ValueError(f"a batch has {len(sel)} edges in '{key}', the static "
                                 f"shape {shape.n_edges[key]}")  # fmt: skip
            index = self.local[key][:, sel] + np.repeat(offsets, e_counts)
            pad = np.array([[atoms], [atoms + 1]]).repeat(extra, axis=1)
            self._put(row, key, np.concatenate([index, pad], axis=1).reshape(-1))
            n_shifts = self.shifts[K.EDGE_SHIFT_PREFIX + key[len(K.EDGE_INDEX_PREFIX) :]].shape[0]
            self._put(row, "sel:" + key, np.concatenate([sel, np.full(extra, n_shifts - 1)]))
        return row

    def _put(self, row: np.ndarray, part: str, values: np.ndarray) -> None:
        start, stop = self._layout[part]
        row[start:stop] = values

    def gather(self, row: Tensor) -> Graph:
        """The padded batch of a plan row [row_length] (on the store's device); no value is
        read back to the host, so this runs inside a recorded graph."""
        part = {name: row[a:b] for name, (a, b) in self._layout.items()}
        out: Graph = {
            key: value.index_select(0, part["atoms"]) for key, value in self.atoms.items()
        }
        out.update({key: value.index_select(0, part["rows"]) for key, value in self.rows.items()})
        out[K.BATCH] = part["batch"]
        for key in self.edge_keys:
            shift_key = K.EDGE_SHIFT_PREFIX + key[len(K.EDGE_INDEX_PREFIX) :]
            out[key] = part[key].view(2, -1)
            out[shift_key] = self.shifts[shift_key].index_select(0, part["sel:" + key])
        return out


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first_of = np.repeat(np.cumsum(counts) - counts, counts)
    out: np.ndarray = np.repeat(starts, counts) + (np.arange(total) - first_of)
    return out
