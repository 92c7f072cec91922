"""SevenNet-0 behind the trustpot model contract (optional extra ``trustpot[sevennet]``).

SevenNet-0 (``7net-0``, 11 July 2024 weights) is a NequIP-style E(3)-equivariant network of
5 interaction blocks (128x0e+64x1e+32x2e node features, lmax 2, 5 Å cutoff) trained on the
Materials Project MPtrj set (PBE, PBE+U). The ``sevenn`` package ships its weights; nothing is
downloaded.

:class:`SevenNetAdapter` holds the package's own network (``sevenn.nn.sequential.
AtomGraphSequential``, built by the package from its checkpoint) and feeds it trustpot's batched
graph: the one-hot type index of each atom, trustpot's edge index and the edge vectors computed
from *our* positions and cell (:func:`trustpot.models.base.edge_vectors`, so they stay
differentiable with respect to positions and strain), the batch vector and the atom counts. It
runs the package's modules in order up to the per-atom energies (``atomic_energy``, after the
species-wise scale and shift) and stops before the package's own sum and force/stress module;
energy, forces, stress, virial and per-atom energies then come from
:func:`trustpot.models.potential.compute_outputs`, exactly as for every trustpot model.

Both frameworks use the same edge convention: edge ``(i, j)`` carries ``r_j - r_i + shift @
cell`` and SevenNet aggregates messages from ``j`` onto ``i``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import os
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import (
    Embedding,
    LayerGroups,
    Modulator,
    edge_vectors,
    group_parameters,
)
from trustpot.models.contract import DEFAULT_OUTPUTS, Model, load_state_checked
from trustpot.models.potential import compute_outputs
from trustpot.models.pretrained import PretrainedInfo, package_available, require_package

__all__ = ["SEVENNET_0", "SevenNetAdapter", "SevenNetPretrained", "build_sevennet"]

PACKAGE = "sevenn"
EXTRA = "sevennet"
#: the package's name of the only checkpoint this adapter builds
CHECKPOINT = "7net-0"
#: neighbour-list radius of SevenNet-0, Å
CUTOFF = 5.0
REFERENCE = "PBE(+U), Materials Project MPtrj"
#: what the installed package states (its LICENSE file and METADATA: MIT); no separate licence
#: file ships with the 7net-0 weights inside the package
LICENCE = "MIT (sevenn package LICENSE; no separate licence for the 7net-0 weights ships)"
#: atomic numbers SevenNet-0 was trained on (H-Bi and Ac-Pu), known without the package
ELEMENTS: tuple[int, ...] = (*range(1, 84), *range(89, 95))
OUTPUTS = frozenset({K.ENERGY, K.FORCES, K.STRESS, K.VIRIAL, K.NODE_ENERGY})
#: the package's data key of per-atom energies in eV (after the species-wise scale and shift)
_ATOMIC_ENERGY = "atomic_energy"
#: suffix of the package's module names ending an interaction block
_GATE_SUFFIX = "_equivariant_gate"


def package_version() -> str:
    """Installed ``sevenn`` version, or ``"not installed"`` (the package is not imported)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _checkpoint_file(checkpoint: str) -> str:
    """Path of the package's own checkpoint file for ``checkpoint`` (never downloads)."""
    if checkpoint != CHECKPOINT:
        raise ConfigError(f"SevenNet adapter builds '{CHECKPOINT}' only, not '{checkpoint}'")
    import sevenn._const as sevenn_const

    path = str(sevenn_const.SEVENNET_0_11Jul2024)
    if not os.path.isfile(path):
        raise ConfigError(
            f"the installed sevenn {package_version()} does not ship the {checkpoint} weights "
            f"({path}); trustpot never downloads weights"
        )
    return path


