"""Equivariant building blocks of the ACE backbone (:mod:`trustpot.models.ace`), on e3nn.

Every equivariant feature here has one layout: ``[n, D, c]`` with ``c`` channels, each channel
holding the irreps ``l = 0..L`` of natural parity (``0e + 1o + 2e + 3o ...``), stacked along
``D = (L + 1)^2`` in e3nn's order and basis (``1o`` is Cartesian ``x, y, z``). A single
channel count for every ``l`` lets every operation be a dense batched matrix product, with
no Python loop over edges, paths or channels in the forward pass; the few loops over ``l``
(at most 4) wrap matrix products.

e3nn supplies the mathematics: spherical harmonics (:class:`e3nn.o3.SphericalHarmonics`), the
real Clebsch-Gordan coefficients (:func:`e3nn.o3.wigner_3j`) from which every coupling tensor
below is built once at construction, and the Wigner-D matrices the tests rotate features with.

- :class:`IrrepsLinear`: channel mixing within each ``l`` (optionally per element);
- :class:`EdgeTensorProduct`: ``h_j (x) Y(r_ij)`` with per-edge, per-path, per-channel weights
  from a radial network (channel-wise, e3nn's "uvu" mode);
- :class:`SymmetricProduct`: the ACE product basis, polynomials of degree ``1..nu`` of a node's
  features ``A`` within each channel, projected onto the equivariant ones and weighted per
  element (body order ``nu + 1``).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from e3nn import o3
from torch import Tensor, nn


def irreps_dim(lmax: int) -> int:
    """``(lmax + 1)^2``: the number of components of ``l = 0..lmax``."""
    return (lmax + 1) ** 2


def block(ell: int) -> slice:
    """The components of irrep ``l`` in the stacked ``D`` axis."""
    return slice(ell * ell, (ell + 1) * (ell + 1))


def natural_irreps(lmax: int, channels: int = 1) -> o3.Irreps:
    """``channels x (0e + 1o + 2e + ...)`` up to ``lmax``, as e3nn irreps."""
    return o3.Irreps([(channels, (ell, (-1) ** ell)) for ell in range(lmax + 1)])


@functools.lru_cache(maxsize=256)
def _w3j(l1: int, l2: int, l3: int) -> Tensor:
    """Real Clebsch-Gordan tensor [2l1+1, 2l2+1, 2l3+1] (float64, unit Frobenius norm)."""
    out: Tensor = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
    return out


class IrrepsLinear(nn.Module):
    """``y[:, l, :] = x[:, l, :] @ W_l``: channel mixing within each irrep ``l`` (equivariant).

    Args:
        lmax_in: the input holds ``l = 0..lmax_in``.
        lmax_out: the output holds ``l = 0..lmax_out``; an ``l`` the input lacks is zero.
        c_in: input channels.
        c_out: output channels.
        n_types: when given, one weight set per element, selected by the ``onehot`` argument
            (all elements' outputs are computed by one matrix product and the atom's is kept:
            cheaper on a CPU than a per-atom gather of weights for a handful of elements).
    """

    def __init__(
        self, lmax_in: int, lmax_out: int, c_in: int, c_out: int, n_types: int = 0
    ) -> None:
        super().__init__()
        self.lmax_out, self.c_out, self.n_types = lmax_out, c_out, n_types
        self.shared = min(lmax_in, lmax_out)
        width = c_out * max(n_types, 1)
        self.weight = nn.Parameter(torch.randn(self.shared + 1, c_in, width) / math.sqrt(c_in))

    def forward(self, x: Tensor, onehot: Tensor | None = None) -> Tensor:
        """x: [n, (lmax_in+1)^2, c_in], onehot: [n, n_types] (per element)
        -> [n, (lmax_out+1)^2, c_out]."""
        y = self.mix(x)  # [n, D_shared, width]
        if self.n_types:
            assert onehot is not None
            y = y.view(x.shape[0], -1, self.n_types, self.c_out)
            y = (y * onehot[:, None, :, None]).sum(dim=2)
        missing = irreps_dim(self.lmax_out) - irreps_dim(self.shared)
        if missing:
            y = torch.cat([y, x.new_zeros((x.shape[0], missing, self.c_out))], dim=1)
        return y

    def mix(self, x: Tensor) -> Tensor:
        """x: [n, (lmax_in+1)^2, c_in] -> [n, (shared+1)^2, width]: each ``l`` block times its
        weight (a stacked ensemble overrides this, :mod:`trustpot.uq.stacked`)."""
        parts = [x[:, block(ell), :] @ self.weight[ell] for ell in range(self.shared + 1)]
        return torch.cat(parts, dim=1)


def edge_paths(lmax_h: int, lmax_y: int, lmax_a: int) -> list[tuple[int, int, int]]:
    """Couplings ``(l_h, l_y) -> l_a`` allowed by the triangle rule and parity."""
    return [
        (lh, ly, la)
        for lh in range(lmax_h + 1)
        for ly in range(lmax_y + 1)
        for la in range(abs(lh - ly), min(lh + ly, lmax_a) + 1)
        if (lh + ly + la) % 2 == 0
    ]


class EdgeTensorProduct(nn.Module):
    """Channel-wise tensor product of neighbour features with the edge's spherical harmonics.

    ``out[e, a, c] = sum_paths w[e, path, c] * sum_{m_h, m_y} C_path[m_h, m_y, a] h[e, m_h, c]
    Y[e, m_y]``: each channel of ``h`` couples with ``Y`` along every path
    :func:`edge_paths` allows, weighted per edge (the radial network makes ``w`` from the
    distance); paths that reach the same ``l_a`` are summed. Each path's coefficients are
    scaled by ``sqrt(2 l_a + 1)`` and divided by the square root of the number of paths into
    ``l_a``, so unit-variance inputs give unit-variance outputs.

    Args:
        lmax_h: ``l`` range of the features.
        lmax_y: ``l`` range of the spherical harmonics.
        lmax_a: ``l`` range of the output.
    """

    coupling: Tensor  # [D_h, D_y, K], K = sum over paths of (2 l_a + 1)
    gather: Tensor  # [K] path of each column
    collect: Tensor  # [K, D_a] 0/1: column -> output component

    def __init__(self, lmax_h: int, lmax_y: int, lmax_a: int) -> None:
        super().__init__()
        self.paths = edge_paths(lmax_h, lmax_y, lmax_a)
        per_out = {la: sum(1 for p in self.paths if p[2] == la) for la in range(lmax_a + 1)}
        width = sum(2 * la + 1 for _, _, la in self.paths)
        coupling = torch.zeros(irreps_dim(lmax_h), irreps_dim(lmax_y), width, dtype=torch.float64)
        collect = torch.zeros(width, irreps_dim(lmax_a), dtype=torch.float64)
        gather = torch.zeros(width, dtype=torch.long)
        col = 0
        for k, (lh, ly, la) in enumerate(self.paths):
            n = 2 * la + 1
            scale = math.sqrt(n / per_out[la])
            coupling[block(lh), block(ly), col : col + n] = scale * _w3j(lh, ly, la)
            collect[col : col + n, block(la)] = torch.eye(n, dtype=torch.float64)
            gather[col : col + n] = k
            col += n
        # constants: rebuilt at construction, never saved; kept in float64 until the model
        # is cast, so that a float64 model has exact coefficients
        self.register_buffer("coupling", coupling, persistent=False)
        self.register_buffer("collect", collect, persistent=False)
        self.register_buffer("gather", gather, persistent=False)

    @property
    def n_paths(self) -> int:
        return len(self.paths)

    def forward(self, h: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """h: [e, D_h, c], y: [e, D_y], w: [e, n_paths, c] -> [e, D_a, c]."""
        t = torch.einsum("hyk,ey->ekh", self.coupling.to(y.dtype), y)  # [e, K, D_h]
        x = t * h if h.shape[1] == 1 else torch.bmm(t, h)  # [e, K, c]
        x = x * w.index_select(1, self.gather)
        return torch.einsum("ka,ekc->eac", self.collect.to(x.dtype), x)


def _monomials(dim: int, degree: int) -> list[tuple[int, ...]]:
    """Sorted index tuples ``a1 <= a2 <= ...``: the monomials of a symmetric polynomial."""
    return list(itertools.combinations_with_replacement(range(dim), degree))


def _coupling_spaces(lmax_a: int, degree: int, lcap: int) -> dict[tuple[int, int], Tensor]:
    """Bases of the equivariant multilinear maps ``(R^D)^(x degree) -> irrep l``.

    Built by coupling one more factor at a time with Clebsch-Gordan tensors; the result is
    keyed by ``(l, parity)`` with tensors [n_maps, D^degree, 2l+1] (float64). Intermediates
    above ``lcap`` are dropped (they cannot come back down to the outputs).
    """
    dim = irreps_dim(lmax_a)
    spaces: dict[tuple[int, int], Tensor] = {}
    for ell in range(lmax_a + 1):
        t = torch.zeros(1, dim, 2 * ell + 1, dtype=torch.float64)
        t[0, block(ell), :] = torch.eye(2 * ell + 1, dtype=torch.float64)
        spaces[(ell, (-1) ** ell)] = t
    for _ in range(degree - 1):
        grown: dict[tuple[int, int], list[Tensor]] = {}
        for (lk, pk), maps in spaces.items():
            for ell in range(lmax_a + 1):
                for lo in range(abs(lk - ell), min(lk + ell, lcap) + 1):
                    c = _w3j(lk, ell, lo)  # [2lk+1, 2l+1, 2lo+1]
                    # maps [n, X, 2lk+1] (x) e_l [D, 2l+1] -> [n, X, D, 2lo+1]
                    new = torch.zeros(maps.shape[0], maps.shape[1], dim, 2 * lo + 1).double()
                    new[:, :, block(ell), :] = torch.einsum("nxk,kmo->nxmo", maps, c)
                    key = (lo, pk * (-1) ** ell)
                    grown.setdefault(key, []).append(new.reshape(maps.shape[0], -1, 2 * lo + 1))
        # coupling one factor at a time is an orthogonal change of basis of the tensor
        # product, so these maps are already independent: no orthogonalisation needed here
        spaces = {key: torch.cat(v) for key, v in grown.items()}
    return spaces


def _orthonormal_rows(maps: Tensor, tol: float = 1e-9) -> Tensor:
    """An orthonormal basis [rank, ...] of the span of ``maps`` [n, ...] (flattened rows)."""
    flat = maps.reshape(maps.shape[0], -1)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = int((s > tol * max(float(s[0]), 1.0)).sum()) if s.numel() else 0
    out: Tensor = vh[:rank].reshape(rank, *maps.shape[1:])
    return out


@functools.lru_cache(maxsize=32)
def symmetric_basis(lmax_a: int, degree: int, l_out: int) -> Tensor:
    """The equivariant symmetric polynomials of degree ``degree`` in ``A`` -> irrep ``l_out``.

    ``A`` is one channel of natural-parity irreps ``0..lmax_a`` (``D = (lmax_a + 1)^2``
    components); the output has parity ``(-1)^l_out``. Returns ``U`` [n_mono, 2l_out+1, n_paths]
    (float64) over the monomials ``A_a1 A_a2 ... (a1 <= a2 <= ...)`` of :func:`_monomials`, with
    orthonormal paths: ``sum_mono U[mono, m, p] * prod(A[mono])`` for each path ``p`` transforms
    as irrep ``l_out``, and the ``p`` are linearly independent polynomials.
    """
    dim = irreps_dim(lmax_a)
    lcap = l_out + (degree - 1) * lmax_a
    maps = _coupling_spaces(lmax_a, degree, lcap).get((l_out, (-1) ** l_out))
    monos = _monomials(dim, degree)
    if maps is None:
        return torch.zeros(len(monos), 2 * l_out + 1, 0, dtype=torch.float64)
    # fold every index tuple into its sorted monomial: the polynomial of a multilinear map
    index = {m: k for k, m in enumerate(monos)}
    fold = torch.tensor(
        [index[tuple(sorted(t))] for t in itertools.product(range(dim), repeat=degree)]
    )
    folded = torch.zeros(maps.shape[0], len(monos), 2 * l_out + 1, dtype=torch.float64)
    folded.index_add_(1, fold, maps)
    basis = _orthonormal_rows(folded)  # [n_paths, n_mono, 2l+1]
    return basis.permute(1, 2, 0).contiguous()


class SymmetricProduct(nn.Module):
    """ACE product basis: per channel, every equivariant polynomial of ``A`` of degree
    ``1..correlation``, weighted per element and channel, summed per output irrep.

    ``B[n, (l,m), c] = sum_{nu,p} W[z_n, p, c] sum_mono U_{nu,l}[mono, m, p] prod(A[n, mono, c])``.
    The monomials of degree ``nu`` are built from those of degree ``nu - 1`` (one product each)
    and each degree is projected by one matrix product; ``U`` comes from
    :func:`symmetric_basis`. With ``A`` a sum over neighbours, degree ``nu`` makes
    ``(nu + 1)``-body features.

    Args:
        lmax_a: ``l`` range of ``A``.
        lmax_out: ``l`` range of ``B``.
        correlation: highest degree ``nu`` (1 to 3).
        channels: channel count ``c``.
        n_types: number of elements (one weight set each).
    """

    collect: Tensor  # [K, D_out]
    gather: Tensor  # [K] path of each column

    def __init__(
        self, lmax_a: int, lmax_out: int, correlation: int, channels: int, n_types: int
    ) -> None:
        super().__init__()
        dim = irreps_dim(lmax_a)
        self.correlation = correlation
        bases = [
            [symmetric_basis(lmax_a, d, ell) for ell in range(lmax_out + 1)]
            for d in range(1, correlation + 1)
        ]
        n_rows = sum(b[0].shape[0] for b in bases)
        width = sum((2 * ell + 1) * u.shape[2] for b in bases for ell, u in enumerate(b))
        projection = torch.zeros(n_rows, width, dtype=torch.float64)
        collect = torch.zeros(width, irreps_dim(lmax_out), dtype=torch.float64)
        gather: list[int] = []
        path_l: list[int] = []
        row = col = 0
        for b in bases:
            for ell, u in enumerate(b):  # u: [n_mono, 2l+1, p]
                n, p = 2 * ell + 1, u.shape[2]
                # columns ordered (path, m): a path's components are adjacent
                projection[row : row + u.shape[0], col : col + n * p] = u.permute(0, 2, 1).reshape(
                    u.shape[0], n * p
                )
                for k in range(p):
                    collect[col + k * n : col + (k + 1) * n, block(ell)] = torch.eye(n)
                    gather.extend([len(path_l)] * n)
                    path_l.append(ell)
                col += n * p
            row += b[0].shape[0]
        self.n_paths = len(path_l)
        #: number of paths of each degree 1..correlation (the weights' path axis, in order)
        self.paths_of_degree = [sum(u.shape[2] for u in b) for b in bases]
        self.paths_per_l = [path_l.count(ell) for ell in range(lmax_out + 1)]
        dtype = torch.get_default_dtype()
        # constants in float64 until the model is cast (see EdgeTensorProduct)
        row = 0
        for degree, b in enumerate(bases, start=1):
            rows = projection[row : row + b[0].shape[0]]
            self.register_buffer(f"projection_{degree}", rows, persistent=False)
            row += b[0].shape[0]
        self.register_buffer("collect", collect, persistent=False)
        self.register_buffer("gather", torch.tensor(gather, dtype=torch.long), persistent=False)
        # monomial (a1..ak) of degree k = monomial (a1..ak-1) of degree k-1 times A[ak]
        for degree in range(2, correlation + 1):
            where = {m: k for k, m in enumerate(_monomials(dim, degree - 1))}
            monos = _monomials(dim, degree)
            prev = torch.tensor([where[m[:-1]] for m in monos], dtype=torch.long)
            last = torch.tensor([m[-1] for m in monos], dtype=torch.long)
            self.register_buffer(f"prev_{degree}", prev, persistent=False)
            self.register_buffer(f"last_{degree}", last, persistent=False)
        # every output sums its paths: 1/sqrt(paths into its l) keeps it of unit scale
        fan_in = torch.tensor([self.paths_per_l[ell] for ell in path_l], dtype=dtype)
        self.weight = nn.Parameter(
            torch.randn(n_types, self.n_paths, channels, dtype=dtype) / fan_in.sqrt()[:, None]
        )

    def monomials(self, a: Tensor) -> list[Tensor]:
        """a: [D, ...] -> the monomials of each degree 1..correlation, [n_mono(degree), ...]."""
        parts = [a]
        for degree in range(2, self.correlation + 1):
            prev = parts[-1].index_select(0, self.get_buffer(f"prev_{degree}"))
            parts.append(prev * a.index_select(0, self.get_buffer(f"last_{degree}")))
        return parts

    def forward(self, a: Tensor, onehot: Tensor) -> Tensor:
        """a: [n, D_a, c], onehot: [n, n_types] element one-hot -> [n, D_out, c].

        Two evaluation orders give the same numbers: with few elements, the weights are folded
        into one matrix per element and channel and every element's output is computed by one
        batched product (``n_types * D_out`` columns); otherwise the monomials are projected on
        every path first (``K`` columns) and weighted per atom. Monomials are laid out
        ``[mono, c, n]`` and the degrees are projected separately (no concatenation, whose
        double backward would allocate zeros the size of every monomial).
        """
        n, _, c = a.shape
        types = onehot.shape[1]
        k, d_out = self.collect.shape
        monomials = self.monomials(a.permute(1, 2, 0))  # [M_degree, c, n] each
        weight = self.path_weights()  # [T, K, c]
        projections = [
            self.get_buffer(f"projection_{g + 1}").to(a.dtype) for g in range(len(monomials))
        ]
        collect = self.collect.to(a.dtype)
        if types * d_out < k and self.foldable:
            # U[c, mono, (t, d)] = sum_k P[mono, k] W[t, k, c] C[k, d]
            folded = weight.permute(1, 2, 0)[..., None] * collect[:, None, None, :]
            folded = folded.reshape(k, c * types * d_out)  # [K, (c, t, d)]
            x = a.new_zeros(())
            for m, p in zip(monomials, projections):
                u = (p @ folded).view(-1, c, types * d_out).transpose(0, 1)  # [c, M, T*D_out]
                x = x + torch.bmm(m.permute(1, 2, 0), u)  # [c, n, T*D_out]
            x = (x.view(c, n, types, d_out) * onehot[None, :, :, None]).sum(dim=2)
            return x.permute(1, 2, 0)
        q = a.new_zeros(())
        for m, p in zip(monomials, projections):
            q = q + p.T @ m.reshape(m.shape[0], c * n)  # [K, (c, n)]
        w = self.atom_weights(onehot, weight).view(n, k, c).permute(1, 2, 0)  # [K, c, n]
        b = collect.T @ (q.view(k, c, n) * w).reshape(k, c * n)  # [D_out, (c, n)]
        return b.view(d_out, c, n).permute(2, 0, 1)

    #: whether the weights may be folded into the projection (one weight set for all atoms)
    foldable = True

    def path_weights(self) -> Tensor:
        """[T, K, c]: the weight of every output column (its path's), per element and channel;
        a stacked ensemble overrides this (:mod:`trustpot.uq.stacked`)."""
        return self.weight.index_select(1, self.gather)

    def atom_weights(self, onehot: Tensor, weight: Tensor) -> Tensor:
        """[n, K * c]: each atom's path weights from its element (``onehot`` [n, T], ``weight``
        [T, K, c]); a stacked ensemble overrides this (:mod:`trustpot.uq.stacked`)."""
        return onehot @ weight.reshape(weight.shape[0], -1)
