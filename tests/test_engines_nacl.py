"""OpenMM NaCl in water: units, periodic frames, nearest ion pair, labels = force field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.geometry import get_distances
from ase.io import read

from trustpot.cli.main import main
from trustpot.engines.nacl_water import (
    FORCE_FIELD,
    NM_TO_A,
    BoxOptions,
    build_box,
    nearest_cation_anion,
)
from trustpot.units import KJ_PER_MOL_PER_NM_TO_EV_PER_A, KJ_PER_MOL_TO_EV


def test_unit_constants() -> None:
    # the kJ/mol factors live in trustpot.units (tested in test_units.py); nm -> Å here
    assert NM_TO_A == 10.0


def test_nearest_cation_anion_minimum_image() -> None:
    edge = 10.0
    pos = np.array([[0.5, 5.0, 5.0], [9.5, 5.0, 5.0], [5.0, 5.0, 5.0]])
    numbers = np.array([11, 17, 17])
    assert nearest_cation_anion(pos, numbers, edge) == pytest.approx(1.0)


@pytest.mark.integration
def test_cli_nacl_water_labels_are_the_force_field(tmp_path: Path) -> None:
    pytest.importorskip("openmm", reason="the openmm extra is not installed")
    import openmm as mm
    import openmm.app as app
    import openmm.unit as u

    out = tmp_path / "nacl.xyz"
    args = ["data", "nacl-water", "--pairs", "2", "--frames", "2", "--equilibration", "50"]
    args += ["--interval", "20", "--chunk", "2", "--workers", "0", "--quiet", "--out", str(out)]
    assert main(args) == 0
    frames = read(out, ":")
    assert len(frames) == 2
    opts = BoxOptions()
    edge = opts.edge_nm * NM_TO_A
    for a in frames:
        assert a.pbc.all() and np.allclose(a.cell.array, np.eye(3) * edge)
        assert a.info["n_pairs"] == 2 and a.info["engine"] == "openmm"
        assert (a.numbers == 11).sum() == 2 and (a.numbers == 17).sum() == 2
        na, cl = a.positions[a.numbers == 11], a.positions[a.numbers == 17]
        _, d = get_distances(na, cl, cell=a.cell, pbc=True)
        assert a.info["nearest_cation_anion"] == pytest.approx(d.min(), abs=1e-6)
    # recompute the last frame in double precision with the Reference platform
    a = frames[-1]
    top, _, _ = build_box(2, opts.grid, np.random.default_rng(int(a.info["seed"])))
    system = app.ForceField(FORCE_FIELD).createSystem(
        top, nonbondedMethod=app.PME, nonbondedCutoff=opts.cutoff * u.nanometer,
        constraints=None, rigidWater=False,
    )  # fmt: skip
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(a.positions / NM_TO_A * u.nanometer)
    state = ctx.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) * KJ_PER_MOL_TO_EV
    forces = state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
    assert a.get_potential_energy() == pytest.approx(energy, rel=1e-4)
    scale = np.abs(a.get_forces()).max()
    err = np.abs(a.get_forces() - np.asarray(forces) * KJ_PER_MOL_PER_NM_TO_EV_PER_A).max()
    assert err < 2e-3 * scale


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openmm", reason="the openmm extra is not installed")
    out = str(tmp_path / "x.xyz")
    assert main(["data", "nacl-water", "--pairs", "0", "--frames", "2", "--out", out]) == 2
    assert "--pairs must be >= 1" in capsys.readouterr().err
    assert main(["data", "nacl-water", "--pairs", "2", "--frames", "2", "--cutoff", "1.0",
                 "--out", out]) == 2  # fmt: skip
    assert "half the box edge" in capsys.readouterr().err
    assert main(["data", "nacl-water", "--pairs", "40", "--frames", "2", "--out", out]) == 2
    assert "do not fit" in capsys.readouterr().err
