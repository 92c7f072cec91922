"""A fine-tuned model: any base :class:`Model` plus per-element energy offsets.

A pretrained model (CHGNet and SevenNet-0 were fitted to PBE(+U) energies of MPtrj) or a
trustpot potential trained on one level of theory has that level's energy zero. Downstream data
from another method (r2SCAN, RI-MP2, another code's pseudopotentials) differ from it by a large,
nearly per-element constant: without correction, the first steps of fine-tuning spend the
gradient on that constant and wreck the pretrained weights (the collapse at step 0). A
:class:`FineTuned` model therefore adds an offset per element, fitted by least squares to the
residual energies of the downstream training data before the first step
(:func:`fit_energy_offsets`), and trained with the rest afterwards. Constant offsets change
energies only: forces, stress and virial are the base's.

A fine-tuned model may also carry a :class:`~trustpot.models.property_head.PropertyHead`: a
downstream property (a HOMO-LUMO gap, a dipole, partial charges...) predicted from the base's
per-atom features, returned as the output ``property:<key>`` beside the base's outputs.

Checkpoint (kind ``"finetuned"``): ``meta`` holds the base's ``kind``, ``meta`` and (where it
has one) ``extra``, and the property head's configuration (``property_head``, absent without
one); ``model`` holds the base's weights under ``base.``, ``offsets`` and the head's weights
under ``head.``. It loads
with :func:`trustpot.io.checkpoint.load_model` like every other kind; the base is rebuilt through
the registry (a pretrained base needs its package installed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.data.structures import Structure
from trustpot.errors import CheckpointError, ConfigError, DataError
from trustpot.models.base import Embedding, LayerGroups, Modulator
from trustpot.models.contract import DEFAULT_OUTPUTS, Model, load_state_checked
from trustpot.models.property_head import PropertyHead
from trustpot.nn import scatter_sum
from trustpot.registry import lookup, names

__all__ = ["FineTuned", "fit_energy_offsets"]

_BASE = "base."
_HEAD = "head."


class FineTuned(Model):
    """``base`` with per-element energy offsets added to its energies.

    Args:
        base: the model being fine-tuned (any kind; trained in place).
        offsets: [119] eV per atomic number (zeros by default).
        head: a property head reading the base's ``embed(g)["node"]`` features (optional).

    Outputs are the base's; ``energy`` [n_graphs] gains ``sum_i offsets[z_i]`` and per-atom
    ``energies`` [n_atoms] gain ``offsets[z_i]`` (eV, float64); forces, stress and virial are
    unchanged (the offsets do not depend on positions). With a head, ``property:<key>`` too
    (shape and unit as its target says).
    """

    kind: ClassVar[str] = "finetuned"

    def __init__(
        self, base: Model, offsets: Tensor | None = None, head: PropertyHead | None = None
    ) -> None:
        super().__init__()
        if isinstance(base, FineTuned):
            raise ConfigError("a FineTuned model wraps its base, not another FineTuned model")
        self.base = base
        value = torch.zeros(119, dtype=torch.float64) if offsets is None else offsets
        if tuple(value.shape) != (119,):
            raise ConfigError(f"offsets must have shape (119,), got {tuple(value.shape)}")
        self.offsets = nn.Parameter(value.detach().to(torch.float64).clone())
        self.head = head

    # -- contract -------------------------------------------------------------------------
    @property
    def species(self) -> list[int]:
        return self.base.species

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def neighbor_lists(self) -> list[NeighborListSpec]:
        """The base's neighbour lists."""
        return self.base.neighbor_lists()

    def output_specs(self) -> dict[str, K.FieldSpec]:
        """The base's outputs, and the property head's."""
        specs = dict(self.base.output_specs())
        if self.head is not None:
            specs[self.head.target.output] = self.head.target.spec()
        return specs

    def layer_groups(self) -> LayerGroups:
        """The base's groups (input to output), then ``offsets``, then ``property_head``."""
        groups = [*self.base.layer_groups(), ("offsets", [self.offsets])]
        if self.head is not None:
            groups.append(("property_head", list(self.head.parameters())))
        return groups

    def modulation_shape(self) -> tuple[int, int] | None:
        """The base's modulation hook (the offsets do not change features)."""
        return self.base.modulation_shape()

    def set_modulator(self, modulator: Modulator | None) -> Modulator | None:
        """Attach ``modulator`` to the base; returns the previous one."""
        return self.base.set_modulator(modulator)

    def offsets_by_element(self) -> dict[int, float]:
        """The non-zero offsets, eV, keyed by atomic number."""
        values = self.offsets.detach().cpu().tolist()
        return {z: float(v) for z, v in enumerate(values) if v != 0.0}

    # -- evaluation -----------------------------------------------------------------------
    def _shift(self, out: dict[str, Tensor], g: Graph) -> dict[str, Tensor]:
        z = g[K.ATOMIC_NUMBERS]
        per_atom = self.offsets[z]
        if K.ENERGY in out:
            n_graphs = int(g[K.N_ATOMS].shape[0])
            shift = scatter_sum(per_atom, g[K.BATCH], n_graphs)
            out[K.ENERGY] = out[K.ENERGY] + shift.to(out[K.ENERGY].dtype)
        if K.NODE_ENERGY in out:
            out[K.NODE_ENERGY] = out[K.NODE_ENERGY] + per_atom.to(out[K.NODE_ENERGY].dtype)
        return out

    def forward(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS, create_graph: bool | None = None
    ) -> dict[str, Tensor]:
        """The base's outputs of ``g`` with the offsets added to ``energy`` [n_graphs] and
        ``energies`` [n_atoms] (eV); other outputs as the base returns them; the property
        head's from the base's embedding (a second pass; differentiable when ``create_graph``
        or training)."""
        wanted = self.check_outputs(outputs)
        keep = self.training if create_graph is None else create_graph
        prop = self._property(wanted)
        inner = wanted - {prop}
        out = self._shift(dict(self.base(g, inner, create_graph=keep)), g) if inner else {}
        if self.head is not None and prop:
            with torch.set_grad_enabled(keep and torch.is_grad_enabled()):
                out[prop] = self.head(g, self.base.embed(g)["node"])
        return out

    def _property(self, wanted: frozenset[str]) -> str:
        """The head's output name when ``wanted`` asks for it, else ``""``."""
        if self.head is not None and self.head.target.output in wanted:
            return self.head.target.output
        return ""

    def embed(self, g: Graph) -> Embedding:
        """The base's per-atom embeddings (the offsets add no features)."""
        return self.base.embed(g)

    def outputs_and_embedding(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS
    ) -> tuple[dict[str, Tensor], Embedding]:
        """The base's detached outputs (offsets added) and embedding, in its own way; the
        property head's output from that embedding."""
        wanted = self.check_outputs(outputs)
        prop = self._property(wanted)
        out, emb = self.base.outputs_and_embedding(g, wanted - {prop})
        with torch.no_grad():
            shifted = self._shift(dict(out), g)
            if self.head is not None and prop:
                shifted[prop] = self.head(g, emb["node"])
        return {k: v.detach() for k, v in shifted.items()}, emb

    def embedding_widths(self) -> list[int]:
        """The base's embedding widths."""
        return self.base.embedding_widths()

    # -- persistence ----------------------------------------------------------------------
    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """``kind``, ``meta`` (the base's kind, meta and extra; the property head's
        configuration) and ``model`` (the base's weights under ``base.``, ``offsets``, the
        head's under ``head.``), weights from ``state`` when given."""
        state = dict(state) if state is not None else self.state_dict()
        base_state = {k[len(_BASE) :]: v for k, v in state.items() if k.startswith(_BASE)}
        inner = self.base.payload(base_state)
        meta: dict[str, Any] = {"base_kind": str(inner["kind"]), "base_meta": inner["meta"]}
        if inner.get("extra") is not None:
            meta["base_extra"] = inner["extra"]
        weights = {_BASE + k: v for k, v in inner["model"].items()}
        weights["offsets"] = state["offsets"]
        if self.head is not None:
            meta["property_head"] = self.head.config()
            weights.update({k: v for k, v in state.items() if k.startswith(_HEAD)})
        return {"kind": self.kind, "meta": meta, "model": weights}

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> FineTuned:
        """Rebuild the base through the registry, then check and load the offsets.

        Raises:
            CheckpointError: malformed metadata, an unknown base kind, or weights that do not
                fit.
        """
        meta, weights = data.get("meta"), data.get("model")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("base_kind"), str):
            raise CheckpointError(f"{path}: malformed fine-tuned metadata (no base_kind)")
        if not isinstance(weights, Mapping) or "offsets" not in weights:
            raise CheckpointError(f"{path}: the fine-tuned weights lack 'offsets'")
        kind = str(meta["base_kind"])
        if kind == cls.kind or kind not in names("model"):
            raise CheckpointError(f"{path}: fine-tuned base of unusable kind '{kind}'")
        inner: dict[str, Any] = {
            "kind": kind,
            "meta": meta.get("base_meta"),
            "model": {k[len(_BASE) :]: v for k, v in weights.items() if k.startswith(_BASE)},
        }
        if "base_extra" in meta:
            inner["extra"] = meta["base_extra"]
        base = lookup("model", kind).from_payload(inner, path)
        head = None
        if meta.get("property_head") is not None:
            lists = [spec.name for spec in base.neighbor_lists()]
            head = PropertyHead.from_config(meta["property_head"], base.dtype, lists, path)
        model = cls(base, head=head)
        load_state_checked(model, dict(weights), path, "fine-tuned model")
        return model


