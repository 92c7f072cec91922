"""Data layer: reading, labels, units, checks with clear errors, neighbour lists, statistics."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write
from ase.neighborlist import neighbor_list
from conftest import labelled_molecules

from trustpot.data.neighbors import neighbor_pairs
from trustpot.data.reader import KeyMap, read_structures
from trustpot.data.stats import fit_reference_energies, force_rms
from trustpot.data.structures import check_species
from trustpot.errors import DataError


def write_frames(path: Path, frames: list) -> Path:
    write(path, frames, format="extxyz")
    return path


def test_reads_energy_forces_and_metadata(ethanol_file: Path) -> None:
    structures = read_structures(ethanol_file, use_cache=False)
    assert len(structures) == 24
    s = structures[0]
    assert s.energy is not None and s.forces is not None and s.forces.shape == (9, 3)
    assert s.info["config_type"] == "even"
    assert not s.is_periodic


def test_gzip_and_cache_give_same_structures(ethanol_file: Path, tmp_path: Path) -> None:
    gz = tmp_path / "eth.xyz.gz"
    gz.write_bytes(gzip.compress(ethanol_file.read_bytes()))
    plain = read_structures(ethanol_file, use_cache=False)
    first = read_structures(gz)
    cached = read_structures(gz)  # second read comes from the cache
    for a, b, c in zip(plain, first, cached):
        assert a.energy == b.energy == c.energy
        assert np.array_equal(a.forces, c.forces) and np.array_equal(a.positions, c.positions)
        assert a.info == c.info


def test_compressed_files_are_read_from_memory(ethanol_file: Path, tmp_path: Path) -> None:
    """``read_atoms`` on .gz/.bz2/.xz gives the frames (and slices) of the plain file; a damaged
    archive is a DataError naming the file."""
    import bz2
    import lzma

    from ase.io import read

    from trustpot.data.reader import read_atoms

    data = ethanol_file.read_bytes()
    plain = read(ethanol_file, "::2")
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress),
                             (".xz", lzma.compress)):  # fmt: skip
        path = tmp_path / f"eth.xyz{suffix}"
        path.write_bytes(compress(data))
        got = read_atoms(path, "::2")
        assert len(got) == len(plain) > 1
        for a, b in zip(plain, got):
            assert np.array_equal(a.positions, b.positions)
            assert np.array_equal(a.get_forces(), b.get_forces())
    broken = tmp_path / "cut.xyz.gz"
    broken.write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DataError, match=r"cut\.xyz\.gz.*cannot decompress"):
        read_structures(broken, use_cache=False)


def test_units_are_converted(tmp_path: Path) -> None:
    frames = labelled_molecules(2)
    path = write_frames(tmp_path / "f.xyz", frames)
    ev = read_structures(path, use_cache=False)
    ha = read_structures(path, KeyMap(energy_unit="Hartree"), use_cache=False)
    assert ha[0].energy == pytest.approx(ev[0].energy * 27.211386, rel=1e-6)
    assert np.allclose(ha[0].forces, ev[0].forces * 27.211386, rtol=1e-6)


def test_periodic_with_stress(bulk_structures: list) -> None:
    s = bulk_structures[0]
    assert s.is_periodic and s.stress is not None and s.stress.shape == (3, 3)


# -- bad input: every case names file, frame and field ----------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_structures(tmp_path / "nope.xyz")


def test_unreadable_frame_is_named(tmp_path: Path) -> None:
    path = write_frames(tmp_path / "f.xyz", labelled_molecules(3))
    lines = path.read_text().splitlines()
    # damage a coordinate line of the third frame (9 atoms + 2 header lines per frame)
    lines[2 * 11 + 4] = "C 0.0 zero 0.0 1 2 3"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"frame 2: cannot parse"):
        read_structures(path, use_cache=False)


def test_missing_forces(tmp_path: Path) -> None:
    frames = labelled_molecules(3)
    frames[1].calc = None
    frames[1].info["energy"] = -1.0
    path = write_frames(tmp_path / "f.xyz", frames)
    with pytest.raises(DataError, match=r"f.xyz: frame 1: field 'forces': label missing"):
        read_structures(path, use_cache=False)


def test_missing_energy(tmp_path: Path) -> None:
    frames = labelled_molecules(2)
    frames[0].calc = None
    frames[0].arrays["forces"] = np.zeros((9, 3))
    path = write_frames(tmp_path / "f.xyz", frames)
    with pytest.raises(DataError, match=r"frame 0: field 'energy': label missing"):
        read_structures(path, use_cache=False)


def test_nan_forces(tmp_path: Path) -> None:
    path = write_frames(tmp_path / "f.xyz", labelled_molecules(3))
    text = path.read_text().splitlines()
    parts = text[11 + 2 + 3].split()
    parts[-1] = "nan"
    text[11 + 2 + 3] = " ".join(parts)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"frame 1: field 'forces': contains NaN or inf \(atom 3\)"):
        read_structures(path, use_cache=False)


def test_inf_energy(tmp_path: Path) -> None:
    frames = labelled_molecules(2)
    path = write_frames(tmp_path / "f.xyz", frames)
    text = path.read_text()
    energy = f"energy={float(frames[1].get_potential_energy())!r}"
    assert energy in text
    path.write_text(text.replace(energy, "energy=inf"))
    with pytest.raises(DataError, match=r"frame 1: field 'energy': value inf is not finite"):
        read_structures(path, use_cache=False)


def test_overlapping_atoms(tmp_path: Path) -> None:
    frames = labelled_molecules(3)
    frames[2].positions[4] = frames[2].positions[0] + [0.05, 0.0, 0.0]
    path = write_frames(tmp_path / "f.xyz", frames)
    with pytest.raises(
        DataError, match=r"frame 2: field 'positions': atoms 0 and 4 are 0.050 Å apart"
    ):
        read_structures(path, use_cache=False)


def test_overlap_across_periodic_boundary(tmp_path: Path) -> None:
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.positions[1] = a.positions[0] - [0.04, 0.0, 0.0] + a.cell[0]
    write(tmp_path / "p.xyz", a, format="extxyz")
    with pytest.raises(DataError, match="overlapping atoms"):
        read_structures(tmp_path / "p.xyz", require=(), use_cache=False)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.xyz"
    path.write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        read_structures(path, use_cache=False)


def test_unknown_element_is_named(ethanol_structures: list) -> None:
    with pytest.raises(
        DataError, match=r"x.xyz: frame 0: field 'numbers': element\(s\) O not in the model"
    ):
        check_species(ethanol_structures, [1, 6], "x.xyz")


# -- neighbour lists and statistics -------------------------------------------------------------
def test_neighbor_pairs_match_ase() -> None:
    a = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    a.rattle(0.05, seed=1)
    i, j, shifts, d = neighbor_pairs(a.positions, a.cell.array, a.pbc, 4.0, with_distances=True)
    ii, _jj, dd = neighbor_list("ijd", a, 4.0)
    assert len(i) == len(ii)
    assert np.allclose(np.sort(d), np.sort(dd))
    vec = a.positions[j] - a.positions[i] + shifts @ a.cell.array
    assert np.allclose(np.linalg.norm(vec, axis=1), d)


def test_reference_energies_least_squares() -> None:
    from trustpot.data.structures import Structure

    e_h, e_o = -13.6, -432.1
    structures = []
    for n_h, n_o in [(2, 1), (1, 1), (2, 2), (4, 1)]:
        numbers = np.array([1] * n_h + [8] * n_o)
        pos = np.arange(len(numbers) * 3, dtype=float).reshape(-1, 3)
        structures.append(
            Structure(
                numbers, pos, np.zeros((3, 3)), np.zeros(3, bool), energy=n_h * e_h + n_o * e_o
            )
        )
    e0 = fit_reference_energies(structures, [1, 8])
    assert e0[1] == pytest.approx(e_h) and e0[8] == pytest.approx(e_o)


def test_force_rms(ethanol_structures: list) -> None:
    expected = np.sqrt(np.mean(np.concatenate([s.forces.ravel() for s in ethanol_structures]) ** 2))
    assert force_rms(ethanol_structures) == pytest.approx(expected)


def test_collate_with_host_counts_and_a_dataset_kept_on_a_device(ethanol_structures: list) -> None:
    """Batches collated from graphs kept on a device (here the shape-only ``meta`` device)
    need no value from it: atom counts come from the host."""
    import torch

    from trustpot.data.dataset import GraphDataset
    from trustpot.data.graph import collate
    from trustpot.data.neighbors import NeighborListSpec

    specs = [NeighborListSpec("main", 4.0)]
    data = GraphDataset(ethanol_structures[:6], specs)
    graphs = [data.graph(k) for k in range(3)]
    plain, counted = collate(graphs), collate(graphs, [s.n_atoms for s in data.structures[:3]])
    assert plain.keys() == counted.keys()
    assert all(torch.equal(plain[k], counted[k]) for k in plain)
    with pytest.raises(ValueError, match="2 atom counts for 3 graphs"):
        collate(graphs, [9, 9])
    assert data.to("cpu") is data
    on_meta = data.to("meta")
    assert on_meta.to("cpu") is data and on_meta.to("meta") is on_meta
    batches = [b for b, _ in on_meta.batches(4)]
    reference = [b for b, _ in data.batches(4)]
    for b, ref in zip(batches, reference):
        assert b is not None and ref is not None
        assert all(v.device.type == "meta" for v in b.values())
        assert {k: v.shape for k, v in b.items()} == {k: v.shape for k, v in ref.items()}
    sub = on_meta.subset([0, 2])
    assert sub.device.type == "meta" and sub.to("cpu").structures == [
        data.structures[i] for i in (0, 2)
    ]
