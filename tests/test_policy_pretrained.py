"""Trust policies on the pretrained adapters when wrapped: PROBE on CHGNet, perturbations of
CHGNet (P-CHGNet) and an ensemble of two CHGNet fine-tunes, each built by the command line
(``trustpot uq fit probe --from chgnet``, ``uq fit perturb --from chgnet``, ``trustpot
finetune --from chgnet`` then ``uq fit ensemble --members``) on a few frames of the EDI silica
zeolite (15 atoms), then run under the policies through ASE dynamics and ``trustpot md``.

The signal's quality is the policy benchmark's business (``benchmarks/policy.py --foundation``);
here the thresholds are set from a first run without rules, so that the rule first holds at a
known step k > 0, and the second run must halt exactly there, with the trajectory kept. Skipped
without the chgnet extra or the shared zeolite data.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.io import Trajectory, read, write
from ase.md.langevin import Langevin
from conftest import needs_shared

from trustpot.calculator import TrustpotCalculator
from trustpot.cli.main import main
from trustpot.data.reader import read_atoms
from trustpot.errors import ConfigError
from trustpot.monitor import TrustHalt, TrustMonitor, capabilities
from trustpot.policy import TrustPolicy, sigma_for_exceedance

pytest.importorskip("chgnet", reason="the CHGNet adapter needs 'pip install trustpot[chgnet]'")
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

STEPS = 16  # MD steps of every run
#: the model kind each wrapper reports (named in refusals)
KINDS = {
    "probe": "uq:probe (base pretrained:chgnet)",
    "perturb": "uq:perturb (base pretrained:chgnet)",
    "ensemble": "uq:ensemble (base finetuned)",
}
TEMPERATURE = 1500.0  # K: a hot start


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``uq.ckpt`` of each wrapper kind around CHGNet, and ``start``: an EDI frame (not among
    the fitting frames) compressed to 0.97 of its cell, the distorted start."""
    zeolite = needs_shared("sio2_zeolites", "train_topology_EDI.xyz.gz")
    frames = read_atoms(zeolite, "::40")
    folder = tmp_path_factory.mktemp("wrapped")
    train, cal, start = folder / "train.xyz", folder / "cal.xyz", folder / "start.xyz"
    write(train, frames[:4], format="extxyz")
    write(cal, frames[4:14], format="extxyz")  # 10: PROBE's minimum
    first = Atoms(numbers=frames[20].numbers, positions=frames[20].positions,
                  cell=frames[20].cell, pbc=True)  # fmt: skip
    first.set_cell(first.cell * 0.97, scale_atoms=True)
    write(start, first, format="extxyz")
    common = ["--calibration", str(cal)]
    runs = {
        "probe": ["uq", "fit", "probe", "--from", "chgnet", "--epochs", "3", *common],
        "perturb": ["uq", "fit", "perturb", "--from", "chgnet", "--train", str(train),
                    "--epochs", "1", "--batch-size", "2", "--n-samples-train", "2",
                    "--n-samples", "3", "--lr", "1e-3", *common],
    }  # fmt: skip
    for name, argv in runs.items():
        assert main([*argv, "--out", str(folder / name)]) == 0, name
    members = []
    for seed in (0, 1):
        run = folder / f"finetune_{seed}"
        argv = ["finetune", "--from", "chgnet", "--train", str(train), "--epochs", "1"]
        assert main([*argv, "--seed", str(seed), "--no-maps", "--out", str(run)]) == 0
        members.append(str(run / "best.ckpt"))
    argv = ["uq", "fit", "ensemble", "--members", *members, *common]
    assert main([*argv, "--out", str(folder / "ensemble")]) == 0
    return {**{k: folder / k / "uq.ckpt" for k in ("probe", "perturb", "ensemble")},
            "start": start}  # fmt: skip


def _calculator(path: Path) -> TrustpotCalculator:
    return TrustpotCalculator.from_checkpoint(path)


