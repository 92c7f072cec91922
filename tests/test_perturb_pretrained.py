"""Learned functional perturbations on the pretrained adapters (SevenNet-0, CHGNet).

The adapters' modulation hook (``Model.modulation_shape`` / ``set_modulator``) lets
:class:`~trustpot.uq.perturb.PerturbedPotential` wrap them: the zero-initialised wrapper is the
pretrained model exactly, a trained (here: randomised) modulator spreads the samples while
every sample stays rotation invariant/equivariant (SevenNet: only the ``0e`` channels are
modulated), and the wrapper round-trips through a checkpoint. Each case skips when its extra
is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.data.splits import read_data
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import load_model, save_model
from trustpot.testing import check_invariances
from trustpot.uq.perturb import PerturbedPotential, fit_perturbation

FRAMES = Path(__file__).resolve().parent / "fixtures" / "checkpoints" / "frames.xyz"
CASES = [
    pytest.param(
        "chgnet",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("chgnet") is None, reason="the chgnet extra is not installed"
        ),
    ),
    pytest.param(
        "sevennet-0",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("sevenn") is None,
            reason="the sevennet extra (sevenn) is not installed",
        ),
    ),
]


def _frames() -> list[Structure]:
    return read_data(str(FRAMES))


def _randomise(wrapper: PerturbedPotential, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in wrapper.modulator.mlps:
            for p in mlp[-1].parameters():
                p.copy_(0.03 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("name", CASES)
def test_perturbed_adapter(name: str, tmp_path: Path) -> None:
    base = load_model(name)
    shape = base.modulation_shape()
    assert shape is not None and shape[0] >= 3, shape
    wrapper = PerturbedPotential(base, n_samples=4).eval()
    frames = _frames()[:3]
    plain = Predictor(base).predict_structures(frames)
    start = Predictor(wrapper).predict_structures(frames, {K.ENERGY, K.FORCES, K.FORCES_STD})
    for p, s in zip(plain, start):  # zero-initialised: the pretrained model exactly
        assert abs(float(p[K.ENERGY]) - float(s[K.ENERGY])) < 1e-4
        assert float(abs(p[K.FORCES] - s[K.FORCES]).max()) < 1e-4
        assert float(abs(s[K.FORCES_STD]).max()) < 1e-6

    _randomise(wrapper)
    spread = Predictor(wrapper).predict_structures(frames, {K.ENERGY, K.FORCES, K.FORCES_STD})
    assert all(float(s[K.FORCES_STD].mean()) > 1e-3 for s in spread)
    assert base.set_modulator(None) is None  # the wrapper detached itself after each call
    check_invariances(wrapper, frames[0], atol=2e-4, permutation=False)

    path = tmp_path / "perturbed.ckpt"
    save_model(wrapper, path)
    again = load_model(path)
    assert isinstance(again, PerturbedPotential) and again.base.kind == base.kind
    back = Predictor(again).predict_structures(frames, {K.ENERGY, K.FORCES, K.FORCES_STD})
    for a, b in zip(spread, back):
        assert float(abs(a[K.FORCES_STD] - b[K.FORCES_STD]).max()) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_fit_perturbation_on_adapter(name: str) -> None:
    frames = _frames()
    fitted = fit_perturbation(
        load_model(name), frames[:4], frames[4:6], n_samples_train=2, epochs=2,
        batch_size=2, n_samples=3, progress=False, log=lambda _: None,
    )  # fmt: skip
    assert fitted.fit_report["epochs"] == 2
    assert fitted.fit_report["best_epoch"] >= 1  # the zero-spread start is never returned
    out = Predictor(fitted).predict_structures(frames[4:6], {K.FORCES_STD})
    assert all(float(o[K.FORCES_STD].mean()) > 0 for o in out)


def test_a_model_without_the_hook_is_refused() -> None:
    ensemble = load_model(FRAMES.parent / "uq-ensemble.ckpt")  # wrappers have no hook
    assert ensemble.modulation_shape() is None
    with pytest.raises(ConfigError, match="kind 'uq:ensemble' has none"):
        PerturbedPotential(ensemble)
    with pytest.raises(ConfigError, match="no modulation hook"):
        ensemble.set_modulator(None)
