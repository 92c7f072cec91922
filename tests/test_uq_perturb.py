"""Learned functional perturbations: exactness at start, physics of samples, CRPS, fit, I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import labelled_molecules

from trustpot import keys as K
from trustpot.data.graph import collate, replicate_batch, structure_to_graph
from trustpot.data.reader import atoms_to_structure
from trustpot.data.structures import Structure
from trustpot.errors import CheckpointError, ConfigError
from trustpot.metrics.uncertainty import ensemble_crps
from trustpot.models import build_potential
from trustpot.models.potential import Potential
from trustpot.testing import random_rotation
from trustpot.uq.perturb import (
    PerturbationModulator,
    PerturbedPotential,
    crps_scores,
    fair_crps_loss,
    fit_perturbation,
)

TINY = {"n_features": 16, "n_layers": 2, "cutoff": 4.0}
SAMPLES = frozenset({K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD})
ALL = SAMPLES | {K.ENERGY_SAMPLES, K.FORCES_SAMPLES}


def tiny_base(name: str, structures: list[Structure], dtype: str = "float64") -> Potential:
    model = build_potential(name, TINY, structures, dtype=dtype, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def randomise(model: PerturbedPotential, std: float = 0.3, seed: int = 1) -> PerturbedPotential:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in model.modulator.mlps:
            for p in (mlp[-1].weight, mlp[-1].bias):
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def batch_of(model: Potential | PerturbedPotential, structures: list[Structure]) -> dict:
    return collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures])


def moved(s: Structure, positions: np.ndarray, order: np.ndarray | None = None) -> Structure:
    numbers = s.numbers if order is None else s.numbers[order]
    pos = positions if order is None else positions[order]
    return Structure(numbers.copy(), np.array(pos), s.cell.copy(), s.pbc.copy())


@pytest.mark.parametrize("name", ["egnn", "schnet", "painn", "ace"])
def test_zero_init_is_the_base_then_samples_differ(
    name: str, ethanol_structures: list[Structure]
) -> None:
    base = tiny_base(name, ethanol_structures)
    model = PerturbedPotential(base, n_samples=8).eval()
    g = batch_of(model, ethanol_structures[:3])
    ref = base(g, frozenset({K.ENERGY, K.FORCES, K.STRESS}))
    out = model(g, ALL | {K.STRESS})
    assert out[K.ENERGY_SAMPLES].shape == (3, 8)
    assert out[K.FORCES_SAMPLES].shape == (27, 8, 3)
    # bit for bit equal to the base evaluated on the same replicated batch...
    big = base(replicate_batch(g, 8), frozenset({K.ENERGY, K.FORCES}))
    assert torch.equal(out[K.ENERGY_SAMPLES], big[K.ENERGY].reshape(8, 3).T)
    assert torch.equal(out[K.FORCES_SAMPLES], big[K.FORCES].reshape(8, 27, 3).transpose(0, 1))
    # ...and to rounding (a bigger batch sums in another order) on the plain batch
    assert torch.allclose(out[K.ENERGY], ref[K.ENERGY], rtol=0, atol=1e-12)
    assert torch.allclose(out[K.FORCES], ref[K.FORCES], rtol=0, atol=1e-12)
    assert torch.allclose(out[K.STRESS], ref[K.STRESS], rtol=0, atol=1e-12)
    assert float(out[K.ENERGY_STD].abs().max()) == 0.0
    assert float(out[K.FORCES_STD].abs().max()) == 0.0
    assert base.backbone.modulator is None, "the modulator must be detached after a call"
    assert not any(k.startswith("backbone.modulator") for k in base.state_dict())
    randomise(model)
    out = model(g, ALL)
    assert bool((out[K.ENERGY_STD] > 1e-6).all())
    assert bool((out[K.FORCES_STD] > 1e-6).all())
    assert float((out[K.ENERGY] - ref[K.ENERGY].detach()).abs().max()) > 1e-6


def test_each_sample_is_conservative(ethanol_structures: list[Structure]) -> None:
    s = ethanol_structures[1]
    model = randomise(PerturbedPotential(tiny_base("egnn", ethanol_structures), noise_dim=4))
    noise = torch.randn((3, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def energies(positions: np.ndarray) -> np.ndarray:
        g = batch_of(model, [moved(s, positions)])
        return model.evaluate(g, noise, frozenset({K.ENERGY}))[K.ENERGY][0].detach().numpy()

    g = batch_of(model, [s])
    forces = model.sample(g, noise=noise)[1].detach().numpy()  # [n_atoms, 3, 3]
    numeric = np.zeros_like(forces)
    delta = 1e-5
    for a in range(s.n_atoms):
        for d in range(3):
            plus, minus = s.positions.copy(), s.positions.copy()
            plus[a, d] += delta
            minus[a, d] -= delta
            numeric[a, :, d] = -(energies(plus) - energies(minus)) / (2 * delta)
    assert np.abs(forces).max() > 1e-3
    assert np.allclose(forces, numeric, rtol=1e-5, atol=1e-7), np.abs(forces - numeric).max()
    assert not np.allclose(forces[:, 0], forces[:, 1]), "samples should be distinct functions"


@pytest.mark.parametrize("name", ["egnn", "schnet", "painn", "ace"])
def test_samples_invariant_and_equivariant(name: str, ethanol_structures: list[Structure]) -> None:
    s = ethanol_structures[2]
    model = randomise(PerturbedPotential(tiny_base(name, ethanol_structures), n_samples=4))
    ref = model(batch_of(model, [s]), ALL)
    rot = random_rotation(3)
    order = np.random.default_rng(0).permutation(s.n_atoms)
    cases = {
        "rotation": (moved(s, s.positions @ rot.T), rot, None),
        "translation": (moved(s, s.positions + np.array([0.4, -1.3, 2.2])), np.eye(3), None),
        "permutation": (moved(s, s.positions, order), np.eye(3), order),
    }
    for what, (other, r, perm) in cases.items():
        out = model(batch_of(model, [other]), ALL)
        expected = ref[K.FORCES_SAMPLES].numpy() @ r.T
        if perm is not None:
            expected = expected[perm]
        assert torch.allclose(out[K.ENERGY_SAMPLES], ref[K.ENERGY_SAMPLES], atol=1e-9), what
        assert np.allclose(out[K.FORCES_SAMPLES].numpy(), expected, atol=1e-9), what


def test_eval_seed_is_reproducible_and_batch_independent(
    ethanol_structures: list[Structure],
) -> None:
    model = randomise(PerturbedPotential(tiny_base("egnn", ethanol_structures), n_samples=4))
    structures = ethanol_structures[:3]
    batch = model(batch_of(model, structures), ALL)
    again = model(batch_of(model, structures), ALL)
    assert torch.equal(batch[K.ENERGY_SAMPLES], again[K.ENERGY_SAMPLES])
    single = model(batch_of(model, structures[1:2]), ALL)
    assert torch.allclose(single[K.ENERGY_SAMPLES][0], batch[K.ENERGY_SAMPLES][1], atol=1e-10)
    assert torch.allclose(single[K.FORCES_SAMPLES], batch[K.FORCES_SAMPLES][9:18], atol=1e-10)
    model.eval_seed = None
    fresh = model(batch_of(model, structures), ALL)
    assert not torch.allclose(fresh[K.ENERGY_SAMPLES], batch[K.ENERGY_SAMPLES])


def test_replicate_batch_matches_collate_and_sample_order(
    ethanol_structures: list[Structure], bulk_structures: list[Structure]
) -> None:
    base = tiny_base("schnet", ethanol_structures[:2] + bulk_structures[:1])
    graphs = [
        structure_to_graph(s, base.neighbor_lists(), base.dtype)
        for s in [ethanol_structures[0], bulk_structures[0], ethanol_structures[1]]
    ]
    g = collate(graphs)
    big = replicate_batch(g, 3)
    expected = collate(graphs * 3)
    assert set(big) == set(expected)
    for key in expected:
        assert torch.equal(big[key], expected[key]), key
    single = replicate_batch(graphs[1], 2)  # an un-collated graph has no "batch" field
    assert torch.equal(single[K.BATCH], collate(graphs[1:2] * 2)[K.BATCH])
    with pytest.raises(ConfigError):
        replicate_batch(g, 0)
    # per-(structure, sample) noise ends up where the reshape says it does
    model = randomise(PerturbedPotential(base, noise_dim=4))
    noise = torch.randn((2, 3, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    energies, forces = model.sample(g, noise=noise)
    assert energies.shape == (3, 2) and forces.shape == (g[K.POSITIONS].shape[0], 2, 3)
    start = 0
    for b, graph in enumerate(graphs):
        one = collate([graph])
        e1, f1 = model.sample(one, noise=noise[:, b : b + 1])
        n = int(graph[K.N_ATOMS][0])
        assert torch.allclose(e1[0], energies[b], atol=1e-10)
        assert torch.allclose(f1, forces[start : start + n], atol=1e-10)
        start += n


def test_modulator_needs_noise_of_the_right_shape() -> None:
    mod = PerturbationModulator(8, 2, noise_dim=4)
    h = torch.randn(5, 8)
    g = {K.N_ATOMS: torch.tensor([2, 3]), K.BATCH: torch.tensor([0, 0, 1, 1, 1])}
    with pytest.raises(ConfigError, match="no noise"):
        mod(0, h, g)
    with pytest.raises(ConfigError):
        mod.set_noise(torch.zeros(2, 3))
    mod.set_noise(torch.randn(3, 4))
    with pytest.raises(ConfigError, match="rows"):
        mod(0, h, g)
    mod.set_noise(torch.randn(2, 4))
    assert torch.equal(mod(1, h, g), h)  # zero-initialised last layers: the identity


def test_fair_crps_matches_numpy_and_is_gradient_safe() -> None:
    rng = np.random.default_rng(0)
    for m in (2, 3, 8):
        x, y = rng.normal(size=(50, m)), rng.normal(size=50)
        got = fair_crps_loss(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        assert np.allclose(got, ensemble_crps(x, y), rtol=1e-12, atol=1e-12)
    same = torch.full((4, 5), 0.3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, -1.0, 0.3, 2.0], dtype=torch.float64)
    loss = fair_crps_loss(same, target)
    assert torch.allclose(loss, (0.3 - target).abs())
    loss.sum().backward()
    assert same.grad is not None and bool(torch.isfinite(same.grad).all())
    expected = torch.sign(0.3 - target).unsqueeze(1).expand(-1, 5) / 5
    assert torch.allclose(same.grad, expected)
    with pytest.raises(ConfigError):
        fair_crps_loss(torch.zeros(3, 1), torch.zeros(3))


def trained_base(tmp_path: Path, frames: list) -> Potential:
    """A tiny EGNN trained for 20 epochs by trustpot's own trainer (about 3 s)."""
    from ase.io import write

    from trustpot.config import load_config
    from trustpot.io.checkpoint import load_potential
    from trustpot.train.run import run_training

    write(tmp_path / "train.xyz", frames, format="extxyz")
    options = ["model.name=egnn", *(f"model.hypers.{k}={v}" for k, v in TINY.items())]
    options += ["train.epochs=20", "train.lr=1e-2", "train.batch_size=4", "train.threads=1"]
    cfg = load_config(overrides=[f"data.train={tmp_path / 'train.xyz'}", *options])
    run_training(cfg, tmp_path / "run")
    return load_potential(tmp_path / "run" / "best.ckpt")