def fit_energy_offsets(
    model: Model, structures: Sequence[Structure], batch_size: int = 8
) -> tuple[dict[int, float], float, float]:
    """Per-element offsets (eV) that best explain what ``model`` misses of the energies.

    Solves ``min_c sum_s (E_s - E_model(s) - sum_i c[z_i])^2`` by least squares over the
    elements present (minimum-norm solution when compositions do not pin every element down,
    e.g. one molecule: then the mean residual per atom for every element).

    Returns:
        the offsets by atomic number, and the RMS residual energy per atom (eV/atom) before
        and after applying them.

    Raises:
        DataError: no structure has an energy.
    """
    labelled = [s for s in structures if s.energy is not None]
    if not labelled:
        raise DataError("training data", "no energies to fit offsets to", None, "energy")
    was_training = model.training
    model.eval()
    ds = GraphDataset(labelled, model.neighbor_lists(), model.dtype, "training data")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    predicted: list[float] = []
    with torch.no_grad():
        for batch, _ in ds.batches(batch_size):
            assert batch is not None
            batch = {k: v.to(device) for k, v in batch.items()}
            predicted += model(batch, {K.ENERGY}, create_graph=False)[K.ENERGY].tolist()
    model.train(was_training)
    species = sorted({int(z) for s in labelled for z in s.numbers})
    column = {z: k for k, z in enumerate(species)}
    counts = np.zeros((len(labelled), len(species)))
    for row, s in enumerate(labelled):
        zs, n = np.unique(s.numbers, return_counts=True)
        counts[row, [column[int(z)] for z in zs]] = n
    residual = np.array([float(s.energy or 0.0) for s in labelled]) - np.array(predicted)
    solution, *_ = np.linalg.lstsq(counts, residual, rcond=None)
    n_atoms = counts.sum(1)
    before = float(np.sqrt(np.mean((residual / n_atoms) ** 2)))
    after = float(np.sqrt(np.mean(((residual - counts @ solution) / n_atoms) ** 2)))
    return {z: float(solution[column[z]]) for z in species}, before, after
