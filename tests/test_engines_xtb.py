"""GFN2-xTB engine: molecules from SMILES, labelling files, errors before work, kill and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.io import read, write

from trustpot.cli.main import main
from trustpot.data.reader import read_structures
from trustpot.engines.labelling import failed_path, scan_output

pytest.importorskip("tblite", reason="the xtb extra (tblite) is not installed")
pytest.importorskip("rdkit", reason="the xtb extra (rdkit) is not installed")

TINY_MD = ["--equilibration", "10", "--interval", "5", "--chunk", "3", "--quiet"]


def _single_point(atoms, charge: int = 0, uhf: int = 0) -> tuple[float, np.ndarray]:
    from tblite.ase import TBLite

    a = atoms.copy()
    a.calc = TBLite(method="GFN2-xTB", charge=charge, multiplicity=uhf + 1, verbosity=0)
    return a.get_potential_energy(), a.get_forces()


@pytest.mark.integration
def test_molecules_with_provenance(tmp_path: Path) -> None:
    out = tmp_path / "mol.xyz"
    args = ["data", "molecules", "--smiles", "CCO", "[NH4+]", "--temperatures", "300", "600"]
    assert main([*args, "--frames", "2", "--workers", "0", *TINY_MD, "--out", str(out)]) == 0
    frames = read(out, ":")
    assert len(frames) == 8  # --frames is per (SMILES, temperature)
    keys = {"engine", "engine_version", "method", "smiles", "temperature", "seed", "frame_id"}
    for a in frames:
        assert keys | {"trustpot_version"} <= set(a.info)
        assert a.info["engine"] == "tblite" and a.info["method"] == "GFN2-xTB"
    ammonium = [a for a in frames if a.info["smiles"] == "[NH4+]"]
    assert ammonium[0].get_chemical_formula() == "H4N" and ammonium[0].info["charge"] == 1
    e, f = _single_point(ammonium[-1], charge=1)
    assert ammonium[-1].get_potential_energy() == pytest.approx(e, abs=1e-5)
    # the MD run restarts SCF from the previous step's density: agreement to SCF tolerance
    np.testing.assert_allclose(ammonium[-1].get_forces(), f, atol=3e-4)
    assert sorted({a.info["temperature"] for a in frames}) == [300.0, 600.0]
    assert len(read_structures(out, use_cache=False)) == 8


@pytest.mark.parametrize(
    ("smiles", "message"),
    [
        ("C1CC", "invalid SMILES 'C1CC'"),
        ("[Og]", "not supported by GFN2-xTB"),
        ("not-a-smiles", "invalid SMILES"),
    ],
)
def test_bad_smiles_fail_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smiles: str, message: str
) -> None:
    out = tmp_path / "x.xyz"
    assert (
        main(["data", "molecules", "--smiles", "CCO", smiles, "--frames", "2", "--out", str(out)])
        == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.xyz")
    base = ["data", "molecules", "--smiles", "CCO", "--out", out]
    assert main([*base, "--frames", "-3"]) == 2
    assert "--frames must be >= 1" in capsys.readouterr().err
    assert main([*base, "--frames", "2", "--temperatures", "300", "0"]) == 2
    assert "temperatures must be > 0 K" in capsys.readouterr().err
    assert main([*base, "--frames", "2", "--timestep", "-1"]) == 2
    assert "--timestep must be > 0" in capsys.readouterr().err
    assert main([*base, "--frames", "2", "--method", "DFT"]) == 2
    assert "unknown xTB method" in capsys.readouterr().err


@pytest.mark.integration
def test_label_file_records_failures(tmp_path: Path) -> None:
    water, methane, radical = molecule("H2O"), molecule("CH4"), molecule("H2O")
    radical.info["multiplicity"] = 2  # 8 electrons cannot have one unpaired: the frame fails
    anion = molecule("OH")
    anion.info["charge"] = -1
    source = tmp_path / "in.xyz"
    write(source, [water, methane, radical, anion])
    out = tmp_path / "lab.xyz"
    assert main(["data", "label", str(source), "--out", str(out), "--workers", "0", "--quiet"]) == 1
    frames = read(out, ":")
    assert [a.info["source_frame"] for a in frames] == [0, 1, 3]
    failures = [json.loads(x) for x in failed_path(out).read_text().splitlines()]
    assert [f["frame_id"] for f in failures] == ["frame-2"]
    assert "not compatible" in failures[0]["reason"]
    e, _ = _single_point(anion, charge=-1)
    assert frames[2].get_potential_energy() == pytest.approx(e, abs=1e-6)
    assert frames[2].info["charge"] == -1


def test_label_unsupported_element(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ase import Atoms

    source = tmp_path / "u.xyz"
    write(source, [molecule("H2O"), Atoms("U2", positions=[[0, 0, 0], [0, 0, 2.5]])])
    assert main(["data", "label", str(source), "--out", str(tmp_path / "o.xyz")]) == 2
    assert "frame 1: field 'numbers': element(s) U not supported" in capsys.readouterr().err


@pytest.mark.slow
def test_molecules_resume_after_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "kill.xyz"
    cmd = [sys.executable, "-m", "trustpot", "data", "molecules", "--smiles", "CCO"]
    cmd += ["--frames", "12", "--equilibration", "10", "--interval", "40", "--chunk", "2"]
    cmd += ["--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("frame_id=") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    partial = len(scan_output(out)[0])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{partial} resumed" in done.stdout
    ids = [a.info["frame_id"] for a in read(out, ":")]
    assert ids == [f"CCO@300K#{k}" for k in range(12)]


def test_isolated_atoms_in_their_ground_state_spin(tmp_path: Path) -> None:
    from ase import Atoms

    from trustpot.engines.xtb import ground_state_unpaired, isolated_atoms, label_file
    from trustpot.errors import ConfigError

    spins = {z: ground_state_unpaired(z) for z in (1, 2, 6, 7, 8, 9, 14, 16, 17, 35, 53)}
    assert spins == {1: 1, 2: 0, 6: 2, 7: 3, 8: 2, 9: 1, 14: 2, 16: 2, 17: 1, 35: 1, 53: 1}
    with pytest.raises(ConfigError, match="d- or f-block"):
        ground_state_unpaired(26)
    summary = isolated_atoms([8, 1, 1], tmp_path / "e0.xyz", progress=False)
    assert (summary.written, summary.failed) == (2, 0)
    frames = read(tmp_path / "e0.xyz", ":")
    assert [int(a.numbers[0]) for a in frames] == [1, 8]
    assert [a.info["uhf"] for a in frames] == [1, 2]
    # the spin reaches the engine: the O triplet differs from the label without spin
    write(tmp_path / "o.xyz", Atoms("O", positions=[[0, 0, 0]]), format="extxyz")
    label_file(tmp_path / "o.xyz", tmp_path / "o-singlet.xyz", workers=0, progress=False)
    singlet = read(tmp_path / "o-singlet.xyz").get_potential_energy()
    assert abs(frames[1].get_potential_energy() - singlet) > 1e-3
