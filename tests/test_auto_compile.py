"""``train.compile=auto``: the decision (:mod:`trustpot.train.auto_compile`) and the trainer
acting on it: compile after the first epoch when the run is long, go back to the eager step
when the compiled one is not faster or cannot compile, and say so in the log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import trustpot.train.auto_compile as auto_compile
from trustpot.config import TrainConfig, load_config
from trustpot.data.dataset import GraphDataset
from trustpot.errors import ConfigError
from trustpot.models.build import build_potential
from trustpot.train.auto_compile import MIN_REMAINING_S, AutoCompile
from trustpot.train.losses import LossWeights
from trustpot.train.trainer import Objective, Trainer


def test_auto_compiles_a_long_run_and_keeps_it_only_when_faster() -> None:
    auto = AutoCompile("auto", "cpu", distributed=False)
    first = auto.after_epoch(10.0, MIN_REMAINING_S + 1)
    assert first.action == "compile" and "compiling the step" in first.message
    assert auto.first_compiled_epoch
    assert auto.after_epoch(70.0, 1e9).action == ""  # the epoch that compiled: not judged
    assert not auto.first_compiled_epoch
    kept = auto.after_epoch(5.0, 1e9)
    assert kept.action == "" and "2.00x): keeping" in kept.message and auto.state == "on"
    assert auto.after_epoch(50.0, 1e9).action == ""  # decided for good

    slow = AutoCompile("auto", "cpu", distributed=False)
    slow.after_epoch(10.0, 1e9)
    slow.after_epoch(70.0, 1e9)
    back = slow.after_epoch(9.5, 1e9)
    assert back.action == "eager" and "back to the eager step" in back.message
    assert slow.state == "off"


def test_auto_leaves_short_runs_gpus_and_other_modes_alone() -> None:
    short = AutoCompile("auto", "cpu", distributed=False)
    decision = short.after_epoch(1.0, MIN_REMAINING_S - 1)
    assert decision.action == "" and "min of training left" in decision.message
    assert short.state == "off" and short.after_epoch(1.0, 1e9).action == ""
    for mode, device, dist in (
        ("auto", "cuda", False), ("auto", "cpu", True), ("always", "cpu", False),
        ("never", "cpu", False),
    ):  # fmt: skip
        auto = AutoCompile(mode, device, dist)
        assert auto.state == "off" and auto.after_epoch(1.0, 1e9).action == ""


def test_compile_option_values() -> None:
    assert TrainConfig().compile == "auto"
    assert load_config(overrides=["train.compile=true"]).train.compile == "always"
    assert load_config(overrides=["train.compile=false"]).train.compile == "never"
    assert load_config(overrides=["train.compile=never"]).train.compile == "never"
    with pytest.raises(ConfigError, match=r"train\.compile must be auto, always or never"):
        load_config(overrides=["train.compile=sometimes"])


def _run(
    structures: list, folder: Path, compile: str, epochs: int = 3
) -> tuple[Trainer, list[float], list[str]]:
    model = build_potential(
        "painn", {"n_features": 8, "n_layers": 1, "n_rbf": 4}, structures, "float64", seed=3
    )
    data = GraphDataset(structures, model.neighbor_lists(), model.dtype)
    cfg = TrainConfig(epochs=epochs, batch_size=2, lr=1e-3, compile=compile)
    trainer = Trainer(model, [Objective("main", "main", LossWeights())], cfg, progress=False)
    losses: list[float] = []
    trainer.on_epoch = lambda _t, row: losses.append(row["train_loss"])  # type: ignore[assignment,return-value]
    lines: list[str] = []
    trainer.fit({"main": data}, {}, folder, log=lines.append)
    return trainer, losses, lines


def test_a_step_that_cannot_compile_falls_back_to_the_eager_run_exactly(
    ethanol_structures: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` decides to compile, the compiler fails at the first step: the epoch runs
    again eagerly, and the whole run equals one that never compiled."""
    import trustpot.train.compiled_step as compiled_step

    def no_compiler(fn: Callable, **_kw: Any) -> Callable:
        def fail(*_a: Any) -> None:
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setattr(compiled_step.torch, "compile", no_compiler)
    monkeypatch.setattr(auto_compile, "MIN_REMAINING_S", 0.0)
    structures = ethanol_structures[:6]
    auto, auto_losses, lines = _run(structures, tmp_path / "auto", "auto")
    never, never_losses, _ = _run(structures, tmp_path / "never", "never")
    assert any("compiling the step" in line for line in lines), lines
    assert any("no C++ compiler found" in line and "eager from here" in line for line in lines)
    assert auto._static is None and auto.auto_compile.state == "off"
    assert auto_losses == never_losses
    for a, b in zip(auto.model.parameters(), never.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("speedup", [0.0, 1e9])
def test_auto_switches_to_the_static_step_and_back(
    speedup: float, ethanol_structures: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the compiler replaced by the uncompiled function (the same arithmetic, no C++
    needed), ``auto`` moves to the static-shape step with packed batches after the first
    epoch; it keeps it or goes back depending on the measured speed-up."""
    import trustpot.train.compiled_step as compiled_step

    monkeypatch.setattr(compiled_step.torch, "compile", lambda fn, **_kw: fn)
    monkeypatch.setattr(auto_compile, "MIN_REMAINING_S", 0.0)
    monkeypatch.setattr(auto_compile, "MIN_SPEEDUP", speedup)
    trainer, losses, lines = _run(ethanol_structures[:6], tmp_path / "run", "auto", epochs=4)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any("compiling the step" in line for line in lines), lines
    if speedup == 0.0:
        assert any("keeping the compiled step" in line for line in lines), lines
        assert trainer._static is not None and trainer._static.compiled is not None
        assert trainer.order.packed
    else:
        assert any("back to the eager step" in line for line in lines), lines
        assert trainer._static is None and not trainer.order.packed


def test_a_short_auto_run_says_it_did_not_compile(ethanol_structures: list, tmp_path: Path) -> None:
    trainer, _, lines = _run(ethanol_structures[:4], tmp_path / "run", "auto", epochs=2)
    assert trainer._static is None
    assert any("step not compiled" in line and "min of training left" in line for line in lines)
