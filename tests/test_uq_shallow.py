"""Shallow ensembles: M last layers on one backbone, fine-tuned with a likelihood."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from trustpot import keys as K
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import load_model, save_model
from trustpot.models.build import build_potential
from trustpot.uq.lastlayer import last_layer
from trustpot.uq.shallow import ShallowEnsemble, fit_shallow_ensemble, gaussian_nll_of_samples

HYPERS = {"n_features": 16, "n_layers": 2, "cutoff": 4.0}
UQ = frozenset({K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD, K.FORCES_SAMPLES, K.STRESS})


def _batch(model, structures):
    return collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures])


@pytest.fixture(scope="module")
def base(ethanol_structures):
    return build_potential("painn", HYPERS, ethanol_structures, dtype="float64", seed=2).eval()


def test_heads_are_last_layers_and_start_from_the_trained_one(base, ethanol_structures):
    g = _batch(base, ethanol_structures[:3])
    plain = base(g, {K.ENERGY, K.FORCES}, create_graph=False)
    same = ShallowEnsemble(base, n_heads=3, spread=0.0).predict(g, UQ)
    torch.testing.assert_close(same[K.ENERGY], plain[K.ENERGY])
    torch.testing.assert_close(same[K.FORCES], plain[K.FORCES])
    assert float(same[K.FORCES_STD].max()) < 1e-12
    shallow = ShallowEnsemble(base, n_heads=3, spread=0.5, seed=1)
    out = shallow.predict(g, UQ)
    assert float(out[K.FORCES_STD].min()) > 0
    for m in range(3):  # head m is the potential with that last layer, evaluated on its own
        other = copy.deepcopy(base)
        _, last = last_layer(other)
        with torch.no_grad():
            last.weight.copy_(shallow.heads.weight[m : m + 1])
            last.bias.copy_(shallow.heads.bias[m : m + 1])
        ref = other(g, {K.FORCES}, create_graph=False)
        torch.testing.assert_close(out[K.FORCES_SAMPLES][:, m], ref[K.FORCES])


def test_gaussian_nll_of_samples():
    samples = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([0.0, 0.0], dtype=torch.float64)
    nll = gaussian_nll_of_samples(samples, target, floor=1e-6)
    var = 2.0 + 1e-6  # unbiased variance of (1, 3)
    assert math.isclose(float(nll[0]), 0.5 * math.log(2 * math.pi * var) + 4.0 / (2 * var))
    assert math.isfinite(float(nll[1]))
    with pytest.raises(ConfigError, match="M >= 2"):
        gaussian_nll_of_samples(samples[:, :1], target)


@pytest.mark.parametrize("loss", ["nll", "crps"])
def test_fit_with_either_loss_round_trips_and_freezes_on_request(
    loss, tmp_path: Path, base, ethanol_structures
):
    kwargs = dict(n_heads=3, loss=loss, epochs=3, batch_size=4, progress=False, log=lambda _: None)
    model = fit_shallow_ensemble(base, ethanol_structures[:12], ethanol_structures[12:16], **kwargs)
    report = model.fit_report
    assert report["loss"] == loss and report["epochs"] == 3
    save_model(model, tmp_path / "s.ckpt")
    again = load_model(tmp_path / "s.ckpt")
    assert isinstance(again, ShallowEnsemble) and again.n_heads == 3
    g = _batch(base, ethanol_structures[16:18])
    for key, value in model(g, UQ).items():
        torch.testing.assert_close(again(g, UQ)[key], value)
    frozen = fit_shallow_ensemble(
        base, ethanol_structures[:12], ethanol_structures[12:16], finetune_backbone=False, **kwargs
    )
    for a, b in zip(frozen.base.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # --freeze-backbone trains the heads only
    with pytest.raises(ConfigError, match="--loss must be one of"):
        fit_shallow_ensemble(base, ethanol_structures[:4], ethanol_structures[4:6], loss="mse")


def test_cli_fits_a_shallow_ensemble(tmp_path: Path, ethanol_file: Path, base) -> None:
    save_model(base, tmp_path / "base.ckpt")
    out = tmp_path / "sh"
    argv = ["uq", "fit", "shallow-ensemble", "--from", str(tmp_path / "base.ckpt"), "--train"]
    flags = ["--n-heads", "3", "--epochs", "2", "--calibration", str(ethanol_file)]
    assert main([*argv, str(ethanol_file), *flags, "--out", str(out)]) == 0
    assert json.loads((out / "fit.json").read_text())["method"] == "shallow-ensemble"
    assert isinstance(load_model(out / "uq.ckpt"), ShallowEnsemble)
    bad = ["--freeze-backbone", "--backbone-lr", "1e-3"]
    assert main([*argv, str(ethanol_file), *bad, "--out", str(tmp_path / "x")]) == 2