def test_short_fit_lowers_validation_crps(tmp_path: Path) -> None:
    frames = labelled_molecules(24, seed=11, scale=0.1)
    train = [atoms_to_structure(a) for a in frames]
    valid = [atoms_to_structure(a) for a in labelled_molecules(8, seed=12, scale=0.1)]
    base = trained_base(tmp_path, frames)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    start = crps_scores(PerturbedPotential(base).eval(), valid)
    assert start["forces_crps"] == pytest.approx(start["forces_mae"])  # no spread: CRPS = MAE
    kwargs: dict = dict(
        epochs=10, lr=3e-2, finetune_backbone=False, batch_size=4, seed=0, progress=False
    )
    lines: list[str] = []
    model = fit_perturbation(base, train, valid, log=lines.append, **kwargs)
    after = crps_scores(model, valid)
    start_obj = start["energy_crps"] + 10 * start["forces_crps"]
    after_obj = after["energy_crps"] + 10 * after["forces_crps"]
    assert after_obj < 0.85 * start_obj, (start, after)
    # the base is frozen and the samples' CRPS is well below the MAE of their own mean:
    # the perturbations learned a useful spread, not only a correction of the mean
    assert after["forces_crps"] < 0.85 * start["forces_crps"], (start, after)
    assert after["forces_crps"] < 0.9 * after["forces_mae"], after
    report = model.fit_report
    assert report["epochs"] == 10 and report["best_epoch"] >= 1
    assert report["base_val_forces_mae"] == pytest.approx(start["forces_mae"])
    assert report["val_forces_crps"] == pytest.approx(after["forces_crps"])
    assert len(lines) == 11
    for k, v in base.state_dict().items():  # the caller's potential is untouched
        assert torch.equal(v, before[k]), k
    for k, v in model.base.state_dict().items():  # frozen base: only the modulator moved
        assert torch.equal(v, before[k]), k
    # deterministic for a seed (one epoch, backbone fine-tuned as well)
    kwargs.update(epochs=2, finetune_backbone=True, backbone_lr=1e-3)
    one = fit_perturbation(base, train, valid, log=lambda _: None, **kwargs)
    two = fit_perturbation(base, train, valid, log=lambda _: None, **kwargs)
    assert one.fit_report["best_epoch"] >= 1
    assert not torch.equal(one.base.state_dict()[k], before[k])
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), k


