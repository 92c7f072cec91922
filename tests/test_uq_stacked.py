"""Deep-ensemble members evaluated together as one stacked network (trustpot.uq.stacked)."""

from __future__ import annotations

import pytest
import torch

from trustpot import keys as K
from trustpot.data.graph import collate, structure_to_graph
from trustpot.models.build import build_potential
from trustpot.uq.ensemble import DeepEnsemble
from trustpot.uq.stacked import StackedMembers, stack_problem

HYPERS = {"n_features": 16, "n_layers": 2, "cutoff": 4.0}
OUTPUTS = [
    K.ENERGY,
    K.FORCES,
    K.ENERGY_STD,
    K.FORCES_STD,
    K.ENERGY_SAMPLES,
    K.FORCES_SAMPLES,
    K.NODE_ENERGY,
]


def _members(structures, backbone, n=3, dtype="float64", **hypers):
    members = [
        build_potential(backbone, {**HYPERS, **hypers}, structures, dtype, seed=k).eval()
        for k in range(n)
    ]
    for k, m in enumerate(members):  # members differ in scale, shift and E0, as fitted ones do
        m.energy_scale.fill_(0.5 + 0.3 * k)
        m.energy_shift.fill_(-0.1 * k)
        m.reference_energies.add_(0.01 * k)
    return members


def _batch(model, structures):
    specs = model.neighbor_lists()
    return collate([structure_to_graph(s, specs, model.dtype) for s in structures])


@pytest.mark.parametrize(
    ("backbone", "hypers"),
    [
        ("painn", {}),
        ("schnet", {}),
        ("egnn", {}),
        ("ace", {}),
        ("ace", {"correlation": 3, "l_max": 2}),  # the products' weight-folding order
    ],
)
def test_stacked_equals_members_one_by_one(ethanol_structures, backbone, hypers):
    members = _members(ethanol_structures, backbone, **hypers)
    stacked, loop = DeepEnsemble(members), DeepEnsemble(members, stacked=False)
    g = _batch(members[0], ethanol_structures[:3])
    a, b = stacked(g, OUTPUTS), loop(g, OUTPUTS)
    assert stacked.evaluation == "stacked"
    assert loop.evaluation == "one by one: stacking turned off"
    for key in OUTPUTS:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10, msg=key)


def test_stacked_stress_of_periodic_cells(bulk_structures):
    members = _members(bulk_structures, "painn")
    stacked, loop = DeepEnsemble(members), DeepEnsemble(members, stacked=False)
    g = _batch(members[0], bulk_structures[:2])
    wanted = [K.ENERGY, K.FORCES, K.STRESS, K.FORCES_STD]
    a, b = stacked(g, wanted), loop(g, wanted)
    assert stacked.evaluation == "stacked"
    for key in wanted:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10, msg=key)


def test_unstackable_members_run_one_by_one_and_say_why(ethanol_structures):
    members = _members(ethanol_structures, "deepset-moe", n=2)  # its experts' own tensors
    why = "is not in a stackable layer"
    ens = DeepEnsemble(members)
    loop = DeepEnsemble(members, stacked=False)
    g = _batch(members[0], ethanol_structures[:2])
    a, b = ens(g, [K.ENERGY, K.FORCES_STD]), loop(g, [K.ENERGY, K.FORCES_STD])
    assert ens.evaluation.startswith("one by one") and why in ens.evaluation
    torch.testing.assert_close(a[K.FORCES_STD], b[K.FORCES_STD], rtol=0, atol=0)


def test_mixed_architectures_and_attached_modulators_do_not_stack(ethanol_structures):
    painn = _members(ethanol_structures, "painn", n=1)[0]
    schnet = _members(ethanol_structures, "schnet", n=1)[0]
    assert "another architecture" in str(stack_problem([painn, schnet]))
    wide = build_potential("painn", {**HYPERS, "n_features": 8}, ethanol_structures, "float64")
    assert "hyper-parameters" in str(stack_problem([painn, wide]))
    with pytest.raises(ValueError, match="do not stack"):
        StackedMembers([painn, schnet])


def test_changed_weights_are_followed(ethanol_structures):
    members = _members(ethanol_structures, "painn")
    ens = DeepEnsemble(members)
    g = _batch(members[0], ethanol_structures[:2])
    before = ens(g, [K.ENERGY_SAMPLES])[K.ENERGY_SAMPLES]
    with torch.no_grad():
        members[1].head.mlp[0].weight.mul_(2.0)  # in place: the stack must be rebuilt
    after = ens(g, [K.ENERGY_SAMPLES])[K.ENERGY_SAMPLES]
    own = members[1](g, [K.ENERGY], create_graph=False)[K.ENERGY]
    assert ens.evaluation == "stacked"
    assert not torch.allclose(before[:, 1], after[:, 1])
    torch.testing.assert_close(after[:, 1], own.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=0)


def test_members_in_training_mode_run_one_by_one(ethanol_structures):
    members = _members(ethanol_structures, "schnet", n=2)
    ens = DeepEnsemble(members)
    members[0].train()
    ens(_batch(members[0], ethanol_structures[:1]), [K.ENERGY])
    assert ens.evaluation == "one by one: a member is in training mode"


def test_float32_stacked_agrees_to_rounding(ethanol_structures):
    members = _members(ethanol_structures, "painn", dtype="float32")
    ens, loop = DeepEnsemble(members), DeepEnsemble(members, stacked=False)
    g = _batch(members[0], ethanol_structures[:2])
    a, b = ens(g, [K.FORCES_SAMPLES]), loop(g, [K.FORCES_SAMPLES])
    assert ens.evaluation == "stacked"
    torch.testing.assert_close(a[K.FORCES_SAMPLES], b[K.FORCES_SAMPLES], rtol=1e-4, atol=1e-5)


def test_stacked_batches_of_different_sizes(ethanol_structures):
    from trustpot.data.reader import atoms_to_structure

    small = atoms_to_structure(ethanol_structures[0].to_atoms(with_labels=False)[:6])
    members = _members(ethanol_structures, "painn")
    stacked, loop = DeepEnsemble(members), DeepEnsemble(members, stacked=False)
    g = _batch(members[0], [ethanol_structures[1], small, ethanol_structures[2]])
    a, b = stacked(g, OUTPUTS), loop(g, OUTPUTS)
    assert stacked.evaluation == "stacked"
    for key in OUTPUTS:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10, msg=key)


def test_auto_stacks_small_batches_only_on_the_cpu(ethanol_structures):
    from trustpot.errors import ConfigError
    from trustpot.uq.ensemble import STACK_ATOMS_CPU

    members = _members(ethanol_structures, "schnet", n=2)
    small = _batch(members[0], ethanol_structures[:1])
    n_large = STACK_ATOMS_CPU // (2 * ethanol_structures[0].n_atoms) + 1
    large = _batch(members[0], ethanol_structures[:n_large])  # above the limit
    auto, always = DeepEnsemble(members), DeepEnsemble(members, stacked=True)
    auto(small, [K.ENERGY])
    assert auto.evaluation == "stacked"
    a = auto(large, [K.FORCES_SAMPLES])
    assert auto.evaluation.startswith("one by one") and "stacking limit" in auto.evaluation
    b = always(large, [K.FORCES_SAMPLES])
    assert always.evaluation == "stacked"
    torch.testing.assert_close(a[K.FORCES_SAMPLES], b[K.FORCES_SAMPLES], rtol=1e-10, atol=1e-10)
    with pytest.raises(ConfigError, match="stacked must be"):
        DeepEnsemble(members, stacked="yes")
