"""Deep-ensemble members evaluated as one model: stacked weights, one forward, one backward.

M potentials of one architecture (same backbone class, hyper-parameters, species, dtype and
constants) run as one network on M copies of the batch. Copy ``k`` holds member ``k``'s atoms
and edges; the copies are laid out member-major, so every per-atom and per-edge tensor of the
network is ``M`` equal blocks of rows. Every layer with weights (``nn.Linear``,
``nn.Embedding``, ACE's equivariant linear layers and products) is replaced by its stacked
version, which applies member ``k``'s weights to block ``k`` in one batched matrix product;
everything else in the network (activations, gathers and sums over edges, the radial basis)
works row by row and needs no change. The forces of every member come from one backward
pass of the sum of all copies' energies, since copy ``k``'s energy depends only on copy ``k``'s
positions.

What this buys: on a small molecule a model's evaluation is dominated by the fixed cost of each
tensor operation, which the stacked network pays once instead of M times. The arithmetic is the
members' own: results equal the member-by-member loop to float rounding
(:meth:`StackedMembers.check` verifies it on a probe structure before the first use).

Which ensembles stack (:func:`stack_problem`): trustpot potentials whose only per-member
weights sit in the layer types of :data:`STACKABLE` (``nn.Linear``, ``nn.Embedding`` and ACE's
equivariant ``IrrepsLinear`` and ``SymmetricProduct``), plus the per-member energy scale, shift
and reference energies. PaiNN, SchNet, EGNN and ACE qualify; DeepSet-MoE (expert weight
tensors) and pretrained adapters do not, and are evaluated member by member, as the ensemble
reports (:attr:`trustpot.uq.ensemble.DeepEnsemble.evaluation`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from trustpot import keys as K
from trustpot.data.graph import Graph, replicate_batch
from trustpot.models.ace_blocks import IrrepsLinear, SymmetricProduct, block
from trustpot.models.base import Embedding
from trustpot.models.contract import Model
from trustpot.models.potential import Potential, compute_outputs

#: per-member buffers of a potential that the stacked network carries as [M, ...] tensors
_MEMBER_BUFFERS = ("reference_energies", "energy_scale", "energy_shift")


class StackedLinear(nn.Module):
    """M linear layers as one: rows of block ``k`` of the input use layer ``k``'s weights.

    Args:
        layers: the members' layers (same shapes, all with or all without bias).
    """

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.m = len(layers)
        self.n_in, self.n_out = layers[0].in_features, layers[0].out_features
        with torch.no_grad():
            # [M, in, out]: x @ W^T of each member as one batched product
            self.weight = torch.stack([lin.weight.detach().t() for lin in layers]).contiguous()
            self.bias = (
                torch.stack([lin.bias.detach() for lin in layers]).unsqueeze(1)
                if layers[0].bias is not None
                else None
            )  # [M, 1, out]

    def forward(self, x: Tensor) -> Tensor:
        """x: [M * R, ..., in] member-major -> [M * R, ..., out]."""
        rows = x.reshape(self.m, -1, self.n_in)
        if self.bias is None:
            y = torch.bmm(rows, self.weight)
        else:
            y = torch.baddbmm(self.bias, rows, self.weight)
        return y.reshape(*x.shape[:-1], self.n_out)


class StackedEmbedding(nn.Module):
    """M embedding tables as one: index ``i`` of block ``k`` reads row ``i`` of table ``k``.

    Args:
        tables: the members' embeddings (same shapes).
    """

    def __init__(self, tables: Sequence[nn.Embedding]) -> None:
        super().__init__()
        self.m = len(tables)
        self.n_rows = tables[0].num_embeddings
        with torch.no_grad():
            self.weight = torch.cat([t.weight.detach() for t in tables])  # [M * rows, F]

    def forward(self, index: Tensor) -> Tensor:
        """index: [M * R] member-major -> [M * R, F]."""
        per_member = index.shape[0] // self.m
        member = torch.arange(self.m, device=index.device).repeat_interleave(per_member)
        return torch.index_select(self.weight, 0, index + member * self.n_rows)


class StackedIrrepsLinear(IrrepsLinear):
    """M :class:`~trustpot.models.ace_blocks.IrrepsLinear` layers as one (block ``k`` of the
    rows uses layer ``k``'s weights). Built by :func:`_stacked_copy`."""

    m: int
    stacked_weight: Tensor  # [M, shared + 1, c_in, width]

    def mix(self, x: Tensor) -> Tensor:
        """x: [M * n, D_in, c_in] member-major -> [M * n, D_shared, width]."""
        rows = x.reshape(self.m, -1, *x.shape[1:])  # [M, n, D_in, c_in]
        parts = [
            rows[:, :, block(ell), :] @ self.stacked_weight[:, ell].unsqueeze(1)
            for ell in range(self.shared + 1)
        ]
        y = torch.cat(parts, dim=2)  # [M, n, D_shared, width]
        return y.reshape(x.shape[0], *y.shape[2:])


class StackedSymmetricProduct(SymmetricProduct):
    """M :class:`~trustpot.models.ace_blocks.SymmetricProduct` layers as one: the monomials
    and their projection are shared (they hold no weights), each atom's path weights are its
    member's. Built by :func:`_stacked_copy`."""

    m: int
    stacked_weight: Tensor  # [M, T, n_paths, c]
    foldable = False  # one weight set per member, not one for all atoms

    def path_weights(self) -> Tensor:
        """[M, T, K, c]."""
        return self.stacked_weight.index_select(2, self.gather)

    def atom_weights(self, onehot: Tensor, weight: Tensor) -> Tensor:
        """onehot [M * n, T], weight [M, T, K, c] -> [M * n, K * c]."""
        per_member = onehot.reshape(self.m, -1, onehot.shape[1])  # [M, n, T]
        w = torch.bmm(per_member, weight.reshape(self.m, weight.shape[1], -1))
        return w.reshape(onehot.shape[0], -1)


def _stacked_copy(layers: Sequence[nn.Module], cls: type[nn.Module]) -> nn.Module:
    """A copy of ``layers[0]`` turned into ``cls`` (its subclass), with every member's
    ``weight`` stacked in ``stacked_weight`` [M, ...] instead of its own."""
    new = copy.deepcopy(layers[0])
    del new.weight
    new.__class__ = cls
    with torch.no_grad():
        weights = [layer.get_parameter("weight").detach() for layer in layers]
    object.__setattr__(new, "m", len(layers))
    object.__setattr__(new, "stacked_weight", torch.stack(weights))
    return new


#: the layer types whose weights differ between members, and how each is stacked
STACKABLE: dict[type[nn.Module], Callable[[Sequence[nn.Module]], nn.Module]] = {
    nn.Linear: lambda layers: StackedLinear(layers),  # type: ignore[arg-type]
    nn.Embedding: lambda layers: StackedEmbedding(layers),  # type: ignore[arg-type]
    IrrepsLinear: lambda layers: _stacked_copy(layers, StackedIrrepsLinear),
    SymmetricProduct: lambda layers: _stacked_copy(layers, StackedSymmetricProduct),
}


def _stackable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if type(mod) in STACKABLE and name}


