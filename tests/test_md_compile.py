"""``trustpot md --compile auto``: the decision of :class:`trustpot.md_compile.AutoCompileMD`,
made on measured step times (a fake clock here), with the compiler replaced so that every branch
runs in seconds: compile and keep, compile and go back, too short to compile, a compiler error,
compiled forces that differ, a model without a compiled path; and ``run_md``'s three modes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet
from conftest import labelled_molecules

from trustpot.calculator import Predictor, TrustpotCalculator
from trustpot.data.reader import atoms_to_structure
from trustpot.errors import ConfigError
from trustpot.md import run_md
from trustpot.md_compile import MIN_SPEEDUP, TIMED_STEPS, WARMUP_STEPS, AutoCompileMD
from trustpot.models.build import build_potential
from trustpot.uq.ensemble import MCDropout

EAGER_S = 0.01  # fake seconds per eager step


def _calculator(dropout: bool = False) -> tuple[TrustpotCalculator, Atoms]:
    frames = labelled_molecules(3)
    structures = [atoms_to_structure(a) for a in frames]
    hypers = {"n_features": 8, "n_layers": 1, "cutoff": 3.0}
    pot = build_potential("painn", hypers, structures, dtype="float32",
                          head_dropout=0.1 if dropout else 0.0)  # fmt: skip
    model = MCDropout(pot, n_samples=2) if dropout else pot
    atoms = frames[0].copy()
    atoms.calc = TrustpotCalculator(Predictor(model, batch_size=1), skin=0.5)
    return atoms.calc, atoms


def _compiler(monkeypatch: pytest.MonkeyPatch, wrap: Callable[[Any], Any]) -> list[str]:
    """Replace torch.compile by ``wrap`` (no compilation: seconds, not minutes); returns the
    names of the functions it was given."""
    names: list[str] = []

    def fake(fn: Any, **_: Any) -> Any:
        names.append(fn.__name__)
        return wrap(fn)

    monkeypatch.setattr(torch, "compile", fake)
    return names


def _run(
    calc: TrustpotCalculator, atoms: Atoms, total: int, compiled_s: float, steps: int = 60
) -> tuple[AutoCompileMD, list[str]]:
    """``steps`` of NVE with the decision attached, for a run announced as ``total`` steps;
    the fake clock advances EAGER_S per eager step and ``compiled_s`` per compiled one."""
    now = [0.0]
    lines: list[str] = []
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.attach(lambda: now.__setitem__(0, now[0] + (compiled_s if calc.compiled else EAGER_S)))
    auto = AutoCompileMD(calc, atoms, total, lines.append, clock=lambda: now[0])
    dyn.attach(auto, interval=1)
    dyn.run(steps)
    return auto, lines


def test_a_long_run_compiles_and_keeps_a_faster_step(monkeypatch: pytest.MonkeyPatch) -> None:
    names = _compiler(monkeypatch, lambda fn: fn)
    calc, atoms = _calculator()
    auto, lines = _run(calc, atoms, total=10**6, compiled_s=EAGER_S / 2)
    assert names == ["node_energies"] and calc.compiled and auto.state == "on"
    assert auto.eager_step_s == pytest.approx(EAGER_S)
    assert auto.compiled_step_s == pytest.approx(EAGER_S / 2)
    assert "compiled in" in lines[0] and "(2.00x): keeping it" in lines[1]


def test_a_compiled_step_that_is_not_faster_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    _compiler(monkeypatch, lambda fn: fn)
    calc, atoms = _calculator()
    auto, lines = _run(calc, atoms, total=10**6, compiled_s=EAGER_S / (MIN_SPEEDUP - 0.05))
    assert not calc.compiled and auto.state == "off"
    assert "back to the eager step" in lines[-1]


def test_a_short_run_is_not_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    names = _compiler(monkeypatch, lambda fn: fn)
    calc, atoms = _calculator()
    auto, lines = _run(calc, atoms, total=1000, compiled_s=EAGER_S / 2)
    assert names == [] and not calc.compiled and auto.state == "off"
    assert lines == [f"md: not compiled: {(1000 - WARMUP_STEPS - TIMED_STEPS) * EAGER_S:.0f} s "
                     "of MD left at 10.00 ms per step (--compile auto compiles when 300 s or "
                     "more are left)"]  # fmt: skip


def test_a_compiler_error_leaves_the_run_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("backend exploded")

        return call

    _compiler(monkeypatch, broken)
    calc, atoms = _calculator()
    auto, lines = _run(calc, atoms, total=10**6, compiled_s=EAGER_S / 2)
    assert not calc.compiled and auto.state == "off" and dict(calc.results)
    assert lines == ["md: compiling failed, staying eager (RuntimeError: backend exploded)"]
    assert np.all(np.isfinite(atoms.positions))


def test_compiled_forces_that_differ_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def off_by_one_percent(fn: Any) -> Any:
        def call(g: Any) -> Any:
            energies, embedding = fn(g)
            return 1.01 * energies, embedding

        return call

    _compiler(monkeypatch, off_by_one_percent)
    calc, atoms = _calculator()
    forces: list[np.ndarray] = []
    now = [0.0]
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.attach(lambda: now.__setitem__(0, now[0] + EAGER_S))
    lines: list[str] = []
    dyn.attach(AutoCompileMD(calc, atoms, 10**6, lines.append, clock=lambda: now[0]))
    dyn.attach(lambda: forces.append(np.array(calc.results["forces"])))
    dyn.run(WARMUP_STEPS + TIMED_STEPS + 2)
    assert not calc.compiled and "differ from the eager ones" in lines[0]
    # the restored results are the eager forces of the same positions
    fresh = calc.predictor.predict_structures([atoms_to_structure(atoms)])[0]["forces"]
    np.testing.assert_allclose(forces[-1], fresh, rtol=0, atol=1e-5)


def test_a_model_without_a_compiled_path_stays_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    names = _compiler(monkeypatch, lambda fn: fn)
    calc, atoms = _calculator(dropout=True)
    auto, lines = _run(calc, atoms, total=10**6, compiled_s=EAGER_S / 2)
    assert names == [] and auto.state == "off"
    assert "not compiled: compile needs a plain potential" in lines[0]


def test_run_md_modes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``always`` compiles before the first step, ``never`` switches a compiled calculator off,
    ``auto`` leaves a compiled calculator compiled; anything else is an error naming it."""
    names = _compiler(monkeypatch, lambda fn: fn)
    calc, atoms = _calculator()
    run_md(calc, atoms, 3, 300, tmp_path / "a.xyz", compile="always")
    assert calc.compiled and names == ["node_energies"]
    run_md(calc, atoms, 3, 300, tmp_path / "b.xyz", compile="auto")
    assert calc.compiled
    run_md(calc, atoms, 3, 300, tmp_path / "c.xyz", compile="never")
    assert not calc.compiled
    with pytest.raises(ConfigError, match="--compile must be one of"):
        run_md(calc, atoms, 3, 300, tmp_path / "d.xyz", compile="sometimes")
