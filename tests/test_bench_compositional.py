"""Compositional benchmark: offsets, kNN distances, option errors, and the quick CLI end to end."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from trustpot.bench.compositional import BenchOptions, parse_model, parse_tasks
from trustpot.bench.manifold import fit_reference, spearman, structure_distances
from trustpot.bench.offsets import energy_offset_analysis
from trustpot.cli.main import main
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError

HAVE_XTB = find_spec("tblite") is not None and find_spec("rdkit") is not None


def _structure(numbers: list[int], energy: float, smiles: str) -> Structure:
    n = len(numbers)
    return Structure(
        numbers=np.array(numbers),
        positions=np.zeros((n, 3)),
        cell=np.zeros((3, 3)),
        pbc=np.zeros(3, bool),
        energy=energy,
        info={"smiles": smiles},
    )


def test_energy_offset_split_by_hand() -> None:
    # molecule A (H2O): errors +1.0, +1.2 -> offset 1.1, rest -0.1, +0.1
    # molecule B (H2O2): errors -0.5, -0.3, -0.7 -> offset -0.5, rest 0, +0.2, -0.2
    a, b = [1, 1, 8], [1, 1, 8, 8]
    structures = [_structure(a, 0.0, "O"), _structure(a, 0.0, "O")]
    structures += [_structure(b, 0.0, "OO") for _ in range(3)]
    predicted = [1.0, 1.2, -0.5, -0.3, -0.7]
    out = energy_offset_analysis(structures, predicted)
    assert out["energy_mae"] == pytest.approx(3.7 / 5)
    assert out["energy_bias"] == pytest.approx(0.7 / 5)
    assert out["offset_mae"] == pytest.approx((2 * 1.1 + 3 * 0.5) / 5)
    assert out["mae_rest"] == pytest.approx((0.1 + 0.1 + 0 + 0.2 + 0.2) / 5)
    sse = sum(e * e for e in predicted)
    assert out["offset_share"] == pytest.approx(1 - (0.01 * 2 + 0.04 * 2) / sse)
    assert out["offset_per_molecule"] == pytest.approx({"O": 1.1, "OO": -0.5})
    # two compositions, two elements: a per-element fit explains any offsets, not determined
    assert out["element_share"] == pytest.approx(1.0)
    assert not out["element_fit_determined"]
    assert energy_offset_analysis([], []) == {}


def test_knn_distance_ranks_far_atoms_higher() -> None:
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(6, 4)) for _ in range(20)]
    numbers = [np.array([1, 1, 1, 6, 6, 8]) for _ in train]
    ref = fit_reference(train, numbers, k=3)
    assert set(ref.elements) == {1, 6, 8} and ref.n_atoms == {1: 60, 6: 40, 8: 20}
    near = rng.normal(size=(6, 4))
    far = near.copy()
    far[3] += 25.0  # one carbon far outside the training cloud
    d_max, d_mean = structure_distances(ref, [near, far], [numbers[0], numbers[0]])
    assert d_max[1] > 5 * d_max[0]
    assert d_mean[1] > d_mean[0]
    # an element no training atom has is infinitely far
    d_max, _ = structure_distances(ref, [near[:1]], [np.array([9])])
    assert math.isinf(d_max[0])
    assert spearman(np.arange(5.0), np.arange(5.0) ** 2) == pytest.approx(1.0)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model 'mace'"):
        parse_model("mace")
    with pytest.raises(ConfigError, match="key=value"):
        parse_model("deepset-moe:aggregation")
    assert parse_model("deepset-moe:aggregation=mean,top_k=2").hypers == {
        "aggregation": "mean",
        "top_k": 2,
    }
    with pytest.raises(ConfigError, match="unknown compositional task 'dup'"):
        parse_tasks(["dup"])
    assert parse_tasks(["all", "size"]) == ["duplication", "combination", "size", "holdout"]
    with pytest.raises(ConfigError, match="given twice"):
        BenchOptions(["size"], ["schnet", "schnet"]).check()
    with pytest.raises(ConfigError, match="--minutes"):
        BenchOptions(["size"], ["schnet"], minutes=0).check()


def test_cli_unknown_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["bench", "compositional", "--task", "size", "--models", "nope", "--out", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "unknown model 'nope'" in err[0]


@pytest.mark.skipif(not HAVE_XTB, reason="the xtb extra (tblite, rdkit) is not installed")
def test_quick_benchmark_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    # the data command writes what the benchmark's quick mode would build, so it is reused
    data = out / "duplication" / "data"
    build = ["data", "compositional", "--task", "duplication", "--quick", "--frames", "6"]
    assert main([*build, "--workers", "0", "--quiet", "--out", str(data)]) == 0
    manifest = json.loads((data / "split.json").read_text())
    assert set(manifest["subsets"]) == {"train", "test_id", "test_ood"}
    args = ["bench", "compositional", "--task", "duplication", "--quick", "--minutes", "0.03"]
    args += ["--models", "schnet", "deepset-moe:top_k=2", "--out", str(out)]
    assert main(args) == 0
    assert "duplication: reusing the data" in capsys.readouterr().out
    summary = json.loads((out / "compositional.json").read_text())
    task = summary["tasks"]["duplication"]
    assert set(task["models"]) == {"schnet", "deepset-moe:top_k=2"}
    assert task["frames"]["test_ood"] > 0 and task["frames"]["test_id"] > 0
    for name, m in task["models"].items():
        i, o = m["subsets"]["test_id"], m["subsets"]["test_ood"]
        for key in ("forces_mae", "forces_cosine", "forces_magnitude_mae", "energy_mae"):
            assert math.isfinite(i[key]) and math.isfinite(o[key]), (name, key)
        assert m["ratios"]["forces_mae"] == pytest.approx(o["forces_mae"] / i["forces_mae"])
        ps = m["per_structure"]["test_ood"]
        assert len(ps["distance_max"]) == task["frames"]["test_ood"]
        assert all(d >= m_ for d, m_ in zip(ps["distance_max"], ps["distance_mean"]))
        weighted = np.average(ps["forces_mae"], weights=ps["n_atoms"])
        assert weighted == pytest.approx(o["forces_mae"], rel=1e-6)
        assert o["energy_offset"]["energy_mae"] == pytest.approx(o["energy_mae"])
        assert m["training"]["minutes"] == pytest.approx(0.03)
    routing = task["models"]["deepset-moe:top_k=2"]["routing"]["test_ood"]
    assert sum(routing["load"]) == pytest.approx(1.0)
    # reference energies are the free atoms' (the default --reference-energies isolated)
    from ase.io import read

    from trustpot.io.checkpoint import load_potential

    free = {
        int(a.numbers[0]): a.get_potential_energy() for a in read(data / "isolated_atoms.xyz", ":")
    }
    meta = load_potential(out / "duplication" / "schnet" / "best.ckpt").meta
    assert meta.reference_energies == pytest.approx(free)
    assert "free atoms' GFN2-xTB energies" in (out / "report.md").read_text()
    assert 0.0 <= routing["normalised_mi"] <= 1.0
    assert set(routing["label_values"]) == {0, 1}  # scaffold and carboxylic acid atoms
    assert "routing" not in task["models"]["schnet"]
    report = (out / "report.md").read_text()
    assert "| schnet |" in report and "I(expert; fragment)" in report
    for png in ("ratios.png", "duplication_distance.png", "duplication_routing.png"):
        assert (out / png).stat().st_size > 1000
    capsys.readouterr()
    # a rerun reuses data, models and evaluations
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("trained already") == 2 and "training for" not in log