def test_fit_budget_bad_options_and_nan(ethanol_structures: list[Structure]) -> None:
    base = tiny_base("schnet", ethanol_structures, dtype="float32")
    quick = fit_perturbation(
        base,
        ethanol_structures[:8],
        ethanol_structures[8:10],
        epochs=50,
        batch_size=4,
        max_minutes=1e-6,
        progress=False,
        log=lambda _: None,
    )
    assert quick.fit_report["stopped_by"] == "time" and quick.fit_report["epochs"] == 1
    with pytest.raises(ConfigError):
        fit_perturbation(base, ethanol_structures[:4], ethanol_structures[4:6], n_samples_train=1)
    from trustpot.train.trainer import TrainingError

    with torch.no_grad():
        base.head.mlp[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="loss became nan"):
        fit_perturbation(
            base,
            ethanol_structures[:4],
            ethanol_structures[4:6],
            epochs=1,
            progress=False,
            log=lambda _: None,
        )


def test_payload_validation(ethanol_structures: list[Structure]) -> None:
    model = randomise(PerturbedPotential(tiny_base("egnn", ethanol_structures), eval_seed=7))
    data = model.payload()
    again = PerturbedPotential.from_payload(data, "x.ckpt").eval()
    assert again.eval_seed == 7 and again.n_samples == model.n_samples
    g = batch_of(model, ethanol_structures[:2])
    assert torch.equal(model(g, ALL)[K.FORCES_SAMPLES], again(g, ALL)[K.FORCES_SAMPLES])
    bad = model.payload()
    key = next(iter(bad["extra"]["modulator"]))
    bad["extra"]["modulator"][key] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"bad\.ckpt"):
        PerturbedPotential.from_payload(bad, "bad.ckpt")
    nan = model.payload()
    nan["extra"]["modulator"] = {
        k: torch.full_like(v, float("nan")) for k, v in nan["extra"]["modulator"].items()
    }
    with pytest.raises(CheckpointError, match="NaN"):
        PerturbedPotential.from_payload(nan, "nan.ckpt")
    missing = model.payload()
    del missing["extra"]["modulator"]
    with pytest.raises(CheckpointError, match=r"missing\.ckpt"):
        PerturbedPotential.from_payload(missing, "missing.ckpt")


def test_save_load_round_trip(ethanol_structures: list[Structure], tmp_path: Path) -> None:
    pytest.importorskip("trustpot.uq.ensemble")
    pytest.importorskip("trustpot.uq.probe")
    from trustpot.io.checkpoint import load_model, save_model
    from trustpot.uq.base import UQModel

    model = randomise(PerturbedPotential(tiny_base("schnet", ethanol_structures), n_samples=5))
    model.recalibration.forces_std_scale = 1.7
    model.fit_report = {"epochs": 3}
    save_model(model, tmp_path / "uq.ckpt")
    again = load_model(tmp_path / "uq.ckpt", UQModel)
    assert isinstance(again, PerturbedPotential)
    assert again.recalibration.forces_std_scale == 1.7 and again.fit_report == {"epochs": 3}
    g = batch_of(model, ethanol_structures[:3])
    a, b = model(g, ALL), again(g, ALL)
    for key in ALL:
        assert torch.equal(a[key], b[key]), key
