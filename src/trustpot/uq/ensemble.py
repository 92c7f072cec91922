"""Deep ensembles and Monte Carlo dropout: uncertainty from the spread of M predictions.

Both give ``energy_std``, ``forces_std`` and the samples themselves; every sample is an
ordinary conservative potential (forces = -dE/dr of that sample's energy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.errors import CheckpointError, ConfigError
from trustpot.models.base import Embedding
from trustpot.models.contract import Model
from trustpot.models.potential import EnergyHead, Potential, compute_outputs
from trustpot.uq.base import (
    Recalibration,
    UQModel,
    base_from_payload,
    sample_statistics,
    wrapper_extra,
)
from trustpot.uq.stacked import StackedMembers, stack_problem

#: On a CPU, eager stacking pays only for small batches: at most this many atoms times
#: members. Measured crossover (PaiNN, 5 members, one thread, MD with the force std,
#: benchmarks/results/speed): 45 (ethanol) stacked 2.5x faster than one by one, 135 (3BPA)
#: 1.1x faster, 960 (a 192-atom water box) 1.9x slower. Accelerators always stack (their cost
#: is kernel launches, which stacking divides by M; the limit there is not measured yet).
STACK_ATOMS_CPU = 160

SAMPLE_OUTPUTS = frozenset({K.ENERGY_STD, K.FORCES_STD, K.ENERGY_SAMPLES, K.FORCES_SAMPLES})


def samples_output(
    energies: Tensor, forces: Tensor, outputs: frozenset[str], extra: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Means, std and (when asked) samples from [n_graphs, M] energies, [n_atoms, M, 3] forces,
    with the ``extra`` outputs (means of stress, per-atom energies...)."""
    energy, force, energy_std, forces_std = sample_statistics(energies, forces)
    out = {K.ENERGY: energy, K.FORCES: force, K.ENERGY_STD: energy_std, K.FORCES_STD: forces_std}
    if K.ENERGY_SAMPLES in outputs:
        out[K.ENERGY_SAMPLES] = energies
    if K.FORCES_SAMPLES in outputs:
        out[K.FORCES_SAMPLES] = forces
    out.update(extra)
    return out


#: outputs a sampling wrapper returns as the mean over its samples (besides energy and forces)
MEAN_OUTPUTS = frozenset({K.STRESS, K.VIRIAL, K.NODE_ENERGY})


def _means_of(samples: list[dict[str, Tensor]], outputs: frozenset[str]) -> dict[str, Tensor]:
    """Means over samples of the outputs that are not energy or forces (stress, energies...)."""
    return {k: torch.stack([s[k] for s in samples]).mean(0) for k in outputs & MEAN_OUTPUTS}


def _potential_outputs(outputs: frozenset[str]) -> frozenset[str]:
    return frozenset(outputs & {K.ENERGY, K.FORCES, K.STRESS, K.VIRIAL, K.NODE_ENERGY}) | {
        K.ENERGY,
        K.FORCES,
    }


def _local_index(g: Graph) -> Tensor:
    """[n_atoms] index of each atom within its structure (on the CPU)."""
    batch = g[K.BATCH]
    first = torch.zeros_like(g[K.N_ATOMS])
    first[1:] = torch.cumsum(g[K.N_ATOMS], 0)[:-1]
    return (torch.arange(batch.shape[0], device=batch.device) - first[batch]).cpu()


