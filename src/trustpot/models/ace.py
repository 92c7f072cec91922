"""ACE: an equivariant message-passing backbone of higher body order (MACE-like), on e3nn.

Each interaction layer ``t`` (features ``h`` of irreps ``0..l_max``, ``F`` channels each,
natural parity ``0e + 1o + 2e``; the first layer's input is an element embedding, ``F x 0e``):

1. one-particle basis, a sum over neighbours ``j`` within the cutoff,
   ``A_i = (1/N_avg) sum_j R(r_ij) * (Y(r_ij / |r_ij|) (x) W h_j)``: spherical harmonics ``Y``
   up to ``sh_lmax``, a channel-wise tensor product whose per-path, per-channel weights ``R``
   come from an MLP of ``n_rbf`` Bessel functions times a cosine cutoff (value and slope vanish
   at the cutoff), then channel mixing per ``l`` (per element of atom ``i`` in the first
   layer, ``element_mix_a``);
2. higher body order: every equivariant polynomial of ``A_i`` of degree ``1..correlation``
   within each channel (the symmetric tensor powers of ``A_i``, contracted back to
   ``l <= l_max`` with Clebsch-Gordan coefficients precomputed at construction), weighted per
   element, path and channel; degree ``nu`` makes ``(nu + 1)``-body features, so two layers of
   correlation 3 see up to 13-body correlations;
3. update: channel mixing per ``l``, plus an element-dependent self-connection of ``h``.

The last layer produces only invariants (``F x 0e``: the energy needs nothing else). After
every layer the invariant channels go through :meth:`Backbone.modulate` (the hook of learned
perturbations; acting on scalars only keeps the network equivariant) and are the layer's
public embedding (``Embedding["layers"]``, read by PROBE); ``node`` is the last layer's. The
energy head reads ``node`` like every other backbone's, so MC dropout and property heads work
unchanged. There is no nonlinearity inside the layers besides the radial MLP: the body order
is the expressive part, as in MACE.

Sizes (``size`` hyper; any hyper set explicitly wins over the size's value):

======  ========  =====  =======  ===========  ======  =====  ============
size    channels  l_max  sh_lmax  correlation  layers  n_rbf  radial_width
======  ========  =====  =======  ===========  ======  =====  ============
small   32        1      2        2            2       8      64
medium  64        1      2        3            2       8      64
large   128       2      3        3            2       8      64
======  ========  =====  =======  ===========  ======  =====  ============

``small`` (the default) has MACE-small's width (32 x 0e + 32 x 1o, 2 interactions) with
correlation 2 and spherical harmonics to ``l = 2``. On one CPU thread it takes 1.3x PaiNN's time
per epoch. At an equal 10-minute budget it was more accurate, in and out of domain, on ethanol
and 3BPA than the same width with correlation 3, which trains about 2x slower
(``docs/backbones.md``). MACE-small's shape is ``-o model.hypers.correlation=3``; add
``sh_lmax=3`` for MACE's spherical harmonics, which costs another 3.6x. ``medium`` and ``large``
are for longer budgets or a GPU, and their accuracy has not been measured here.

Two choices were measured at equal epochs (30 on 3BPA, two seeds, ``docs/backbones.md``) and
are the defaults: the radial MLP starts variance-preserving (weights N(0, 1/fan_in), the SiLU's
second-moment gain after each activation, zero biases), so that ``R`` and with it ``A`` start
at unit scale rather than PyTorch's default 1/sqrt(3) per layer (which left the geometric part
of the first layer's features at about 0.5% of the element embedding, and the products of
``A`` smaller still); and the first layer mixes ``A``'s channels per element, as MACE's first
interaction does. Checkpoints written before ``element_mix_a`` existed load without it.

Kernels are dense matrix products over one feature layout (:mod:`trustpot.models.ace_blocks`),
so a float64 model gives the same numbers as the mathematics to rounding, and no loop runs
over edges, paths or channels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Final

import torch
from e3nn import o3
from torch import Tensor, nn

from trustpot.data.graph import Graph
from trustpot.errors import ConfigError
from trustpot.models.ace_blocks import (
    EdgeTensorProduct,
    IrrepsLinear,
    SymmetricProduct,
    irreps_dim,
)
from trustpot.models.base import Backbone, BackboneHypers, Embedding, LayerGroups, edge_vectors
from trustpot.nn import MLP, BesselBasis, CosineCutoff, scatter_sum

#: named sizes: the values of every hyper left at -1
SIZES: Final[dict[str, dict[str, int]]] = {
    "small": {
        "n_features": 32,
        "l_max": 1,
        "sh_lmax": 2,
        "correlation": 2,
        "n_layers": 2,
        "n_rbf": 8,
        "radial_width": 64,
    },
    "medium": {
        "n_features": 64,
        "l_max": 1,
        "sh_lmax": 2,
        "correlation": 3,
        "n_layers": 2,
        "n_rbf": 8,
        "radial_width": 64,
    },
    "large": {
        "n_features": 128,
        "l_max": 2,
        "sh_lmax": 3,
        "correlation": 3,
        "n_layers": 2,
        "n_rbf": 8,
        "radial_width": 64,
    },
}


@dataclasses.dataclass(frozen=True)
class AceHypers(BackboneHypers):
    """ACE hyper-parameters; every integer left at -1 takes the value of ``size``.

    Attributes:
        size: ``small``, ``medium`` or ``large`` (see the module docstring).
        n_features: channels per irrep (the width of the invariant embedding).
        n_layers: interaction layers.
        l_max: highest ``l`` of the hidden features between layers (0, 1 or 2).
        sh_lmax: highest ``l`` of the spherical harmonics and of ``A`` (1 to 3).
        correlation: highest degree of the products of ``A`` (1 to 3; body order + 1).
        n_rbf: Bessel functions expanding each distance.
        radial_width: hidden width of the radial MLP (two hidden layers).
        element_mix_a: the first layer mixes the channels of ``A`` with one weight set per
            element of the centre atom.
        radial_bias: the radial MLP's hidden layers have biases (off: it has none, as MACE's
            e3nn ``FullyConnectedNet``; see ``docs/backbones.md`` for what was measured).
    """

    LEGACY: ClassVar[dict[str, Any]] = {"element_mix_a": False, "radial_bias": True}

    size: str = "small"
    n_features: int = -1
    n_layers: int = -1
    l_max: int = -1
    sh_lmax: int = -1
    correlation: int = -1
    n_rbf: int = -1
    radial_width: int = -1
    element_mix_a: bool = True
    radial_bias: bool = True

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"ACE size must be one of {sorted(SIZES)}, got '{self.size}'")
        for key, value in SIZES[self.size].items():
            if getattr(self, key) == -1:
                object.__setattr__(self, key, value)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values the backbone cannot use."""
        super().validate()
        bounds = {"l_max": (0, 2), "sh_lmax": (1, 3), "correlation": (1, 3)}
        for key, (low, high) in bounds.items():
            value = getattr(self, key)
            if not low <= value <= high:
                raise ConfigError(f"ACE {key} must be in {low}..{high}, got {value}")
        if self.l_max > self.sh_lmax:
            raise ConfigError(f"ACE l_max ({self.l_max}) exceeds sh_lmax ({self.sh_lmax})")
        if self.n_rbf < 1 or self.radial_width < 1:
            raise ConfigError("ACE n_rbf and radial_width must be at least 1")


