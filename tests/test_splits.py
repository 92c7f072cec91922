"""Split manifests: rules, the hash check, and use from train and eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustpot.cli.main import main
from trustpot.data.reader import read_structures
from trustpot.data.splits import (
    data_sha256,
    make_split,
    read_data,
    read_manifest_subset,
    write_manifest,
)
from trustpot.errors import ConfigError, DataError


def test_random_split_sizes_and_disjoint(ethanol_structures: list) -> None:
    subsets = make_split(ethanol_structures, "random", seed=1, sizes={"train": 16, "test": 0.25})
    assert len(subsets["train"]) == 16 and len(subsets["test"]) == 6
    assert not set(subsets["train"]) & set(subsets["test"])
    assert subsets == make_split(
        ethanol_structures, "random", seed=1, sizes={"train": 16, "test": 0.25}
    )


def test_info_key_and_composition(ethanol_structures: list) -> None:
    by_type = make_split(ethanol_structures, "info-key", assign={"test": ["odd"]})
    assert by_type["test"] == list(range(1, 24, 2)) and by_type["train"] == list(range(0, 24, 2))
    by_formula = make_split(ethanol_structures, "composition", assign={"test": ["C2H6O"]})
    assert len(by_formula["test"]) == 24 and by_formula["train"] == []
    with pytest.raises(ConfigError, match="needs sizes"):
        make_split(ethanol_structures, "random")


def test_manifest_refuses_modified_file(ethanol_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.xyz"
    data.write_bytes(ethanol_file.read_bytes())
    structures = read_structures(data, use_cache=False)
    subsets = make_split(structures, "random", sizes={"train": 20, "test": 4})
    write_manifest(data, subsets, "random", 0, {}, tmp_path / "split.json")
    got = read_manifest_subset(f"{tmp_path / 'split.json'}:test")
    assert [s.energy for s in got] == [structures[i].energy for i in subsets["test"]]
    data.write_text(data.read_text().replace("config_type=odd", "config_type=ODD", 1))
    with pytest.raises(DataError, match="changed since the split was made"):
        read_manifest_subset(f"{tmp_path / 'split.json'}:test")


def test_several_specs_joined_by_commas(ethanol_file: Path, tmp_path: Path) -> None:
    structures = read_structures(ethanol_file)
    subsets = make_split(structures, "random", sizes={"train": 5, "test": 3})
    manifest = tmp_path / "split.json"
    write_manifest(ethanol_file, subsets, "random", 0, {}, manifest)
    both = read_data(f"{manifest}:test,{ethanol_file}")
    assert len(both) == 3 + len(structures)
    assert [s.energy for s in both[:3]] == [structures[i].energy for i in subsets["test"]]
    assert data_sha256(f"{manifest}:test,{ethanol_file}")[0] is None
    assert len(str(data_sha256(f"{manifest}:test,{ethanol_file}")[1])) == 64
    with pytest.raises(ConfigError, match="empty entry"):
        read_data(f"{ethanol_file},,{ethanol_file}")
    comma_named = tmp_path / "a,b.xyz"  # an existing path is never split
    comma_named.write_bytes(ethanol_file.read_bytes())
    assert len(read_data(str(comma_named))) == len(structures)


def test_cli_split_then_train_and_eval(ethanol_file: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "split.json"
    assert (
        main(
            [
                "data",
                "split",
                str(ethanol_file),
                "--rule",
                "random",
                "--sizes",
                "train=18",
                "test=6",
                "--out",
                str(manifest),
            ]
        )
        == 0
    )
    assert json.loads(manifest.read_text())["sizes"] == {"train": 18, "test": 6}
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--train",
                f"{manifest}:train",
                "--model",
                "schnet",
                "--epochs",
                "1",
                "--out",
                str(run),
                "-o",
                "model.hypers.n_features=8",
                "-o",
                "train.threads=1",
            ]
        )
        == 0
    )
    assert (
        main(["eval", str(run / "best.ckpt"), f"{manifest}:test", "--out", str(tmp_path / "ev")])
        == 0
    )
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_structures"] == 6
