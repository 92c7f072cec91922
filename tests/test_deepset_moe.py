"""DeepSet-MoE: contracts in every routing mode and aggregation, gating, diagnostics, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import write
from conftest import labelled_molecules

from trustpot import keys as K
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import load_potential
from trustpot.models import build_potential
from trustpot.models.deepset_moe import (
    DeepSetMoEHead,
    routing_diagnostics,
    routing_statistics,
    topk_gate,
)
from trustpot.testing import (
    check_batch_equals_single,
    check_cutoff_smoothness,
    check_forces_finite_difference,
    check_invariances,
    check_save_load,
    check_stress_finite_difference,
)

TINY = {"n_features": 8, "n_layers": 2, "cutoff": 4.0, "n_experts": 3, "n_rbf": 8}
MODES = [
    ("soft", "sum", "schnet"),
    ("soft", "mean", "schnet"),
    ("soft", "attention", "schnet"),
    ("top1", "sum", "schnet"),
    ("top1-renormalised", "mean", "schnet"),
    ("top2", "attention", "painn"),
    ("top2", "mean", "painn"),
]


def tiny(
    structures: list[Structure], mode: str, aggregation: str, encoder: str, noise: float = 0.3
) -> torch.nn.Module:
    """A float64 model with random weights large enough for forces of 0.1-1 eV/Å."""
    top_k = 0 if mode == "soft" else int(mode[3])
    gate = "renormalised" if mode.endswith("renormalised") else "margin"
    hypers = {**TINY, "top_k": top_k, "gate": gate, "aggregation": aggregation}
    hypers["encoder"] = encoder
    model = build_potential("deepset-moe", hypers, structures, dtype="float64", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(("mode", "aggregation", "encoder"), MODES)
def test_contracts(
    mode: str,
    aggregation: str,
    encoder: str,
    ethanol_structures: list[Structure],
    bulk_structures: list[Structure],
    tmp_path: Path,
) -> None:
    model = tiny(ethanol_structures, mode, aggregation, encoder)
    assert isinstance(model.head, DeepSetMoEHead)
    check_invariances(model, ethanol_structures[0])
    check_forces_finite_difference(model, ethanol_structures[1])
    check_batch_equals_single(model, ethanol_structures[:3])
    # (the check's tolerance suits the small weights of the other backbones' tests)
    gentle = tiny(ethanol_structures, mode, aggregation, encoder, noise=0.1)
    check_cutoff_smoothness(gentle, (6, 8), TINY["cutoff"])
    check_save_load(model, ethanol_structures[0], tmp_path / "m.ckpt")
    periodic = tiny(bulk_structures, mode, aggregation, encoder)
    check_invariances(periodic, bulk_structures[0])
    check_stress_finite_difference(periodic, bulk_structures[0])


def test_energy_is_rho_of_aggregate_not_a_sum(ethanol_structures: list[Structure]) -> None:
    model = tiny(ethanol_structures, "soft", "sum", "schnet")
    s = ethanol_structures[0]
    g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype)])
    out = {k: v.detach() for k, v in model(g, {K.ENERGY, K.NODE_ENERGY}).items()}
    with torch.no_grad():
        phi = model.head.phi(model.embed(g)["node"])
        rho = float(model.head.rho(phi.sum(0, keepdim=True)).squeeze())
    e0 = sum(model.meta.reference_energies[int(z)] for z in s.numbers)
    expected = model.energy_scale * rho + s.n_atoms * model.energy_shift + e0
    assert float(out[K.ENERGY][0]) == pytest.approx(float(expected), abs=1e-9)
    shares = out[K.NODE_ENERGY] - model.reference_energies[g[K.ATOMIC_NUMBERS]]
    assert torch.allclose(shares, shares[0].expand_as(shares))  # an even split, by design
    # a checkpoint keeps the hypers (round trip through ModelMeta / potential_from_meta)
    assert model.meta.backbone == "deepset-moe" and model.meta.hypers["n_experts"] == 3


def test_a_modulator_reaches_the_encoder(ethanol_structures: list[Structure]) -> None:
    from trustpot.uq.perturb import PerturbationModulator, attached

    model = tiny(ethanol_structures, "soft", "sum", "painn")
    keys = set(model.state_dict())
    g = collate([structure_to_graph(ethanol_structures[0], model.neighbor_lists(), model.dtype)])
    base = model(g, {K.ENERGY})[K.ENERGY].detach()
    modulator = PerturbationModulator(TINY["n_features"], TINY["n_layers"], noise_dim=2).double()
    with torch.no_grad():
        for p in modulator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    modulator.set_noise(torch.ones(1, 2, dtype=torch.float64))
    with attached(model, modulator):
        moved = model(g, {K.ENERGY})[K.ENERGY].detach()
        assert set(model.state_dict()) == keys  # not registered as a submodule
    assert not torch.allclose(moved, base)
    assert torch.allclose(model(g, {K.ENERGY})[K.ENERGY].detach(), base)


def test_topk_gate_is_sparse_renormalised_and_continuous() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.45, 0.05]], dtype=torch.float64)
    assert torch.equal(topk_gate(probs, 0), probs) and torch.equal(topk_gate(probs, 3), probs)
    w = topk_gate(probs, 1)
    assert ((w > 0).sum(1) <= 1).all()
    assert w[0, 0] == pytest.approx((0.6 - 0.3) / 0.6)
    assert w[1].abs().sum() == pytest.approx((0.6 - 0.2) / 0.6)
    w2 = topk_gate(probs, 2)
    assert ((w2 > 0).sum(1) <= 2).all()
    assert w2[0].tolist() == pytest.approx([(0.6 - 0.1) / 0.9, (0.3 - 0.1) / 0.9, 0.0])
    # small margins -> the usual renormalised weights
    sharp = torch.tensor([[0.7, 0.3 - 1e-9, 1e-9]], dtype=torch.float64)
    assert topk_gate(sharp, 2)[0, :2].tolist() == pytest.approx([0.7, 0.3], abs=1e-8)
    # across a switch of the chosen expert the weights move continuously (through zero)
    for eps in (1e-3, 1e-6):
        before = topk_gate(torch.tensor([[0.5, 0.25 + eps, 0.25 - eps]]), 2)
        after = topk_gate(torch.tensor([[0.5, 0.25 - eps, 0.25 + eps]]), 2)
        assert (before - after).abs().max() < 10 * eps
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: topk_gate(torch.softmax(x, -1), 2), (logits,))
    # the usual renormalised top-k, for comparison: rows sum to 1, and jump at a switch
    usual = topk_gate(probs, 2, "renormalised")
    assert usual.sum(1).tolist() == pytest.approx([1, 1, 1]) and ((usual > 0).sum(1) == 2).all()
    eps = 1e-6
    side_a, side_b = [[0.4 + eps, 0.4 - eps, 0.2]], [[0.4 - eps, 0.4 + eps, 0.2]]
    jump = topk_gate(torch.tensor(side_a), 1, "renormalised")
    jump -= topk_gate(torch.tensor(side_b), 1, "renormalised")
    assert jump.abs().max() == 1.0
    smooth = topk_gate(torch.tensor(side_a), 1) - topk_gate(torch.tensor(side_b), 1)
    assert smooth.abs().max() < 1e-5


def test_routing_statistics_on_hand_made_router_output() -> None:
    n, k = 600, 3
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(k), size=n)
    stats = routing_statistics(probs, np.zeros(n, dtype=int))
    assert stats.load.sum() == pytest.approx(1.0) and stats.argmax_load.sum() == pytest.approx(1)
    assert 0 < stats.normalised_entropy < 1
    assert stats.mutual_information == 0.0 and stats.label_entropy == 0.0
    # uniform router: maximal entropy; one-hot router: none
    flat = routing_statistics(np.full((n, k), 1 / k), np.zeros(n, dtype=int))
    assert flat.entropy == pytest.approx(math.log(k)) and flat.normalised_entropy == pytest.approx(
        1
    )
    expert = np.arange(n) % k
    onehot = np.eye(k)[expert]
    assert routing_statistics(onehot, expert).entropy == pytest.approx(0.0)
    # labels independent of the expert (exactly, by construction): MI = 0
    independent = (np.arange(n) // k) % 4
    stats = routing_statistics(onehot, independent)
    assert stats.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert stats.table.sum() == n and stats.load.tolist() == pytest.approx([1 / 3] * 3)
    # labels a bijection of the expert: MI = H(label)
    aligned = np.array([7, 2, 5])[expert]
    stats = routing_statistics(onehot, aligned)
    assert stats.mutual_information == pytest.approx(stats.label_entropy)
    assert stats.label_entropy == pytest.approx(math.log(3)) and stats.normalised_mi == 1.0
    # top-k weights (rows summing to < 1) still give loads that sum to 1
    gated = topk_gate(torch.tensor(probs), 1).numpy()
    assert routing_statistics(gated, expert, probs).load.sum() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="labels"):
        routing_statistics(onehot, aligned[:-1])


def test_routing_diagnostics_of_a_model(ethanol_structures: list[Structure]) -> None:
    model = tiny(ethanol_structures, "top2", "attention", "painn")
    structures = ethanol_structures[:4]
    labels = [s.numbers for s in structures]  # per-atom label: the element
    diag = routing_diagnostics(model, structures, labels, batch_size=3)
    assert diag.n_atoms == sum(s.n_atoms for s in structures)
    assert diag.load.shape == (3,) and diag.load.sum() == pytest.approx(1.0)
    assert 0 <= diag.mutual_information <= diag.label_entropy + 1e-12
    assert set(diag.label_values.tolist()) == {1, 6, 8}
    assert diag.to_dict()["table"]
    flat = routing_diagnostics(model, structures, np.concatenate(labels))
    assert flat.mutual_information == pytest.approx(diag.mutual_information)
    schnet = build_potential("schnet", {"n_features": 8}, structures)
    with pytest.raises(ConfigError, match="DeepSet-MoE"):
        routing_diagnostics(schnet, structures, labels)


@pytest.mark.parametrize(
    ("hypers", "message"),
    [
        ({"n_experts": 0}, "n_experts"),
        ({"top_k": 5}, "top_k"),
        ({"aggregation": "max"}, "aggregation"),
        ({"gate": "hard"}, "gate"),
        ({"encoder": "deepset-moe"}, "own encoder"),
        ({"encoder": "mace"}, "unknown backbone"),
        ({"n_expert": 2}, "unknown model option"),
    ],
)
def test_bad_hypers(
    hypers: dict[str, object], message: str, ethanol_structures: list[Structure]
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_potential("deepset-moe", hypers, ethanol_structures)


def test_train_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "train.xyz"
    write(data, labelled_molecules(12, seed=2), format="extxyz")
    run = tmp_path / "run"
    args = ["train", "--train", str(data), "--model", "deepset-moe", "--epochs", "2"]
    overrides = [
        "model.hypers.n_features=8",
        "model.hypers.n_layers=1",
        "model.hypers.n_experts=5",
        "model.hypers.top_k=2",
        "model.hypers.aggregation=attention",
        "train.threads=1",
    ]
    args += [x for o in overrides for x in ("-o", o)]
    assert main([*args, "--valid-fraction", "0.25", "--out", str(run)]) == 0
    model = load_potential(run / "best.ckpt")
    assert isinstance(model.head, DeepSetMoEHead)
    assert model.meta.hypers["n_experts"] == 5 and model.head.experts.w1.shape[0] == 5
    assert (run / "metrics.csv").read_text().count("\n") >= 3