#: E[(c SiLU(z))^2] = 1 for z ~ N(0, 1) (e3nn's normalize2mom of SiLU)
SILU_GAIN: Final = 1.679


def unit_variance_init(mlp: nn.Sequential) -> None:
    """Initialise ``mlp``'s linear layers so that unit-variance inputs give unit-variance
    outputs: weights N(0, 1/fan_in), times :data:`SILU_GAIN` after an activation, zero biases.
    """
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    for k, linear in enumerate(linears):
        gain = 1.0 if k == 0 else SILU_GAIN
        nn.init.normal_(linear.weight, 0.0, gain / math.sqrt(linear.in_features))
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


class AceInteraction(nn.Module):
    """One interaction layer: ``h`` [n, (lmax_in+1)^2, F] -> ``h'`` [n, (lmax_out+1)^2, F].

    Args:
        hypers: the backbone's hypers.
        lmax_in: ``l`` range of the input features.
        lmax_out: ``l`` range of the output features.
        n_types: number of elements.
        avg_neighbors: divides the neighbour sum.
        first: the network's first layer (its ``A`` is mixed per element with
            ``hypers.element_mix_a``).
    """

    def __init__(
        self,
        hypers: AceHypers,
        lmax_in: int,
        lmax_out: int,
        n_types: int,
        avg_neighbors: float,
        first: bool = False,
    ) -> None:
        super().__init__()
        f, la = hypers.n_features, hypers.sh_lmax
        self.lmax_out = lmax_out
        self.n_features, self.n_types = f, n_types
        self.norm = float(avg_neighbors)
        self.up = IrrepsLinear(lmax_in, lmax_in, f, f)
        self.tp = EdgeTensorProduct(lmax_in, hypers.sh_lmax, la)
        width = hypers.radial_width
        self.radial = MLP(
            [hypers.n_rbf, width, width, self.tp.n_paths * f],
            bias_last=False,
            bias_hidden=hypers.radial_bias,
        )
        unit_variance_init(self.radial)
        by_element = hypers.element_mix_a and first
        self.mix_a = IrrepsLinear(la, la, f, f, n_types=n_types if by_element else 0)
        self.product = SymmetricProduct(la, lmax_out, hypers.correlation, f, n_types)
        self.mix_b = IrrepsLinear(lmax_out, lmax_out, f, f)
        self.skip = IrrepsLinear(lmax_in, lmax_out, f, f, n_types=n_types)

    def forward(
        self, h: Tensor, types: Tensor, y: Tensor, rbf: Tensor, fcut: Tensor, index: Tensor
    ) -> Tensor:
        """h: node features, types: [n] element index, y: [e, (sh_lmax+1)^2] spherical
        harmonics, rbf: [e, n_rbf] Bessel features, fcut: [e] cutoff function, index: [2, e]
        (centre i, neighbour j)."""
        i, j = index[0], index[1]
        w = self.radial(rbf) * fcut.unsqueeze(-1)  # vanishes with its slope at the cutoff
        w = w.view(rbf.shape[0], self.tp.n_paths, self.n_features)
        messages = self.tp(self.up(h)[j], y, w)  # [e, D_a, F]
        onehot = nn.functional.one_hot(types, self.n_types).to(h.dtype)
        a = self.mix_a(scatter_sum(messages, i, h.shape[0]) / self.norm, onehot)
        b = self.mix_b(self.product(a, onehot))
        out: Tensor = b + self.skip(h, onehot)
        return out


