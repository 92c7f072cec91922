"""CHGNet (Deng et al. 2023, package ``chgnet``) behind the trustpot model contract.

Design: CHGNet's own modules on a graph built from trustpot's positions and cell
-----------------------------------------------------------------------------------
The package builds a ``CrystalGraph`` from a pymatgen ``Structure`` (atom graph within 6 Å for
the bundled 0.3.0 weights, bond graph of the bonds shorter than 3 Å, angles between pairs of
short bonds that share an atom) and differentiates with respect to its own fractional
coordinates and strain. This adapter does not use that converter. It takes the connectivity of
CHGNet's graphs, which is integer and piecewise constant, from trustpot's ``"main"`` neighbour
list (at CHGNet's 6 Å atom-graph cutoff):

- atom graph: every directed pair ``(i, j, shift)`` of the list; the undirected bond is the pair
  with its reverse ``(j, i, -shift)``;
- bond graph: every ordered pair of distinct directed bonds with the same centre atom, both
  shorter than 3 Å, with the angle between them.

Every value that depends on geometry (bond vectors, lengths, radial and angular bases) is
computed from *our* ``positions`` and ``cell`` with differentiable torch operations, then sent
through CHGNet's own embedding, convolution and readout modules (this file only wires them,
in the order of ``CHGNet._compute``). The per-atom energy is CHGNet's site energy plus its
elemental reference (``AtomRef``, MPtrj), so the structure energy is the package's (it predicts
energy per atom times the number of atoms). Forces, stress and virial then come from
:func:`trustpot.models.potential.compute_outputs`, by autograd on positions and a symmetric
strain, as for every trustpot model: the adapter is conservative, works on molecules without a
vacuum box (non-periodic frames simply have no image shifts), batches structures of any size
into one graph, and can be fine-tuned through forces (``create_graph=True``).

Not exposed: CHGNet's magnetic moments (no ``magmoms`` output key in :mod:`trustpot.keys`).
The composition model (``AtomRef``) is frozen by the package (``requires_grad=False``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Embedding, LayerGroups, Modulator, group_parameters
from trustpot.models.contract import DEFAULT_OUTPUTS, Model, load_state_checked
from trustpot.models.potential import compute_outputs
from trustpot.models.pretrained import PretrainedInfo, package_available, require_package

__all__ = ["CHGNET", "CHGNetAdapter", "CHGNetEntry", "chgnet_topology"]

NAME = "chgnet"
PACKAGE = "chgnet"
EXTRA = "chgnet"
#: the bundled checkpoint this adapter loads (``CHGNet.load(model_name=...)``)
MODEL_VERSION = "0.3.0"
#: CHGNet 0.3.0 radii (its ``model_args``), Å; stated here so ``info()`` needs no import
ATOM_GRAPH_CUTOFF = 6.0
BOND_GRAPH_CUTOFF = 3.0
#: CHGNet's atom embedding covers H..Pu
ELEMENTS: tuple[int, ...] = tuple(range(1, 95))
OUTPUTS = frozenset({K.ENERGY, K.FORCES, K.STRESS, K.VIRIAL, K.NODE_ENERGY})


def _load_package_model(model_name: str = MODEL_VERSION) -> nn.Module:
    """The package's pretrained CHGNet on the CPU, its start-up prints silenced.

    Raises:
        ConfigError: the package is missing (one line naming the extra).
    """
    require_package(PACKAGE, EXTRA, NAME)
    from chgnet.model.model import CHGNet

    with contextlib.redirect_stdout(io.StringIO()):
        net: nn.Module = CHGNet.load(model_name=model_name, use_device="cpu", verbose=False)
    return net


def chgnet_topology(
    edge_index: Tensor, shifts: Tensor, lengths: Tensor, n_atoms: int, bond_cutoff: float
) -> dict[str, Tensor]:
    """CHGNet's integer graph structure from a full neighbour list (no gradients).

    Args:
        edge_index: [2, E] directed pairs ``(i, j)`` (trustpot's ``edge_index:main``).
        shifts: [E, 3] integer cell shifts of ``j`` (as float).
        lengths: [E] bond lengths, Å (only compared with ``bond_cutoff``).
        n_atoms: atoms in the batch.
        bond_cutoff: bonds shorter than this (Å) enter the bond graph.

    Returns:
        ``directed2undirected`` [E] undirected bond of each directed pair;
        ``undirected2directed`` [U] one directed pair of each undirected bond;
        ``angle_left``/``angle_right`` [A] the two directed bonds of each angle (same centre);
        ``bond_graph`` [A, 3] (centre atom, undirected left bond, undirected right bond).

    Raises:
        ConfigError: the list is not symmetric (a pair without its reverse).
    """
    device = edge_index.device
    n_edges = int(edge_index.shape[1])
    i, j = edge_index[0], edge_index[1]
    s = torch.round(shifts).to(torch.long)
    forward = torch.cat([i[:, None], j[:, None], s], 1)
    backward = torch.cat([j[:, None], i[:, None], -s], 1)
    keys, inverse = torch.unique(torch.cat([forward, backward]), dim=0, return_inverse=True)
    edge_of_key = torch.full((keys.shape[0],), -1, dtype=torch.long, device=device)
    edge_of_key[inverse[:n_edges]] = torch.arange(n_edges, device=device)
    reverse = edge_of_key[inverse[n_edges:]]
    if bool((reverse < 0).any()):
        raise ConfigError("CHGNet needs a full (symmetric) neighbour list")
    arange = torch.arange(n_edges, device=device)
    canonical = arange < reverse
    undirected_id = torch.cumsum(canonical.long(), 0) - 1
    directed2undirected = undirected_id[torch.minimum(arange, reverse)]
    undirected2directed = torch.nonzero(canonical).flatten()

    short = torch.nonzero(lengths < bond_cutoff).flatten()
    short = short[torch.argsort(i[short], stable=True)]
    centre = i[short]
    counts = torch.bincount(centre, minlength=n_atoms)
    start = torch.cumsum(counts, 0) - counts
    per_bond = counts[centre]
    left = torch.repeat_interleave(torch.arange(short.numel(), device=device), per_bond)
    first = torch.cumsum(per_bond, 0) - per_bond
    within = torch.arange(left.numel(), device=device) - torch.repeat_interleave(first, per_bond)
    right = start[centre[left]] + within
    keep = left != right
    angle_left, angle_right = short[left[keep]], short[right[keep]]
    bond_graph = torch.stack(
        [i[angle_left], directed2undirected[angle_left], directed2undirected[angle_right]], 1
    )
    return {
        "directed2undirected": directed2undirected,
        "undirected2directed": undirected2directed,
        "angle_left": angle_left,
        "angle_right": angle_right,
        "bond_graph": bond_graph,
    }


class CHGNetAdapter(Model):
    """Pretrained CHGNet as a trustpot :class:`Model` (see the module docstring).

    Args:
        net: a ``chgnet.model.CHGNet`` (the package's pretrained model).
        model_name: the bundled checkpoint it was loaded from (``"0.3.0"``).
    """

    kind: ClassVar[str] = "pretrained:chgnet"

    def __init__(self, net: nn.Module, model_name: str = MODEL_VERSION) -> None:
        super().__init__()
        self.net = net
        self.model_name = model_name
        args: dict[str, Any] = dict(getattr(net, "model_args", {}))
        self.atom_cutoff = float(args.get("atom_graph_cutoff", ATOM_GRAPH_CUTOFF))
        self.bond_cutoff = float(args.get("bond_graph_cutoff", BOND_GRAPH_CUTOFF))
        if not bool(args.get("mlp_first", True)):
            raise ConfigError("the CHGNet adapter needs per-atom readout (mlp_first=True)")
        self._modulator: Modulator | None = None

    # -- contract -------------------------------------------------------------------------
    @property
    def species(self) -> list[int]:
        return list(ELEMENTS)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def neighbor_lists(self) -> list[NeighborListSpec]:
        """trustpot's ``"main"`` list at CHGNet's atom-graph cutoff (6 Å)."""
        return [NeighborListSpec("main", self.atom_cutoff)]

    def output_specs(self) -> dict[str, K.FieldSpec]:
        """``energy``, ``forces``, ``stress``, ``virial`` and per-atom ``energies``."""
        return K.specs_of(OUTPUTS)

    def modulation_shape(self) -> tuple[int, int] | None:
        """``(4, 64)`` for CHGNet 0.3.0: the atom features after each atom-conv layer."""
        net: Any = self.net
        width = int(net.atom_embedding.embedding.embedding_dim)
        return len(net.atom_conv_layers), width

    def set_modulator(self, modulator: Modulator | None) -> Modulator | None:
        """Attach ``modulator`` to the atom features; returns the previous one."""
        previous = self._modulator
        object.__setattr__(self, "_modulator", modulator)
        return previous

    # -- evaluation -----------------------------------------------------------------------
    def _features(self, g: Graph) -> tuple[Tensor, list[Tensor]]:
        """Atom features after each of CHGNet's atom-conv layers.

        Returns:
            the final features after CHGNet's readout norm [n_atoms, 64] and the list of the
            features after each atom-conv layer (4 x [n_atoms, 64]), all differentiable in
            ``g["positions"]`` and ``g["cell"]``.
        """
        net: Any = self.net
        z = g[K.ATOMIC_NUMBERS]
        if bool(((z < 1) | (z > len(ELEMENTS))).any()):
            raise ConfigError(f"CHGNet knows atomic numbers 1-{len(ELEMENTS)} only")
        pos, cell, batch = g[K.POSITIONS], g[K.CELL], g[K.BATCH]
        edge_index = g[K.edge_index_key("main")]
        shifts = g[K.edge_shift_key("main")].to(pos.dtype)
        i, j = edge_index[0], edge_index[1]
        # CHGNet's bond vector points from the neighbour (with its image) to the centre
        image = torch.einsum("ek,ekl->el", shifts, cell[batch[i]])
        vectors = pos[i] - (pos[j] + image)
        lengths = torch.linalg.norm(vectors, dim=1)
        with torch.no_grad():
            topo = chgnet_topology(
                edge_index, shifts, lengths.detach(), int(z.shape[0]), self.bond_cutoff
            )
        unit = vectors / lengths[:, None]
        und_lengths = lengths[topo["undirected2directed"]]
        basis = net.bond_basis_expansion
        bases_ag = basis.rbf_expansion_ag(und_lengths)
        bases_bg = basis.rbf_expansion_bg(und_lengths)
        angles = net.angle_basis_expansion(unit[topo["angle_left"]], unit[topo["angle_right"]])
        has_angles = int(topo["bond_graph"].shape[0]) > 0

        atom_feas = net.atom_embedding(z - 1)
        bond_feas = net.bond_embedding(bases_ag)
        weights_ag = net.bond_weights_ag(bases_ag)
        weights_bg = net.bond_weights_bg(bases_bg)
        angle_feas = net.angle_embedding(angles)
        atom_graph = torch.stack([i, j], 1)
        d2u = topo["directed2undirected"]
        layers: list[Tensor] = []
        n_conv = len(net.atom_conv_layers)
        for idx, atom_layer in enumerate(net.atom_conv_layers):
            atom_feas = atom_layer(
                atom_feas=atom_feas,
                bond_feas=bond_feas,
                bond_weights=weights_ag,
                atom_graph=atom_graph,
                directed2undirected=d2u,
            )
            if self._modulator is not None:
                atom_feas = self._modulator(idx, atom_feas, g)
            layers.append(atom_feas)
            if idx == n_conv - 1 or not has_angles:
                continue
            bond_layer, angle_layer = net.bond_conv_layers[idx], net.angle_layers[idx]
            if bond_layer is not None:
                bond_feas = bond_layer(
                    atom_feas=atom_feas,
                    bond_feas=bond_feas,
                    bond_weights=weights_bg,
                    angle_feas=angle_feas,
                    bond_graph=topo["bond_graph"],
                )
                if angle_layer is not None:
                    angle_feas = angle_layer(
                        atom_feas=atom_feas,
                        bond_feas=bond_feas,
                        angle_feas=angle_feas,
                        bond_graph=topo["bond_graph"],
                    )
        if net.readout_norm is not None:
            atom_feas = net.readout_norm(atom_feas)
        return atom_feas, layers

    def node_energies(self, g: Graph) -> tuple[Tensor, Embedding]:
        """[n_atoms] per-atom energies, eV (float64): CHGNet's site energies plus its MPtrj
        elemental references, and the embedding."""
        net: Any = self.net
        feas, layers = self._features(g)
        site = net.mlp(feas).squeeze(-1)
        if net.composition_model is not None:
            reference = net.composition_model.fc.weight[0]
            site = site + reference[g[K.ATOMIC_NUMBERS] - 1]
        return site.double(), {"node": layers[-1], "layers": layers}

    def forward(
        self, g: Graph, outputs: Iterable[str] = DEFAULT_OUTPUTS, create_graph: bool | None = None
    ) -> dict[str, Tensor]:
        """Evaluate the requested ``outputs`` on the batch ``g``.

        Returns:
            ``energy`` [n_graphs] eV (float64), ``forces`` [n_atoms, 3] eV/Å,
            ``stress`` [n_graphs, 3, 3] eV/Å^3 (ASE sign), ``virial`` [n_graphs, 3, 3] eV,
            ``energies`` [n_atoms] eV, as requested.
        """
        wanted = self.check_outputs(outputs)
        return compute_outputs(
            self.node_energies, g, wanted, self.training if create_graph is None else create_graph
        )

    def layer_groups(self) -> LayerGroups:
        """``embedding`` (atom, bond and angle embeddings and bases), ``interaction_k`` (atom
        conv k with the bond and angle updates that follow it, k = 0..3) and ``readout``
        (readout norm, site MLP). The composition model's elemental references are fixed in
        the package (``requires_grad`` off) and belong to no group: fine-tuning keeps them;
        :class:`~trustpot.models.finetuned.FineTuned` offsets take their role."""
        net: Any = self.net
        embedding = [
            net.atom_embedding, net.bond_basis_expansion, net.bond_embedding,
            net.bond_weights_ag, net.bond_weights_bg, net.angle_basis_expansion,
            net.angle_embedding,
        ]  # fmt: skip
        named: list[tuple[str, list[nn.Module | None]]] = [("embedding", embedding)]
        for k, atom_layer in enumerate(net.atom_conv_layers):
            block: list[nn.Module | None] = [atom_layer]
            if k < len(net.bond_conv_layers):
                block += [net.bond_conv_layers[k], net.angle_layers[k]]
            named.append((f"interaction_{k}", block))
        named.append(("readout", [net.readout_norm, net.mlp]))
        groups = group_parameters(self, named, rest="readout")
        kept = [(name, [p for p in params if p.requires_grad]) for name, params in groups]
        return [(name, params) for name, params in kept if params]

    def embed(self, g: Graph) -> Embedding:
        """CHGNet's atom features: ``node`` [n_atoms, 64] the output of the last atom-conv
        layer (before the readout norm), ``layers`` the 4 x [n_atoms, 64] outputs of each
        atom-conv layer (``layers[-2]`` is the package's ``return_atom_feas``)."""
        _, layers = self._features(g)
        return {"node": layers[-1], "layers": layers}

    # -- persistence ----------------------------------------------------------------------
    def payload(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Checkpoint fields: kind, meta (name, package and its version, bundled model
        version) and the weights (of the whole adapter, ``net.`` prefixed)."""
        meta = {
            "name": NAME,
            "package": PACKAGE,
            "package_version": _package_version(),
            "model": self.model_name,
        }
        return self.checkpoint_fields(meta, state)

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> CHGNetAdapter:
        """Rebuild from the package's bundled model and load the saved weights (checked).

        Raises:
            CheckpointError: package missing (names the extra), malformed meta, or weights
                that do not fit.
        """
        if not package_available(PACKAGE):
            raise CheckpointError(
                f"{path}: a CHGNet checkpoint needs the 'chgnet' package: "
                'pip install "trustpot[chgnet]"'
            )
        meta = data.get("meta")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("model"), str):
            raise CheckpointError(f"{path}: malformed CHGNet metadata: {meta!r}")
        try:
            model = cls(_load_package_model(str(meta["model"])), str(meta["model"]))
        except (ValueError, ConfigError) as err:
            raise CheckpointError(f"{path}: cannot rebuild CHGNet: {err}") from None
        load_state_checked(model, data.get("model"), path, "CHGNet adapter")
        return model.eval()


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class CHGNetEntry:
    """Registry entry (kind ``"pretrained"``) of CHGNet 0.3.0 as shipped by the package."""

    name = NAME
    kind = CHGNetAdapter.kind
    package = PACKAGE
    extra = EXTRA

    def info(self) -> PretrainedInfo:
        """The model card line; counts the weights only when the package is installed."""
        installed = package_available(PACKAGE)
        n_parameters = 0
        if installed:
            n_parameters = sum(p.numel() for p in _load_package_model().parameters())
        return PretrainedInfo(
            name=NAME,
            package=PACKAGE,
            package_version=_package_version() if installed else "not installed",
            n_parameters=n_parameters,
            elements=ELEMENTS,
            cutoff=ATOM_GRAPH_CUTOFF,
            reference="PBE(+U), Materials Project MPtrj",
            licence="Modified BSD (chgnet package metadata)",
            extra=EXTRA,
        )

    def load(self) -> CHGNetAdapter:
        """The adapter with the bundled 0.3.0 weights, in eval mode, on the CPU."""
        return CHGNetAdapter(_load_package_model(), MODEL_VERSION).eval()


#: the registry entry ``"chgnet"``
CHGNET = CHGNetEntry()
