"""``trustpot learn``: selection, options, provenance, resume, and the quick run end to end.

The loop tests use the N-body engine (exact labels, no extra package, milliseconds per frame);
the ``--quick`` run uses GFN2-xTB and skips without the ``xtb`` extra.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase.io import read

from trustpot import keys as K
from trustpot.cli.main import main
from trustpot.errors import ConfigError, DataError
from trustpot.learn.options import LearnOptions, quick_values
from trustpot.learn.rounds import CALIBRATION, TRAIN, split_roles
from trustpot.learn.select import (
    farthest_point_sampling,
    frame_score,
    pool_size,
    select_diverse,
    select_random,
    structure_descriptors,
    top_k,
)

HAVE_XTB = find_spec("tblite") is not None and find_spec("rdkit") is not None


# -- selection -----------------------------------------------------------------------------
def test_top_k_orders_by_score_then_index_with_nan_last() -> None:
    scores = [0.2, np.nan, 0.9, 0.2, 0.5]
    assert top_k(scores, 3) == [2, 4, 0]
    assert top_k(scores, 10) == [2, 4, 0, 3, 1]
    assert top_k(scores, 0) == []


def test_farthest_point_sampling_picks_one_frame_per_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + 0.01 * rng.normal(size=(5, 2)) for c in centres])
    picked = farthest_point_sampling(points, 3, first=0)
    assert picked[0] == 0
    assert sorted(i // 5 for i in picked) == [0, 1, 2]  # one from each cluster
    assert farthest_point_sampling(points, 50) == sorted(
        farthest_point_sampling(points, 50), key=farthest_point_sampling(points, 50).index
    )
    assert len(set(farthest_point_sampling(points, 50))) == len(points)


def test_select_diverse_spreads_the_top_scores_over_the_embedding_space() -> None:
    """The 6 highest scores are near-copies (consecutive MD frames); top-k takes 3 of them,
    FPS over a pool of 4 x 3 takes the best one and then frames elsewhere."""
    rng = np.random.default_rng(1)
    copies = 0.001 * rng.normal(size=(6, 4))
    others = rng.normal(size=(10, 4)) * 5
    desc = np.concatenate([copies, others])
    scores = np.concatenate([np.linspace(1.0, 0.9, 6), np.linspace(0.8, 0.1, 10)])
    assert select_diverse(scores, desc, 3, pool_factor=1.0) == [0, 1, 2]  # plain top-k
    diverse = select_diverse(scores, desc, 3, pool_factor=4.0)
    assert diverse[0] == 0  # starts from the highest score
    assert sum(i < 6 for i in diverse) == 1  # one of the near-copies only
    pool = set(top_k(scores, pool_size(3, 4.0)))
    assert set(diverse) <= pool  # and only among the top-scoring candidates
    assert pool_size(3, 0.5) == 3 and pool_size(3, 4.0) == 12


def test_random_selection_is_seeded_and_without_repeats() -> None:
    a = select_random(20, 5, seed=3)
    assert a == select_random(20, 5, seed=3) != select_random(20, 5, seed=4)
    assert len(set(a)) == 5 and all(0 <= i < 20 for i in a)
    assert sorted(select_random(3, 5, seed=0)) == [0, 1, 2]


def test_structure_descriptors_average_per_element() -> None:
    emb = [np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), np.array([[7.0, 8.0]])]
    numbers = [np.array([1, 1, 8]), np.array([8])]
    d = structure_descriptors(emb, numbers, species=[1, 6, 8])
    assert d.shape == (2, 6)
    np.testing.assert_allclose(d[0], [2.0, 3.0, 0.0, 0.0, 5.0, 6.0])
    np.testing.assert_allclose(d[1], [0.0, 0.0, 0.0, 0.0, 7.0, 8.0])


def test_frame_score_reads_the_std_before_recalibration() -> None:
    pred: dict[str, Any] = {
        K.FORCES_STD: np.array([0.5, 0.5]),
        K.FORCES_STD_RAW: np.array([0.1, 0.3]),
        K.RELIABILITY: 0.25,
    }
    assert frame_score(pred, "max-std") == pytest.approx(0.3)
    assert frame_score(pred, "mean-std") == pytest.approx(0.2)
    assert frame_score(pred, "reliability") == pytest.approx(0.75)
    assert frame_score({K.FORCES_STD: np.array([0.4])}, "max-std") == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="reliability"):
        frame_score({K.FORCES_STD: np.array([0.4])}, "reliability")


def test_split_roles_holds_out_a_seeded_share() -> None:
    roles = split_roles(10, 0.2, seed=0)
    assert roles.count(CALIBRATION) == 2 and roles == split_roles(10, 0.2, seed=0)
    assert split_roles(10, None, seed=0) == [TRAIN] * 10
    assert split_roles(6, 0.1, seed=0, minimum=2).count(CALIBRATION) == 2
    assert split_roles(1, 0.5, seed=0) == [TRAIN]


# -- options -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"engine": "nbody", "smiles": ("CCO",)}, "--smiles"),
        ({"particles": (3,)}, "--particles"),
        ({"uq": "probe", "n_models": 3}, "--n-models"),
        ({"uq": "ensemble", "uq_minutes": 1.0}, "--uq-minutes"),
        ({"uq": "random", "baseline": True}, "--baseline"),
        ({"uq": "random", "pool_factor": 2.0}, "--pool-factor"),
        ({"uq": "probe", "score": "max-std"}, "--score"),
        ({"pool_factor": 0.0}, "--pool-factor"),
        ({"calibration_fraction": 1.0}, "--calibration-fraction"),
        ({"interval": 50, "md_steps": 20}, "--interval"),
        ({"initial": "a.xyz", "initial_frames": 4}, "--initial-frames"),
        ({"min_distance": 1.5}, "--min-distance"),
        ({"overrides": ("train.nothing=1",)}, "train.nothing"),
    ],
)
def test_bad_options_name_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        LearnOptions(out="x", **kwargs)


def test_quick_preset_never_overrides_what_was_given() -> None:
    opts = LearnOptions(**quick_values({"out": "x", "rounds": 5, "overrides": ("train.lr=0.1",)}))
    assert opts.quick and opts.rounds == 5 and opts.baseline and opts.smiles == ("CO", "CC")
    assert opts.overrides[-1] == "train.lr=0.1"  # the user's -o comes last, so it wins
    nbody = LearnOptions(**quick_values({"out": "x", "engine": "nbody", "uq": "random"}))
    assert nbody.particles and not nbody.baseline and nbody.smiles == ()


def test_missing_systems_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["learn", "--out", str(tmp_path / "al")]) == 2
    assert "--smiles" in capsys.readouterr().err


# -- the loop (N-body engine) --------------------------------------------------------------
def _nbody_argv(out: Path, rounds: int) -> list[str]:
    return [
        "learn",
        "--engine",
        "nbody",
        "--particles",
        "3",
        "--temperature",
        "600",
        "--initial-frames",
        "8",
        "--test-frames",
        "6",
        "--rounds",
        str(rounds),
        "--per-round",
        "3",
        "--walkers",
        "1",
        "--md-steps",
        "20",
        "--interval",
        "2",
        "--n-models",
        "2",
        "--epochs",
        "3",
        "--max-minutes",
        "1",
        "--workers",
        "0",
        "-o",
        "model.hypers.n_features=8",
        "-o",
        "model.hypers.n_layers=1",
        "--quiet",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_resume_reuses_finished_rounds_and_frames_keep_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "al"
    assert main(_nbody_argv(out, 1)) == 0
    fit0 = out / "rounds" / "00" / "fit" / "state.json"
    first = fit0.read_text()
    assert (out / "rounds" / "01" / "fit" / "state.json").is_file()
    capsys.readouterr()
    # a kill while labelling round 1: its acquire step is unfinished and a frame is missing
    acquire = out / "rounds" / "00" / "acquire"
    for step in (acquire, acquire / "label"):
        state = json.loads((step / "state.json").read_text())
        (step / "state.json").write_text(json.dumps({**state, "status": "running"}))
    labelled = acquire / "label" / "labelled.xyz"
    text = labelled.read_text().splitlines(keepends=True)
    n_atoms = int(text[0])
    labelled.write_text("".join(text[: -(n_atoms + 2)]))  # the last frame never arrived
    # rerun with one more round: round 0 is reused, its labelling resumed, round 2 added
    assert main(_nbody_argv(out, 2)) == 0
    log = capsys.readouterr().out
    assert fit0.read_text() == first
    assert "rounds/00/fit: done already, reused" in log
    assert "rounds/00/acquire/explore: done already, reused" in log
    assert "rounds/00/acquire/label: unfinished, resuming" in log
    assert (out / "rounds" / "02" / "fit" / "state.json").is_file()
    report = json.loads((out / "report.json").read_text())
    (ens,) = report["strategies"]
    assert [r["round"] for r in ens["rounds"]] == [0, 1, 2]
    assert [r["labels"] for r in ens["rounds"]] == [8, 11, 14]
    frames = read(str(out / "data.xyz"), ":")
    assert len(frames) == 14 == len({a.info["al_id"] for a in frames})
    explored = [a for a in frames if a.info["al_round"] >= 0]
    assert len(explored) == 6
    for a in explored:
        assert a.info["engine"] == "trustpot-nbody" and a.info["al_source"] == "md"
        assert a.info["al_role"] in (TRAIN, CALIBRATION)
        assert a.info["al_source_step"] % 2 == 0
        assert a.info["al_seed_frame"].startswith("start:")  # walkers start from engine frames
        assert np.isfinite(a.info["al_score"]) and a.get_forces().shape == (3, 3)
    assert {a.info["al_round"] for a in frames} == {-1, 0, 1}
    assert all(a.info["al_source"] == "start" for a in frames if a.info["al_round"] == -1)
    # another exploration setting is refused, naming it, instead of mixing rounds
    assert main([*_nbody_argv(out, 2), "--walkers", "2"]) == 2
    assert "walkers" in capsys.readouterr().err


@pytest.mark.slow
def test_given_start_and_test_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--initial and --test files instead of the engine's sampling; random selection."""
    from trustpot.engines.nbody import generate_nbody

    start, test = tmp_path / "start.xyz", tmp_path / "test.xyz"
    generate_nbody([3], 5, start, [800.0], seed=1, workers=0, progress=False)
    generate_nbody([3], 4, test, [800.0], seed=2, workers=0, progress=False)
    argv = _nbody_argv(tmp_path / "al", 1)
    for flag in ("--particles", "--initial-frames", "--test-frames", "--n-models"):
        i = argv.index(flag)
        del argv[i : i + 2]
    argv += ["--uq", "random", "--initial", str(start), "--test", str(test)]
    assert main(argv) == 0
    frames = read(str(tmp_path / "al" / "data.xyz"), ":")
    assert len(frames) == 8
    given = [a for a in frames if a.info["al_round"] == -1]
    assert [a.info["frame_id"] for a in given] == [f"given-{i}" for i in range(5)]
    assert all(a.info["al_source"] == "given" and a.info["al_role"] == TRAIN for a in given)
    assert all(a.info["al_rule"] == "random" and "al_score" not in a.info for a in frames[5:])
    report = json.loads((tmp_path / "al" / "report.json").read_text())
    assert report["test"]["frames"] == 4 and report["strategies"][0]["strategy"] == "random"
    capsys.readouterr()
    test.write_text(test.read_text().replace("energy=", "energy=1", 1))  # another label
    assert main(argv) == 2
    assert "--test" in capsys.readouterr().err  # the file changed since the run used it


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGKILL while round 1 trains; the rerun ends with the frames and errors of a run that
    was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    def argv(out: Path) -> list[str]:
        args = _nbody_argv(out, 2)
        args[args.index("--epochs") + 1] = "40"
        return args

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(full)) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustpot", *argv(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = killed / "rounds" / "01" / "fit" / "models" / "member_0" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) > 3
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "rounds" / "01" / "fit" / "uq").exists()
    assert main(argv(killed)) == 0
    a, b = read(str(full / "data.xyz"), ":"), read(str(killed / "data.xyz"), ":")
    assert [x.info["al_id"] for x in a] == [y.info["al_id"] for y in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.positions, y.positions, atol=1e-8)
        assert x.get_potential_energy() == pytest.approx(y.get_potential_energy(), abs=1e-8)
    ra, rb = (json.loads((d / "report.json").read_text())["strategies"][0] for d in (full, killed))
    for x, y in zip(ra["rounds"], rb["rounds"]):
        assert x["test"]["forces_mae"] == pytest.approx(y["test"]["forces_mae"], rel=1e-6)