def stack_problem(members: Sequence[Model]) -> str | None:
    """Why these members cannot run as one stacked network, or None when they can."""
    if not all(type(m) is Potential for m in members):
        kinds = sorted({m.kind or type(m).__name__ for m in members})
        return f"members are not all plain trustpot potentials ({', '.join(kinds)})"
    pots = [m for m in members if isinstance(m, Potential)]
    first = pots[0]
    for k, m in enumerate(pots[1:], start=1):
        if type(m.backbone) is not type(first.backbone) or type(m.head) is not type(first.head):
            return f"member {k} has another architecture than member 0"
        if m.backbone.hypers != first.backbone.hypers:
            return f"member {k} has other hyper-parameters than member 0"
        if m.meta.avg_neighbors != first.meta.avg_neighbors:
            return f"member {k} normalises messages by another neighbour count than member 0"
    if any(m.backbone.modulator is not None for m in pots):
        return "a member has a modulator attached"
    layers = _stackable_modules(first)
    own = {f"{name}.{p}" for name in layers for p, _ in layers[name].named_parameters()}
    own |= set(_MEMBER_BUFFERS)
    for m in pots[1:]:
        theirs = dict(itertools.chain(m.named_parameters(), m.named_buffers()))
        for name, value in itertools.chain(first.named_parameters(), first.named_buffers()):
            if name not in own and not torch.equal(theirs[name], value):
                return f"'{name}' differs between members and is not in a stackable layer"
    for name, mod in layers.items():
        for k, m in enumerate(pots[1:], start=1):
            other = m.get_submodule(name)
            if type(other) is not type(mod) or any(
                a.shape != b.shape for a, b in zip(other.parameters(), mod.parameters())
            ):
                return f"layer '{name}' of member {k} has another shape than member 0's"
            if isinstance(mod, nn.Linear) and (mod.bias is None) != (other.bias is None):
                return f"layer '{name}' of member {k} has another bias than member 0's"
    return None


