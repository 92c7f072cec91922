"""Small building blocks shared by the backbones."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def cell_volume(cell: Tensor) -> Tensor:
    """``|det(cell)|`` [n] Å^3 of cells [n, 3, 3] (rows: lattice vectors), as the triple
    product ``a . (b x c)``: unlike an LU factorisation its derivatives need no test for a
    singular cell (a molecule's zero cell), so the same few kernels run for every batch and a
    CUDA graph can record them."""
    a, b, c = cell.unbind(-2)
    volume: Tensor = (a * torch.linalg.cross(b, c, dim=-1)).sum(-1).abs()
    return volume


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum rows of ``src`` [n_items, ...] into ``dim_size`` bins given by ``index`` [n_items]."""
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add_(0, index, src)


class CosineCutoff(nn.Module):
    """0.5 (cos(pi r / r_c) + 1) inside the cutoff, 0 outside: value and slope vanish at r_c.

    Args:
        cutoff: r_c in Å.
    """

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: Tensor) -> Tensor:
        """r: [n_edges] Å -> [n_edges] in [0, 1]."""
        inside = (r < self.cutoff).to(r.dtype)
        return 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * inside


class BesselBasis(nn.Module):
    """sin(n pi r / r_c) / r for n = 1..n_basis (PaiNN, DimeNet, NequIP).

    Args:
        cutoff: r_c in Å.
        n_basis: number of functions.
        trainable: learn the frequencies.
    """

    def __init__(self, cutoff: float, n_basis: int = 20, trainable: bool = False) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        freqs = torch.arange(1, n_basis + 1, dtype=torch.get_default_dtype()) * math.pi / cutoff
        self.freqs = nn.Parameter(freqs, requires_grad=trainable)

    def forward(self, r: Tensor) -> Tensor:
        """r: [n_edges] Å -> [n_edges, n_basis]."""
        r = r.unsqueeze(-1)
        return torch.sin(self.freqs * r) / r.clamp_min(1e-6)


class GaussianBasis(nn.Module):
    """exp(-gamma (r - mu_k)^2) on an even grid of centres in [0, r_c] (SchNet).

    Args:
        cutoff: r_c in Å.
        n_basis: number of Gaussians.
    """

    centres: Tensor  # [n_basis] Å, a buffer

    def __init__(self, cutoff: float, n_basis: int = 50) -> None:
        super().__init__()
        centres = torch.linspace(0.0, float(cutoff), n_basis)
        self.register_buffer("centres", centres)
        spacing = float(cutoff) / max(n_basis - 1, 1)
        self.gamma = 0.5 / spacing**2

    def forward(self, r: Tensor) -> Tensor:
        """r: [n_edges] Å -> [n_edges, n_basis]."""
        return torch.exp(-self.gamma * (r.unsqueeze(-1) - self.centres) ** 2)


class MLP(nn.Sequential):
    """Linear layers with an activation between them (none after the last).

    Args:
        sizes: layer widths, input first, e.g. ``[64, 64, 1]``.
        activation: activation class.
        dropout: dropout probability before each hidden linear layer (0 disables it); kept
            as real ``nn.Dropout`` modules so that MC dropout can switch them on.
        bias_last: whether the last layer has a bias.
        bias_hidden: whether the layers before the last have biases (without them, and with
            ``bias_last`` off, the MLP maps zero to zero, as e3nn's ``FullyConnectedNet``).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: Callable[[], nn.Module] = nn.SiLU,
        dropout: float = 0.0,
        bias_last: bool = True,
        bias_hidden: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        for k in range(len(sizes) - 1):
            last = k == len(sizes) - 2
            if dropout > 0 and k > 0:
                layers.append(nn.Dropout(dropout))
            bias = bias_last if last else bias_hidden
            layers.append(nn.Linear(sizes[k], sizes[k + 1], bias=bias))
            if not last:
                layers.append(activation())
        super().__init__(*layers)


class ShiftedSoftplus(nn.Module):
    """log(0.5 e^x + 0.5), SchNet's activation (zero at zero)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(x) - math.log(2.0)
