"""The fine-tuning report against hand-made cases: drift metrics, local environments,
Davies-Bouldin by environment, the verdict, t-SNE maps and report.md."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from trustpot.data.environments import environment_labels, environments, pool_rare
from trustpot.data.neighbors import neighbor_pairs
from trustpot.data.structures import Structure
from trustpot.finetune_render import report_markdown, tsne_2d, tsne_maps
from trustpot.finetune_report import (
    THRESHOLDS,
    Embeddings,
    davies_bouldin,
    drift,
    linear_cka,
    scaled_w1,
    verdict,
)


def test_identical_representations_have_no_drift() -> None:
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert scaled_w1(x, x) == pytest.approx(0.0)
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)


def test_w1_of_a_shift_is_the_shift_in_stds() -> None:
    x = np.random.default_rng(0).normal(size=(5000, 3))
    assert scaled_w1(x, x + 0.5 * x.std(0)) == pytest.approx(0.5, rel=1e-6)


def test_davies_bouldin_by_hand() -> None:
    # two groups on a line: centres 0 and 10, mean distance to centre 1 in each
    x = np.array([[-1.0], [1.0], [9.0], [11.0]])
    labels = np.array([1, 1, 8, 8])
    assert davies_bouldin(x, labels) == pytest.approx((1 + 1) / 10)
    # collapsing the groups onto each other raises it
    assert davies_bouldin(x * np.array([[1.0]]) / 5 + np.array([[0.0]]), labels) == pytest.approx(
        0.2
    )
    assert davies_bouldin(np.array([[-1.0], [1.0], [0.0], [2.0]]), labels) > 1
    assert np.isnan(davies_bouldin(x, np.ones(4)))


def test_verdict_names_forgetting_and_collapse() -> None:
    report = {
        "frames": "replay.xyz",
        "forgetting": {"forces_mae_vs_pretrained": 0.3},
        "drift": [
            {"layer": 0, "cka": 0.9, "davies_bouldin_before": 1.0, "davies_bouldin_after": 1.1},
            {"layer": 1, "cka": 0.2, "davies_bouldin_before": 1.0, "davies_bouldin_after": 3.0},
        ],
    }
    line = verdict(report)
    assert line.startswith("FORGOT") and "COLLAPSED in layer(s) [1]" in line
    report["forgetting"]["forces_mae_vs_pretrained"] = 0.01
    report["drift"] = report["drift"][:1]
    assert verdict(report).startswith("kept") and "no layer collapsed" in verdict(report)


def _structure(atoms: Atoms) -> Structure:
    return Structure(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)


def cristobalite() -> Atoms:
    """Ideal beta-cristobalite (24 atoms, periodic): silicon on diamond sites 3.1 Å apart,
    an oxygen half-way along every Si-Si line (Si-O 1.55 Å)."""
    si = bulk("Si", "diamond", a=7.16, cubic=True)
    i, j, shifts, _ = neighbor_pairs(si.positions, si.cell.array, si.pbc, 3.2)
    once = i < j
    middle = (si.positions[i[once]] + si.positions[j[once]] + shifts[once] @ si.cell.array) / 2
    return si + Atoms("O" * len(middle), positions=middle)


def test_environment_labels_of_known_structures() -> None:
    assert environment_labels(_structure(molecule("H2O"))) == ["O(H2)", "H(O1)", "H(O1)"]
    assert environment_labels(_structure(molecule("CH4"))) == ["C(H4)"] + ["H(C1)"] * 4
    ethanol = environment_labels(_structure(molecule("CH3CH2OH")))
    assert ethanol[:4] == ["C(C1H3)", "C(C1H2O1)", "O(C1H1)", "H(O1)"]
    silica = cristobalite()
    labels = environment_labels(_structure(silica))  # bonds across the cell faces count
    assert Counter(labels) == {"Si(O4)": 8, "O(Si2)": 16}
    assert Counter(environment_labels(_structure(Atoms("Na", pbc=False)))) == {"Na()": 1}
    # the same cell cut out of its periodic images loses the bonds across its faces
    silica.pbc = False
    assert Counter(environment_labels(_structure(silica))) != {"Si(O4)": 8, "O(Si2)": 16}


def test_rare_environments_are_pooled() -> None:
    labels = ["C(H4)"] * 3 + ["C(H3)", "H(C1)", "H(C1)", "H(C1)"]
    assert pool_rare(labels).tolist() == ["C(H4)"] * 3 + ["C(other)"] + ["H(C1)"] * 3
    both = environments([_structure(molecule("H2O")), _structure(molecule("H2O"))], min_count=2)
    assert both.tolist() == ["O(H2)", "H(O1)", "H(O1)"] * 2
    assert environments([_structure(molecule("H2O"))]).tolist() == ["O(other)"] + ["H(other)"] * 2


def _embeddings(after_env_gap: float) -> Embeddings:
    """One layer, two elements, two environments of element 6 set ``after_env_gap`` apart
    after fine-tuning (4 before)."""
    rng = np.random.default_rng(0)
    numbers = np.repeat([1, 6, 6], 30)
    envs = np.repeat(["H(C1)", "C(H4)", "C(H3)"], 30)
    centres = {"H(C1)": (0.0, 10.0), "C(H4)": (10.0, 0.0), "C(H3)": (14.0, 0.0)}
    noise = rng.normal(scale=0.5, size=(90, 2))
    before = np.array([centres[e] for e in envs]) + noise
    moved = {**centres, "C(H3)": (10.0 + after_env_gap, 0.0)}
    after = np.array([moved[e] for e in envs]) + noise
    return Embeddings([before], [after], numbers, envs)


def test_davies_bouldin_by_environment_and_its_verdict() -> None:
    """Two environments of one element merging leave the element grouping as it was but
    raise the environment index: a collapse the verdict names."""
    (kept,) = drift(_embeddings(4.0))
    assert kept["davies_bouldin_env_after"] == pytest.approx(kept["davies_bouldin_env_before"])
    (merged,) = drift(_embeddings(0.3))
    assert merged["davies_bouldin_after"] < 1.5 * merged["davies_bouldin_before"]
    assert merged["davies_bouldin_env_after"] > 3 * merged["davies_bouldin_env_before"]
    report = {"frames": "f", "forgetting": {"forces_mae_vs_pretrained": 0.0}, "drift": [merged]}
    line = verdict(report)
    assert line.startswith("kept") and "COLLAPSED in layer(s) [0]" in line
    assert "by environment" in line and "by element" not in line.split("COLLAPSED")[1]


def test_tsne_maps_are_deterministic_and_drawn(tmp_path: Path) -> None:
    emb = _embeddings(0.3)
    maps = tsne_maps(emb, tmp_path, max_atoms=60)
    assert maps == {"layer": 0, "n_atoms": 60, "element": "tsne_element.png",
                    "environment": "tsne_environment.png"}  # fmt: skip
    for name in (maps["element"], maps["environment"]):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    x = emb.before[0][:40]
    np.testing.assert_array_equal(tsne_2d(x), tsne_2d(x))
    assert "skipped" in tsne_maps(Embeddings([], [], np.ones(3), np.array(["a"] * 3)), tmp_path)


def test_report_markdown_has_every_section() -> None:
    forgot = {"labels": "given", "forces_mae_vs_pretrained": 0.3,
              "pretrained": {"forces_mae": 0.1, "n_structures": 2},
              "finetuned": {"forces_mae": 0.5, "n_structures": 2}}  # fmt: skip
    metrics = {"energy_mae_per_atom": 0.002, "forces_mae": 0.1, "forces_rmse": 0.2}
    report = {
        "frames": "replay.xyz", "n_structures": 2, "thresholds": dict(THRESHOLDS),
        "downstream": {"in_domain": {"frames": "validation", "pretrained": metrics,
                                     "finetuned": metrics}},
        "forgetting": forgot, "environments": {"H(C1)": 30}, "drift": drift(_embeddings(0.3)),
        "maps": {"skipped": "too few atoms"},
    }  # fmt: skip
    report["verdict"] = verdict(report)
    assert report["verdict"].startswith("FORGOT") and "0.1 -> 0.5" in report["verdict"]
    md = report_markdown(report)
    assert md.count(report["verdict"]) == 2
    assert "| pretrained | - | 2 | - | 0.1 | 0.2 |" in md  # meV/atom; energy RMSE absent
    for text in ("## Downstream error", "--test-ood", "given", "`H(C1)` 30", "DB environment",
                 "Not drawn: too few atoms"):  # fmt: skip
        assert text in md, text
