"""Charged N-body engine: exact forces, the functional form, sampling and the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.io import read
from scipy.spatial.transform import Rotation

from trustpot.cli.main import main
from trustpot.data.reader import read_structures
from trustpot.engines.nbody import charges_of, energy_forces
from trustpot.units import COULOMB_EV_A


@pytest.mark.parametrize("n", [2, 5, 8])
def test_forces_are_minus_gradient(n: int) -> None:
    rng = np.random.default_rng(n)
    pos = rng.uniform(0, 7, (n, 3))
    q = charges_of(n)
    _, forces = energy_forces(pos, q)
    h = 1e-5
    numeric = np.zeros_like(pos)
    for i in range(n):
        for a in range(3):
            plus, minus = pos.copy(), pos.copy()
            plus[i, a] += h
            minus[i, a] -= h
            numeric[i, a] = -(energy_forces(plus, q)[0] - energy_forces(minus, q)[0]) / (2 * h)
    np.testing.assert_allclose(forces, numeric, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10)  # no net force


def test_functional_form_and_invariance() -> None:
    r0 = 2.8
    q = charges_of(2)
    assert list(charges_of(5)) == [1, -1, 1, -1, 1]
    # a +/- pair has its minimum at r0 with energy -K/r0 * 8/9
    e, f = energy_forces(np.array([[0.0, 0, 0], [r0, 0, 0]]), q, r0)
    assert e == pytest.approx(-COULOMB_EV_A / r0 * 8 / 9)
    np.testing.assert_allclose(f, 0.0, atol=1e-12)
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 6, (6, 3))
    q6 = charges_of(6)
    e0, f0 = energy_forces(pos, q6)
    rot = Rotation.random(random_state=1).as_matrix()
    e1, f1 = energy_forces(pos @ rot.T + 3.0, q6)
    assert e1 == pytest.approx(e0, rel=1e-12)
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-10)


@pytest.mark.integration
def test_cli_nbody(tmp_path: Path) -> None:
    out = tmp_path / "nb.xyz"
    args = ["data", "nbody", "--particles", "5", "--frames", "6", "--equilibration", "10"]
    assert main([*args, "--interval", "2", "--out", str(out), "--workers", "0", "--quiet"]) == 0
    frames = read(out, ":")
    assert len(frames) == 6
    for a in frames:
        assert a.get_chemical_symbols() == ["Na", "Cl", "Na", "Cl", "Na"]
        assert not a.pbc.any()
        e, f = energy_forces(a.positions, charges_of(5))
        assert a.get_potential_energy() == pytest.approx(e)
        np.testing.assert_allclose(a.get_forces(), f, atol=1e-6)
        assert a.info["engine"] == "trustpot-nbody" and a.info["temperature"] == 1000.0
        assert np.all((a.positions >= 0) & (a.positions <= 10.0))
    assert len(read_structures(out, use_cache=False)) == 6  # trustpot reads it back


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.xyz")
    assert main(["data", "nbody", "--particles", "5", "--frames", "0", "--out", out]) == 2
    assert "--frames must be >= 1" in capsys.readouterr().err
    bad_t = ["--temperatures", "-5", "--out", out]
    assert main(["data", "nbody", "--particles", "5", "--frames", "2", *bad_t]) == 2
    assert "temperatures must be > 0" in capsys.readouterr().err
    assert (
        main(["data", "nbody", "--particles", "50", "--frames", "2", "--box", "4", "--out", out])
        == 2
    )
    assert "too small" in capsys.readouterr().err
    assert not Path(out).exists()
