"""Trust policies: the probability maths, the rule grammar, the ASE monitor (warn, harvest,
halt, non-finite values) on stored wrapper checkpoints, and ``trustpot md`` halting a hot
start of a small trained ensemble."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.io import read, write
from ase.md.verlet import VelocityVerlet
from conftest import labelled_molecules
from scipy import stats

from trustpot.calculator import TrustpotCalculator
from trustpot.cli.main import main
from trustpot.data.reader import read_structures
from trustpot.errors import ConfigError
from trustpot.md import run_md
from trustpot.monitor import TrustHalt, TrustMonitor, append_frame
from trustpot.policy import (
    TrustPolicy,
    TrustRule,
    force_error_exceedance,
    parse_rule,
    sigma_for_exceedance,
)

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


def _atoms(kind: str) -> Any:
    (s,) = read_structures(FIXTURES / "frames.xyz", use_cache=False, index=0)
    atoms = s.to_atoms(with_labels=False)
    atoms.calc = TrustpotCalculator.from_checkpoint(FIXTURES / f"{kind}.ckpt")
    return atoms


# -- probability maths ----------------------------------------------------------------------
def test_force_error_probability_is_the_chi3_survival_function() -> None:
    # hand value: x = 1, erfc(1/sqrt 2) + sqrt(2/pi) exp(-1/2) = 0.317311 + 0.483941
    assert force_error_exceedance(1.0, np.array([1.0]))[0] == pytest.approx(0.801252, abs=1e-6)
    sigma = np.array([0.01, 0.05, 0.1, 0.3, 1.0, 10.0])
    expected = stats.chi(3).sf(0.15 / sigma)
    np.testing.assert_allclose(force_error_exceedance(0.15, sigma), expected, atol=1e-12)
    assert force_error_exceedance(0.15, np.array([0.0]))[0] == 0.0  # no spread, no error


def test_force_error_probability_matches_sampled_gaussian_errors() -> None:
    """At the std where ``force-error>T@P`` starts to fire, a fraction P of sampled 3D
    Gaussian force errors is longer than T."""
    rng = np.random.default_rng(0)
    for t, p in ((0.15, 0.95), (0.3, 0.5), (0.1, 0.05)):
        sigma = sigma_for_exceedance(t, p)
        assert force_error_exceedance(t, np.array([sigma]))[0] == pytest.approx(p, abs=1e-9)
        errors = rng.normal(scale=sigma, size=(200_000, 3))
        assert np.mean(np.linalg.norm(errors, axis=1) > t) == pytest.approx(p, abs=0.005)
    assert sigma_for_exceedance(0.15, 0.95) == pytest.approx(0.15 / 0.593166, rel=1e-5)


# -- grammar --------------------------------------------------------------------------------
def test_rules_parse_and_print_back() -> None:
    rule = parse_rule(" force-error > 0.15 @ 0.95 ", "halt", "--halt")
    assert rule == TrustRule("halt", "force-error", 0.15, 0.95, "--halt")
    assert rule.spec == "force-error>0.15@0.95" and rule.label == "--halt force-error>0.15@0.95"
    for text in ("force-std>0.2", "frame-force-std>0.1", "reliability<0.5"):
        assert parse_rule(text, "warn").spec == text
    policy = TrustPolicy.from_specs(warn=["force-std>0.05"], halt=["reliability<0.2"])
    assert [r.action for r in policy.rules] == ["warn", "halt"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("force-eror>0.1@0.9", "unknown quantity 'force-eror'"),
        ("force-std<0.2", "takes '>'"),
        ("reliability>0.5", "takes '<'"),
        ("force-error>0.15", "needs a probability"),
        ("force-std>0.2@0.9", "takes no '@'"),
        ("force-error>0.15@1.5", r"probability must be in \(0, 1\)"),
        ("force-std>-1", "positive"),
        ("reliability<1.5", r"in \(0, 1\]"),
        ("force-std>abc", "'abc' is not a number"),
        ("force-std>nan", "finite"),
        ("0.2", "not a rule"),
        ("force-std", "quote the rule"),  # `--halt force-std>0.2` unquoted in a shell
    ],
)
def test_bad_rules_are_refused_naming_the_flag(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        parse_rule(text, "harvest", "--harvest")
    assert str(err.value).startswith(f"--harvest '{text}'")


# -- what a model kind can provide ----------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "rule", "match"),
    [
        ("uq-probe", "force-std>0.2", "kind uq:probe .*gives no forces_std"),
        ("uq-probe", "force-error>0.2@0.9", "kind uq:probe .*gives no forces_std"),
        ("potential", "reliability<0.5", "kind potential gives no reliability"),
        ("potential", "frame-force-std>0.1", "kind potential gives no forces_std"),
    ],
)
def test_a_quantity_the_model_lacks_is_refused(kind: str, rule: str, match: str) -> None:
    atoms = _atoms(kind)
    with pytest.raises(ConfigError, match=match):
        TrustMonitor(TrustPolicy.from_specs(halt=[rule], flags=True), atoms)


def test_force_error_needs_a_recalibrated_std(ethanol_structures: Any) -> None:
    from trustpot.calculator import Predictor
    from trustpot.models.build import build_potential
    from trustpot.uq.ensemble import DeepEnsemble

    hypers = {"n_features": 8, "n_layers": 1, "cutoff": 4.0}
    members = [build_potential("schnet", hypers, ethanol_structures, seed=k) for k in range(2)]
    atoms = ethanol_structures[0].to_atoms(with_labels=False)
    atoms.calc = TrustpotCalculator(Predictor(DeepEnsemble(members)))
    with pytest.raises(ConfigError, match="not recalibrated"):
        TrustMonitor(TrustPolicy.from_specs(halt=["force-error>0.2@0.5"]), atoms)
    with pytest.raises(ConfigError, match=r"uq:ensemble .*gives no reliability"):
        TrustMonitor(TrustPolicy.from_specs(halt=["reliability<0.5"]), atoms)
    TrustMonitor(TrustPolicy.from_specs(halt=["force-std>0.2"]), atoms)  # the raw std: allowed


WRAPPERS = sorted(p.stem for p in FIXTURES.glob("uq-*.ckpt"))  # one stored file per kind


def test_the_fixtures_cover_every_wrapper_kind() -> None:
    from trustpot.registry import names

    assert {f"uq-{n}" for n in names("uq")} == set(WRAPPERS)


@pytest.mark.parametrize("kind", WRAPPERS)
def test_every_wrapper_kind_evaluates_its_rules(kind: str) -> None:
    atoms = _atoms(kind)
    rules = ["reliability<1"] + ([] if kind == "uq-probe" else ["force-std>1e-9"])
    monitor = TrustMonitor(TrustPolicy.from_specs(warn=rules), atoms, log=lambda line: None)
    monitor()
    assert monitor.counts["warn"] == len(rules)
    assert set(monitor.first_fired) == {parse_rule(r, "warn").label for r in rules}


# -- actions --------------------------------------------------------------------------------
def test_warn_logs_one_line_per_rule_on_sampled_steps() -> None:
    atoms = _atoms("uq-ensemble")
    lines: list[str] = []
    dyn = VelocityVerlet(atoms, 0.5 * 0.09822694788464063)  # 0.5 fs in ASE time units
    policy = TrustPolicy.from_specs(warn=["force-std>1e-6", "frame-force-std>1e6"])
    dyn.attach(TrustMonitor(policy, atoms, dyn, log=lines.append, sample_interval=2), interval=1)
    dyn.run(4)
    assert [line.split(":")[2].strip() for line in lines] == ["step 0", "step 2", "step 4"]
    assert all(line.startswith("trustpot: warning: step") for line in lines)
    assert "force std" in lines[0] and lines[0].endswith("[warn force-std>1e-06]")


def test_harvest_appends_frames_with_provenance_that_survive_reopening(tmp_path: Path) -> None:
    atoms = _atoms("uq-mc-dropout")
    harvest = tmp_path / "harvest.xyz"
    policy = TrustPolicy.from_specs(harvest=["force-std>1e-6", "reliability<1"])
    monitor = TrustMonitor(policy, atoms, harvest_file=harvest, source="md.xyz")
    for k in range(3):
        atoms.positions[0, 0] += 0.01 * k
        monitor()
    # a frame cut short by a kill (the last write) leaves the finished frames readable
    with open(harvest, "a") as handle:
        handle.write("9\nProperties=species:S:1:pos:R:3\nC 0.0")
    frames = read(harvest, ":3")
    assert [f.info["trust_step"] for f in frames] == [0, 1, 2]
    first = frames[0]
    assert first.info["trust_rules"] == "harvest force-std>1e-06;harvest reliability<1"
    std = first.arrays["forces_std"]
    assert first.info["trust_score"] == pytest.approx(std.max())
    assert first.info["trust_atom"] == int(np.argmax(std))
    assert first.info["trust_source"] == "md.xyz" and 0 <= first.info["reliability"] <= 1
    assert first.arrays["pred_forces"].shape == (len(atoms), 3)
    assert first.calc is None  # predictions are not labels
    assert monitor.counts["harvest"] == 6


def test_harvest_needs_a_file() -> None:
    with pytest.raises(ConfigError, match=r"harvest force-std>0\.1: harvest rules need"):
        TrustMonitor(TrustPolicy.from_specs(harvest=["force-std>0.1"]), _atoms("uq-ensemble"))


def test_append_frame_is_one_write(tmp_path: Path) -> None:
    path = tmp_path / "a.xyz"
    for k in range(2):
        a = labelled_molecules(1, seed=k)[0]
        a.calc = None
        append_frame(path, a)
    assert len(read(path, ":")) == 2


def test_halt_keeps_the_trajectory_and_names_step_atom_and_value(tmp_path: Path) -> None:
    atoms = _atoms("uq-ensemble")
    calc = atoms.calc
    atoms.calc = None
    # halt when some atom's std reaches 1.5 times the start's largest (a 3000 K run distorts
    # the molecule, and the spread of the fixture's two members grows)
    calc.calculate(atoms.copy(), ["energy", "forces"])
    start = float(calc.results["forces_std"].max())
    harvest = tmp_path / "h.xyz"
    policy = TrustPolicy.from_specs(
        halt=[f"force-std>{start * 1.5:.6g}"], harvest=["force-std>1e9"]
    )
    with pytest.raises(TrustHalt) as exc:
        run_md(calc, atoms, 400, 3000, tmp_path / "md.xyz", interval=5, policy=policy,
               harvest_file=harvest)  # fmt: skip
    halt = exc.value
    step, frames = halt.event.step, read(tmp_path / "md.xyz", ":")
    assert step > 0 and len(frames) == math.ceil(step / 5) == halt.stats["frames"]
    assert halt.stats["steps"] == step
    message = str(halt)
    assert message.startswith(f"step {step}: atom {halt.event.atom} (")
    assert f"force std {halt.event.value:.3g} eV/Å" in message
    assert [f.info["trust_step"] for f in read(harvest, ":")] == [step]  # the halted frame


def test_non_finite_forces_halt_before_the_frame_is_written(tmp_path: Path) -> None:
    atoms = _atoms("potential")
    calc = atoms.calc
    atoms.calc = None
    predict = calc.predictor.predict_graph  # what the calculator calls once per step
    calls = {"n": 0}

    def broken(g: Any, outputs: Any) -> Any:
        calls["n"] += 1
        (res,) = predict(g, outputs)
        if calls["n"] > 8:
            res["forces"][2] = np.nan
        return [res]

    calc.predictor.predict_graph = broken
    with pytest.raises(TrustHalt, match=r"atom 2 \(O\): non-finite forces \[non-finite check\]"):
        run_md(calc, atoms, 20, 300, tmp_path / "md.xyz", interval=1, thermostat="nve")
    frames = read(tmp_path / "md.xyz", ":")
    assert all(np.isfinite(f.positions).all() for f in frames) and len(frames) >= 1


# -- trustpot md ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small SchNet models trained on ethanol rattled by 0.03 Å (EMT), recalibrated on
    held-out frames of the same kind: agreement near equilibrium, disagreement far from it."""
    folder = tmp_path_factory.mktemp("policy")
    write(folder / "train.xyz", labelled_molecules(30, seed=1, scale=0.03), format="extxyz")
    write(folder / "cal.xyz", labelled_molecules(10, seed=2, scale=0.03), format="extxyz")
    argv = ["uq", "fit", "ensemble", "--train", str(folder / "train.xyz"), "--n-models", "2"]
    argv += ["--calibration", str(folder / "cal.xyz"), "--model", "schnet", "--epochs", "60"]
    argv += ["--lr", "5e-3", "--valid-fraction", "0.1", "-o", "model.hypers.n_features=16"]
    argv += ["-o", "model.hypers.cutoff=4.0", "-o", "train.threads=1", "--out", str(folder)]
    assert main(argv) == 0
    return folder / "uq.ckpt"