def _dynamics(atoms: Atoms) -> Langevin:
    """A seeded hot Langevin run (the same trajectory every time in one process)."""
    from ase.md import velocitydistribution as vd

    rng = np.random.default_rng(0)
    # ASE >= 3.29 renamed MaxwellBoltzmannDistribution thermalize_momenta
    thermalize = getattr(vd, "thermalize_momenta", vd.MaxwellBoltzmannDistribution)
    thermalize(atoms, temperature_K=TEMPERATURE, rng=rng)
    return Langevin(atoms, 0.5 * units.fs, temperature_K=TEMPERATURE, friction=0.01 / units.fs,
                    rng=rng, fixcm=False)  # fmt: skip


def _first_rise(values: list[float], larger_is_worse: bool) -> tuple[int, float]:
    """The first step k > 0 whose value is worse than every earlier one by 2%, and a threshold
    halfway between them: a rule on it first holds at step k."""
    sign = 1.0 if larger_is_worse else -1.0
    worst = sign * values[0]
    for k, v in enumerate(values[1:], start=1):
        if sign * v > worst * (1.02 if worst > 0 else 0.98):
            return k, sign * (worst + sign * v) / 2
        worst = max(worst, sign * v)
    raise AssertionError(f"no step worse than all earlier ones: {values}")


def _rule(kind: str, series: dict[str, list[float]]) -> tuple[int, str, float]:
    """(step k, rule, the std or reliability it fires at) for the wrapper's natural halt."""
    if kind == "probe":
        k, r = _first_rise(series["reliability"], larger_is_worse=False)
        return k, f"reliability<{r:.6g}", float(f"{r:.6g}")
    k, sigma = _first_rise(series["forces_std"], larger_is_worse=True)
    t = float(f"{sigma * sigma_for_exceedance(1.0, 0.5) ** -1:.6g}")  # fires at sigma
    return k, f"force-error>{t:g}@0.5", sigma_for_exceedance(t, 0.5)


# -- what each wrapped kind evaluates -------------------------------------------------------
@pytest.mark.parametrize("kind", ["probe", "perturb", "ensemble"])
def test_wrapped_adapters_evaluate_the_rules_they_can(kind: str, wrapped: dict[str, Path]) -> None:
    atoms = read(wrapped["start"])
    atoms.calc = _calculator(wrapped[kind])
    rules = ["reliability<1"] + ([] if kind == "probe" else ["force-std>1e-9"])
    lines: list[str] = []
    monitor = TrustMonitor(TrustPolicy.from_specs(warn=rules), atoms, log=lines.append)
    monitor()
    assert monitor.counts["warn"] == len(rules) and len(lines) == len(rules)
    assert capabilities(atoms.calc)[1] == KINDS[kind]
    if kind == "probe":  # a std rule is refused, naming the wrapped adapter
        with pytest.raises(ConfigError, match=r"uq:probe \(base pretrained:chgnet\) gives no"):
            TrustMonitor(TrustPolicy.from_specs(halt=["force-std>0.1"]), atoms)
    else:  # recalibrated by --calibration: the probability rule is allowed
        TrustMonitor(TrustPolicy.from_specs(halt=["force-error>0.3@0.95"]), atoms)


