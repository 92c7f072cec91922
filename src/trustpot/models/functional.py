"""Energy derivatives taken as functions (``torch.func``), for a training step compiled whole.

``torch.compile`` cannot differentiate a compiled region twice, and training on forces needs
exactly that: the forces are the energy's derivative with respect to positions, and the step
needs the loss's derivative with respect to the weights. Inside :func:`functional_derivatives`,
:func:`~trustpot.models.potential.compute_outputs` takes the energy's derivatives with
``torch.func.grad`` instead of ``torch.autograd.grad``: the same values (float64: 2e-16
relative on PaiNN), and written as functions, so that an outer ``torch.func.grad`` over the
weights, traced by ``torch.compile``, becomes one graph of fused kernels
(:mod:`trustpot.train.compiled_step`). Outside it nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from trustpot import keys as K
from trustpot.data.graph import Graph
from trustpot.errors import ConfigError
from trustpot.models.strain import apply_strain, strain_outputs
from trustpot.nn import scatter_sum

_STATE = {"on": False}


@contextmanager
def functional_derivatives() -> Iterator[None]:
    """Within this block energy derivatives are taken with ``torch.func.grad``."""
    previous = _STATE["on"]
    _STATE["on"] = True
    try:
        yield
    finally:
        _STATE["on"] = previous


def functional_mode() -> bool:
    """Whether :func:`functional_derivatives` is in force."""
    return _STATE["on"]


def functional_outputs(
    node_energy_fn: Callable[[Graph], tuple[Tensor, Any]], g: Graph, wanted: frozenset[str]
) -> dict[str, Tensor]:
    """What :func:`~trustpot.models.potential.compute_outputs` returns (energy, forces,
    stress, virial, per-atom energies as ``wanted``), the derivatives by ``torch.func.grad``
    of the total energy with respect to positions and a symmetric strain.

    Raises:
        ConfigError: ``node_energy_fn`` returns several samples per atom ([n_atoms, M]):
            sampled outputs have no functional form here.
    """
    need_strain = bool(wanted & {K.STRESS, K.VIRIAL})
    n_graphs = int(g[K.N_ATOMS].shape[0])
    pos = g[K.POSITIONS]
    strain = torch.zeros((n_graphs, 3, 3), dtype=pos.dtype, device=pos.device)

    def energy_of(positions: Tensor, eps: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h = apply_strain(g, positions, eps) if need_strain else {**g, K.POSITIONS: positions}
        node_e, _ = node_energy_fn(h)
        if node_e.dim() != 1:
            raise ConfigError(
                "a compiled training step needs one energy per atom; this model returns "
                f"{tuple(node_e.shape[1:])} samples per atom"
            )
        energy = scatter_sum(node_e, g[K.BATCH], n_graphs)
        return energy.sum(), (energy, node_e)

    grads: tuple[Tensor, ...] = ()
    if need_strain or K.FORCES in wanted:
        argnums = (0, 1) if need_strain else (0,)
        grads, (energy, node_e) = torch.func.grad(energy_of, argnums=argnums, has_aux=True)(
            pos, strain
        )
    else:
        _, (energy, node_e) = energy_of(pos, strain)
    out = {K.ENERGY: energy}
    if K.FORCES in wanted:
        out[K.FORCES] = -grads[0]
    if need_strain:
        out.update(strain_outputs(grads[1], g, wanted))
    if K.NODE_ENERGY in wanted:
        out[K.NODE_ENERGY] = node_e
    return out
