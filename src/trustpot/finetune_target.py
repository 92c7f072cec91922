"""The downstream property of ``trustpot finetune --target KEY``.

:func:`resolve_target` reads the property's level, kind and reduction off the frames where the
flags leave them open and checks every training and validation frame (errors name the file, the
frame and the key); :func:`attach_head` gives the fine-tuned model a
:class:`~trustpot.models.property_head.PropertyHead` standardised on the training targets;
:func:`downstream_data` and :func:`property_objective` are the dataset and the
:class:`~trustpot.train.objectives.PropertyLoss` objective the trainer runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from trustpot.data.dataset import GraphDataset
from trustpot.data.neighbors import NeighborListSpec
from trustpot.data.structures import Structure
from trustpot.engines.xtb import CHARGES_KEY, DIPOLE_KEY, GAP_KEY
from trustpot.errors import ConfigError, DataError
from trustpot.models.finetuned import FineTuned
from trustpot.models.property_head import PropertyHead, PropertyTarget
from trustpot.train.objectives import Objective, PropertyLoss

__all__ = ["KNOWN_UNITS", "attach_head", "downstream_data", "property_objective", "resolve_target"]

#: units of the properties ``trustpot data`` engines write (xTB: gap, dipole, charges)
KNOWN_UNITS = {GAP_KEY: "eV", DIPOLE_KEY: "e*Å", CHARGES_KEY: "e"}


class TargetOptions(Protocol):
    """The fields of :class:`trustpot.finetune.FinetuneOptions` a target is resolved from."""

    @property
    def target(self) -> str: ...
    @property
    def target_level(self) -> str | None: ...
    @property
    def target_kind(self) -> str | None: ...
    @property
    def target_reduce(self) -> str | None: ...
    @property
    def target_unit(self) -> str: ...
    @property
    def property_weight(self) -> float | None: ...


def resolve_target(
    opts: TargetOptions, train: Sequence[Structure], source: str, checked: Sequence[tuple[
        Sequence[Structure], str]] = (),
) -> PropertyTarget:  # fmt: skip
    """The :class:`PropertyTarget` that ``--target`` and its flags describe, what they leave
    open read off the first training frame (level: where the key is; kind: the value's shape;
    reduction: ``mean`` for a scalar, ``sum`` for a vector; unit: :data:`KNOWN_UNITS`), and
    every frame of ``train`` and of each ``(frames, source)`` in ``checked`` checked.

    Raises:
        DataError: a frame lacks the key or holds a value of another shape (naming the file,
            the frame and the key).
        ConfigError: ``--target-reduce`` for a per-atom property; a key that is both.
    """
    key = opts.target
    level = opts.target_level
    if level is None:
        found = PropertyTarget.levels_of(train[0], key)
        if not found:
            raise DataError(source, "neither in the frame's info nor in its per-atom arrays "
                            "(--target)", 0, key)  # fmt: skip
        if len(found) > 1:
            raise ConfigError(f"--target {key}: {source} holds it both per structure and per "
                              "atom; give --target-level")  # fmt: skip
        level = found[0]
    if level == "atom" and opts.target_reduce is not None:
        raise ConfigError(f"--target-reduce applies to a per-structure property; '{key}' is "
                          "per atom (--target-level atom)")  # fmt: skip
    unit = opts.target_unit or KNOWN_UNITS.get(key, "")
    target = PropertyTarget.infer(
        train, key, source, level, opts.target_kind, opts.target_reduce, unit
    )
    for frames, name in checked:
        target.values(frames, name)
    return target


def attach_head(
    model: FineTuned, target: PropertyTarget, train: Sequence[Structure], source: str,
    log: Callable[[str], None],
) -> None:  # fmt: skip
    """Give ``model`` a head for ``target``, standardised on the ``train`` targets; a head the
    model already has for the same target is kept as it is (fine-tuning it further)."""
    if model.head is not None and model.head.target == target:
        log(f"property '{target.key}': the starting model's head is kept")
        return
    edges: NeighborListSpec | None = None
    if target.kind == "vector":
        lists = model.base.neighbor_lists()
        if not lists:
            raise ConfigError(f"--target {target.key}: a vector head sums over neighbour-list "
                              f"edges, and {model.base.kind} declares none")  # fmt: skip
        edges = lists[0]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    head = PropertyHead(
        target, model.base.node_width(), None if edges is None else edges.name,
        None if edges is None else edges.cutoff, dtype=model.dtype,
    ).to(device)  # fmt: skip
    shift, scale = head.fit(target.values(train, source), [s.n_atoms for s in train])
    replaced = " (replacing the starting model's head)" if model.head is not None else ""
    model.head = head
    per = " per atom" if target.extensive else ""
    log(
        f"property '{target.key}' ({target.level} {target.kind}"
        f"{', ' + str(target.reduce) if target.reduce else ''}, unit '{target.unit}'): new head"
        f"{replaced} on {head.width} features, standardised by shift {shift:.4g} and scale "
        f"{scale:.4g}{per}"
    )


def downstream_data(
    model: FineTuned, frames: Sequence[Structure], specs: Sequence[NeighborListSpec],
    dtype: torch.dtype, name: str, with_property: bool,
) -> GraphDataset:  # fmt: skip
    """The downstream frames as graphs; with ``with_property``, each carrying the reference
    values of the model's head target under its output key ([1, *shape] per structure or
    [n_atoms, *shape])."""
    if not with_property or model.head is None:
        return GraphDataset(frames, specs, dtype, name)
    target = model.head.target
    values = target.values(frames, name)
    rows: list[np.ndarray] = [v[None] if target.level == "structure" else v for v in values]
    return GraphDataset(frames, specs, dtype, name, {target.output: rows})


def property_objective(model: FineTuned, opts: TargetOptions) -> Objective:
    """The downstream objective ``main``: the property MSE on standardised targets
    (:class:`PropertyLoss` with the head's scale), weighted by ``--property-weight``."""
    if model.head is None:
        raise ConfigError("--target: the model has no property head")
    target = model.head.target
    loss = PropertyLoss(target.output, float(model.head.scale), per_atom=target.extensive)
    weight = 1.0 if opts.property_weight is None else float(opts.property_weight)
    return Objective("main", "main", weight=weight, loss=loss)
