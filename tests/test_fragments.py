"""Fragment-annotated molecules, the four compositional tasks, and their xTB data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="the xtb extra (rdkit) is not installed")

from rdkit import Chem

from trustpot.engines.compositional import (
    TASKS,
    TaskSpec,
    build_task_data,
    make_task,
)
from trustpot.engines.fragments import (
    DEFAULT_LIBRARY,
    Fragment,
    FragmentLibrary,
    MoleculeSpec,
    annotate_frames,
    enumerate_molecules,
)
from trustpot.errors import ConfigError, DataError

PARENTS = {"benzene": "c1ccccc1", "cyclohexane": "C1CCCCC1"}


def _formula(smiles: str) -> Counter:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    return Counter(a.GetSymbol() for a in mol.GetAtoms())


def _expected(scaffold: str, chain_length: int | None, names: list[str]) -> Counter:
    """Parent hydrocarbon + each H-capped fragment - 2 H per bond made (independent of molzip)."""
    total = _formula(PARENTS.get(scaffold, "C" * (chain_length or 0)))
    for name in names:
        total += _formula(DEFAULT_LIBRARY.fragment(name).smiles.replace("*", "[H]"))
        total -= Counter({"H": 2})
    return total


def _check(spec: MoleculeSpec) -> None:
    mol = Chem.MolFromSmiles(spec.smiles)
    assert mol is not None and Chem.MolToSmiles(mol) == spec.smiles
    names = [n for n, c in spec.fragments for _ in range(c)]
    assert _formula(spec.smiles) == _expected(spec.scaffold, spec.chain_length, names)
    labels = spec.atom_labels(DEFAULT_LIBRARY.names)
    assert len(labels) == len(spec.atomic_numbers())
    for k, name in enumerate(DEFAULT_LIBRARY.names):
        capped = sum(_formula(DEFAULT_LIBRARY.fragment(name).smiles.replace("*", "[H]")).values())
        assert int((labels == k + 1).sum()) == (capped - 1) * spec.count(name), (spec, name)


def test_library_has_the_defaults() -> None:
    lib = DEFAULT_LIBRARY
    assert len(lib.names) >= 7 and {"benzene", "chain"} <= set(lib.scaffolds)
    assert {"carboxylic_acid", "hydroxyl", "amine", "nitro", "aldehyde", "nitrile"} <= set(
        lib.names
    )
    assert {"fluoro", "chloro"} & set(lib.names)
    assert lib.legend()[0] == "scaffold"


@pytest.mark.parametrize("scaffold", ["benzene", "cyclohexane", "chain"])
def test_every_product_is_valid_with_expected_composition(scaffold: str) -> None:
    length = 3 if scaffold == "chain" else None
    names = DEFAULT_LIBRARY.names
    for a in names:
        (mono,) = enumerate_molecules(scaffold, {a: 1}, length, sites=(0,))
        _check(mono)
        assert mono.info(names)[f"n_{a}"] == 1 and mono.info(names)["fragments"] == a
    for k, a in enumerate(names):
        for b in names[k:]:
            counts = {a: 2} if a == b else {a: 1, b: 1}
            for spec in enumerate_molecules(scaffold, counts, length, sites=(0, 2)):
                _check(spec)
                assert spec.info(names)["fragments"] == ",".join(sorted({a, b}))


def test_enumeration_counts_isomers_and_refuses_bad_input() -> None:
    diacids = enumerate_molecules("benzene", {"carboxylic_acid": 2})
    assert len(diacids) == 3  # ortho, meta, para
    assert "O=C(O)c1ccc(C(=O)O)cc1" in {m.smiles for m in diacids}
    assert len(enumerate_molecules("chain", {"amine": 1, "nitro": 1}, 3)) == 3
    (methanol,) = enumerate_molecules("chain", {"hydroxyl": 1}, 1)
    assert methanol.smiles == "CO" and methanol.info(DEFAULT_LIBRARY.names)["chain_length"] == 1
    (benzene,) = enumerate_molecules("benzene", {})
    assert benzene.info(DEFAULT_LIBRARY.names)["fragments"] == "none"
    for args, message in [
        (("benzene", {"thiol": 1}), "unknown fragment 'thiol'"),
        (("naphthalene", {"amine": 1}), "unknown scaffold"),
        (("chain", {"amine": 1}), "needs chain_length"),
        (("chain", {"amine": 3}, 2), "do not fit"),
        (("benzene", {"amine": -1}), ">= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            enumerate_molecules(*args)


def test_library_is_extensible() -> None:
    lib = FragmentLibrary().add(Fragment("methoxy", "*OC"))
    (anisole,) = lib.enumerate("benzene", {"methoxy": 1})
    assert anisole.smiles == "COc1ccccc1"
    assert anisole.atom_labels(lib.names).max() == len(lib.names)
    for bad, message in [
        (Fragment("Bad-Name", "*O"), "must match"),
        (Fragment("two", "*C*"), "needs one"),
        (Fragment("broken", "*C(("), "cannot parse"),
        (Fragment("hydroxyl", "*O"), "taken"),
    ]:
        with pytest.raises(ConfigError, match=message):
            lib.add(bad)


@pytest.mark.parametrize("quick", [True, False])
def test_tasks_respect_their_definitions(quick: bool) -> None:
    dup = make_task("duplication", quick, {"fragment": "nitro"})
    assert all(m.count("nitro") == 1 and len(m.fragments) == 1 for m in dup.subsets["train"])
    assert all(m.count("nitro") == 2 and len(m.fragments) == 1 for m in dup.subsets["test_ood"])
    assert {m.scaffold for m in dup.subsets["test_ood"]} == {"benzene", "chain"}

    comb = make_task("combination", quick, {"a": "hydroxyl", "b": "nitrile"})
    for m in comb.subsets["train"]:
        assert sorted(n for n, _ in m.fragments) in (["hydroxyl"], ["nitrile"])
    for m in comb.subsets["test_ood"]:
        assert dict(m.fragments) == {"hydroxyl": 1, "nitrile": 1}

    size = make_task("size", quick)
    longest = max(m.chain_length for m in size.subsets["train"])
    assert all(m.chain_length > longest for m in size.subsets["test_ood"])
    assert {m.fragments for m in size.subsets["train"]} == {
        m.fragments for m in size.subsets["test_ood"]
    }

    hold = make_task("holdout", quick)
    assert all(m.count("nitrile") == 0 for m in hold.subsets["train"])
    assert all(m.count("nitrile") == 1 for m in hold.subsets["test_ood"])
    train_elements = set().union(*(m.elements() for m in hold.subsets["train"]))
    assert set().union(*(m.elements() for m in hold.subsets["test_ood"])) <= train_elements

    for spec in (dup, comb, size, hold):
        assert spec.subsets["test_id"] == spec.subsets["train"]
        train = {m.smiles for m in spec.subsets["train"]}
        assert not train & {m.smiles for m in spec.subsets["test_ood"]}
    assert set(TASKS) == {"duplication", "combination", "size", "holdout"}


def test_task_definitions_are_enforced() -> None:
    with pytest.raises(ConfigError, match=r"element\(s\) Cl that no training molecule has"):
        make_task("holdout", True, {"held_out": "chloro"})
    with pytest.raises(ConfigError, match="also a training fragment"):
        make_task("holdout", True, {"held_out": "amine", "train_fragments": ["amine", "hydroxyl"]})
    with pytest.raises(ConfigError, match="must all be longer"):
        make_task("size", True, {"train_lengths": [1, 3], "test_lengths": [3]})
    with pytest.raises(ConfigError, match="two different fragments"):
        make_task("combination", True, {"a": "amine", "b": "amine"})
    with pytest.raises(ConfigError, match="unknown compositional task"):
        make_task("swap")
    with pytest.raises(ConfigError, match="unexpected keyword"):
        make_task("size", True, {"colour": "red"})
    spec = make_task("size", True)
    with pytest.raises(ConfigError, match="in train and test_ood"):
        TaskSpec("x", "", {**spec.subsets, "test_ood": spec.subsets["train"]}, {})


def _tiny_task() -> TaskSpec:
    # methanol in training, ethanol out of domain: the smallest chain pair
    options = {"fragments": ["hydroxyl"], "train_lengths": [1], "test_lengths": [2]}
    return make_task("size", True, options)


def test_bad_options_fail_before_work(tmp_path: Path) -> None:
    out = tmp_path / "task"
    cases = [
        ({"task": "swap"}, "unknown compositional task"),
        ({"frames_per_molecule": 0}, "frames_per_molecule must be >= 1"),
        ({"frames_per_molecule": 1}, ">= 2 frames per training molecule"),
        ({"temperatures": [300.0, 0.0]}, "temperatures must be"),
        ({"temperatures": []}, "temperatures must be"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"id_fraction": 1.0}, "id_fraction"),
        ({"method": "DFT"}, "unknown xTB method"),
        ({"options": {"held_out": "chloro"}, "task": "holdout", "quick": True}, "Cl"),
        ({"task": _tiny_task(), "options": {"fragments": ["amine"]}}, "ready TaskSpec"),
    ]
    for kwargs, message in cases:
        args = {"task": "size", "out_dir": out, "frames_per_molecule": 2, **kwargs}
        with pytest.raises(ConfigError, match=message):
            build_task_data(**args)
        assert not out.exists()


def test_build_task_data_writes_annotated_frames_and_manifest(tmp_path: Path) -> None:
    pytest.importorskip("tblite", reason="the xtb extra (tblite) is not installed")
    from ase.io import read

    from trustpot.data.splits import read_data
    from trustpot.engines.xtb import MDOptions

    md = MDOptions(equilibration=10, interval=5, chunk=2)
    spec = _tiny_task()
    result = build_task_data(spec, tmp_path / "t", 2, [300.0], seed=1, workers=0, quick=True, md=md)
    assert result.failed == 0
    assert result.sizes == {"train": 1, "test_id": 1, "test_ood": 2}
    frames = read(result.data, ":")
    assert [a.info["smiles"] for a in frames] == ["CO", "CO", "CCO", "CCO"]
    names = DEFAULT_LIBRARY.names
    for a in frames:
        assert a.info["scaffold"] == "chain" and a.info["fragments"] == "hydroxyl"
        assert a.info["n_hydroxyl"] == 1 and a.info["n_nitro"] == 0
        assert a.info["chain_length"] == (1 if a.info["smiles"] == "CO" else 2)
        labels = a.arrays["fragment_label"]
        oxygen_and_its_h = labels == names.index("hydroxyl") + 1
        assert oxygen_and_its_h.sum() == 2 and 8 in a.numbers[oxygen_and_its_h]
        assert a.get_potential_energy() < 0 and np.abs(a.get_forces()).max() > 0
    manifest = json.loads(result.manifest.read_text())
    assert manifest["rule"] == "compositional" and manifest["params"]["task"] == "size"
    assert manifest["params"]["molecules"]["test_ood"] == ["CCO"]
    assert manifest["subsets"]["test_ood"] == [2, 3]
    assert sorted(manifest["subsets"]["train"] + manifest["subsets"]["test_id"]) == [0, 1]
    ood = read_data(f"{result.manifest}:test_ood")
    assert [s.info["smiles"] for s in ood] == ["CCO", "CCO"]
    # a rerun resumes: nothing is relabelled and the data file is byte-identical
    before = result.data.read_bytes()
    again = build_task_data(spec, tmp_path / "t", 2, [300.0], seed=1, workers=0, quick=True, md=md)
    assert again.data.read_bytes() == before and again.sizes == result.sizes
    # frames of a molecule the task does not know are refused
    with pytest.raises(DataError, match="not in the task"):
        annotate_frames(result.raw, tmp_path / "x.xyz", spec.subsets["train"])
