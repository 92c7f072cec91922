"""LLPR: a Bayesian last layer from one pass over the training data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trustpot import keys as K
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.errors import CheckpointError, ConfigError
from trustpot.io.checkpoint import load_model, read_checkpoint, save_checkpoint, save_model
from trustpot.models.build import build_potential
from trustpot.uq.lastlayer import LLPR, fit_llpr, last_layer, structure_features

HYPERS = {"n_features": 16, "n_layers": 2, "cutoff": 4.0}
UQ = frozenset({K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD, K.ENERGY_SAMPLES, K.FORCES_SAMPLES})


def _batch(model, structures):
    return collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures])


@pytest.fixture(scope="module")
def base(ethanol_structures):
    return build_potential("painn", HYPERS, ethanol_structures, dtype="float64", seed=1).eval()


def test_prediction_is_the_trained_model_and_samples_are_last_layers(base, ethanol_structures):
    llpr = fit_llpr(base, ethanol_structures[:16], n_samples=5, log=lambda _: None)
    g = _batch(base, ethanol_structures[16:20])
    out = llpr.predict(g, UQ)
    plain = base(g, {K.ENERGY, K.FORCES}, create_graph=False)
    torch.testing.assert_close(out[K.ENERGY], plain[K.ENERGY])
    torch.testing.assert_close(out[K.FORCES], plain[K.FORCES])
    # sample m is the potential with last-layer weights w + dw_m, evaluated on its own
    for m in range(5):
        other = copy.deepcopy(base)
        _, other_last = last_layer(other)
        with torch.no_grad():
            other_last.weight += llpr.deltas[:, m].to(other_last.weight.dtype).unsqueeze(0)
        ref = other(g, {K.ENERGY, K.FORCES}, create_graph=False)
        torch.testing.assert_close(out[K.ENERGY_SAMPLES][:, m], ref[K.ENERGY])
        torch.testing.assert_close(out[K.FORCES_SAMPLES][:, m], ref[K.FORCES])
    assert float(out[K.FORCES_STD].min()) > 0


def test_energy_std_is_the_posterior_spread_of_the_last_layers(base, ethanol_structures):
    """Sample m's energy is E + dw_m . phi, and sqrt(phi^T Sigma phi) equals the spread of
    many drawn last layers' energies (the draws have covariance Sigma)."""
    llpr = fit_llpr(base, ethanol_structures[:16], n_samples=5, log=lambda _: None)
    g = _batch(base, ethanol_structures[16:19])
    out = llpr.predict(g, UQ)
    phi = structure_features(base, g)
    assert phi.shape == (3, last_layer(base)[1].in_features)
    torch.testing.assert_close(out[K.ENERGY_SAMPLES] - out[K.ENERGY][:, None], phi @ llpr.deltas)
    many = LLPR(base, llpr.covariance, n_samples=20000, seed=3)
    sampled = (phi @ many.deltas).std(dim=1)
    np.testing.assert_allclose(out[K.ENERGY_STD].numpy(), sampled.numpy(), rtol=0.03)


def test_regularizer_is_chosen_on_calibration_energies(base, ethanol_structures):
    chosen = fit_llpr(
        base, ethanol_structures[:12], ethanol_structures[12:20], log=lambda _: None
    ).fit_report
    assert "regularizer_nll" in chosen and chosen["regularizer"] > 0
    fixed = fit_llpr(base, ethanol_structures[:12], regularizer=0.5, log=lambda _: None)
    assert fixed.fit_report["regularizer"] == 0.5 and "regularizer_nll" not in fixed.fit_report
    with pytest.raises(ConfigError, match="--regularizer must be > 0"):
        fit_llpr(base, ethanol_structures[:12], regularizer=0.0)