class StackedMembers(nn.Module):
    """The members of a deep ensemble as one stacked network (see the module docstring).

    Built from the members' current weights; it does not follow later changes to them
    (:class:`~trustpot.uq.ensemble.DeepEnsemble` rebuilds it when they change).

    Args:
        members: potentials for which :func:`stack_problem` is None.
    """

    reference_energies: Tensor  # [M, 119] eV, float64
    energy_scale: Tensor  # [M]
    energy_shift: Tensor  # [M]

    def __init__(self, members: Sequence[Model]) -> None:
        super().__init__()
        problem = stack_problem(members)
        if problem is not None:
            raise ValueError(f"these members do not stack: {problem}")
        pots = [m for m in members if isinstance(m, Potential)]
        self.m = len(pots)
        self.dtype = pots[0].dtype
        net = copy.deepcopy(pots[0]).eval()
        for name, mod in _stackable_modules(pots[0]).items():
            parts = [p.get_submodule(name) for p in pots]
            net.set_submodule(name, STACKABLE[type(mod)](parts))
        self.net = net
        with torch.no_grad():
            for name in _MEMBER_BUFFERS:
                self.register_buffer(name, torch.stack([p.get_buffer(name) for p in pots]))
        #: what :meth:`evaluate` differentiates: :meth:`node_energies` or its compiled form
        self.energy_fn: Callable[[Graph], tuple[Tensor, Embedding]] = self.node_energies

    def compile(self) -> None:
        """Evaluate :meth:`node_energies` through ``torch.compile`` (dynamic shapes) from now
        on: fewer, fused operations per call after a one-off compilation; results equal to
        float rounding, not to the last bit."""
        self.energy_fn = torch.compile(self.node_energies, dynamic=True)

    def node_energies(self, g: Graph) -> tuple[Tensor, Embedding]:
        """[M * n_atoms] per-atom energies (eV, float64) of the replicated batch ``g``, each
        copy by its member, and the stacked embedding."""
        emb = self.net.backbone(g)
        raw = self.net.head(g, emb).reshape(self.m, -1)  # [M, n_atoms]
        scale = self.energy_scale.to(raw.dtype).unsqueeze(1)
        learned = raw * scale + self.energy_shift.to(raw.dtype).unsqueeze(1)
        numbers = g[K.ATOMIC_NUMBERS].reshape(self.m, -1)
        e0 = torch.gather(self.reference_energies, 1, numbers)
        return (learned.double() + e0).reshape(-1), emb

    def evaluate(self, g: Graph, wanted: frozenset[str]) -> dict[str, Tensor]:
        """The members' outputs on the batch ``g``, each with a member axis after its first:
        ``energy`` [n_graphs, M], ``forces`` [n_atoms, M, 3], ``stress`` / ``virial``
        [n_graphs, M, 3, 3], ``energies`` [n_atoms, M], as ``wanted`` asks."""
        out = compute_outputs(
            self.energy_fn, replicate_batch(g, self.m), wanted, create_graph=False
        )
        return {
            k: v.detach().reshape(self.m, -1, *v.shape[1:]).movedim(0, 1) for k, v in out.items()
        }

    def check(self, members: Sequence[Model], probe: Graph) -> str | None:
        """None when the stacked energies and forces on ``probe`` equal the members' own to
        float rounding; else what differs."""
        wanted = frozenset({K.ENERGY, K.FORCES})
        got = self.evaluate(probe, wanted)
        tol = 1e-4 if self.dtype == torch.float32 else 1e-9
        for k, member in enumerate(members):
            ref = member(probe, wanted, create_graph=False)
            for key in (K.ENERGY, K.FORCES):
                a, b = got[key][:, k], ref[key].detach()
                err = float((a - b).abs().max())
                scale = max(float(b.abs().max()), 1.0)
                if not err <= tol * scale:
                    return f"stacked {key} of member {k} differs from its own by {err:.3g}"
        return None