@pytest.mark.integration
def test_md_halts_a_hot_start_with_one_line_and_keeps_the_trajectory(
    trained_ensemble: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = tmp_path / "start.xyz"
    write(start, labelled_molecules(1, scale=0.0), format="extxyz")  # equilibrium: in domain
    traj = tmp_path / "md.xyz"
    argv = ["md", str(trained_ensemble), str(start), "--steps", "400", "--temperature", "2000"]
    argv += ["--interval", "2", "--out", str(traj), "--warn", "force-std>0.3"]
    argv += ["--harvest", "force-error>0.3@0.5", "--halt", "force-error>0.5@0.95"]
    capsys.readouterr()
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("trustpot: halted at step ") and "trajectory kept" in last
    step = int(last.split("step ")[1].split(":")[0])
    assert 0 < step < 400
    assert "P(|force error| > 0.5 eV/Å) = " in last and "[--halt force-error>0.5@0.95]" in last
    assert all(line.startswith("trustpot: warning: step") for line in err[:-1])
    frames = read(traj, ":")
    assert len(frames) == math.ceil(step / 2) and f"({len(frames)} frames)" in last
    harvested = read(str(traj) + ".harvest.xyz", ":")
    assert harvested[-1].info["trust_step"] == step
    assert all(f.info["trust_step"] % 2 == 0 for f in harvested[:-1])
    # against the labels (EMT): the start is predicted within 0.5 eV/Å, the halted frame not
    for frame, above in ((frames[0], False), (harvested[-1], True)):
        labelled = frame.copy()
        labelled.calc = EMT()
        predicted = frame.arrays.get("pred_forces")
        if predicted is None:
            frame.calc = TrustpotCalculator.from_checkpoint(trained_ensemble)
            predicted = frame.get_forces()
        error = np.linalg.norm(labelled.get_forces() - predicted, axis=1)
        assert (error.max() > 0.5) == above, error
    # the same run without the halt goes to the end
    assert main([*argv[:-2], "--out", str(tmp_path / "free.xyz")]) == 0


def test_md_refuses_a_rule_the_checkpoint_cannot_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["md", str(FIXTURES / "uq-probe.ckpt"), str(FIXTURES / "frames.xyz"), "--steps", "2"]
    argv += ["--temperature", "300", "--out", str(tmp_path / "md.xyz")]
    assert main([*argv, "--halt", "force-std>0.2"]) == 2
    expected = "--halt force-std>0.2: a model of kind uq:probe (base potential) gives no forces_std"
    assert expected in capsys.readouterr().err
    assert main([*argv, "--halt", "force-std<0.2"]) == 2
    assert "--halt 'force-std<0.2': force-std takes '>'" in capsys.readouterr().err
    assert main([*argv, "--harvest-file", "h.xyz"]) == 2
    assert "--harvest-file needs at least one --harvest RULE" in capsys.readouterr().err
    # --stop-below is the older spelling of --halt reliability<R
    assert main([*argv, "--stop-below", "1"]) == 3
    assert "[--stop-below reliability<1]" in capsys.readouterr().err


def test_the_monitor_works_with_an_optimizer() -> None:
    """Any ASE dynamics: a BFGS relaxation of a compressed molecule halts at step 0."""
    from ase.optimize import BFGS

    atoms = _atoms("uq-ensemble")
    atoms.positions *= 0.8
    opt = BFGS(atoms, logfile=None)
    opt.attach(TrustMonitor(TrustPolicy.from_specs(halt=["force-std>1e-6"]), atoms, opt))
    with pytest.raises(TrustHalt, match=r"^step 0: atom \d+ \("):
        opt.run(fmax=1e-6, steps=5)


def test_md_statistics_print_as_valid_json() -> None:
    """A run halted at its first step has no reliability yet: null, not NaN (invalid JSON)."""
    import json

    from trustpot.cli.main import _finite_or_null

    text = json.dumps(_finite_or_null({"min_reliability": float("nan"), "steps": 0.0}))
    assert json.loads(text) == {"min_reliability": None, "steps": 0.0}