class DeepEnsemble(UQModel):
    """M independently trained models; the prediction is their mean, the std their spread.

    Members may be of any model kind (trustpot potentials, fine-tuned pretrained models...), as
    long as they share species, dtype and neighbour lists. Members of one architecture whose
    weights sit in stackable layers (PaiNN, SchNet, EGNN and ACE potentials) can be evaluated
    together as one stacked network (:mod:`trustpot.uq.stacked`: one forward and one backward
    pass for all members, the same numbers to float rounding); others one by one.
    :attr:`evaluation` says which ran last, and why.

    Args:
        members: at least two models with the same species, dtype and neighbour lists.
        stacked: ``"auto"`` (default): stack on accelerators, and on the CPU for batches of at
            most :data:`STACK_ATOMS_CPU` atoms times members (small molecules, where the fixed
            cost of each operation dominates; larger batches run faster one by one); a
            compiled ensemble (:meth:`compile_stacked`) always stacks. ``True``: always
            stack (when the members stack); ``False``: always one by one.
    """

    kind: ClassVar[str] = "uq:ensemble"
    method: ClassVar[str] = "ensemble"
    provides: ClassVar[frozenset[str]] = SAMPLE_OUTPUTS

    def __init__(self, members: Sequence[Model], stacked: bool | str = "auto") -> None:
        if stacked not in (True, False, "auto"):
            raise ConfigError(f"stacked must be True, False or 'auto', got {stacked!r}")
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        for k, m in enumerate(members[1:], start=1):
            if m.species != first.species:
                raise ConfigError(
                    f"ensemble member {k} knows elements {m.species}, member 0 {first.species}"
                )
            if m.dtype != first.dtype:
                raise ConfigError(f"ensemble member {k} is {m.dtype}, member 0 {first.dtype}")
            if m.neighbor_lists() != first.neighbor_lists():
                raise ConfigError(
                    f"ensemble member {k} needs neighbour lists {m.neighbor_lists()}, "
                    f"member 0 {first.neighbor_lists()}: train all members with one cutoff"
                )
        super().__init__(first)
        self.others = nn.ModuleList(members[1:])
        self.fit_report: dict[str, Any] = {}
        self.stacked: bool | str = stacked
        #: evaluate the stacked network through torch.compile (:meth:`compile_stacked`)
        self.compiled = False
        #: how the members are evaluated: "stacked" or "one by one: <why>" (set on first use)
        self.evaluation = "not evaluated yet"
        #: (weights key, the stacked network or None, why not)
        self._stack: tuple[tuple[Any, ...], StackedMembers | None, str] = ((), None, "")
        self._tables: list[tuple[dict[str, Any], str]] = []

    @property
    def members(self) -> list[Model]:
        return [self.base, *(m for m in self.others if isinstance(m, Model))]

    def _weights_key(self) -> tuple[Any, ...]:
        """Changes whenever a member's weights, device or dtype change (storage and version
        counter of every parameter and buffer, read from the modules' own tables: cheap
        enough to check on every call; a move or cast gives new storage)."""
        tables = self._tables
        if not tables:
            tables = [
                (table, name)
                for m in self.members
                for mod in m.modules()
                for table in (mod._parameters, mod._buffers)
                for name in table
            ]
            self._tables = tables
        tensors = [table[name] for table, name in tables]
        return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)

    def stack_problem(self) -> str | None:
        """Why this ensemble cannot compile its stacked network, or None when it can."""
        problem = "stacking is turned off" if self.stacked is False else stack_problem(self.members)
        if problem is None:
            return None
        return f"only a stacked ensemble compiles, and this one is not: {problem}"

    def compile_stacked(self, on: bool = True) -> None:
        """Evaluate the stacked members through ``torch.compile`` from now on (for long MD
        runs: a one-off compilation of seconds, then fewer operations per step; results equal
        to float rounding), or (``on=False``) as before again.

        Raises:
            ConfigError: ``on``, and the members do not stack or stacking is off.
        """
        if on and (problem := self.stack_problem()) is not None:
            raise ConfigError(problem)
        if on != self.compiled:
            self.compiled = on
            self._stack = ((), None, "")  # rebuilt (compiled or not) on the next call

    def _stacked_members(self, g: Graph) -> tuple[StackedMembers | None, str]:
        """The members as one stacked network for the batch ``g`` (rebuilt when their weights
        change), or None and why they run one by one."""
        if self.stacked is False:
            return None, "stacking turned off"
        if any(m.training for m in self.members):
            return None, "a member is in training mode"
        atoms = int(g[K.POSITIONS].shape[0]) * len(self.members)
        on_cpu = g[K.POSITIONS].device.type == "cpu"
        if self.stacked == "auto" and not self.compiled and on_cpu and atoms > STACK_ATOMS_CPU:
            return None, (
                f"{atoms} atoms x members is above the CPU's stacking limit "
                f"({STACK_ATOMS_CPU}): faster one by one"
            )
        key = self._weights_key()
        if key != self._stack[0]:
            members = self.members
            problem = stack_problem(members)
            net = None
            if problem is None:
                net = StackedMembers(members)
                problem = net.check(members, self.base._two_atoms())
                if self.compiled:
                    net.compile()
            self._stack = (key, net if problem is None else None, problem or "")
        return self._stack[1], self._stack[2]

    def predict(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        wanted = _potential_outputs(outputs)
        net, why = self._stacked_members(g)
        how = "stacked, compiled" if self.compiled else "stacked"
        self.evaluation = how if net is not None else f"one by one: {why}"
        if net is not None:
            out = net.evaluate(g, wanted)
            extra = {k: out[k].mean(1) for k in outputs & MEAN_OUTPUTS}
            return samples_output(out[K.ENERGY], out[K.FORCES], outputs, extra)
        samples = [m(g, wanted, create_graph=False) for m in self.members]
        energies = torch.stack([s[K.ENERGY].detach() for s in samples], dim=1)
        forces = torch.stack([s[K.FORCES].detach() for s in samples], dim=1)
        return samples_output(energies, forces, outputs, _means_of(samples, outputs))

    def wrapper_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **self.base_fields(),
            "extra": {
                "members": [
                    {k: v for k, v in m.payload().items() if k in ("kind", "meta", "model")}
                    for m in self.members[1:]
                ],
                "recalibration": self.recalibration.to_dict(),
                "fit_report": dict(self.fit_report),
            },
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> DeepEnsemble:
        extra = wrapper_extra(data, path)
        raw = extra.get("members")
        if not isinstance(raw, list) or not raw:
            raise CheckpointError(f"{path}: ensemble checkpoint lists no further members")
        members = [base_from_payload(data, path)]
        for k, item in enumerate(raw, start=1):
            if not isinstance(item, dict) or "meta" not in item or "model" not in item:
                raise CheckpointError(f"{path}: ensemble member {k} is malformed")
            # members written before ensembles of any kind carry no kind: plain potentials
            fields = {"meta": item["meta"], "model": item["model"]}
            member = {**fields, "base_kind": item.get("kind", "potential")}
            members.append(base_from_payload(member, f"{path} (member {k})"))
        try:
            model = cls(members)
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from None
        model.recalibration = Recalibration.from_dict(extra.get("recalibration", {}))
        model.fit_report = dict(extra.get("fit_report", {}))
        return model


class MCDropout(UQModel):
    """Monte Carlo dropout: M forward passes of one potential with its dropout layers on.

    The potential must have been trained with dropout (``model.head_dropout > 0``). With
    ``eval_seed`` set, the mask of sample ``k`` for an atom is a fixed function of
    ``(eval_seed, k, dropout layer, the atom's index within its structure)``: repeated calls on
    the same structure give the same answer (smooth energies along an MD trajectory), and a
    structure gets the same answer alone or in any batch (the ASE calculator and the batched
    Predictor agree). The mean over M fixed masks still depends on the order of atoms within
    a structure, as any finite set of per-atom masks must. ``eval_seed=None`` draws fresh
    masks from the global generator on every call.

    Args:
        base: a potential with dropout.
        n_samples: M, forward passes per prediction.
        eval_seed: seed of the dropout masks (None: global RNG).
    """

    base: Potential  # these methods need trustpot's own potential
    kind: ClassVar[str] = "uq:mc-dropout"
    method: ClassVar[str] = "mc-dropout"
    provides: ClassVar[frozenset[str]] = SAMPLE_OUTPUTS

    def __init__(self, base: Potential, n_samples: int = 16, eval_seed: int | None = 0) -> None:
        super().__init__(base)
        if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in base.modules()):
            raise ConfigError(
                "MC dropout needs a potential trained with dropout "
                "(trustpot train -o model.head_dropout=0.1, or trustpot uq fit mc-dropout)"
            )
        if n_samples < 2:
            raise ConfigError(f"MC dropout needs at least 2 samples, got {n_samples}")
        self.n_samples = int(n_samples)
        self.eval_seed = eval_seed
        self.fit_report: dict[str, Any] = {}

    def _dropout_on(self, on: bool) -> None:
        for m in self.base.modules():
            if isinstance(m, nn.Dropout):
                m.train(on)

    def _dropout_layers(self) -> list[nn.Dropout]:
        return [m for m in self.base.modules() if isinstance(m, nn.Dropout) and m.p > 0]

    def _keep(self, local: Tensor, sample: int, index: int, width: int, p: float) -> Tensor:
        """[n_atoms, width] bool keep-mask of sample ``sample`` on dropout layer ``index``: a
        fixed function of (eval_seed, sample, layer, the atom's index ``local`` within its
        structure)."""
        seed = (int(self.eval_seed or 0) * 1_000_003 + sample * 7919 + index) % (2**62)
        gen = torch.Generator().manual_seed(seed)
        n_local = int(local.max()) + 1 if local.numel() else 0
        table = torch.rand((n_local, width), generator=gen, dtype=torch.float64)
        return table[local] >= p

    def _seeded_masks(self, g: Graph, sample: int) -> list[RemovableHandle]:
        """Hooks that apply sample ``sample``'s fixed masks on every (eval-mode) dropout layer.

        The mask of an atom depends on its index within its structure, never on the batch.
        """
        local = _local_index(g)
        handles = []
        for index, layer in enumerate(self._dropout_layers()):
            p = float(layer.p)

            def hook(
                mod: nn.Module, args: tuple[Tensor, ...], out: Tensor, i: int = index, p: float = p
            ) -> Tensor:
                keep = self._keep(local, sample, i, out.shape[-1], p)
                return out * keep.to(out.device, out.dtype) / (1.0 - p)

            handles.append(layer.register_forward_hook(hook))
        return handles

    def _shared_backbone(self) -> bool:
        """True when every dropout layer is in the energy head's MLP: the M samples then share
        one backbone pass (:meth:`_predict_shared`)."""
        head = getattr(self.base.head, "mlp", None)
        inside = {id(m) for m in head.modules()} if isinstance(head, nn.Sequential) else set()
        layers = self._dropout_layers()
        return isinstance(self.base.head, EnergyHead) and all(id(m) in inside for m in layers)

    def _masks(self, g: Graph, layer: nn.Dropout, index: int, width: int, x: Tensor) -> Tensor:
        """[M, n_atoms, width] scaled keep-masks of dropout layer ``index`` for all samples:
        the masks :meth:`_seeded_masks` applies one sample at a time, or fresh ones."""
        p = float(layer.p)
        if self.eval_seed is None:
            keep = torch.rand((self.n_samples, x.shape[-2], width), device=x.device) >= p
            return keep.to(x.dtype) / (1.0 - p)
        local = _local_index(g)
        masks = [self._keep(local, k, index, width, p) for k in range(self.n_samples)]
        return torch.stack(masks).to(x.device, x.dtype) / (1.0 - p)

    def _predict_shared(self, g: Graph, wanted: frozenset[str]) -> dict[str, Tensor]:
        """All M samples from one backbone pass: the head runs on [M, n_atoms, F] with each
        sample's masks, and one vectorised backward pass gives the M force fields."""
        base = self.base

        def node_energies(graph: Graph) -> tuple[Tensor, Embedding]:
            emb = base.backbone(graph)
            x = emb["node"].unsqueeze(0).expand(self.n_samples, -1, -1)
            index = 0
            mlp = base.head.mlp
            assert isinstance(mlp, nn.Sequential)  # checked by _shared_backbone
            for module in mlp:
                if isinstance(module, nn.Dropout) and module.p > 0:
                    x = x * self._masks(graph, module, index, x.shape[-1], x)
                    index += 1
                elif not isinstance(module, nn.Dropout):
                    x = module(x)
            raw = x.squeeze(-1).transpose(0, 1)  # [n_atoms, M]
            return base.energies_from_raw(raw, graph), emb

        return compute_outputs(node_energies, g, wanted, create_graph=False)

    def predict(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        wanted = _potential_outputs(outputs)
        if self._shared_backbone():
            out = {k: v.detach() for k, v in self._predict_shared(g, wanted).items()}
            means = {k: out[k].mean(1) for k in outputs & MEAN_OUTPUTS}
            return samples_output(out[K.ENERGY], out[K.FORCES], outputs, means)
        return self.predict_one_by_one(g, outputs)

    def predict_one_by_one(self, g: Graph, outputs: frozenset[str]) -> dict[str, Tensor]:
        """The M samples as M full passes (dropout outside the energy head; the reference the
        shared pass is tested against)."""
        wanted = _potential_outputs(outputs)
        samples = []
        if self.eval_seed is None:
            self._dropout_on(True)
            try:
                for _ in range(self.n_samples):
                    samples.append(self.base(g, wanted, create_graph=False))
            finally:
                self._dropout_on(False)
        else:
            self._dropout_on(False)
            for k in range(self.n_samples):
                handles = self._seeded_masks(g, k)
                try:
                    samples.append(self.base(g, wanted, create_graph=False))
                finally:
                    for handle in handles:
                        handle.remove()
        energies = torch.stack([s[K.ENERGY].detach() for s in samples], dim=1)
        forces = torch.stack([s[K.FORCES].detach() for s in samples], dim=1)
        return samples_output(energies, forces, outputs, _means_of(samples, outputs))

    def wrapper_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **self.base_fields(),
            "extra": {
                "n_samples": self.n_samples,
                "eval_seed": -1 if self.eval_seed is None else self.eval_seed,
                "recalibration": self.recalibration.to_dict(),
                "fit_report": dict(self.fit_report),
            },
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], path: str = "checkpoint") -> MCDropout:
        extra = wrapper_extra(data, path)
        base = Potential.from_payload(data, path)
        try:
            seed = int(extra.get("eval_seed", 0))
            model = cls(base, int(extra.get("n_samples", 16)), None if seed < 0 else seed)
        except (ConfigError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: {err}") from None
        model.recalibration = Recalibration.from_dict(extra.get("recalibration", {}))
        model.fit_report = dict(extra.get("fit_report", {}))
        return model
