"""Scale analysis: close-contact geometry and metrics, pool refinement with a pool loss, the
branch trainer, the differentiable scale and pool, the testbeds' manifests, and ``trustpot
scales run --quick`` end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones
from ase.geometry import get_distances
from ase.io import write
from conftest import needs_shared

from trustpot.bench.scales import refine_pool
from trustpot.bench.scales.analysis import (
    FrameSet,
    PoolScorer,
    fit_differentiable_pool,
    fit_differentiable_scale,
    gain_recovered,
    pool_loss,
    pool_selection,
)
from trustpot.bench.scales.branches import BranchModel, train_branch
from trustpot.bench.scales.contacts import (
    binned_errors,
    contact_errors,
    frame_distance,
    ion_distances,
    minimum_image_distances,
)
from trustpot.cli.main import main
from trustpot.data.dataset import GraphDataset
from trustpot.data.structures import Structure
from trustpot.models.build import build_scale_mixture
from trustpot.models.mixture import FORCES_LONG, FORCES_SHORT
from trustpot.units import EV_PER_A_IN_KJ_PER_MOL_PER_NM

SEED_POOL = [0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0]


# -- geometry -----------------------------------------------------------------------------------
@pytest.mark.parametrize("triclinic", [False, True])
def test_minimum_image_distances_match_ase(triclinic: bool) -> None:
    rng = np.random.default_rng(1)
    cell = np.diag([9.0, 11.0, 7.5])
    if triclinic:
        cell[1, 0], cell[2, 1] = 2.0, -1.5
    a = rng.uniform(-3, 15, size=(6, 3))
    b = rng.uniform(-3, 15, size=(5, 3))
    ours = minimum_image_distances(a, b, cell, np.ones(3, bool))
    _, ref = get_distances(a, b, cell=cell, pbc=True)
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    # not periodic: plain distances
    plain = minimum_image_distances(a, b, cell, np.zeros(3, bool))
    np.testing.assert_allclose(plain, np.linalg.norm(a[:, None] - b[None], axis=-1))


def ion_frame(d: float, box: float = 10.0, forces: np.ndarray | None = None) -> Structure:
    """Na at the origin, Cl at x = d (wrapped), one water far from both."""
    pos = np.array([[0.5, 0.5, 0.5], [0.5 + d, 0.5, 0.5], [3, 5, 5], [3.9, 5, 5], [2.7, 5.9, 5]])
    return Structure(
        np.array([11, 17, 8, 1, 1]),
        pos % box,
        np.eye(3) * box,
        np.ones(3, bool),
        energy=0.0,
        forces=forces if forces is not None else np.zeros((5, 3)),
    )


def test_ion_distances_use_the_minimum_image() -> None:
    s = ion_frame(7.0)  # 7 Å apart in the box, 3 Å through the boundary
    d = ion_distances(s)
    assert d[0] == pytest.approx(3.0) and d[1] == pytest.approx(3.0)
    assert np.isnan(d[2:]).all()
    assert frame_distance(s) == pytest.approx(3.0)
    pos = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    no_anion = Structure(np.array([11, 8]), pos, np.eye(3) * 5, np.ones(3, bool))
    assert frame_distance(no_anion) == float("inf")


def test_close_contact_errors_by_hand() -> None:
    # frame 0: contact (3 Å), all errors 1; frame 1: far (6.5 Å in a 14 Å box)
    e0 = np.ones((5, 3))
    e1 = np.full((5, 3), 3.0)
    e1[:2] = 2.0  # the ions of the far frame
    frames = [ion_frame(3.0), ion_frame(6.5, box=14.0)]
    frame_d = np.array([frame_distance(s) for s in frames])
    atom_d = [ion_distances(s) for s in frames]
    got = contact_errors([e0, e1], frame_d, atom_d, threshold=6.0)
    assert got.overall == pytest.approx((15 * 1 + 6 * 2 + 9 * 3) / 30)
    assert got.contact_frames == pytest.approx(1.0)
    assert got.far_frames == pytest.approx((6 * 2 + 9 * 3) / 15)
    assert got.contact_atoms == pytest.approx(1.0)  # only frame 0's two ions are in contact
    assert (got.n_contact_frames, got.n_contact_atoms) == (1, 2)
    edges = np.array([2.0, 4.0, 6.0, 8.0])
    by_frame = binned_errors([e0, e1], frame_d, edges, per_frame=True)
    np.testing.assert_allclose(by_frame.mae, [1.0, np.nan, (6 * 2 + 9 * 3) / 15])
    np.testing.assert_array_equal(by_frame.count, [1, 0, 1])
    by_atom = binned_errors([e0, e1], atom_d, edges, per_frame=False)
    np.testing.assert_allclose(by_atom.mae, [1.0, np.nan, 2.0])
    np.testing.assert_array_equal(by_atom.count, [2, 0, 2])


# -- pool refinement and differentiable modes -----------------------------------------------------
def test_pool_refinement_inserts_the_best_midpoint_each_round() -> None:
    # frames whose ideal scales are the seed's interior points, heavier weight first
    targets = {0.5: 16.0, 0.25: 8.0, 0.75: 4.0, 0.125: 2.0, 0.375: 1.0}

    def loss(pool: list[float]) -> float:
        return sum(w * min(abs(s - t) for s in pool) for t, w in targets.items())

    result = refine_pool(loss, tol=1e-9, relative=False)
    assert result.trajectory() == [
        [0.0, 1.0],
        [0.0, 0.5, 1.0],
        [0.0, 0.25, 0.5, 1.0],
        [0.0, 0.25, 0.5, 0.75, 1.0],
        [0.0, 0.125, 0.25, 0.5, 0.75, 1.0],
        SEED_POOL,
    ]
    assert result.pool == SEED_POOL and result.stop_reason == "tolerance"
    assert result.best_loss == pytest.approx(0.0)
    # gains are 8.25, 2, 1, 0.25, 0.125: a tolerance of 0.3 stops before 0.125 is inserted
    early = refine_pool(loss, tol=0.3, relative=False)
    assert early.pool == [0.0, 0.25, 0.5, 0.75, 1.0] and early.stop_reason == "tolerance"
    # relative gains are 0.71, 0.59, 0.73, 0.67 and 1 of the loss before each insertion
    assert refine_pool(loss, tol=0.6, relative=True).pool == [0.0, 0.5, 1.0]
    assert refine_pool(loss, tol=0.5, relative=True).pool == SEED_POOL
    capped = refine_pool(loss, tol=0.0, relative=False, max_rounds=2)
    assert capped.pool == [0.0, 0.25, 0.5, 1.0] and capped.stop_reason == "max_rounds"


def test_pool_refinement_lookahead_reaches_a_deep_scale() -> None:
    # only 1/16 pays off: no first midpoint helps, so plain refinement stops at once
    def loss(pool: list[float]) -> float:
        return min(abs(s - 0.0625) for s in pool)

    plain = refine_pool(loss, tol=1e-9, relative=False)
    assert plain.pool == [0.0, 1.0] and plain.stop_reason == "tolerance"
    deep = refine_pool(loss, tol=1e-9, relative=False, lookahead=True)
    assert deep.trajectory()[-1] == [0.0, 0.0625, 0.125, 0.25, 0.5, 1.0]
    assert deep.best_loss == 0.0 and deep.stop_reason == "tolerance"
    # the look-ahead does not change the rounds of the seed-like loss above
    targets = {0.5: 16.0, 0.25: 8.0, 0.75: 4.0, 0.125: 2.0, 0.375: 1.0}
    seed_like = refine_pool(
        lambda p: sum(w * min(abs(s - t) for s in p) for t, w in targets.items()),
        tol=1e-9,
        relative=False,
        lookahead=True,
    )
    assert seed_like.pool == SEED_POOL


def synthetic_frames(scales: list[float], seed: int = 0) -> FrameSet:
    """Frames whose labels are exactly (1 - t) F_short + t F_long with t = ``scales[k]``."""
    rng = np.random.default_rng(seed)
    short, long, ref = [], [], []
    for t in scales:
        a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
        short.append(a)
        long.append(b)
        ref.append((1 - t) * a + t * b)
    n = len(scales)
    return FrameSet(short, long, ref, np.full(n, 3.0), [np.full(6, np.nan)] * n)


def test_differentiable_scale_and_pool_find_the_true_scales() -> None:
    frames = synthetic_frames([0.3] * 4)
    fit = fit_differentiable_scale(frames, init=0.5, steps=600, lr=0.05)
    assert fit["scale"] == pytest.approx(0.3, abs=1e-2)
    two = synthetic_frames([0.2, 0.2, 0.8, 0.8], seed=1)
    assert pool_loss(two, [0.0, 0.2, 0.8, 1.0]) == pytest.approx(0.0, abs=1e-12)
    scorer = PoolScorer(two)
    for pool in ([0.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.2, 0.8, 1.0]):
        assert scorer(pool) == pytest.approx(pool_loss(two, pool), abs=1e-12)
    assert list(pool_selection(two, [0.0, 0.2, 0.8, 1.0])) == [0.2, 0.2, 0.8, 0.8]
    tuned = fit_differentiable_pool(two, [0.0, 0.25, 0.75, 1.0], steps=400, lr=0.02)
    assert tuned["pool"][1] == pytest.approx(0.2, abs=2e-2)
    assert tuned["pool"][2] == pytest.approx(0.8, abs=2e-2)
    assert tuned["calibration_loss"] < pool_loss(two, [0.0, 0.25, 0.75, 1.0])
    assert gain_recovered(1.0, 0.5, 0.75) == pytest.approx(0.5)
    assert np.isnan(gain_recovered(1.0, 1.0, 0.9))


# -- branch training ------------------------------------------------------------------------------
def tiny_mixture(structures: list[Structure]):  # type: ignore[no-untyped-def]
    return build_scale_mixture(
        structures,
        short_hypers={"n_features": 8, "n_layers": 1, "cutoff": 3.0},
        long_backbone="schnet",
        long_hypers={"n_features": 8, "n_layers": 1, "cutoff": 4.5, "n_rbf": 8, "n_filters": 8},
        dtype="float64",
    )


def test_branch_model_is_one_branch_and_trains_only_it(tmp_path: Path) -> None:
    from trustpot.config import TrainConfig

    frames = [ion_frame(d, box=9.0) for d in (2.8, 3.5, 4.2, 5.0)]
    rng = np.random.default_rng(0)
    for s in frames:
        s.positions = s.positions + rng.normal(scale=0.05, size=s.positions.shape)
        s.forces = rng.normal(size=(5, 3))
        s.energy = float(rng.normal())
    mixture = tiny_mixture(frames)
    ds = GraphDataset(frames, mixture.neighbor_lists(), torch.float64)
    g, _ = next(ds.batches(4))
    both = mixture(g, {"energy", "forces", FORCES_SHORT, FORCES_LONG})
    for which, key in (("short", FORCES_SHORT), ("long", FORCES_LONG)):
        branch = BranchModel(mixture, which)
        out = branch(g, {"energy", "forces"}, create_graph=False)
        torch.testing.assert_close(out["forces"], both[key])
        trainable = {n for n, p in mixture.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(f"{which}.") or n.startswith("charges.")
                                 for n in trainable)  # fmt: skip
        branch.release()
    before = {k: v.clone() for k, v in mixture.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=2, ema_decay=0.0, seed=0)
    summary = train_branch(mixture, "short", ds, ds, cfg, tmp_path / "short", log=lambda m: None)
    after = mixture.state_dict()
    assert summary["epochs"] == 2
    assert json.loads((tmp_path / "short" / "state.json").read_text())["status"] == "done"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("short."))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("short."))
    # a rerun reuses the finished branch
    fresh = tiny_mixture(frames)
    messages: list[str] = []
    train_branch(fresh, "short", ds, ds, cfg, tmp_path / "short", log=messages.append)
    assert any("reusing" in m for m in messages)
    torch.testing.assert_close(fresh.short.state_dict(), mixture.short.state_dict())


# -- testbeds and the command ---------------------------------------------------------------------
def test_dft_testbed_manifests(tmp_path: Path) -> None:
    from trustpot.bench.scales.testbeds import prepare_dft
    from trustpot.data.splits import read_data

    folder = needs_shared("nacl_water")
    bed = prepare_dft(folder, tmp_path, max_train=20, max_valid=6,
                      max_test=10, log=lambda m: None)  # fmt: skip
    assert bed.info["excluded"] and bed.info["excluded"][0]["file"] == "revPBE0-D3_gen1b.xyz"
    assert bed.info["excluded"][0]["max_force_ev_a"] > bed.info["force_cap_ev_a"]
    manifest = json.loads((tmp_path / "splits" / "revPBE0-D3_gen1b.json").read_text())
    assert manifest["subsets"]["excluded"] == [bed.info["excluded"][0]["frame"]]
    assert not set(manifest["subsets"]["train"]) & set(manifest["subsets"]["valid"])
    assert all("gen1e" in s or "gen3" in s for s in bed.test)
    assert not any("gen1e" in s or "gen3" in s for s in bed.train + bed.valid)
    test = [s for spec in bed.test for s in read_data(spec)]
    assert 8 <= len(test) <= 12


def lj_frames(n: int, seed: int) -> list[Atoms]:
    """Na, Cl and three O-H-H groups in a 9 Å box; LJ labels (exercise the code, not physics)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        d = 2.6 + 5.0 * k / max(n - 1, 1)  # Na-Cl from contact to far (minimum image)
        pos = [[1.0, 1.0, 1.0], [1.0 + d, 1.0, 1.0]]
        for c in ([5.5, 5.0, 5.0], [2.0, 6.0, 6.5], [7.5, 3.0, 7.0]):
            pos += [c, [c[0] + 0.96, c[1], c[2]], [c[0] - 0.24, c[1] + 0.93, c[2]]]
        a = Atoms("NaClOH2OH2OH2", positions=np.array(pos), cell=[9.0] * 3, pbc=True)
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.wrap()
        a.calc = LennardJones(sigma=1.0, epsilon=0.05, rc=4.0, smooth=True)
        a.get_forces()
        frames.append(a)
    return frames


