"""Scale mixture: electrostatics against hand-computed cases, conservative forces, branch limits,
checkpoints. Tiny float64 models on rattled rock-salt cells and a small Na/Cl/water cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from trustpot import keys as K
from trustpot.bench.scales import oracle_scale_l2
from trustpot.data.graph import Graph, collate, structure_to_graph
from trustpot.data.neighbors import NeighborListSpec
from trustpot.data.structures import Structure
from trustpot.errors import CheckpointError, ConfigError
from trustpot.io.checkpoint import load_model, read_checkpoint, save_checkpoint, save_model
from trustpot.models.build import build_scale_mixture
from trustpot.models.electrostatics import (
    MADELUNG_ROCKSALT,
    TOTAL_CHARGE,
    ElectrostaticEnergy,
    ElectrostaticsConfig,
    LearnedCharges,
    coulomb_direct,
)
from trustpot.models.mixture import (
    CHARGES,
    ENERGY_LONG,
    ENERGY_SHORT,
    FORCES_LONG,
    FORCES_SHORT,
    NODE_ENERGY_LONG,
    NODE_ENERGY_SHORT,
    SCALE,
    ScaleMixturePotential,
)
from trustpot.models.potential import compute_outputs
from trustpot.units import COULOMB_EV_A

R0 = 2.82  # Å, Na-Cl nearest-neighbour distance of the test rock salt


def rocksalt(rng: np.random.Generator | None = None, rattle: float = 0.0) -> Structure:
    """8-atom cubic NaCl cell (a = 2 r0), optionally rattled, with random labels."""
    a = bulk("NaCl", "rocksalt", a=2 * R0, cubic=True)
    rng = rng or np.random.default_rng(0)
    pos = a.positions + rng.normal(scale=rattle, size=a.positions.shape)
    return Structure(
        a.numbers,
        pos,
        a.cell.array.copy(),
        np.ones(3, bool),
        energy=float(rng.normal()),
        forces=rng.normal(size=(8, 3)),
    )


def cluster(rng: np.random.Generator) -> Structure:
    """Non-periodic Na+, Cl- and one water molecule, with random labels."""
    pos = np.array(
        [[0.0, 0.0, 0.0], [2.8, 0.0, 0.0], [1.4, 2.6, 0.3], [2.0, 3.2, 0.5], [0.8, 3.1, 0.1]]
    )
    pos = pos + rng.normal(scale=0.05, size=pos.shape)
    return Structure(
        np.array([11, 17, 8, 1, 1]),
        pos,
        np.zeros((3, 3)),
        np.zeros(3, bool),
        energy=float(rng.normal()),
        forces=rng.normal(size=(5, 3)),
    )


def batch_of(structures: list[Structure], specs: list[NeighborListSpec]) -> Graph:
    return collate([structure_to_graph(s, specs, torch.float64) for s in structures])


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    rng = np.random.default_rng(1)
    return [rocksalt(rng, 0.1), cluster(rng), rocksalt(rng, 0.1)]


def tiny_mixture(
    structures: list[Structure], mode: str = "fixed", scale: float = 0.3, level: str = "atom"
) -> ScaleMixturePotential:
    """A float64 mixture in eval mode (derivatives without a graph unless asked for)."""
    model = build_scale_mixture(
        structures,
        short_hypers={"cutoff": 3.0, "n_features": 8, "n_layers": 1, "n_rbf": 6},
        long_backbone="schnet",
        long_hypers={"cutoff": 5.0, "n_features": 8, "n_layers": 1, "n_rbf": 8, "n_filters": 8},
        dtype="float64",
        scale_mode=mode,
        scale=scale,
        router_hidden=8,
        router_level=level,
        electrostatics=ElectrostaticsConfig(charges_hidden=8),
        seed=3,
    )
    return model.eval()


def ionic_charges(numbers: np.ndarray) -> torch.Tensor:
    return torch.tensor([1.0 if z == 11 else -1.0 for z in numbers], dtype=torch.float64)


# -- electrostatics -----------------------------------------------------------------------------
def test_two_point_charges_in_vacuum() -> None:
    pos = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    pos.requires_grad_(True)
    q = torch.tensor([1.0, -0.5], dtype=torch.float64)
    e = coulomb_direct(pos, q)
    expected = COULOMB_EV_A * 1.0 * -0.5 / 3.0
    assert torch.allclose(e, torch.full((2,), expected / 2, dtype=torch.float64), rtol=1e-12)
    (grad,) = torch.autograd.grad(e.sum(), pos)
    # attraction: the force on atom 0 points towards atom 1 (+x), magnitude k |q1 q2| / r^2
    assert torch.allclose(-grad[0], torch.tensor([COULOMB_EV_A * 0.5 / 9.0, 0, 0]).double())
    assert torch.allclose(grad.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # the module gives the same through a non-periodic graph (no neighbour list needed)
    s = Structure(np.array([11, 17]), pos.detach().numpy(), np.zeros((3, 3)), np.zeros(3, bool))
    g = batch_of([s], [])
    module = ElectrostaticEnergy(5.0).double()
    assert torch.allclose(module(g, q), e.detach(), rtol=1e-12)


@pytest.mark.parametrize("method, rtol", [("ewald", 1e-5), ("pme", 1e-4)])
def test_rocksalt_madelung_energy(method: str, rtol: float) -> None:
    s = rocksalt()
    cutoff = 5.0
    g = batch_of([s], [NeighborListSpec("long", cutoff)])
    module = ElectrostaticEnergy(cutoff, ElectrostaticsConfig(method=method)).double()
    e = module(g, ionic_charges(s.numbers))
    per_pair = float(e.sum()) / 4
    expected = -MADELUNG_ROCKSALT * COULOMB_EV_A / R0
    assert per_pair == pytest.approx(expected, rel=rtol)
    # every ion of the perfect crystal has the same energy
    assert torch.allclose(e, e.mean().expand(8), rtol=rtol)


def disordered_ions(n: int = 64, box: float = 11.0, seed: int = 0) -> Structure:
    """``n`` ions at random (non-overlapping) positions in a cubic box, half Na, half Cl."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        trial = rng.uniform(0.0, box, 3)
        if all(np.linalg.norm((trial - p + box / 2) % box - box / 2) > 2.2 for p in pos):
            pos.append(trial)
    numbers = np.array([11, 17] * (n // 2))
    return Structure(numbers, np.array(pos), np.eye(3) * box, np.ones(3, bool))


def test_default_ewald_wavelength_matches_a_tighter_sum() -> None:
    """The default reciprocal cut (0.75 σ) against σ / 4 on a disordered ionic box: forces
    within 1e-4 eV/Å (unit charges; measured 1.9e-5, where a trained model's force error is
    ~0.05), energy within 1e-5 relative (measured 1.2e-6)."""
    s = disordered_ions()
    cutoff = 6.0
    g = batch_of([s], [NeighborListSpec("long", cutoff)])
    q = ionic_charges(s.numbers)

    def energy_and_forces(config: ElectrostaticsConfig) -> tuple[float, torch.Tensor]:
        module = ElectrostaticEnergy(cutoff, config).double()

        def fn(gg: Graph) -> tuple[torch.Tensor, dict]:
            return module(gg, q).double(), {}

        out = compute_outputs(fn, g, frozenset({K.ENERGY, K.FORCES}), False)
        return float(out[K.ENERGY][0].detach()), out[K.FORCES]

    e_default, f_default = energy_and_forces(ElectrostaticsConfig())
    e_tight, f_tight = energy_and_forces(ElectrostaticsConfig(lr_wavelength=cutoff / 5 / 4))
    assert abs(e_default - e_tight) < 1e-5 * abs(e_tight)
    assert float((f_default - f_tight).abs().max()) < 1e-4
    # and the cut is not vacuous: twice the wavelength is visibly worse
    _, f_coarse = energy_and_forces(ElectrostaticsConfig(wavelength_per_smearing=1.5))
    assert float((f_coarse - f_tight).abs().max()) > 1e-2


def test_checkpoints_without_the_wavelength_field_keep_their_ewald_sum() -> None:
    d = ElectrostaticsConfig().to_dict()
    del d["wavelength_per_smearing"]
    assert ElectrostaticsConfig.from_dict(d).wavelength_per_smearing == 0.5
    fixture = Path(__file__).parent / "fixtures" / "checkpoints" / "scale-mixture.ckpt"
    model = load_model(fixture, ScaleMixturePotential)
    assert model.electrostatics is not None
    assert model.electrostatics.config.wavelength_per_smearing == 0.5
    assert ElectrostaticsConfig().wavelength_per_smearing == 0.75


def test_coulomb_virial_and_forces_in_periodic_cell() -> None:
    """A pure Coulomb energy is homogeneous of degree -1 in lengths: trace(virial) = E.
    Forces vanish by symmetry in the perfect crystal."""
    s = rocksalt()
    g = batch_of([s], [NeighborListSpec("long", 5.0)])
    module = ElectrostaticEnergy(5.0).double()
    q = ionic_charges(s.numbers)

    def fn(gg: Graph) -> tuple[torch.Tensor, dict]:
        return module(gg, q).double(), {}

    out = compute_outputs(fn, g, frozenset({K.ENERGY, K.FORCES, K.VIRIAL}), False)
    energy = float(out[K.ENERGY][0].detach())
    assert float(torch.diagonal(out[K.VIRIAL][0]).sum()) == pytest.approx(energy, rel=1e-5)
    assert float(out[K.FORCES].abs().max()) < 1e-6


def test_batch_mixes_periodic_and_isolated_structures(structures: list[Structure]) -> None:
    specs = [NeighborListSpec("long", 5.0)]
    module = ElectrostaticEnergy(5.0).double()
    q = [torch.linspace(-0.5, 0.5, s.n_atoms, dtype=torch.float64) for s in structures]
    together = module(batch_of(structures, specs), torch.cat(q))
    apart = torch.cat([module(batch_of([s], specs), qs) for s, qs in zip(structures, q)])
    assert torch.allclose(together, apart, rtol=1e-12)


def test_partly_periodic_structures_are_refused() -> None:
    s = rocksalt()
    s.pbc = np.array([True, True, False])
    g = batch_of([s], [NeighborListSpec("long", 5.0)])
    with pytest.raises(ConfigError, match="periodic in 1-2 directions"):
        ElectrostaticEnergy(5.0).double()(g, ionic_charges(s.numbers))


def test_learned_charges_keep_the_formal_total_charge() -> None:
    torch.manual_seed(0)
    module = LearnedCharges(4, 2, hidden=8).double()
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    features = torch.randn(9, 4, dtype=torch.float64)
    types = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    q = module(features, types, batch, 3)
    totals = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, q)
    assert torch.allclose(totals, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    target = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    q = module(features, types, batch, 3, target)
    totals = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, q)
    assert torch.allclose(totals, target, atol=1e-12)


# -- the mixture ----------------------------------------------------------------------------------
def test_mixture_interface(structures: list[Structure]) -> None:
    model = tiny_mixture(structures)
    specs = model.neighbor_lists()
    assert [(s.name, s.cutoff) for s in specs] == [("short", 3.0), ("long", 5.0)]
    assert model.species == [1, 8, 11, 17] and model.dtype == torch.float64
    g = batch_of(structures, specs)
    out = model(g, {K.ENERGY, K.FORCES, CHARGES})
    assert out[K.ENERGY].shape == (3,) and out[K.FORCES].shape == (g[K.POSITIONS].shape[0], 3)
    assert out[ENERGY_SHORT].shape == (3,) and out[ENERGY_LONG].shape == (3,)
    assert torch.allclose(out[SCALE], torch.full_like(out[SCALE], 0.3))
    totals = torch.zeros(3, dtype=torch.float64).index_add_(0, g[K.BATCH], out[CHARGES])
    assert torch.allclose(totals, torch.zeros(3, dtype=torch.float64), atol=1e-10)
    g[TOTAL_CHARGE] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    totals = torch.zeros(3, dtype=torch.float64).index_add_(
        0, g[K.BATCH], model(g, {K.ENERGY, CHARGES})[CHARGES]
    )
    assert torch.allclose(totals, g[TOTAL_CHARGE], atol=1e-10)
    with pytest.raises(ConfigError, match="does not provide"):
        model(g, {"dipole"})


@pytest.mark.parametrize("mode", ["router", "router-structure", "fixed"])
def test_mixture_forces_are_minus_energy_gradient(structures: list[Structure], mode: str) -> None:
    """Central finite differences of the mixed energy, periodic and isolated structures; the
    router's s depends on the positions, and its contribution must be in the forces too."""
    level = "structure" if mode == "router-structure" else "atom"
    mode = "router" if mode.startswith("router") else mode
    model = tiny_mixture(structures, mode=mode, level=level)
    with torch.no_grad():  # a router far from constant, so that ds/dr matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = batch_of(structures, model.neighbor_lists())
    out = model(g, {K.ENERGY, K.FORCES})
    if mode == "router":
        s = out[SCALE].detach()
        assert float(s.std()) > 1e-3
        for k in range(3):  # one s per structure, or a spread of s over its atoms
            spread = float(s[g[K.BATCH] == k].std())
            assert spread < 1e-12 if level == "structure" else spread > 1e-6
    h = 1e-5
    atoms = [0, 5, 8, 12, 17]  # atoms of all three structures
    for atom in atoms:
        for axis in range(3):
            energies = []
            for sign in (1.0, -1.0):
                gg = dict(g)
                gg[K.POSITIONS] = g[K.POSITIONS].clone()
                gg[K.POSITIONS][atom, axis] += sign * h
                energies.append(float(model(gg, {K.ENERGY})[K.ENERGY].sum().detach()))
            numeric = -(energies[0] - energies[1]) / (2 * h)
            assert float(out[K.FORCES][atom, axis].detach()) == pytest.approx(
                numeric, rel=1e-5, abs=1e-7
            )


def test_mixture_virial_is_minus_strain_derivative(structures: list[Structure]) -> None:
    model = tiny_mixture(structures[:1], mode="router")
    g = batch_of(structures[:1], model.neighbor_lists())
    virial = model(g, {K.ENERGY, K.VIRIAL})[K.VIRIAL][0]
    h = 1e-6
    for i, j in [(0, 0), (1, 2), (2, 2)]:
        energies = []
        for sign in (1.0, -1.0):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[i, j] += sign * h / 2
            eps[j, i] += sign * h / 2
            gg = dict(g)
            gg[K.POSITIONS] = g[K.POSITIONS] + g[K.POSITIONS] @ eps
            gg[K.CELL] = g[K.CELL] + g[K.CELL] @ eps
            energies.append(float(model(gg, {K.ENERGY})[K.ENERGY][0].detach()))
        numeric = -(energies[0] - energies[1]) / (2 * h)
        assert float(virial[i, j].detach()) == pytest.approx(numeric, rel=1e-4, abs=1e-6)


def test_scale_zero_and_one_reproduce_each_branch(structures: list[Structure]) -> None:
    model = tiny_mixture(structures)
    g = batch_of(structures, model.neighbor_lists())
    wanted = {K.ENERGY, K.FORCES, FORCES_SHORT, FORCES_LONG, NODE_ENERGY_SHORT, NODE_ENERGY_LONG}
    for s, energy_key, forces_key in [
        (0.0, ENERGY_SHORT, FORCES_SHORT),
        (1.0, ENERGY_LONG, FORCES_LONG),
    ]:
        model.set_scale(s)
        out = model(g, wanted)
        assert torch.equal(out[K.ENERGY], out[energy_key])
        assert torch.allclose(out[K.FORCES], out[forces_key], rtol=1e-12, atol=1e-12)
        again = model(g, wanted, scale=s)  # the same through the per-call override
        assert torch.allclose(again[K.FORCES], out[K.FORCES], rtol=1e-12, atol=1e-12)
    # the long branch alone is its potential plus its Coulomb energy
    long_pot = model.long(
        {**g, "edge_index:main": g["edge_index:long"], "edge_shift:main": g["edge_shift:long"]},
        {K.ENERGY},
    )
    el = model(g, {K.ENERGY, "energy_electrostatic"})["energy_electrostatic"]
    assert torch.allclose(long_pot[K.ENERGY] + el, out[ENERGY_LONG], rtol=1e-12)


def test_constant_scale_interpolates_branch_forces(structures: list[Structure]) -> None:
    """With one s per structure the mixture's forces are exactly (1 - s) F_short + s F_long, so
    the per-structure continuous oracle is attainable by the model."""
    model = tiny_mixture(structures)
    g = batch_of(structures, model.neighbor_lists())
    out = model(g, {K.FORCES, FORCES_SHORT, FORCES_LONG}, scale=0.3)
    mixed = 0.7 * out[FORCES_SHORT] + 0.3 * out[FORCES_LONG]
    assert torch.allclose(out[K.FORCES], mixed, rtol=1e-10, atol=1e-12)
    # the oracle s of structure 0, applied as a per-atom tensor, gives the closed-form optimum
    ref = torch.as_tensor(structures[0].forces)
    sl = slice(0, 8)
    s_star = oracle_scale_l2(out[FORCES_SHORT][sl], out[FORCES_LONG][sl], ref)
    s_atoms = torch.full((g[K.POSITIONS].shape[0],), s_star, dtype=torch.float64)
    forces = model(g, {K.FORCES}, scale=s_atoms)[K.FORCES][sl]
    err = float(((forces - ref) ** 2).sum())
    for s in (max(s_star - 0.05, 0.0), min(s_star + 0.05, 1.0)):
        other = model(g, {K.FORCES}, scale=s)[K.FORCES][sl]
        assert err <= float(((other - ref) ** 2).sum()) + 1e-12


def test_per_atom_scale_mixes_per_atom_energies(structures: list[Structure]) -> None:
    model = tiny_mixture(structures)
    g = batch_of(structures, model.neighbor_lists())
    n = g[K.POSITIONS].shape[0]
    s = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = model(g, {K.ENERGY, NODE_ENERGY_SHORT, NODE_ENERGY_LONG, K.NODE_ENERGY}, scale=s)
    mixed = (1 - s) * out[NODE_ENERGY_SHORT] + s * out[NODE_ENERGY_LONG]
    assert torch.allclose(out[K.NODE_ENERGY], mixed, rtol=1e-12)
    assert torch.allclose(out[SCALE], s)
    with pytest.raises(ValueError, match="n_atoms"):
        model(g, {K.ENERGY}, scale=torch.zeros(3, dtype=torch.float64))


def test_parameter_mode_scale_gets_gradients(structures: list[Structure]) -> None:
    model = tiny_mixture(structures, mode="parameter", scale=0.4)
    g = batch_of(structures, model.neighbor_lists())
    out = model(g, {K.ENERGY, K.FORCES}, create_graph=True)
    assert torch.allclose(out[SCALE], torch.full_like(out[SCALE], 0.4))
    loss = ((out[K.FORCES] - g[K.FORCES]) ** 2).mean()
    loss.backward()
    assert model.scale_parameter is not None
    assert model.scale_parameter.theta.grad is not None
    assert float(model.scale_parameter.theta.grad.abs()) > 0


# -- checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_round_trip(structures: list[Structure], tmp_path: Path) -> None:
    model = tiny_mixture(structures, mode="router")
    path = tmp_path / "mix.ckpt"
    save_model(model, path, extra={"split": "train"})
    loaded = load_model(path, ScaleMixturePotential)
    assert isinstance(loaded, ScaleMixturePotential) and not loaded.training
    assert loaded.meta == model.meta
    g = batch_of(structures, model.neighbor_lists())
    a = model.eval()(g, {K.ENERGY, K.FORCES})
    b = loaded(g, {K.ENERGY, K.FORCES})
    for key in (K.ENERGY, K.FORCES, ENERGY_SHORT, ENERGY_LONG, SCALE):
        assert torch.equal(a[key], b[key])
    # the fixed scale travels with the weights
    fixed = tiny_mixture(structures)
    fixed.set_scale(0.625)
    save_model(fixed, path)
    assert float(load_model(path, ScaleMixturePotential).fixed_scale) == 0.625


def test_checkpoint_errors(structures: list[Structure], tmp_path: Path) -> None:
    model = tiny_mixture(structures)
    path = tmp_path / "mix.ckpt"
    save_model(model, path)
    data = read_checkpoint(path)
    name = next(k for k in data["model"] if k.startswith("charges."))
    data["model"][name] = torch.zeros(7, 7, dtype=torch.float64)
    bad = tmp_path / "bad.ckpt"
    save_checkpoint(data, bad)  # a valid digest, but a tensor of the wrong shape
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
        load_model(bad, ScaleMixturePotential)
    data = read_checkpoint(path)
    data["kind"] = "potential"
    save_checkpoint(data, bad)
    with pytest.raises(CheckpointError, match=r"malformed model metadata|not a ScaleMixture"):
        load_model(bad, ScaleMixturePotential)
    data = read_checkpoint(path)
    del data["model"]["fixed_scale"]
    save_checkpoint(data, bad)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(bad, ScaleMixturePotential)


def test_float32_mixture_and_payload(structures: list[Structure], tmp_path: Path) -> None:
    model = build_scale_mixture(
        structures,
        short_hypers={"cutoff": 3.0, "n_features": 8, "n_layers": 1},
        long_backbone="schnet",
        long_hypers={"cutoff": 5.0, "n_features": 8, "n_layers": 1, "n_filters": 8},
        scale_mode="fixed",
        scale=0.3,
    )
    g = collate([structure_to_graph(s, model.neighbor_lists(), torch.float32) for s in structures])
    out = model.eval()(g, {K.ENERGY, K.FORCES, K.STRESS})
    assert out[K.ENERGY].dtype == torch.float64 and out[K.FORCES].dtype == torch.float32
    assert bool(torch.isfinite(out[K.FORCES]).all()) and out[K.STRESS].shape == (3, 3, 3)
    assert float(out[K.STRESS][1].detach().abs().max()) == 0.0  # the isolated cluster has no stress
    payload = model.payload()
    assert payload["kind"] == "scale-mixture" and payload["meta"]["scale"] == 0.3
    save_checkpoint(payload, tmp_path / "m.ckpt")
    assert load_model(tmp_path / "m.ckpt", ScaleMixturePotential).meta == model.meta
