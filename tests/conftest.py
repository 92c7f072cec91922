"""Shared fixtures: tiny labelled molecules and periodic cells, written as extxyz files.

Labels come from ASE's EMT calculator: cheap, deterministic and good enough to exercise the
code (these are not accuracy tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import write

from trustpot.data.reader import read_structures
from trustpot.data.structures import Structure

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUSTPOT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def labelled_molecules(
    n: int, seed: int = 0, name: str = "CH3CH2OH", scale: float = 0.08
) -> list[Atoms]:
    """``n`` rattled copies of a molecule with EMT energies and forces."""
    rng = np.random.default_rng(seed)
    base = molecule(name)
    frames = []
    for k in range(n):
        a = base.copy()
        a.positions += rng.normal(scale=scale, size=a.positions.shape)
        a.calc = EMT()
        a.get_forces()
        a.info["config_type"] = "even" if k % 2 == 0 else "odd"
        frames.append(a)
    return frames


def labelled_bulk(n: int, seed: int = 0) -> list[Atoms]:
    """``n`` rattled, slightly strained copper cells (periodic) with EMT labels and stress."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.set_cell(
            a.cell.array @ (np.eye(3) + rng.normal(scale=0.01, size=(3, 3))), scale_atoms=True
        )
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.calc = EMT()
        a.get_forces()
        a.get_stress()
        frames.append(a)
    return frames


@pytest.fixture(scope="session")
def ethanol_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ethanol.xyz"
    write(path, labelled_molecules(24), format="extxyz")
    return path


@pytest.fixture(scope="session")
def ethanol_structures(ethanol_file: Path) -> list[Structure]:
    return read_structures(ethanol_file, use_cache=False)


@pytest.fixture(scope="session")
def bulk_structures(tmp_path_factory: pytest.TempPathFactory) -> list[Structure]:
    path = tmp_path_factory.mktemp("data") / "cu.xyz"
    write(path, labelled_bulk(6), format="extxyz")
    return read_structures(path, use_cache=False)


def needs_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (the shared datasets are not beside this checkout)")
    return path