def test_distance_force_std_is_each_atoms_feature_distance(base, ethanol_structures):
    with pytest.raises(ConfigError, match="needs --calibration"):
        fit_llpr(base, ethanol_structures[:12], force_std="distance")
    train = ethanol_structures[:12]
    dist = fit_llpr(base, train, ethanol_structures[12:20], force_std="distance", log=print)
    assert K.FORCES_SAMPLES not in dist.supported_outputs()
    assert dist.fit_report["distance_elements"] == [1, 6, 8]
    g = _batch(base, ethanol_structures[20:22])
    out = dist.predict(g, frozenset({K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD}))
    plain = base(g, {K.ENERGY, K.FORCES}, create_graph=False)
    torch.testing.assert_close(out[K.FORCES], plain[K.FORCES])
    # the Mahalanobis distance from the element's training atoms, computed here in numpy
    below, _ = last_layer(base)

    def features(graph):
        with torch.no_grad():
            return (below(base.backbone(graph)["node"]).double() * base.energy_scale).numpy()

    g_train = _batch(base, train)
    f_train, z_train = features(g_train), g_train[K.ATOMIC_NUMBERS].numpy()
    f, z = features(g), g[K.ATOMIC_NUMBERS].numpy()
    h = f.shape[1]
    expected = np.zeros(len(z))
    for element in (1, 6, 8):
        x = f_train[z_train == element]
        mean = x.mean(0)
        cov = np.cov(x.T, bias=True)
        precision = np.linalg.inv(cov + 1e-3 * np.trace(cov) / h * np.eye(h))
        d = f[z == element] - mean
        expected[z == element] = np.sqrt(np.einsum("ah,hk,ak->a", d, precision, d))
    np.testing.assert_allclose(out[K.FORCES_STD].numpy(), expected, rtol=1e-8)
    # an atom pushed out of its environment is farther than the atoms of the data
    moved = copy.deepcopy(ethanol_structures[20])
    moved.positions[0] += np.array([0.45, 0.0, 0.0])
    far = dist.predict(_batch(base, [moved]), frozenset({K.FORCES_STD}))[K.FORCES_STD]
    assert float(far.max()) > 2 * float(out[K.FORCES_STD][:9].max())
    # the energy std is the same exact posterior std in both modes
    samples = LLPR(base, dist.covariance, n_samples=4)
    both = samples.predict(g, frozenset({K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD}))
    torch.testing.assert_close(out[K.ENERGY_STD], both[K.ENERGY_STD])
    with pytest.raises(ConfigError, match="--force-std must be"):
        LLPR(base, dist.covariance, force_std="local")
    with pytest.raises(ConfigError, match="go with --force-std distance"):
        LLPR(base, dist.covariance, force_std="distance")
    # an element without training statistics is an error, not a score
    carbon_only = (dist.elements[1:], dist.means[1:], dist.whitening[1:])
    partial = LLPR(base, dist.covariance, force_std="distance", distance=carbon_only)
    with pytest.raises(ConfigError, match=r"element\(s\) \[1\]"):
        partial.predict(g, frozenset({K.FORCES_STD}))


def test_distance_checkpoints_round_trip_and_refusals(tmp_path: Path, base, ethanol_structures):
    dist = fit_llpr(
        base,
        ethanol_structures[:12],
        ethanol_structures[12:20],
        force_std="distance",
        log=lambda _: None,
    )
    save_model(dist, tmp_path / "d.ckpt")
    again = load_model(tmp_path / "d.ckpt")
    assert isinstance(again, LLPR) and again.force_std == "distance"
    g = _batch(base, ethanol_structures[20:22])
    wanted = frozenset({K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD})
    for key, value in dist(g, wanted).items():
        torch.testing.assert_close(again(g, wanted)[key], value)
    payload = read_checkpoint(tmp_path / "d.ckpt")
    payload["extra"]["force_std"] = "local"
    save_checkpoint(payload, tmp_path / "local.ckpt")
    with pytest.raises(CheckpointError, match="fit it again"):
        load_model(tmp_path / "local.ckpt")
    payload["extra"]["force_std"] = "distance"
    payload["extra"]["distance"]["means"] = [[0.0, 1.0]]
    save_checkpoint(payload, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="feature-distance statistics must be"):
        load_model(tmp_path / "bad.ckpt")


def test_round_trip_and_refusals(tmp_path: Path, base, ethanol_structures):
    llpr = fit_llpr(base, ethanol_structures[:12], n_samples=3, seed=7, log=lambda _: None)
    save_model(llpr, tmp_path / "llpr.ckpt")
    again = load_model(tmp_path / "llpr.ckpt")
    assert isinstance(again, LLPR) and again.n_samples == 3
    torch.testing.assert_close(again.deltas, llpr.deltas)
    g = _batch(base, ethanol_structures[12:14])
    for key, value in llpr(g, UQ).items():
        torch.testing.assert_close(again(g, UQ)[key], value)
    with pytest.raises(ConfigError, match="covariance must be"):
        LLPR(base, torch.eye(3))
    moe = build_potential("deepset-moe", {}, ethanol_structures, dtype="float64")
    with pytest.raises(ConfigError, match="EnergyHead"):
        fit_llpr(moe, ethanol_structures[:4])


def test_cli_fits_and_evaluates_llpr(tmp_path: Path, ethanol_file: Path, base) -> None:
    save_model(base, tmp_path / "base.ckpt")
    out = tmp_path / "llpr"
    argv = ["uq", "fit", "llpr", "--from", str(tmp_path / "base.ckpt"), "--train"]
    assert (
        main([*argv, str(ethanol_file), "--calibration", str(ethanol_file), "--out", str(out)]) == 0
    )
    report = json.loads((out / "fit.json").read_text())
    assert report["method"] == "llpr" and "recalibration" in report
    assert (
        main(["uq", "eval", str(out / "uq.ckpt"), str(ethanol_file), "--out", str(tmp_path / "e")])
        == 0
    )
    metrics = json.loads((tmp_path / "e" / "uq_metrics.json").read_text())
    assert metrics["n_structures"] == 24 and "structure" in metrics
    assert (
        main(["uq", "fit", "llpr", "--from", str(tmp_path / "base.ckpt"), "--out", str(out)]) == 2
    )