def test_scales_run_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "train.xyz", lj_frames(10, 0))
    write(tmp_path / "test.xyz", lj_frames(5, 1))
    out = tmp_path / "run"
    args = ["scales", "run", "--train", str(tmp_path / "train.xyz"), "--test",
            str(tmp_path / "test.xyz"), "--out", str(out), "--quick", "--epochs", "2",
            "--router-epochs", "1", "--short-cutoff", "3", "--long-cutoff", "4.4"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "scales.json").read_text())
    keys = [r["key"] for r in result["rows"]]
    for key in ("fixed_0", "fixed_1", "fixed_baseline", "oracle_hard_structure",
                "oracle_hard_atom", "oracle_continuous_structure", "oracle_continuous_atom",
                "pool_refined", "differentiable_scale", "router", "router_structure"):  # fmt: skip
        assert key in keys
    rows = {r["key"]: r for r in result["rows"]}
    for r in rows.values():
        assert r["overall_kjmolnm"] == pytest.approx(
            r["overall_ev_a"] * EV_PER_A_IN_KJ_PER_MOL_PER_NM
        )
    # the oracles are bounds: never worse than the end points or hard routing
    ends = min(rows["fixed_0"]["overall_ev_a"], rows["fixed_1"]["overall_ev_a"])
    assert rows["oracle_hard_structure"]["overall_ev_a"] <= ends + 1e-12
    cont = rows["oracle_continuous_structure"]["overall_ev_a"]
    assert cont <= rows["oracle_hard_structure"]["overall_ev_a"] + 1e-12
    assert rows["oracle_continuous_atom"]["overall_ev_a"] <= cont + 1e-12
    assert result["pool"]["rounds"][0]["pool"] == [0.0, 1.0]
    assert result["data"]["n_test"] == 5 and result["data"]["n_calibration"] == 2
    report = (out / "report.md").read_text()
    for r in rows.values():
        assert r["label"] in report
    assert "399.65" in report and "Final pool" in report and "| Close-contact MAE |" in report
    # each branch's plateau measure (or why there is none) is stated
    assert report.count("over the last quarter") + report.count("to judge a plateau") == 2
    assert all("val_loss_tail_gain" in b for b in result["branches"].values())
    assert "![branch learning curves](branch_curves.png)" in report
    for png in ("mae_vs_distance.png", "pool_trajectory.png", "router_vs_distance.png",
                "mae_vs_scale.png", "branch_curves.png"):  # fmt: skip
        assert (out / png).stat().st_size > 1000
    # a rerun reuses both branches and the router
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 4  # two branches, two routers
    # the report can be rebuilt from scales.json alone
    (out / "report.md").unlink()
    assert main(["scales", "report", str(out)]) == 0 and (out / "report.md").is_file()
    # other training settings in the same folder are refused, not silently reused
    changed = list(args)
    changed[changed.index("--epochs") + 1] = "3"
    assert main(changed) == 2
    assert "other settings (epochs differ)" in capsys.readouterr().err