class Ace(Backbone):
    """The ACE backbone (see the module docstring); invariant features in ``node``."""

    Hypers = AceHypers

    def __init__(self, hypers: AceHypers, species: list[int], avg_neighbors: float) -> None:
        super().__init__(hypers, species, avg_neighbors)
        f = hypers.n_features
        self.embedding = nn.Embedding(self.n_types, f)
        self.rbf = BesselBasis(hypers.cutoff, hypers.n_rbf)
        self.cutoff_fn = CosineCutoff(hypers.cutoff)
        self.sh = o3.SphericalHarmonics(
            list(range(hypers.sh_lmax + 1)), normalize=True, normalization="component"
        )
        lmax = [0] + [hypers.l_max] * (hypers.n_layers - 1) + [0]
        self.interactions = nn.ModuleList(
            AceInteraction(
                hypers, lmax[k], lmax[k + 1], self.n_types, self.avg_neighbors, first=k == 0
            )
            for k in range(hypers.n_layers)
        )

    def layer_groups(self) -> LayerGroups:
        """``embedding`` then ``interaction_k`` per layer (see :meth:`Backbone.layer_groups`)."""
        return self.interaction_layers(list(self.interactions))

    def forward(self, g: Graph) -> Embedding:
        index, vec, r = edge_vectors(g, "main")
        types = self.type_index(g)
        y = self.sh(vec)
        rbf, fcut = self.rbf(r), self.cutoff_fn(r)
        h = self.embedding(types).unsqueeze(1)  # [n, 1, F]: F x 0e
        layers = []
        for k, interaction in enumerate(self.interactions):
            h = interaction(h, types, y, rbf, fcut, index)
            scalars = self.modulate(k, h[:, 0, :], g)
            h = torch.cat([scalars.unsqueeze(1), h[:, 1:, :]], dim=1)
            layers.append(scalars)
        assert h.shape[1] == irreps_dim(0)
        return {"node": h[:, 0, :], "layers": layers}
