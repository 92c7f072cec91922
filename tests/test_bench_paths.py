"""Probe paths of any molecule (trustpot.bench.paths): bond graph, rigid torsions and
stretches, relative-energy metrics, storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from trustpot.bench.paths import (
    ProbePath,
    bond_stretch,
    bonds,
    path_energies,
    path_errors,
    path_force_errors,
    plot_paths,
    probe_paths,
    read_paths,
    rotatable_bonds,
    torsion_scan,
    write_paths,
)


def ethanol() -> Atoms:
    return molecule("CH3CH2OH")  # C0 (methyl), C1, O2, H3 (on O), H4-H5 (on C1), H6-H8


def sides(atoms: Atoms, bond: tuple[int, int]) -> tuple[list[int], list[int]]:
    """The atoms on i's and j's side of a bond (by distance graph, test-side)."""
    adj = {k: set() for k in range(len(atoms))}
    for a, b in bonds(atoms):
        if {a, b} != set(bond):
            adj[a].add(b)
            adj[b].add(a)
    out = []
    for start in bond:
        seen, stack = {start}, [start]
        while stack:
            for m in adj[stack.pop()] - seen:
                seen.add(m)
                stack.append(m)
        out.append(sorted(seen))
    return out[0], out[1]


def test_ethanol_bonds_and_rotatable_bonds() -> None:
    a = ethanol()
    assert len(bonds(a)) == 8
    assert rotatable_bonds(a) == [(0, 1), (1, 2)]  # C-C and C-O
    assert rotatable_bonds(molecule("C6H6")) == []
    assert rotatable_bonds(molecule("CH3CN")) == []  # the linear C#N has nothing to rotate
    with pytest.raises(ValueError, match="periodic"):
        bonds(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[5, 5, 5], pbc=True))


def test_torsion_scan_is_rigid_with_a_360_degree_period() -> None:
    a = ethanol()
    frames, angles = torsion_scan(a, (0, 1), 4)  # the methyl (4 atoms) is the smaller side
    assert angles == [0.0, 90.0, 180.0, 270.0]
    np.testing.assert_allclose(frames[0].positions, a.positions, atol=1e-12)
    side_i, side_j = sides(a, (0, 1))
    assert len(side_i) == 4 and len(side_j) == 5
    for f, angle in zip(frames, angles):
        np.testing.assert_allclose(f.positions[side_j], a.positions[side_j], atol=1e-12)
        for side in (side_i, side_j):  # distances within each side are unchanged
            d0 = a.get_all_distances()[np.ix_(side, side)]
            np.testing.assert_allclose(f.get_all_distances()[np.ix_(side, side)], d0, atol=1e-10)
        assert f.get_distance(0, 1) == pytest.approx(a.get_distance(0, 1), abs=1e-12)
        turned = (f.get_dihedral(6, 0, 1, 2) - a.get_dihedral(6, 0, 1, 2)) % 360
        assert min(turned, 360 - turned) == pytest.approx(min(angle, 360 - angle), abs=1e-8)
    # another quarter turn from 270 degrees closes the period
    back, _ = torsion_scan(frames[3], (0, 1), 4)
    np.testing.assert_allclose(back[1].positions, a.positions, atol=1e-10)
    # the same bond given the other way round rotates the same side the same way
    flipped, _ = torsion_scan(a, (1, 0), 4)
    for f, g in zip(frames, flipped):
        np.testing.assert_allclose(f.positions, g.positions, atol=1e-12)
    with pytest.raises(ValueError, match="ring"):
        torsion_scan(molecule("C6H6"), (0, 1), 4)
    with pytest.raises(ValueError, match="not bonded"):
        torsion_scan(a, (0, 2), 4)


def test_bond_stretch_moves_only_the_smaller_side() -> None:
    a = ethanol()
    frames, lengths = bond_stretch(a, (1, 2), 5, extra=1.0)  # O2 and H3 move
    r0 = a.get_distance(1, 2)
    np.testing.assert_allclose(lengths, r0 + np.linspace(0, 1, 5))
    side_c, side_o = sides(a, (1, 2))
    assert side_o == [2, 3]
    for f, r in zip(frames, lengths):
        assert f.get_distance(1, 2) == pytest.approx(r, abs=1e-12)
        np.testing.assert_allclose(f.positions[side_c], a.positions[side_c], atol=0)
        assert f.get_distance(2, 3) == pytest.approx(a.get_distance(2, 3), abs=1e-12)
    # a ring bond: only atom j and its hydrogen move
    benzene = molecule("C6H6")
    i, j = bonds(benzene)[0]
    h = [k for a_, k in bonds(benzene) if a_ == j and benzene.numbers[k] == 1]
    h += [a_ for a_, k in bonds(benzene) if k == j and benzene.numbers[a_] == 1]
    frames, lengths = bond_stretch(benzene, (i, j), 3, extra=0.4)
    moved = np.flatnonzero(np.abs(frames[-1].positions - benzene.positions).max(axis=1) > 0)
    assert sorted(moved) == sorted([j, *h]) and len(h) == 1
    assert frames[-1].get_distance(i, j) == pytest.approx(lengths[-1], abs=1e-12)


def test_probe_paths_of_ethanol() -> None:
    paths = probe_paths(ethanol(), n_torsion=6, n_stretch=3)
    assert [(p.name, p.kind, p.unit) for p in paths] == [
        ("torsion C0-C1", "torsion", "deg"),
        ("torsion C1-O2", "torsion", "deg"),
        ("stretch C0-C1", "stretch", "Å"),
        ("stretch C1-O2", "stretch", "Å"),
        ("stretch O2-H3", "stretch", "Å"),  # the X-H bond with the smallest (i, j)
    ]
    assert [len(p.frames) for p in paths] == [6, 6, 3, 3, 3]
    assert all(len(p.coords) == len(p.frames) and p.dropped == 0 for p in paths)
    assert [p.kind for p in probe_paths(molecule("C6H6"), n_stretch=2)] == ["stretch"] * 3


def test_path_errors_shift_convention_and_barrier() -> None:
    x = np.linspace(0.0, 330.0, 12)
    ref = 0.1 * (1 - np.cos(np.radians(3 * x))) - 150.0
    zero = path_errors(ref, ref, x)
    assert zero["relative_rmse"] == 0 and zero["barrier_error"] == 0
    shifted = path_errors(ref, ref + 42.0, x)  # another energy zero is no error
    assert shifted["relative_rmse"] == pytest.approx(0, abs=1e-12)
    assert shifted["relative_max_error"] == pytest.approx(0, abs=1e-12)
    assert shifted["reference_barrier"] == pytest.approx(0.2)
    half = path_errors(ref, 0.5 * ref + 7.0, x)  # a barrier half as high
    assert half["predicted_barrier"] == pytest.approx(0.1)
    assert half["barrier_error"] == pytest.approx(-0.1)
    assert half["relative_max_error"] == pytest.approx(0.1)
    assert half["max_error_coord"] == pytest.approx(60.0)
    assert half["n_points"] == 12
    with pytest.raises(ValueError):
        path_errors(ref, ref[:-1], x)


def test_path_force_errors() -> None:
    ref = [np.zeros((2, 3)), np.zeros((3, 3))]
    pred = [np.full((2, 3), 1.0), np.full((3, 3), -3.0)]
    out = path_force_errors(ref, pred)
    assert out["n_atoms"] == 5
    assert out["force_mae"] == pytest.approx((6 * 1 + 9 * 3) / 15)
    assert out["force_rmse"] == pytest.approx(np.sqrt((6 * 1 + 9 * 9) / 15))


def labelled(path: ProbePath) -> ProbePath:
    """A path with made-up labels (energy = coordinate, forces = positions)."""
    frames = []
    for f, c in zip(path.frames, path.coords):
        g = f.copy()
        g.info["energy"] = float(c)
        g.arrays["forces"] = f.positions.copy()
        frames.append(g)
    return ProbePath(path.name, path.kind, path.atoms_index, tuple(frames), path.coords, path.unit)


def test_write_read_round_trip_and_plot(tmp_path: Path) -> None:
    a = ethanol()
    a.info["charge"] = 0
    paths = probe_paths(a, n_torsion=4, n_stretch=3, max_torsions=1, max_stretches=1)
    paths = [labelled(paths[0]), paths[1], labelled(paths[2])]  # one unlabelled
    file = tmp_path / "paths.xyz"
    write_paths(paths, file)
    back = read_paths(file)
    assert len(back) == len(paths)
    for p, q in zip(paths, back):
        assert (q.name, q.kind, q.atoms_index, q.unit, q.dropped) == (
            p.name,
            p.kind,
            p.atoms_index,
            p.unit,
            p.dropped,
        )
        np.testing.assert_allclose(q.coords, p.coords)
        for f, g in zip(p.frames, q.frames):
            np.testing.assert_allclose(g.positions, f.positions, atol=1e-8)  # extxyz: 8 decimals
            assert g.info["charge"] == 0
            assert ("energy" in g.info) == ("energy" in f.info)
            if "energy" in f.info:
                assert g.info["energy"] == pytest.approx(f.info["energy"])
                np.testing.assert_allclose(g.arrays["forces"], f.arrays["forces"], atol=1e-8)
    plot = tmp_path / "paths.png"
    done = [back[0], back[2]]
    plot_paths(done, {"model": [path_energies(p) ** 2 for p in done]}, plot)
    assert plot.stat().st_size > 0


def test_label_paths_with_xtb(tmp_path: Path) -> None:
    pytest.importorskip("tblite", reason="labelling needs the xtb extra (tblite)")
    from trustpot.bench.paths import label_paths

    a = ethanol()
    frames, coords = bond_stretch(a, (2, 3), 3, extra=0.4)
    path = ProbePath("stretch O2-H3", "stretch", (2, 3), tuple(frames), tuple(coords), "Å")
    (done,) = label_paths([path], tmp_path / "xtb", workers=0)
    assert done.dropped == 0 and done.coords == path.coords
    e = path_energies(done)
    assert np.all(np.diff(e) > 0)  # pulling the H off costs energy
    assert all(f.arrays["forces"].shape == (9, 3) for f in done.frames)
    # along the stretch, the force on the H pulls it back towards the O
    axis = a.positions[3] - a.positions[2]
    assert done.frames[-1].arrays["forces"][3] @ axis < 0


def test_label_paths_drops_failed_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame the engine could not label leaves its path with its coordinate (no xTB: the
    engine is replaced by one that fails on frame 1 of the two paths' 3 + 2 frames)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    from trustpot.bench.paths import label_paths
    from trustpot.engines import xtb

    def fake_label_file(source: Path, target: Path, **_: object) -> None:
        done = []
        for k, a in enumerate(read(source, ":")):
            if k != 1:
                a.info["source_frame"] = k
                a.calc = SinglePointCalculator(a, energy=-float(k), forces=np.full((9, 3), k))
                done.append(a)
        write(target, done, format="extxyz")

    monkeypatch.setattr(xtb, "label_file", fake_label_file)
    paths = probe_paths(ethanol(), n_stretch=3, max_torsions=0, max_stretches=1)[:1]
    paths.append(probe_paths(ethanol(), n_torsion=2, max_torsions=1, max_stretches=0)[0])
    first, second = label_paths(paths, tmp_path, workers=0)
    assert first.dropped == 1 and first.coords == (paths[0].coords[0], paths[0].coords[2])
    np.testing.assert_allclose(path_energies(first), [0.0, -2.0])
    np.testing.assert_allclose(first.frames[1].positions, paths[0].frames[2].positions)
    assert second.dropped == 0 and second.coords == paths[1].coords
    np.testing.assert_allclose(path_energies(second), [-3.0, -4.0])
    assert np.all(second.frames[1].arrays["forces"] == 4.0)