def test_an_unwrapped_adapter_is_refused_with_the_way_to_wrap_it(
    wrapped: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["md", "chgnet", str(wrapped["start"]), "--steps", "2", "--temperature", "300"]
    assert main([*argv, "--out", str(tmp_path / "md.xyz"), "--halt", "force-std>0.1"]) == 2
    err = capsys.readouterr().err
    assert "a model of kind pretrained:chgnet gives no forces_std" in err
    assert "wrap the model first: trustpot uq fit METHOD --from MODEL" in err


# -- halts through ASE dynamics -------------------------------------------------------------
def _series(path: Path, start: Path) -> dict[str, list[float]]:
    """Per-step reliability and largest force std of a run without rules."""
    atoms = read(start)
    atoms.calc = _calculator(path)
    dyn = _dynamics(atoms)
    out: dict[str, list[float]] = {"reliability": [], "forces_std": []}

    def record() -> None:
        res = atoms.calc.results
        out["reliability"].append(float(res["reliability"]))
        out["forces_std"].append(float(np.max(res.get("forces_std", [np.nan]))))

    dyn.attach(record, interval=1)
    dyn.run(STEPS)
    return out


@pytest.mark.parametrize("kind", ["probe", "perturb"])
def test_ase_dynamics_halt_at_the_first_step_the_rule_holds(
    kind: str, wrapped: dict[str, Path], tmp_path: Path
) -> None:
    k, rule, value = _rule(kind, _series(wrapped[kind], wrapped["start"]))
    atoms = read(wrapped["start"])
    atoms.calc = _calculator(wrapped[kind])
    dyn = _dynamics(atoms)
    harvest = tmp_path / "harvest.xyz"
    policy = TrustPolicy.from_specs(halt=[rule], harvest=[rule])
    dyn.attach(TrustMonitor(policy, atoms, dyn, harvest_file=harvest), interval=1)
    traj = Trajectory(str(tmp_path / "md.traj"), "w", atoms)
    dyn.attach(traj.write, interval=3)  # after the monitor: a halted frame is never written
    with pytest.raises(TrustHalt) as exc:
        dyn.run(STEPS)
    traj.close()
    event = exc.value.event
    assert event.step == k and event.atom is not None
    assert len(read(tmp_path / "md.traj", ":")) == math.ceil(k / 3)  # steps 0, 3, ... < k
    message = str(exc.value)
    assert message.startswith(f"step {k}: ") and f"atom {event.atom} (" in message
    if kind == "probe":  # the reliability and the most important atom
        assert f"reliability {event.value:.3g} < " in message and "most important" in message
        assert event.value < value
    else:  # the probability, at the atom whose calibrated std crossed
        assert "P(|force error| > " in message and event.value >= 0.5
    (frame,) = read(harvest, ":")  # the halted frame, also harvested
    assert frame.info["trust_step"] == k and frame.info["trust_atom"] == event.atom


# -- trustpot md ----------------------------------------------------------------------------
def _csv(path: Path) -> dict[str, list[float]]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return {
        "reliability": [float(r["reliability"]) for r in rows],
        "forces_std": [float(r["max_forces_std_eV_per_A"]) for r in rows],
    }


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["probe", "ensemble"])
def test_md_warns_harvests_and_halts_a_wrapped_adapter(
    kind: str, wrapped: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    md: Callable[..., int] = lambda *extra: main(  # noqa: E731
        ["md", str(wrapped[kind]), str(wrapped["start"]), "--steps", str(STEPS),
         "--temperature", f"{TEMPERATURE:g}", "--seed", "3", *extra]
    )  # fmt: skip
    free = tmp_path / "free.xyz"
    assert md("--interval", "1", "--out", str(free)) == 0
    k, rule, _ = _rule(kind, _csv(Path(f"{free}.reliability.csv")))
    warn = "reliability<1" if kind == "probe" else "force-std>1e-9"
    traj = tmp_path / "md.xyz"
    capsys.readouterr()
    argv = ["--interval", "2", "--out", str(traj), "--warn", warn, "--harvest", warn]
    assert md(*argv, "--halt", rule) == 3
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith(f"trustpot: halted at step {k}: ") and f"[--halt {rule}]" in last
    assert " atom " in last  # the atom at fault (PROBE: the most important one)
    frames = read(traj, ":")
    assert len(frames) == math.ceil(k / 2) and f"trajectory kept: {traj} ({len(frames)} " in last
    sampled = list(range(0, k + 1, 2))  # warn and harvest run on the written frames' steps
    assert [int(line.split("step ")[1].split(":")[0]) for line in err[:-1]] == sampled
    harvested = read(f"{traj}.harvest.xyz", ":")  # the halted frame too (once)
    assert [f.info["trust_step"] for f in harvested] == sorted({*sampled, k})
    assert all("pred_forces" in f.arrays for f in harvested)
    if kind == "ensemble":
        assert all(f.arrays["forces_std"].shape == (len(f),) for f in harvested)


def test_md_halting_at_the_start_says_no_frame_was_written(
    wrapped: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traj = tmp_path / "md.xyz"
    argv = ["md", str(wrapped["probe"]), str(wrapped["start"]), "--steps", "3"]
    argv += ["--temperature", "300", "--out", str(traj), "--halt", "reliability<1"]
    assert main(argv) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("trustpot: halted at step 0: reliability ")
    assert last.endswith(f"no frame written to {traj} (the start frame itself halted)")
    assert not traj.exists()