def _scalar_columns(gate: Any) -> Tensor:
    """Column indices of the invariant (l=0, even) channels of the output irreps of a package
    ``EquivariantGate`` (an e3nn ``Gate`` in ``gate.gate``)."""
    columns: list[int] = []
    start = 0
    for mul, ir in gate.gate.irreps_out:  # e3nn Irreps: (multiplicity, (l, parity))
        width = int(mul) * (2 * int(ir.l) + 1)
        if int(ir.l) == 0 and int(ir.p) == 1:
            columns.extend(range(start, start + width))
        start += width
    return torch.tensor(columns, dtype=torch.long)


class SevenNetAdapter(Model):
    """The package's SevenNet network as a trustpot :class:`Model`.

    Args:
        network: the package's ``AtomGraphSequential`` (weights included).
        type_map: atomic number -> one-hot index of the network.
        cutoff: the network's cutoff, Å.
        meta: checkpoint metadata (``name``, ``package``, ``package_version``,
            ``checkpoint``).

    Embeddings (:meth:`embed`): ``layers[k]`` [n_atoms, 128] is the invariant part (the 128
    ``0e`` channels, after the gate's SiLU) of the node features ``x`` after interaction block
    ``k`` (the package module ``{k}_equivariant_gate``), k = 0..4; ``node`` is ``layers[-1]``,
    the input of the package's readout (``reduce_input_to_hidden``).
    """

    kind: ClassVar[str] = "pretrained:sevennet"
    type_of_z: Tensor

    def __init__(
        self,
        network: nn.Module,
        type_map: Mapping[int, int],
        cutoff: float,
        meta: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.network = network
        self.cutoff = float(cutoff)
        self.meta: dict[str, Any] = dict(meta)
        self._species = sorted(int(z) for z in type_map)
        table = torch.full((120,), -1, dtype=torch.long)
        for z, index in type_map.items():
            table[int(z)] = int(index)
        self.register_buffer("type_of_z", table, persistent=False)
        # the package's modules up to the per-atom energies; its sum and force module are skipped
        self._energy_modules: list[str] = []
        self._scalars: dict[str, Tensor] = {}
        for name, module in network.named_children():
            self._energy_modules.append(name)
            if name.endswith(_GATE_SUFFIX):
                self._scalars[name] = _scalar_columns(module)
            if getattr(module, "key_output", None) == _ATOMIC_ENERGY:
                break
        else:
            raise ConfigError("the SevenNet network has no module writing per-atom energies")
        self._modulator: Modulator | None = None

    # -- contract -------------------------------------------------------------------------
    @property
    def species(self) -> list[int]:
        return list(self._species)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def neighbor_lists(self) -> list[NeighborListSpec]:
        """One list, ``main``, at SevenNet's cutoff (5 Å for SevenNet-0)."""
        return [NeighborListSpec("main", self.cutoff)]

    def output_specs(self) -> dict[str, K.FieldSpec]:
        """``energy``, ``forces``, ``stress``, ``virial`` and per-atom ``energies``."""
        return K.specs_of(OUTPUTS)

    def modulation_shape(self) -> tuple[int, int] | None:
        """``(5, 128)`` for SevenNet-0: the invariant (``0e``) channels after each interaction
        block; a modulator changes those channels only, so the network stays equivariant."""
        widths = {int(c.numel()) for c in self._scalars.values()}
        if len(widths) != 1:
            return None
        return len(self._scalars), widths.pop()

    def set_modulator(self, modulator: Modulator | None) -> Modulator | None:
        """Attach ``modulator`` to the invariant channels; returns the previous one."""
        previous = self._modulator
        object.__setattr__(self, "_modulator", modulator)
        return previous

    # -- evaluation -----------------------------------------------------------------------
    def _network_input(self, g: Graph) -> dict[str, Tensor]:
        """The package's input dict for the batch ``g`` (edge vectors from our positions)."""
        numbers = g[K.ATOMIC_NUMBERS]
        types = self.type_of_z[numbers]
        if bool((types < 0).any()):
            unknown = sorted({int(z) for z in numbers[types < 0].tolist()})
            raise ConfigError(f"SevenNet-0 does not know atomic number(s) {unknown}")
        index, vectors, _ = edge_vectors(g, "main")
        return {
            "atomic_numbers": numbers,
            "x": types,  # one-hot index; the package's OnehotEmbedding expands it
            "edge_index": index,
            "edge_vec": vectors.to(torch.float32),
            "batch": g[K.BATCH],
            "num_atoms": g[K.N_ATOMS],
        }

    def node_energies(self, g: Graph) -> tuple[Tensor, Embedding]:
        """[n_atoms] per-atom energies in eV (float64) and the per-layer invariant features."""
        data = self._network_input(g)
        modules = dict(self.network.named_children())
        layers: list[Tensor] = []
        modulator = self._modulator
        for name in self._energy_modules:
            data = modules[name](data)
            if name in self._scalars:
                columns = self._scalars[name].to(data["x"].device)
                scalars = data["x"].index_select(1, columns)
                if modulator is not None:  # only the invariant channels: equivariance kept
                    scalars = modulator(len(layers), scalars, g)
                    data["x"] = data["x"].index_copy(1, columns, scalars.to(data["x"].dtype))
                layers.append(scalars)
        energies = data[_ATOMIC_ENERGY].reshape(-1).double()
        return energies, {"node": layers[-1], "layers": layers}

    def forward(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS, create_graph: bool | None = None
    ) -> dict[str, Tensor]:
        """The requested outputs of the batch ``g``.

        Returns:
            ``energy`` [n_graphs] eV (float64), ``forces`` [n_atoms, 3] eV/Å,
            ``stress`` [n_graphs, 3, 3] eV/Å^3 (ASE sign), ``virial`` [n_graphs, 3, 3] eV,
            ``energies`` [n_atoms] eV, as requested; all derivatives by autograd of the one
            energy (:func:`~trustpot.models.potential.compute_outputs`).
        """
        wanted = self.check_outputs(outputs)
        return compute_outputs(
            self.node_energies, g, wanted, self.training if create_graph is None else create_graph
        )

    def layer_groups(self) -> LayerGroups:
        """``embedding`` (edge embedding, one-hot to node features), ``interaction_k`` (the
        package modules ``{k}_*`` of block k, k = 0..4) and ``readout`` (the modules after the
        last block: reduction to hidden, to energy, species-wise rescaling)."""
        named: dict[str, list[nn.Module | None]] = {"embedding": []}
        blocks: dict[str, list[nn.Module | None]] = {}
        readout: list[nn.Module | None] = []
        for name, module in self.network.named_children():
            prefix = name.split("_", 1)[0]
            if prefix.isdigit():
                blocks.setdefault(f"interaction_{prefix}", []).append(module)
            elif blocks:
                readout.append(module)
            else:
                named["embedding"].append(module)
        named.update(blocks)
        named["readout"] = readout
        return group_parameters(self, list(named.items()), rest="readout")

    def embed(self, g: Graph) -> Embedding:
        """``node`` [n_atoms, 128] and ``layers`` (5 x [n_atoms, 128]): the invariant channels
        after each interaction block (see the class docstring); no gradients."""
        with torch.no_grad():
            _, emb = self.node_energies(g)
        return emb

    def __deepcopy__(self, memo: dict[int, Any]) -> SevenNetAdapter:
        """A copy with its own network, rebuilt by the package and given these weights.

        ``copy.deepcopy`` of the package's e3nn-compiled modules adds buffers the original
        lacks, so its state dict would not fit the original's; the trainer's evaluation copy
        loads the (EMA) weights of the trained model every epoch and needs it to.
        """
        twin = build_sevennet(str(self.meta["checkpoint"]), name=str(self.meta.get("name", "")))
        twin.meta = copy.deepcopy(self.meta)
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        twin = twin.to(device)
        twin.load_state_dict(self.state_dict())
        for mine, theirs in zip(self.parameters(), twin.parameters()):
            theirs.requires_grad_(mine.requires_grad)
        twin.train(self.training)
        memo[id(self)] = twin
        return twin

    # -- persistence ----------------------------------------------------------------------
    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """``kind``, ``meta`` (name, package, package version, package checkpoint name) and
        ``model``: the network's state dict (fine-tuned weights persist)."""
        return self.checkpoint_fields(dict(self.meta), state)

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> SevenNetAdapter:
        """Rebuild the network from the installed package and load the saved weights.

        A different installed package version is accepted and recorded in ``meta``
        (``saved_package_version``); every tensor's name and shape is checked.

        Raises:
            CheckpointError: the package is missing (one line naming the extra), malformed
                metadata, or weights that do not fit.
        """
        meta = data.get("meta")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("checkpoint"), str):
            raise CheckpointError(f"{path}: malformed SevenNet metadata: {meta!r}")
        if not package_available(PACKAGE):
            raise CheckpointError(
                f"{path}: this SevenNet checkpoint needs the '{PACKAGE}' package: "
                f'pip install "trustpot[{EXTRA}]"'
            )
        try:
            model = build_sevennet(str(meta["checkpoint"]), name=str(meta.get("name", "")))
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from None
        saved_version = str(meta.get("package_version", "unknown"))
        if saved_version != model.meta["package_version"]:
            model.meta["saved_package_version"] = meta.get("saved_package_version", saved_version)
        load_state_checked(model, data.get("model"), path, "SevenNet adapter")
        return model


