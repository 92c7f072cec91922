"""The ACE backbone beyond the shared contract tests (``tests/test_backbones.py``).

Its blocks are equivariant under rotations and reflections (checked with e3nn's Wigner-D
matrices), the product basis has the body order it claims, the two evaluation orders of the
product agree, sizes resolve as documented, and every capability runs on it: perturbations
(also in ``tests/test_uq_perturb.py``), PROBE, MC dropout, ``trustpot train`` and ``eval``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from e3nn import o3

from trustpot import keys as K
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import checkpoint_digest, load_model, save_model
from trustpot.models import build_potential
from trustpot.models.ace import AceHypers, AceInteraction
from trustpot.models.ace_blocks import (
    EdgeTensorProduct,
    IrrepsLinear,
    SymmetricProduct,
    natural_irreps,
    symmetric_basis,
)
from trustpot.models.base import make_hypers
from trustpot.models.potential import Potential, potential_from_meta
from trustpot.testing import (
    check_batch_equals_single,
    check_forces_finite_difference,
    check_invariances,
    check_stress_finite_difference,
    random_rotation,
)
from trustpot.uq.ensemble import MCDropout
from trustpot.uq.probe import ProbeHypers, fit_probe

TINY = {"n_features": 8, "n_layers": 2, "cutoff": 4.0}


def orthogonal(seed: int, improper: bool) -> torch.Tensor:
    """A random rotation [3, 3], times -1 (a rotation and an inversion) when ``improper``."""
    r = torch.tensor(random_rotation(seed))
    return -r if improper else r


def wigner(lmax: int, r: torch.Tensor) -> torch.Tensor:
    """Wigner-D matrix [(lmax+1)^2] ^ 2 of ``r`` on ``0e + 1o + 2e ...``.

    e3nn's ``D_from_matrix`` is exact to about 1e-6 only (its tables are float32), so the matrix
    is solved from the spherical harmonics, ``Y(r v) = D Y(v)`` at 64 directions, in float64,
    and checked against e3nn's.
    """
    sh = o3.SphericalHarmonics(list(range(lmax + 1)), normalize=True, normalization="component")
    v = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = torch.linalg.lstsq(sh(v), sh(v @ r.T)).solution.T
    torch.testing.assert_close(d, natural_irreps(lmax).D_from_matrix(r), atol=1e-5, rtol=0)
    return d


def rotate(x: torch.Tensor, lmax: int, r: torch.Tensor) -> torch.Tensor:
    """Features [n, (lmax+1)^2, c] transformed by the Wigner-D matrix of ``r``."""
    return torch.einsum("ij,njc->nic", wigner(lmax, r), x)


def onehot(types: list[int], n_types: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(types), n_types).double()


def tiny(structures: list[Structure], seed: int = 0, **hypers: object) -> Potential:
    model = build_potential("ace", {**TINY, **hypers}, structures, dtype="float64", seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def evaluate(model: torch.nn.Module, structures: list[Structure]) -> dict[str, torch.Tensor]:
    g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures])
    return {k: v.detach() for k, v in model(g, frozenset({K.ENERGY, K.FORCES})).items()}


# -- the blocks ---------------------------------------------------------------------------------
def test_product_basis_counts_the_known_invariants() -> None:
    # one channel of 0e + 1o (a scalar s and a vector v):
    # degree 2 -> 0e: s^2, v.v; 1o: s v; 2e: the traceless part of v v
    assert [symmetric_basis(1, 2, ell).shape[2] for ell in range(3)] == [2, 1, 1]
    # degree 3 -> 0e: s^3, s v.v; 1o: s^2 v, (v.v) v (v x v = 0 for one vector)
    assert [symmetric_basis(1, 3, ell).shape[2] for ell in range(2)] == [2, 2]
    # paths are orthonormal polynomials
    u = symmetric_basis(2, 3, 1).reshape(-1, symmetric_basis(2, 3, 1).shape[2])
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64))


@pytest.mark.parametrize("improper", [False, True])
def test_symmetric_product_is_equivariant(improper: bool) -> None:
    torch.manual_seed(0)
    product = SymmetricProduct(lmax_a=2, lmax_out=2, correlation=3, channels=4, n_types=2)
    product.double()
    a, types = torch.randn(5, 9, 4, dtype=torch.float64), onehot([0, 1, 1, 0, 1], 2)
    r = orthogonal(1, improper)
    with torch.no_grad():
        out = product(rotate(a, 2, r), types)
        torch.testing.assert_close(out, rotate(product(a, types), 2, r))
    assert float(out.abs().max()) > 1e-3


@pytest.mark.parametrize("improper", [False, True])
def test_edge_tensor_product_and_linears_are_equivariant(improper: bool) -> None:
    torch.manual_seed(0)
    tp = EdgeTensorProduct(lmax_h=1, lmax_y=2, lmax_a=2).double()
    sh = o3.SphericalHarmonics([0, 1, 2], normalize=True, normalization="component")
    h, vec = torch.randn(7, 4, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    w = torch.randn(7, tp.n_paths, 3, dtype=torch.float64)
    r = orthogonal(2, improper)
    out = tp(rotate(h, 1, r), sh(vec @ r.T), w)
    torch.testing.assert_close(out, rotate(tp(h, sh(vec), w), 2, r))
    linear = IrrepsLinear(2, 1, 3, 5, n_types=2).double()
    types = onehot([0, 1, 1, 0, 1, 0, 0], 2)
    torch.testing.assert_close(linear(rotate(out, 2, r), types), rotate(linear(out, types), 1, r))


def test_two_evaluation_orders_agree() -> None:
    """Few elements: weights folded per element; many: projected first. Same numbers."""
    torch.manual_seed(0)
    few = SymmetricProduct(2, 1, 3, channels=4, n_types=2).double()
    many = SymmetricProduct(2, 1, 3, channels=4, n_types=12).double()
    k, d_out = few.collect.shape
    assert 2 * d_out < k <= 12 * d_out, "the two modules should take different branches"
    with torch.no_grad():
        many.weight[:2] = few.weight
    a, types = torch.randn(6, 9, 4, dtype=torch.float64), [0, 1, 1, 0, 0, 1]
    padded = torch.cat([onehot(types, 2), torch.zeros(6, 10, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(few(a, onehot(types, 2)), many(a, padded))


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_body_order_is_the_correlation(correlation: int) -> None:
    """B(lambda A) is a polynomial of degree exactly ``correlation`` in lambda: its
    ``correlation``-th finite difference is non-zero and the next one vanishes."""
    torch.manual_seed(0)
    product = SymmetricProduct(2, 1, correlation, channels=3, n_types=1).double()
    a, types = torch.randn(4, 9, 3, dtype=torch.float64), onehot([0, 0, 0, 0], 1)
    with torch.no_grad():
        values = [product(lam * a, types) for lam in range(correlation + 2)]

    def difference(order: int) -> torch.Tensor:
        coefficients = [(-1) ** (order - k) * float(math.comb(order, k)) for k in range(order + 1)]
        return sum(c * v for c, v in zip(coefficients, values))

    assert float(difference(correlation).abs().max()) > 1e-3
    assert float(difference(correlation + 1).abs().max()) < 1e-9


def test_correlation_3_differs_from_1_and_contains_it(ethanol_structures: list[Structure]) -> None:
    """With its degree-2 and -3 weights zeroed, a correlation-3 model is the correlation-1 model
    with the same other weights; with them, it predicts something else."""
    three = tiny(ethanol_structures, correlation=3)
    one = build_potential("ace", {**TINY, "correlation": 1}, ethanol_structures, dtype="float64")
    state = three.state_dict()
    for k, layer in enumerate(one.backbone.interactions):
        key = f"backbone.interactions.{k}.product.weight"
        state[key] = state[key][:, : layer.product.n_paths]  # degree-1 paths come first
        assert layer.product.paths_of_degree == [layer.product.n_paths]
    one.load_state_dict(state)
    s = ethanol_structures[:2]
    before = evaluate(three, s)
    assert not torch.allclose(before[K.ENERGY], evaluate(one.eval(), s)[K.ENERGY], atol=1e-6)
    with torch.no_grad():
        for layer in three.backbone.interactions:
            layer.product.weight[:, layer.product.paths_of_degree[0] :] = 0.0
    torch.testing.assert_close(evaluate(three, s)[K.ENERGY], evaluate(one, s)[K.ENERGY])


@pytest.mark.parametrize(
    "hypers",
    [{"correlation": 3}, {"correlation": 3, "l_max": 2, "sh_lmax": 3, "n_features": 4}],
    ids=["correlation3", "lmax2-sh3"],
)
def test_contracts_of_other_shapes(
    hypers: dict[str, int], ethanol_structures: list[Structure], bulk_structures: list[Structure]
) -> None:
    """The shared contract checks (run on the default shape in ``test_backbones.py``) on
    correlation 3 and on l = 2 features with l = 3 spherical harmonics."""
    model = tiny(ethanol_structures, **hypers)
    check_invariances(model, ethanol_structures[0])
    check_forces_finite_difference(model, ethanol_structures[1])
    check_batch_equals_single(model, ethanol_structures[:3])
    periodic = tiny(bulk_structures, **hypers)
    check_invariances(periodic, bulk_structures[0])
    check_stress_finite_difference(periodic, bulk_structures[0])


def test_reflection_invariant(ethanol_structures: list[Structure]) -> None:
    model = tiny(ethanol_structures)
    s = ethanol_structures[3]
    mirror = np.diag([-1.0, 1.0, 1.0]) @ random_rotation(4)
    image = Structure(s.numbers.copy(), s.positions @ mirror.T, s.cell.copy(), s.pbc.copy())
    a, b = evaluate(model, [s]), evaluate(model, [image])
    torch.testing.assert_close(b[K.ENERGY], a[K.ENERGY])
    torch.testing.assert_close(b[K.FORCES], a[K.FORCES] @ torch.tensor(mirror).T)


# -- hypers, sizes, checkpoints ------------------------------------------------------------------
def test_sizes_resolve_and_explicit_values_win() -> None:
    small = AceHypers()
    assert (small.n_features, small.l_max, small.sh_lmax, small.correlation) == (32, 1, 2, 2)
    medium = make_hypers(AceHypers, {"size": "medium", "n_features": "16"})
    assert isinstance(medium, AceHypers)
    assert (medium.n_features, medium.sh_lmax, medium.correlation) == (16, 2, 3)
    large = make_hypers(AceHypers, {"size": "large"})
    assert isinstance(large, AceHypers) and (large.l_max, large.sh_lmax) == (2, 3)
    for bad in ({"size": "huge"}, {"l_max": 3}, {"correlation": 4}, {"l_max": 2, "sh_lmax": 1}):
        with pytest.raises(ConfigError):
            make_hypers(AceHypers, bad)


def test_checkpoint_holds_weights_not_constants(
    ethanol_structures: list[Structure], tmp_path: Path
) -> None:
    model = build_potential("ace", {"size": "small", "n_features": 4}, ethanol_structures[:4])
    assert model.meta.hypers["sh_lmax"] == 2 and model.meta.hypers["size"] == "small"
    names = list(model.state_dict())
    assert not [n for n in names if any(c in n for c in ("projection", "coupling", "collect"))]
    assert model.modulation_shape() == (2, 4)
    assert model.embedding_widths() == [4, 4]


def test_first_layer_mixes_a_per_element_and_old_checkpoints_load(
    ethanol_structures: list[Structure], tmp_path: Path
) -> None:
    model = build_potential("ace", TINY, ethanol_structures[:4])
    first, second = model.backbone.interactions
    assert first.mix_a.n_types == 3 and second.mix_a.n_types == 0
    plain = build_potential("ace", {**TINY, "element_mix_a": "false"}, ethanol_structures[:4])
    assert plain.backbone.interactions[0].mix_a.n_types == 0
    # a checkpoint written before the field existed: its hypers lack the key
    path = tmp_path / "old.ckpt"
    save_model(plain, path)
    data = torch.load(path, weights_only=True)
    del data["meta"]["hypers"]["element_mix_a"]
    data["digest"] = checkpoint_digest({k: v for k, v in data.items() if k != "digest"})
    torch.save(data, path)
    old = load_model(path, Potential)
    assert old.backbone.interactions[0].mix_a.n_types == 0
    s = ethanol_structures[0]
    g = collate([structure_to_graph(s, plain.neighbor_lists(), plain.dtype)])
    torch.testing.assert_close(old.eval()(g)[K.FORCES], plain.eval()(g)[K.FORCES])


def test_radial_bias_off_maps_zero_to_zero_and_old_checkpoints_keep_their_biases(
    ethanol_structures: list[Structure],
) -> None:
    """``radial_bias=false``: the radial MLP has no bias anywhere (MACE's e3nn network), so
    zero Bessel features give zero weights; a stored hypers dict without the key is a model
    with biases, as every checkpoint written before the option."""
    plain = build_potential("ace", {**TINY, "radial_bias": "false"}, ethanol_structures[:4])
    radial = plain.backbone.interactions[0].radial
    linears = [m for m in radial if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert float(radial(torch.zeros(5, linears[0].in_features)).abs().max()) == 0.0
    biased = build_potential("ace", TINY, ethanol_structures[:4])
    hidden = [m for m in biased.backbone.interactions[0].radial if isinstance(m, torch.nn.Linear)]
    assert [m.bias is not None for m in hidden] == [True, True, False]
    stored = dict(biased.meta.hypers)
    del stored["radial_bias"]
    old = potential_from_meta(dataclasses.replace(biased.meta, hypers=stored))
    assert old.backbone.interactions[0].radial[0].bias is not None


def test_an_old_deepset_moe_keeps_its_ace_encoder(ethanol_structures: list[Structure]) -> None:
    """A DeepSet-MoE's stored hypers without ``current_encoder`` (written before ACE gained
    ``element_mix_a``) rebuild the encoder as it was; new ones get the current encoder."""
    hypers = {"encoder": "ace", "cutoff": 4.0, "n_features": 8, "n_layers": 2}
    new = build_potential("deepset-moe", hypers, ethanol_structures[:4])
    assert new.backbone.encoder.interactions[0].mix_a.n_types == 3
    stored = dict(new.meta.hypers)
    del stored["current_encoder"]
    old = potential_from_meta(dataclasses.replace(new.meta, hypers=stored))
    assert old.backbone.encoder.interactions[0].mix_a.n_types == 0


def test_radial_network_starts_at_unit_scale() -> None:
    """Variance-preserving init: unit-normal Bessel features give a radial output of about unit
    second moment (PyTorch's default init gave about 0.03)."""
    torch.manual_seed(0)
    layer = AceInteraction(AceHypers(n_features=32), 0, 1, 3, 10.0, first=True)
    out = layer.radial(torch.randn(4096, layer.radial[0].in_features))
    assert 0.5 < float(out.pow(2).mean()) < 2.0


# -- capabilities on ACE -------------------------------------------------------------------------
def test_embeddings_are_the_invariant_channels(ethanol_structures: list[Structure]) -> None:
    model = tiny(ethanol_structures)
    s = ethanol_structures[0]
    rotated = Structure(
        s.numbers.copy(), s.positions @ random_rotation(5).T, s.cell.copy(), s.pbc.copy()
    )
    embs = []
    for x in (s, rotated):
        g = collate([structure_to_graph(x, model.neighbor_lists(), model.dtype)])
        embs.append(model.embed(g))
    assert [t.shape for t in embs[0]["layers"]] == [(9, 8), (9, 8)]
    for a, b in zip(embs[0]["layers"], embs[1]["layers"]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(embs[0]["node"], embs[0]["layers"][-1])


def test_mc_dropout_and_probe_run_on_ace(ethanol_structures: list[Structure]) -> None:
    model = build_potential("ace", TINY, ethanol_structures, head_dropout=0.2, dtype="float64")
    mc = MCDropout(model, n_samples=4).eval()
    g = collate(
        [structure_to_graph(s, mc.neighbor_lists(), mc.dtype) for s in ethanol_structures[:2]]
    )
    out = mc(g, {K.ENERGY, K.FORCES, K.FORCES_STD, K.ENERGY_SAMPLES})
    assert out[K.ENERGY_SAMPLES].shape == (2, 4) and float(out[K.FORCES_STD].min()) > 0
    probe = fit_probe(
        tiny(ethanol_structures),
        ethanol_structures,
        hypers=ProbeHypers(width=8, heads=2, dropout=0.0),
        epochs=2,
        batch_size=8,
        log=lambda _: None,
    )
    g = collate(
        [structure_to_graph(s, probe.neighbor_lists(), probe.dtype) for s in ethanol_structures[:3]]
    )
    reliability = probe(g, {K.ENERGY, K.RELIABILITY})[K.RELIABILITY]
    assert reliability.shape == (3,) and bool(torch.isfinite(reliability).all())


@pytest.mark.integration
def test_cli_trains_and_evaluates_ace(ethanol_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--train", str(ethanol_file), "--model", "ace", "--epochs", "2"]
    argv += ["--out", str(run), "-o", "train.threads=1", "-o", "model.hypers.n_features=8"]
    assert main(argv) == 0
    assert (
        main(["eval", str(run / "best.ckpt"), str(ethanol_file), "--out", str(tmp_path / "ev")])
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert np.isfinite(metrics["forces_mae"]) and metrics["n_structures"] == 24
    assert "name: ace" in (run / "config.resolved.yaml").read_text()