def test_scales_run_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scales", "run", "--out", str(tmp_path / "x"), "--quick"]) == 2
    assert "--train and --test" in capsys.readouterr().err
    missing = ["scales", "run", "--testbed", "dft", "--data-dir", str(tmp_path / "none"),
               "--out", str(tmp_path / "y")]  # fmt: skip
    assert main(missing) == 2
    assert "not found" in capsys.readouterr().err


def test_scales_run_openmm_quick(tmp_path: Path) -> None:
    pytest.importorskip("openmm", reason="the OpenMM testbed needs openmm")
    out = tmp_path / "om"
    args = ["scales", "run", "--testbed", "openmm", "--quick", "--out", str(out), "--epochs",
            "2", "--router-epochs", "1"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "scales.json").read_text())
    assert result["testbed"]["name"] == "openmm"
    manifest = json.loads((out / "splits" / "nacl_openmm.json").read_text())
    subsets = manifest["subsets"]
    assert set(subsets) == {"train", "valid", "test"}
    assert not set(subsets["train"]) & set(subsets["test"])
    assert result["data"]["n_test"] == len(subsets["test"])


def test_contact_start_places_the_first_ion_pair_on_neighbouring_sites() -> None:
    from trustpot.engines.nacl_water import _contact_order

    for seed in range(20):
        grid, n_pairs = 4, 3
        order = _contact_order(grid, n_pairs, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(grid**3))
        na = np.array(np.unravel_index(order[0], (grid,) * 3))
        cl = np.array(np.unravel_index(order[n_pairs], (grid,) * 3))
        step = (cl - na) % grid
        step = np.minimum(step, grid - step)
        assert step.sum() == 1  # one lattice step along one axis (periodic)