# -- the quick run (GFN2-xTB) --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not HAVE_XTB, reason="the xtb extra (tblite, rdkit) is not installed")
def test_quick_run_writes_learning_curves_for_uq_and_random(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    assert main(["learn", "--quick", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [s["strategy"] for s in report["strategies"]]
    assert names == ["ensemble", "random"]
    for s in report["strategies"]:
        assert len(s["rounds"]) == 3  # two labelling rounds, then the last fit
        labels = [r["labels"] for r in s["rounds"]]
        assert labels == sorted(labels) and labels[-1] > labels[0]
        assert all(np.isfinite(r["test"]["forces_mae"]) for r in s["rounds"])
    assert "spearman" in report["strategies"][0]["rounds"][0]["test"]
    assert (out / "learning_curve.png").stat().st_size > 0
    assert (out / "data.xyz").is_file() and (out / "baseline" / "data.xyz").is_file()
    assert "| ensemble |" in (out / "report.md").read_text()


def test_nacl_water_oracle_reproduces_the_engine_labels(tmp_path: Path) -> None:
    """Frames sampled by the OpenMM engine, relabelled by the oracle from their atoms alone."""
    pytest.importorskip("openmm", reason="the openmm extra is not installed")
    from trustpot.engines.nacl_water import BoxOptions, generate_nacl_water
    from trustpot.learn.engines import NaClWaterOracle

    sampled, labelled = tmp_path / "sampled.xyz", tmp_path / "labelled.xyz"
    box = BoxOptions(equilibration=20, interval=10, chunk=2)
    generate_nacl_water([1], 2, sampled, workers=0, box=box, progress=False)
    oracle = NaClWaterOracle((1,))
    oracle.check()
    summary = oracle.label(sampled, labelled, workers=0, progress=False)
    assert summary.written == 2 and summary.failed == 0
    for a, b in zip(read(str(sampled), ":"), read(str(labelled), ":")):
        assert b.info["engine"] == "openmm" and b.info["n_pairs"] == 1
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), rel=1e-6)
        scale = np.abs(a.get_forces()).max()
        assert np.abs(b.get_forces() - a.get_forces()).max() < 1e-3 * scale
    shuffled = read(str(sampled), "0")
    shuffled.numbers = shuffled.numbers[::-1]
    shuffled.write(str(tmp_path / "bad.xyz"))
    with pytest.raises(DataError, match="numbers"):
        oracle.label(tmp_path / "bad.xyz", tmp_path / "bad_out.xyz", workers=0, progress=False)