def build_sevennet(checkpoint: str = CHECKPOINT, name: str = "sevennet-0") -> SevenNetAdapter:
    """The adapter around the package's network with the package's weights, on the CPU.

    Raises:
        ConfigError: ``sevenn`` is missing (naming the extra) or lacks the weights.
    """
    require_package(PACKAGE, EXTRA, name or "sevennet-0")
    from sevenn.checkpoint import SevenNetCheckpoint

    package_checkpoint = SevenNetCheckpoint(_checkpoint_file(checkpoint))
    network = package_checkpoint.build_model()
    network.set_is_batch_data(True)
    config = package_checkpoint.config
    meta = {
        "name": name or "sevennet-0",
        "package": PACKAGE,
        "package_version": package_version(),
        "checkpoint": checkpoint,
    }
    adapter = SevenNetAdapter(network, config["_type_map"], float(config["cutoff"]), meta)
    return adapter.to(torch.float32).eval()


@dataclasses.dataclass(frozen=True)
class SevenNetPretrained:
    """Registry entry (kind ``"pretrained"``) of a SevenNet checkpoint shipped by ``sevenn``."""

    name: str = "sevennet-0"
    kind: str = SevenNetAdapter.kind
    package: str = PACKAGE
    extra: str = EXTRA
    checkpoint: str = CHECKPOINT

    def info(self) -> PretrainedInfo:
        """The model card line; builds the network only when the package is installed."""
        n_parameters, elements = 0, ELEMENTS
        version = package_version()
        if package_available(self.package):
            model = build_sevennet(self.checkpoint, self.name)
            n_parameters = sum(p.numel() for p in model.parameters())
            elements = tuple(model.species)
        return PretrainedInfo(
            name=self.name,
            package=self.package,
            package_version=version,
            n_parameters=n_parameters,
            elements=elements,
            cutoff=CUTOFF,
            reference=REFERENCE,
            licence=LICENCE,
            extra=self.extra,
        )

    def load(self) -> SevenNetAdapter:
        """The adapter with the package's weights, in eval mode, on the CPU."""
        return build_sevennet(self.checkpoint, self.name)


#: SevenNet-0 (11 July 2024 weights), registry name ``sevennet-0``
SEVENNET_0 = SevenNetPretrained()
