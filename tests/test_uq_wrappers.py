"""Deep ensembles, MC dropout, recalibration, the Predictor/ASE integration and ``uq`` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule

from trustpot import keys as K
from trustpot.calculator import Predictor, TrustpotCalculator
from trustpot.cli.main import main
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.reader import read_structures
from trustpot.errors import CheckpointError, ConfigError
from trustpot.io.checkpoint import save_model
from trustpot.models.build import build_potential
from trustpot.uq.base import Recalibration, fit_logistic
from trustpot.uq.calibrate import recalibrate
from trustpot.uq.collect import collect
from trustpot.uq.ensemble import DeepEnsemble, MCDropout
from trustpot.uq.report import headline, uq_metrics

HYPERS = {"n_features": 16, "n_layers": 2, "cutoff": 4.0}


def _members(structures, n=3, backbone="schnet", **kw):
    return [build_potential(backbone, HYPERS, structures, seed=k, **kw).eval() for k in range(n)]


def _batch(model, structures):
    specs = model.neighbor_lists()
    return collate([structure_to_graph(s, specs, model.dtype) for s in structures])


@pytest.mark.parametrize("stacked", [True, False])
def test_ensemble_mean_and_std_match_members(ethanol_structures, stacked):
    members = _members(ethanol_structures)
    ens = DeepEnsemble(members, stacked=stacked).eval()
    g = _batch(ens, ethanol_structures[:4])
    out = ens(g, {K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD, K.FORCES_SAMPLES})
    assert ens.evaluation.startswith("stacked" if stacked else "one by one")
    each = [m(g, {K.ENERGY, K.FORCES}) for m in members]
    e = torch.stack([r[K.ENERGY] for r in each], 1)
    f = torch.stack([r[K.FORCES] for r in each], 1)
    # float32 members: the stacked products round differently from the members' own
    tol = {"rtol": 1e-5, "atol": 1e-5} if stacked else {}
    torch.testing.assert_close(out[K.ENERGY], e.mean(1), **tol)
    torch.testing.assert_close(out[K.ENERGY_STD], e.std(1), **tol)
    torch.testing.assert_close(out[K.FORCES], f.mean(1), **tol)
    torch.testing.assert_close(out[K.FORCES_STD], f.var(1).mean(-1).sqrt(), **tol)
    assert out[K.FORCES_SAMPLES].shape == (g[K.POSITIONS].shape[0], 3, 3)
    assert bool((out[K.FORCES_STD] > 0).all())
    with pytest.raises(ConfigError, match="does not provide"):
        ens(g, {K.ATOM_IMPORTANCE})


def test_ensemble_rejects_incompatible_members(ethanol_structures):
    a = build_potential("schnet", HYPERS, ethanol_structures)
    b = build_potential("schnet", {**HYPERS, "cutoff": 3.0}, ethanol_structures)
    with pytest.raises(ConfigError, match="neighbour lists"):
        DeepEnsemble([a, b])
    with pytest.raises(ConfigError, match="at least 2"):
        DeepEnsemble([a])


def test_mc_dropout_needs_dropout_and_is_repeatable(ethanol_structures):
    plain = build_potential("painn", HYPERS, ethanol_structures)
    with pytest.raises(ConfigError, match="dropout"):
        MCDropout(plain)
    model = build_potential("painn", HYPERS, ethanol_structures, head_dropout=0.2)
    mc = MCDropout(model, n_samples=6).eval()
    g = _batch(mc, ethanol_structures[:3])
    a = mc(g, {K.ENERGY, K.FORCES, K.FORCES_STD, K.ENERGY_SAMPLES})
    b = mc(g, {K.ENERGY, K.FORCES, K.FORCES_STD, K.ENERGY_SAMPLES})
    torch.testing.assert_close(a[K.FORCES], b[K.FORCES])
    assert a[K.ENERGY_SAMPLES].shape == (3, 6)
    assert float(a[K.FORCES_STD].min()) > 0
    # dropout is off again afterwards: the plain potential is deterministic
    assert not any(m.training for m in mc.base.modules())


@pytest.mark.parametrize("backbone", ["schnet", "painn"])
def test_mc_dropout_shares_one_backbone_pass_with_the_same_samples(
    backbone, ethanol_structures, bulk_structures
):
    """All M dropout samples from one backbone pass and one vectorised backward equal M full
    passes with the same masks: energies, forces, stress and the stds (float64)."""
    for structures in (ethanol_structures[:3], bulk_structures[:2]):
        base = build_potential(
            backbone, HYPERS, structures, dtype="float64", head_dropout=0.2
        ).eval()
        mc = MCDropout(base, n_samples=6, eval_seed=4)
        assert mc._shared_backbone()
        g = _batch(mc, structures)
        wanted = frozenset(
            {K.ENERGY, K.FORCES, K.STRESS, K.ENERGY_STD, K.FORCES_STD, K.FORCES_SAMPLES}
        )
        shared, loop = mc.predict(g, wanted), mc.predict_one_by_one(g, wanted)
        assert shared.keys() == loop.keys()
        for key in shared:
            torch.testing.assert_close(shared[key], loop[key], atol=1e-10, rtol=1e-9)
        assert float(shared[K.FORCES_STD].min()) > 0


def test_compute_outputs_with_a_sample_axis_equals_one_pass_per_sample(bulk_structures):
    """[n_atoms, M] node energies: every derivative (forces, virial, stress) per sample from
    one vectorised backward pass equals a backward pass per sample."""
    from trustpot.models.potential import compute_outputs

    base = build_potential("schnet", HYPERS, bulk_structures, dtype="float64").eval()
    g = _batch(base, bulk_structures[:2])
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    wanted = frozenset({K.ENERGY, K.FORCES, K.STRESS, K.VIRIAL})

    def stacked(graph):
        e, emb = base.node_energies(graph)
        return e.unsqueeze(1) * weights + (e.unsqueeze(1) ** 2) * 1e-3, emb

    out = compute_outputs(stacked, g, wanted, create_graph=False)
    for m in range(3):

        def one(graph, m=m):
            e, emb = stacked(graph)
            return e[:, m], emb

        ref = compute_outputs(one, g, wanted, create_graph=False)
        for key in wanted:
            torch.testing.assert_close(out[key][:, m], ref[key])


def test_fit_logistic_recovers_a_known_map():
    rng = np.random.default_rng(0)
    u = np.exp(rng.normal(size=4000))
    p = 1 / (1 + np.exp(-(2.0 * np.log(u) - 0.5)))
    y = rng.random(4000) < p
    a, b = fit_logistic(u, y)
    assert a == pytest.approx(2.0, abs=0.2)
    assert b == pytest.approx(-0.5, abs=0.15)
    cal = Recalibration(tolerance=0.1, logistic_a=a, logistic_b=b)
    r = cal.reliability_from_std(torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64))
    assert bool((r[:-1] > r[1:]).all())  # larger std, lower reliability


def test_recalibration_scales_std_to_unit_z(ethanol_structures):
    ens = DeepEnsemble(_members(ethanol_structures)).eval()
    report = recalibrate(ens, ethanol_structures[:16], source="cal")
    data = collect(ens, ethanol_structures[:16], progress=False)
    z = (data["comp_pred"] - data["comp_ref"]) / data["comp_std"]
    assert np.mean(z**2) == pytest.approx(1.0, rel=1e-6)
    assert report["forces_nll_after"] <= report["forces_nll_before"] + 1e-12
    assert np.isfinite(ens.recalibration.tolerance)
    assert K.RELIABILITY in ens.supported_outputs()
    metrics = uq_metrics(data)
    row = headline(metrics)
    assert -1 <= row["spearman"] <= 1 and 0 <= row["auroc"] <= 1
    assert metrics["forces_gaussian"]["crps"] > 0


def test_predictor_and_calculator_expose_exactly_the_wrapper_outputs(tmp_path, ethanol_structures):
    ens = DeepEnsemble(_members(ethanol_structures, 2)).eval()
    pred = Predictor(ens)
    props = pred.implemented_properties()
    assert "energy_std" in props and "forces_std" in props and "reliability" not in props
    recalibrate(ens, ethanol_structures[:12])
    props = Predictor(ens).implemented_properties()
    assert "reliability" in props and "atom_importance" not in props
    calc = TrustpotCalculator(Predictor(ens))
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    atoms.get_potential_energy()
    for name in ("energy_std", "forces_std", "reliability"):
        assert name in calc.results
    assert 0 <= calc.results["reliability"] <= 1
    assert calc.results["forces_std"].shape == (9,)
    assert set(calc.results) <= set(calc.implemented_properties)
    plain = TrustpotCalculator(Predictor(_members(ethanol_structures, 1)[0]))
    assert "energy_std" not in plain.implemented_properties


def test_uq_checkpoint_round_trip_and_tamper(tmp_path, ethanol_structures):
    from trustpot.io.checkpoint import load_model, save_model
    from trustpot.uq.base import UQModel

    ens = DeepEnsemble(_members(ethanol_structures, 2))
    recalibrate(ens, ethanol_structures[:10])
    path = tmp_path / "uq.ckpt"
    save_model(ens, path)
    again = load_model(path, UQModel)
    g = _batch(ens, ethanol_structures[:2])
    want = {K.ENERGY, K.FORCES_STD, K.RELIABILITY}
    a, b = ens.eval()(g, want), again(g, want)
    for key in want:
        torch.testing.assert_close(a[key], b[key])
    data = torch.load(path, weights_only=True)
    data["extra"]["members"][0]["model"]["head.mlp.0.weight"] = torch.zeros(3, 3)
    torch.save(data, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="digest"):
        load_model(tmp_path / "bad.ckpt", UQModel)
    plain = tmp_path / "plain.ckpt"
    save_model(ens.base, plain)
    with pytest.raises(CheckpointError, match="not a UQModel"):
        load_model(plain, UQModel)


@pytest.mark.integration
def test_uq_cli_fit_and_eval(tmp_path, ethanol_file, ethanol_structures, capsys):
    members = []
    for k, m in enumerate(_members(ethanol_structures, 2)):
        members.append(tmp_path / f"m{k}.ckpt")
        save_model(m, members[-1])
    out = tmp_path / "ens"
    argv = ["uq", "fit", "ensemble", "--members", *map(str, members)]
    argv += ["--calibration", str(ethanol_file), "--out", str(out)]
    assert main(argv) == 0
    assert (out / "uq.ckpt").is_file()
    fit = json.loads((out / "fit.json").read_text())
    assert fit["recalibration"]["n_structures"] == 24
    ev = tmp_path / "ev"
    assert main(["uq", "eval", str(out / "uq.ckpt"), str(ethanol_file), "--out", str(ev)]) == 0
    metrics = json.loads((ev / "uq_metrics.json").read_text())
    assert metrics["n_structures"] == 24 and "structure" in metrics
    for name in ("error_vs_uncertainty.png", "risk_coverage.png", "calibration.png"):
        assert (ev / name).stat().st_size > 1000
    # the plain eval command reads a wrapper too (its mean prediction)
    assert (
        main(["eval", str(out / "uq.ckpt"), str(ethanol_file), "--out", str(tmp_path / "e")]) == 0
    )
    # bad use: probe without a base model
    assert main(["uq", "fit", "probe", "--out", str(tmp_path / "p")]) == 2
    assert "--from is required" in capsys.readouterr().err


@pytest.mark.integration
def test_uq_cli_trains_mc_dropout(tmp_path, ethanol_file):
    out = tmp_path / "mc"
    argv = ["uq", "fit", "mc-dropout", "--train", str(ethanol_file), "--model", "schnet"]
    argv += ["--epochs", "2", "--n-samples", "4", "--out", str(out)]
    argv += ["-o", "model.hypers.n_features=16", "-o", "model.hypers.n_layers=2"]
    assert main(argv) == 0
    assert (out / "model" / "state.json").is_file()
    from trustpot.io.checkpoint import load_model
    from trustpot.uq.base import UQModel

    mc = load_model(out / "uq.ckpt", UQModel)
    assert isinstance(mc, MCDropout) and mc.n_samples == 4
    assert mc.base.meta.head_dropout == pytest.approx(0.1)
    # rerun: the trained model is reused, not retrained
    assert main(argv) == 0


def test_collect_names_file_of_unknown_element(ethanol_structures):
    from trustpot.errors import DataError

    ens = DeepEnsemble(_members(ethanol_structures[:4], 2))
    other = [s for s in ethanol_structures[:1]]
    other[0] = type(other[0])(**{**other[0].__dict__, "numbers": np.full_like(other[0].numbers, 7)})
    with pytest.raises(DataError, match="N not in the model"):
        collect(ens, other, source="x.xyz", progress=False)


def test_save_directory_is_created(tmp_path: Path, ethanol_structures):
    from trustpot.uq.fit import finish

    ens = DeepEnsemble(_members(ethanol_structures, 2))
    path = finish(ens, tmp_path / "a" / "b", None, "", {"method": "ensemble"}, log=lambda m: None)
    assert path.is_file()


@pytest.mark.integration
def test_uq_cli_probe_and_perturb(tmp_path, ethanol_file, ethanol_structures):
    from trustpot.io.checkpoint import load_model
    from trustpot.uq.base import UQModel
    from trustpot.uq.perturb import PerturbedPotential
    from trustpot.uq.probe import Probe

    base = tmp_path / "base.ckpt"
    save_model(_members(ethanol_structures, 1)[0], base)
    out = tmp_path / "probe"
    argv = ["uq", "fit", "probe", "--from", str(base), "--calibration", str(ethanol_file)]
    assert main([*argv, "--epochs", "3", "--out", str(out)]) == 0
    probe = load_model(out / "uq.ckpt", UQModel)
    assert isinstance(probe, Probe) and np.isfinite(probe.recalibration.tolerance)
    ev = tmp_path / "ev_probe"
    assert main(["uq", "eval", str(out / "uq.ckpt"), str(ethanol_file), "--out", str(ev)]) == 0
    assert (ev / "atom_importance.png").stat().st_size > 1000
    metrics = json.loads((ev / "uq_metrics.json").read_text())
    assert "reliability" in metrics["structure"] and "forces_gaussian" not in metrics

    out = tmp_path / "perturb"
    argv = ["uq", "fit", "perturb", "--from", str(base), "--train", str(ethanol_file)]
    argv += ["--calibration", str(ethanol_file), "--epochs", "2", "--n-samples", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    pert = load_model(out / "uq.ckpt", UQModel)
    assert isinstance(pert, PerturbedPotential) and pert.n_samples == 3
    assert K.RELIABILITY in pert.supported_outputs()


def test_md_logs_reliability_and_halts_below_threshold(tmp_path, ethanol_structures):
    from trustpot.md import run_md
    from trustpot.monitor import TrustHalt
    from trustpot.policy import TrustPolicy

    ens = DeepEnsemble(_members(ethanol_structures, 2))
    calc = TrustpotCalculator(Predictor(ens))
    atoms = ethanol_structures[0].to_atoms(with_labels=False)
    below = TrustPolicy.from_specs(halt=["reliability<0.5"])
    with pytest.raises(ConfigError, match="reliability"):
        run_md(calc, atoms, 4, 300, tmp_path / "a.xyz", interval=2, policy=below)
    recalibrate(ens, ethanol_structures[:12])
    calc = TrustpotCalculator(Predictor(ens))
    stats = run_md(calc, atoms, 6, 300, tmp_path / "b.xyz", interval=2)
    lines = (tmp_path / "b.xyz.reliability.csv").read_text().splitlines()
    assert lines[0].startswith("step,time_fs,reliability") and len(lines) == 1 + 4  # 0,2,4,6
    assert stats["frames"] == 4 and 0 <= stats["min_reliability"] <= 1
    # reliability is below 1 (a sigmoid), so reliability<1 halts at the first step
    with pytest.raises(TrustHalt) as exc:
        run_md(calc, atoms, 6, 300, tmp_path / "c.xyz", interval=2,
               policy=TrustPolicy.from_specs(halt=["reliability<1"]))  # fmt: skip
    assert exc.value.event.step == 0 and exc.value.stats["steps"] == 0


def test_std_floor_keeps_raw_ranking_and_reliability(ethanol_structures):
    ens = DeepEnsemble(_members(ethanol_structures[:4]))
    g = _batch(ens, ethanol_structures[:6])
    wanted = frozenset({K.FORCES_STD, K.FORCES_STD_RAW, K.ENERGY_STD, K.ENERGY_STD_RAW})
    before = ens(g, wanted)
    # a std map that is almost a constant: the calibrated std loses the ranking, raw keeps it
    ens.recalibration = Recalibration(
        forces_std_scale=1e-9, forces_std_floor=0.1, tolerance=0.05, logistic_a=2.0
    )
    out = ens(g, wanted | {K.RELIABILITY})
    assert torch.allclose(out[K.FORCES_STD], torch.full_like(out[K.FORCES_STD], 0.1))
    assert torch.equal(out[K.FORCES_STD_RAW], before[K.FORCES_STD])
    assert torch.equal(out[K.ENERGY_STD_RAW], before[K.ENERGY_STD])
    raw_mean = torch.stack(
        [before[K.FORCES_STD][g[K.BATCH] == k].mean() for k in range(6)]
    ).double()
    expected = torch.sigmoid(-(2.0 * torch.log(raw_mean)))
    assert torch.allclose(out[K.RELIABILITY].double(), expected, rtol=1e-5)


def test_ensemble_of_any_model_kind(tmp_path: Path) -> None:
    """Members of any kind (here two scale mixtures, which are not Potentials) are combined,
    saved with their kinds and loaded back with the same predictions."""
    from trustpot.io.checkpoint import load_model, read_checkpoint, save_model
    from trustpot.models.mixture import ScaleMixturePotential
    from trustpot.uq.base import UQModel
    from trustpot.uq.ensemble import DeepEnsemble

    fixtures = Path(__file__).parent / "fixtures" / "checkpoints"
    a = load_model(fixtures / "scale-mixture.ckpt", ScaleMixturePotential)
    b = load_model(fixtures / "scale-mixture.ckpt", ScaleMixturePotential)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ens = DeepEnsemble([a, b])
    path = tmp_path / "ens.ckpt"
    save_model(ens, path)
    data = read_checkpoint(path)
    assert data["base_kind"] == "scale-mixture"
    assert data["extra"]["members"][0]["kind"] == "scale-mixture"
    again = load_model(path, UQModel)
    assert all(isinstance(m, ScaleMixturePotential) for m in again.members)  # type: ignore[attr-defined]
    structures = read_structures(fixtures / "frames.xyz", use_cache=False)
    g = collate([structure_to_graph(s, ens.neighbor_lists(), ens.dtype) for s in structures])
    wanted = frozenset({K.ENERGY, K.FORCES, K.FORCES_STD})
    first, second = ens(g, wanted), again(g, wanted)
    assert torch.equal(first[K.FORCES_STD], second[K.FORCES_STD])
    assert float(first[K.FORCES_STD].mean()) > 0
