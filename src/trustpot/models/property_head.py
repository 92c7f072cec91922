"""Property heads: a property read from the frames, predicted from a model's per-atom features.

A :class:`PropertyTarget` says what the property is: the key it is stored under in the frames
(``Structure.info`` for a per-structure value, ``Structure.arrays`` for a per-atom array), its
level (``structure`` or ``atom``), its kind (``scalar`` or a 3-``vector``), for a structure
the reduction over atoms (``sum``: extensive, ``mean``: intensive) and its unit (free text, as
the frames store it; values are never converted).

A :class:`PropertyHead` reads the invariant per-atom features ``h_i`` (``embed(g)["node"]``
[n_atoms, F], which every model kind provides) and predicts, with ``s`` and ``m`` the target's
standardisation (scale and shift, fitted on the training targets by :meth:`PropertyHead.fit`):

- per-atom scalar: ``p_i = m + s * MLP(h_i)``;
- structure scalar: ``sum_i p_i`` (``sum``) or ``mean_i p_i`` (``mean``);
- per-atom vector (rotation-equivariant): ``v_i = s * sum_j w(h_i, h_j, r_ij) * r_ij / r_ij``
  over the edges of the model's first neighbour list, ``w`` an MLP of both atoms' features and
  a Gaussian basis of the distance, times a cosine cutoff;
- structure vector (a dipole): ``s * (sum_i q_i (r_i - c) / 1 Å + sum_i v_i)`` with latent
  charges ``q_i = MLP(h_i)`` shifted to sum to zero in each structure (a neutral molecule:
  the centroid ``c`` then drops out), divided by the atom count for ``mean``. Meant for
  molecules: the dipole of a periodic cell is not defined by its positions alone.

Scalars are standardised (shift ``m``: mean, scale ``s``: standard deviation); vectors have no
shift (it would break equivariance) and ``s`` the RMS of their components. An extensive
(``sum``) target is standardised per atom (``y / n_atoms``), as energies are. The training loss
(:class:`~trustpot.train.objectives.PropertyLoss`) divides errors by ``s`` (and by the atom
count when extensive), so it is dimensionless.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.structures import Structure
from trustpot.errors import CheckpointError, ConfigError, DataError
from trustpot.models.base import edge_vectors
from trustpot.nn import scatter_sum
from trustpot.nn.layers import MLP, CosineCutoff, GaussianBasis

__all__ = ["KINDS", "LEVELS", "REDUCTIONS", "PropertyHead", "PropertyTarget"]

LEVELS = ("structure", "atom")
KINDS = ("scalar", "vector")
REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class PropertyTarget:
    """A property stored in the frames (see the module docstring).

    Attributes:
        key: its name in ``Structure.info`` (structure level) or ``Structure.arrays`` (atom).
        level: ``structure`` or ``atom``.
        kind: ``scalar`` or ``vector`` (3 components).
        reduce: structure level: ``sum`` (extensive) or ``mean`` (intensive); atom level: None.
        unit: unit of the values as the frames store them (may be empty).
    """

    key: str
    level: str
    kind: str
    reduce: str | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            raise ConfigError("a property target needs a key")
        if self.level not in LEVELS:
            raise ConfigError(f"property level must be one of {LEVELS}, got '{self.level}'")
        if self.kind not in KINDS:
            raise ConfigError(f"property kind must be one of {KINDS}, got '{self.kind}'")
        if self.level == "atom" and self.reduce is not None:
            raise ConfigError("a per-atom property has no reduction over atoms")
        if self.level == "structure" and self.reduce not in REDUCTIONS:
            raise ConfigError(f"a per-structure property needs a reduction in {REDUCTIONS}")

    @property
    def output(self) -> str:
        """The model output (and batch) key, ``property:<key>``."""
        return K.property_key(self.key)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-item shape: ``()`` for a scalar, ``(3,)`` for a vector."""
        return () if self.kind == "scalar" else (3,)

    @property
    def extensive(self) -> bool:
        """A per-structure sum over atoms (standardised and compared per atom)."""
        return self.reduce == "sum"

    def spec(self) -> K.FieldSpec:
        """The output's field spec (``graph`` or ``node`` level, shape, unit)."""
        level: K.Level = "graph" if self.level == "structure" else "node"
        reduce = f" ({self.reduce})" if self.reduce else ""
        doc = f"{self.level} {self.kind} '{self.key}'{reduce}"
        return K.property_spec(level, self.shape, self.unit, doc)

    def reference(self, s: Structure) -> np.ndarray | None:
        """The stored value of ``s`` as float64 (structure: ``shape``; atom: [n_atoms,
        *shape]), ``None`` when the frame lacks the key.

        Raises:
            ValueError: the value is not numeric or has another shape.
        """
        raw = s.info.get(self.key) if self.level == "structure" else s.arrays.get(self.key)
        if raw is None:
            return None
        value = np.asarray(raw, dtype=np.float64)
        if self.level == "structure":
            expected: tuple[int, ...] = self.shape
            if self.kind == "scalar" and value.shape == (1,):
                value = value.reshape(())
        else:
            expected = (s.n_atoms, *self.shape)
            if self.kind == "scalar" and value.shape == (s.n_atoms, 1):
                value = value.reshape(s.n_atoms)
        if value.shape != expected:
            raise ValueError(f"shape {value.shape}, expected {expected} ({self.level} {self.kind})")
        return value

    def values(self, structures: Sequence[Structure], source: str) -> list[np.ndarray]:
        """The reference value of every structure (see :meth:`reference`).

        Raises:
            DataError: naming ``source``, the frame and the key, for a frame without the key, a
                value of the wrong shape, or one that is not a finite number.
        """
        where = "info" if self.level == "structure" else "per-atom arrays"
        out = []
        for frame, s in enumerate(structures):
            try:
                value = self.reference(s)
            except (TypeError, ValueError) as err:
                msg = f"not a {self.kind} per {self.level}: {err}"
                raise DataError(source, msg, frame, self.key) from None
            if value is None:
                raise DataError(source, f"the frame's {where} lack this property", frame, self.key)
            if not np.all(np.isfinite(value)):
                raise DataError(source, "contains NaN or inf", frame, self.key)
            out.append(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (checkpoint meta, ``finetune.json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, path: str = "checkpoint") -> PropertyTarget:
        """Rebuild a target from :meth:`to_dict`; :class:`CheckpointError` naming ``path``."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path}: malformed property target (not a mapping)")
        try:
            reduce = data.get("reduce")
            return cls(
                key=str(data["key"]), level=str(data["level"]), kind=str(data["kind"]),
                reduce=None if reduce is None else str(reduce), unit=str(data.get("unit", "")),
            )  # fmt: skip
        except (KeyError, ConfigError) as err:
            raise CheckpointError(f"{path}: malformed property target: {err}") from None

    @staticmethod
    def levels_of(s: Structure, key: str) -> list[str]:
        """Where ``s`` holds ``key``: ``structure`` (its info), ``atom`` (its arrays), both or
        neither."""
        return [lv for lv, d in (("structure", s.info), ("atom", s.arrays)) if key in d]

    @classmethod
    def infer(
        cls,
        structures: Sequence[Structure],
        key: str,
        source: str,
        level: str,
        kind: str | None = None,
        reduce: str | None = None,
        unit: str = "",
    ) -> PropertyTarget:
        """The target ``key`` at ``level`` with what is not given read off the first frame:
        the kind from the value's shape, the reduction ``mean`` for a structure scalar (a gap)
        and ``sum`` for a structure vector (a dipole). Every frame is then checked
        (:meth:`values`).

        Raises:
            DataError: the first frame lacks the key, or its value is neither a scalar nor a
                3-vector (naming ``source``, the frame and the key); a later frame disagrees.
            ConfigError: a ``reduce`` for an atom-level target.
        """
        first = structures[0]
        if kind is None:
            raw = first.info.get(key) if level == "structure" else first.arrays.get(key)
            if raw is None:
                raise DataError(source, f"not in the frame's {level}-level values", 0, key)
            try:
                shape = np.asarray(raw, dtype=np.float64).shape
            except (TypeError, ValueError):
                raise DataError(source, "not a number", 0, key) from None
            item = shape if level == "structure" else shape[1:]
            if item in ((), (1,)):
                kind = "scalar"
            elif item == (3,):
                kind = "vector"
            else:
                raise DataError(source, f"shape {shape} is neither a scalar nor a 3-vector per "
                                f"{level}", 0, key)  # fmt: skip
        if level == "structure" and reduce is None:
            reduce = "mean" if kind == "scalar" else "sum"
        target = cls(key, level, kind, reduce, unit)
        target.values(structures, source)
        return target


class PropertyHead(nn.Module):
    """Predicts a :class:`PropertyTarget` from per-atom features (module docstring).

    Args:
        target: what to predict.
        width: F, the width of the per-atom features ``node`` [n_atoms, F] it reads.
        edges: name of the neighbour list a vector target sums over (None for scalars).
        cutoff: that list's radius, Å (None for scalars).
        hidden: width of the hidden layers of its MLPs.
        n_basis: Gaussians of the edge distance (vector targets).
        dtype: dtype of its weights (the model's).
    """

    shift: Tensor  # [] float64, in the target's unit (scalars; 0 for vectors)
    scale: Tensor  # [] float64, in the target's unit (per atom when extensive)

    def __init__(
        self,
        target: PropertyTarget,
        width: int,
        edges: str | None = None,
        cutoff: float | None = None,
        hidden: int = 64,
        n_basis: int = 16,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if width < 1 or hidden < 1 or n_basis < 1:
            raise ConfigError("property head widths must be positive")
        self.target = target
        self.width, self.hidden, self.n_basis = int(width), int(hidden), int(n_basis)
        self.edges = edges
        self.cutoff = None if cutoff is None else float(cutoff)
        self.atom_mlp: MLP | None = None
        self.edge_mlp: MLP | None = None
        self.basis: GaussianBasis | None = None
        self.envelope: CosineCutoff | None = None
        if target.kind == "scalar" or target.level == "structure":
            self.atom_mlp = MLP([width, hidden, hidden, 1]).to(dtype)
        if target.kind == "vector":
            if edges is None or self.cutoff is None or self.cutoff <= 0:
                raise ConfigError("a vector property head needs a neighbour list and its cutoff")
            self.basis = GaussianBasis(self.cutoff, n_basis).to(dtype)
            self.envelope = CosineCutoff(self.cutoff)
            self.edge_mlp = MLP([2 * width + n_basis, hidden, hidden, 1]).to(dtype)
        self.register_buffer("shift", torch.zeros((), dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    # -- fitting and persistence ----------------------------------------------------------
    def fit(self, values: Sequence[np.ndarray], n_atoms: Sequence[int]) -> tuple[float, float]:
        """Set the shift and scale from the training targets (module docstring); returns them.

        Args:
            values: per structure, the reference (:meth:`PropertyTarget.values`).
            n_atoms: per structure, its atom count.
        """
        per = [v / n for v, n in zip(values, n_atoms)] if self.target.extensive else values
        flat = np.concatenate([np.ravel(v) for v in per])
        if self.target.kind == "scalar":
            shift, spread = float(flat.mean()), float(flat.std())
        else:
            shift, spread = 0.0, float(np.sqrt((flat**2).mean()))
        scale = spread if spread > 1e-12 else max(abs(shift), 1.0)
        with torch.no_grad():
            self.shift.fill_(shift)
            self.scale.fill_(scale)
        return shift, scale

    def config(self) -> dict[str, Any]:
        """Everything :meth:`from_config` needs besides the weights."""
        return {
            "target": self.target.to_dict(), "width": self.width, "hidden": self.hidden,
            "n_basis": self.n_basis, "edges": self.edges, "cutoff": self.cutoff,
        }  # fmt: skip

    @classmethod
    def from_config(
        cls, data: Any, dtype: torch.dtype, edge_lists: Sequence[str], path: str = "checkpoint"
    ) -> PropertyHead:
        """Rebuild from :meth:`config` (weights not loaded); ``edge_lists`` are the names of
        the model's neighbour lists.

        Raises:
            CheckpointError: naming ``path``, for malformed fields or an unknown list.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path}: malformed property head (not a mapping)")
        target = PropertyTarget.from_dict(data.get("target"), path)
        sizes = [data.get(k) for k in ("width", "hidden", "n_basis")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise CheckpointError(f"{path}: malformed property head widths {sizes}")
        edges, cutoff = data.get("edges"), data.get("cutoff")
        if edges is not None and (not isinstance(edges, str) or edges not in edge_lists):
            raise CheckpointError(f"{path}: property head reads unknown neighbour list {edges!r}")
        if cutoff is not None and not isinstance(cutoff, (int, float)):
            raise CheckpointError(f"{path}: malformed property head cutoff {cutoff!r}")
        width, hidden, n_basis = (int(v) for v in sizes)  # type: ignore[arg-type]
        try:
            return cls(target, width, edges, cutoff, hidden, n_basis, dtype)
        except ConfigError as err:
            raise CheckpointError(f"{path}: malformed property head: {err}") from None

    # -- evaluation -----------------------------------------------------------------------
    def atom_vectors(self, g: Graph, node: Tensor) -> Tensor:
        """[n_atoms, 3] ``sum_j w(h_i, h_j, r_ij) r_ij / |r_ij|`` over the edges (unscaled)."""
        assert self.edges is not None and self.edge_mlp is not None
        assert self.basis is not None and self.envelope is not None
        index, vectors, lengths = edge_vectors(g, self.edges)
        i, j = index[0], index[1]
        feats = torch.cat([node[i], node[j], self.basis(lengths.to(node.dtype))], -1)
        w = self.edge_mlp(feats).squeeze(-1) * self.envelope(lengths).to(node.dtype)
        unit = (vectors / lengths.unsqueeze(-1)).to(node.dtype)
        return scatter_sum(w.unsqueeze(-1) * unit, i, node.shape[0])

    def forward(self, g: Graph, node: Tensor) -> Tensor:
        """The property of the batch ``g`` from its features ``node`` [n_atoms, F]: [n_graphs]
        or [n_graphs, 3] (structure level), [n_atoms] or [n_atoms, 3] (atom level), in the
        target's unit."""
        t = self.target
        n_graphs = int(g[K.N_ATOMS].shape[0])
        batch = g[K.BATCH]
        shift, scale = self.shift.to(node.dtype), self.scale.to(node.dtype)
        counts = g[K.N_ATOMS].to(node.dtype)
        if t.kind == "scalar":
            assert self.atom_mlp is not None
            per_atom: Tensor = shift + scale * self.atom_mlp(node).squeeze(-1)
            if t.level == "atom":
                return per_atom
            total = scatter_sum(per_atom, batch, n_graphs)
            return total if t.reduce == "sum" else total / counts
        v = self.atom_vectors(g, node)
        if t.level == "atom":
            return scale * v
        assert self.atom_mlp is not None
        q = self.atom_mlp(node).squeeze(-1)
        q = q - (scatter_sum(q, batch, n_graphs) / counts)[batch]  # neutral: sum_i q_i = 0
        pos = g[K.POSITIONS].to(node.dtype)
        centroid = scatter_sum(pos, batch, n_graphs) / counts.unsqueeze(-1)
        moment = scatter_sum(q.unsqueeze(-1) * (pos - centroid[batch]) + v, batch, n_graphs)
        if t.reduce == "mean":
            moment = moment / counts.unsqueeze(-1)
        return scale * moment
