"""PROBE: symmetry of its outputs, learnability, temperature scaling, checkpoints, plot."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import labelled_molecules
from scipy.spatial.transform import Rotation

from trustpot import keys as K
from trustpot.data.graph import collate, structure_to_graph
from trustpot.data.reader import atoms_to_structure
from trustpot.data.structures import Structure
from trustpot.errors import CheckpointError, ConfigError
from trustpot.io.checkpoint import read_checkpoint, save_checkpoint
from trustpot.models import build_potential
from trustpot.models.potential import Potential
from trustpot.uq.plots import plot_atom_importance
from trustpot.uq.probe import (
    Probe,
    ProbeHypers,
    binary_nll,
    fit_probe,
    fit_temperature,
)

ALL = frozenset({K.ENERGY, K.FORCES, K.RELIABILITY, K.ATOM_IMPORTANCE})
SMALL = ProbeHypers(width=16, heads=4, dropout=0.0)


def calm_and_distorted(n_calm: int, n_distorted: int, seed: int = 0) -> list[Structure]:
    """Ethanol rattled by 0.02 Å (calm) or 0.2 Å (distorted: large EMT forces), interleaved."""
    calm = labelled_molecules(n_calm, seed=seed, scale=0.02)
    wild = labelled_molecules(n_distorted, seed=seed + 1, scale=0.2)
    frames = [*calm, *wild]
    order = np.random.default_rng(seed).permutation(len(frames))
    return [atoms_to_structure(frames[k]) for k in order]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def data() -> list[Structure]:
    return calm_and_distorted(30, 10)


def make_base(structures: list[Structure]) -> Potential:
    return build_potential("schnet", {"n_features": 16, "n_layers": 2, "cutoff": 4.0}, structures)


@pytest.fixture(scope="module")
def fitted(data: list[Structure]) -> Probe:
    return fit_probe(
        make_base(data), data, top_fraction=0.25, hypers=SMALL, epochs=60, batch_size=8, log=quiet
    )


def run(model: torch.nn.Module, structures: list[Structure]) -> dict[str, torch.Tensor]:
    graphs = [structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in structures]
    return model(collate(graphs), ALL)


def run_base(base: Potential, structures: list[Structure]) -> dict[str, torch.Tensor]:
    graphs = [structure_to_graph(s, base.neighbor_lists(), base.dtype) for s in structures]
    return base.eval()(collate(graphs), {K.ENERGY, K.FORCES})


def moved(s: Structure, perm: np.ndarray | None = None, rot: np.ndarray | None = None) -> Structure:
    perm = np.arange(s.n_atoms) if perm is None else perm
    rot = np.eye(3) if rot is None else rot
    assert s.forces is not None
    return dataclasses.replace(
        s, numbers=s.numbers[perm], positions=s.positions[perm] @ rot.T, forces=s.forces[perm]
    )


# -- (a) symmetry and batching ----------------------------------------------------------------
def test_importance_sums_to_one_and_outputs_have_their_shapes(
    fitted: Probe, data: list[Structure]
) -> None:
    out = run(fitted, data[:4])
    n_atoms = sum(s.n_atoms for s in data[:4])
    assert out[K.RELIABILITY].shape == (4,)
    assert out[K.ATOM_IMPORTANCE].shape == (n_atoms,)
    assert bool(((out[K.RELIABILITY] >= 0) & (out[K.RELIABILITY] <= 1)).all())
    assert bool((out[K.ATOM_IMPORTANCE] > 0).all())
    sums = out[K.ATOM_IMPORTANCE].double().view(4, -1).sum(1)  # ethanol: 9 atoms each
    assert torch.allclose(sums, torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert fitted.supported_outputs() >= {K.RELIABILITY, K.ATOM_IMPORTANCE}


def test_energy_and_forces_are_the_base_potentials(fitted: Probe, data: list[Structure]) -> None:
    out = run(fitted, data[:3])
    ref = run_base(fitted.base, data[:3])
    assert torch.equal(out[K.ENERGY], ref[K.ENERGY])
    assert torch.allclose(out[K.FORCES], ref[K.FORCES])
    assert not any(p.requires_grad for p in fitted.base.parameters())


def test_permutation_equivariance(fitted: Probe, data: list[Structure]) -> None:
    s = data[0]
    perm = np.random.default_rng(3).permutation(s.n_atoms)
    a, b = run(fitted, [s]), run(fitted, [moved(s, perm=perm)])
    assert torch.allclose(a[K.RELIABILITY], b[K.RELIABILITY], atol=1e-6)
    assert torch.allclose(a[K.ATOM_IMPORTANCE][perm], b[K.ATOM_IMPORTANCE], atol=1e-6)
    assert torch.allclose(a[K.FORCES][perm], b[K.FORCES], atol=1e-5)


def test_rotation_invariance(fitted: Probe, data: list[Structure]) -> None:
    s = data[1]
    rot = Rotation.random(random_state=7).as_matrix()
    a, b = run(fitted, [s]), run(fitted, [moved(s, rot=rot)])
    assert torch.allclose(a[K.RELIABILITY], b[K.RELIABILITY], atol=1e-5)
    assert torch.allclose(a[K.ATOM_IMPORTANCE], b[K.ATOM_IMPORTANCE], atol=1e-5)


def test_batch_equals_one_by_one(fitted: Probe, data: list[Structure]) -> None:
    # structures of different sizes so that padding matters
    s = data[2]
    assert s.forces is not None
    small = dataclasses.replace(
        s, numbers=s.numbers[:5], positions=s.positions[:5], forces=s.forces[:5]
    )
    chunk = [data[0], small, data[3]]
    together = run(fitted, chunk)
    single = [run(fitted, [s]) for s in chunk]
    rel = torch.cat([o[K.RELIABILITY] for o in single])
    imp = torch.cat([o[K.ATOM_IMPORTANCE] for o in single])
    assert torch.allclose(together[K.RELIABILITY], rel, atol=1e-6)
    assert torch.allclose(together[K.ATOM_IMPORTANCE], imp, atol=1e-6)


# -- (b) learnability, determinism, input errors ----------------------------------------------
def test_fit_learns_which_structures_are_distorted(fitted: Probe, data: list[Structure]) -> None:
    report = fitted.fit_report
    assert report["n_pos"] + report["n_neg"] == len(data)
    assert report["n_pos"] >= 5
    assert report["train_auroc"] > 0.9, report
    assert report["val_auroc"] > 0.7, report
    # the reliability ranks the high-error structures low on all the data
    rel = run(fitted, data)[K.RELIABILITY].numpy()
    err = np.array(
        [
            np.abs(f.numpy() - s.forces).mean()
            for s, f in zip(data, run_base(fitted.base, data)[K.FORCES].split(9), strict=True)
        ]
    )
    positive = err > fitted.tolerance
    assert rel[positive].mean() < rel[~positive].mean() - 0.3
    assert fitted.recalibration.tolerance == pytest.approx(report["tolerance"])


def test_fit_is_deterministic_for_a_seed(data: list[Structure]) -> None:
    base = make_base(data)
    runs = [
        fit_probe(base, data[:20], hypers=SMALL, epochs=3, batch_size=8, seed=5, log=quiet)
        for _ in range(2)
    ]
    first, second = (r.classifier.state_dict() for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert float(runs[0].temperature) == float(runs[1].temperature)


def test_time_budget_and_no_heldout(data: list[Structure]) -> None:
    base = make_base(data)
    timed = fit_probe(base, data[:20], hypers=SMALL, epochs=50, max_minutes=1e-6, log=quiet)
    assert timed.fit_report["stopped_by"] == "time"
    assert timed.fit_report["epochs"] == 1
    whole = fit_probe(base, data[:20], hypers=SMALL, epochs=2, temperature_fraction=0.0, log=quiet)
    assert whole.fit_report["n_heldout"] == 0 and whole.fit_report["n_train"] == 20
    assert float(whole.temperature) == 1.0


def test_fit_refuses_bad_input(data: list[Structure]) -> None:
    base = make_base(data)
    with pytest.raises(ConfigError, match="at least 10"):
        fit_probe(base, data[:5], log=quiet)
    unlabelled = [*data[:11], dataclasses.replace(data[11], forces=None)]
    with pytest.raises(ConfigError, match="force labels"):
        fit_probe(base, unlabelled, log=quiet)
    with pytest.raises(ConfigError, match="both"):
        fit_probe(base, data[:12], tolerance=1e6, log=quiet)
    with pytest.raises(ConfigError, match="multiple of heads"):
        fit_probe(base, data[:12], hypers=ProbeHypers(width=10, heads=4), log=quiet)


# -- (c) checkpoints --------------------------------------------------------------------------
def saved_dict(model: Probe, path: Path) -> dict:
    payload = model.payload()
    payload["kind"] = "uq:" + model.kind
    save_checkpoint(payload, path)
    return read_checkpoint(path)


def test_payload_round_trip(fitted: Probe, data: list[Structure], tmp_path: Path) -> None:
    loaded = Probe.from_payload(saved_dict(fitted, tmp_path / "p.ckpt"), "p.ckpt").eval()
    a, b = run(fitted, data[:4]), run(loaded, data[:4])
    assert all(torch.equal(a[k], b[k]) for k in ALL)
    assert loaded.tolerance == fitted.tolerance
    assert float(loaded.temperature) == float(fitted.temperature)
    assert loaded.fit_report["train_auroc"] == fitted.fit_report["train_auroc"]


def test_save_and_load_round_trip(fitted: Probe, data: list[Structure], tmp_path: Path) -> None:
    pytest.importorskip("trustpot.uq.ensemble")
    pytest.importorskip("trustpot.uq.perturb")
    from trustpot.io.checkpoint import load_model, save_model
    from trustpot.uq.base import UQModel

    save_model(fitted, tmp_path / "p.ckpt")
    loaded = load_model(tmp_path / "p.ckpt", UQModel)
    assert isinstance(loaded, Probe)
    a, b = run(fitted, data[:4]), run(loaded, data[:4])
    assert all(torch.equal(a[k], b[k]) for k in ALL)


def test_tampered_payloads_are_refused(fitted: Probe, tmp_path: Path) -> None:
    clean = saved_dict(fitted, tmp_path / "p.ckpt")

    def edited(edit: Callable[[dict], object]) -> dict:
        data = read_checkpoint(tmp_path / "p.ckpt")
        edit(data["extra"])
        return data

    def wrong_shape(extra: dict) -> None:
        w = extra["classifier"]["score.weight"]
        extra["classifier"]["score.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)

    def nan_weight(extra: dict) -> None:
        extra["classifier"]["head.0.weight"][0, 0] = float("nan")

    cases = {
        "do not fit": wrong_shape,
        "NaN or inf": nan_weight,
        "lacks": lambda extra: extra.pop("temperature"),
        "finite and positive": lambda extra: extra.update(temperature=-1.0),
        "malformed PROBE": lambda extra: extra.update(hypers={"width": 10, "heads": 4}),
    }
    assert isinstance(Probe.from_payload(clean, "p.ckpt"), Probe)
    for message, edit in cases.items():
        with pytest.raises(CheckpointError, match=message) as err:
            Probe.from_payload(edited(edit), "p.ckpt")
        assert "p.ckpt" in str(err.value)


# -- (d) temperature scaling ------------------------------------------------------------------
def test_temperature_never_increases_heldout_nll(fitted: Probe) -> None:
    report = fitted.fit_report
    assert report["n_heldout"] >= 5
    assert report["heldout_nll_after"] <= report["heldout_nll_before"] + 1e-12
    assert math.isfinite(report["temperature"]) and report["temperature"] > 0
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(4, 60))
        logits = rng.normal(scale=float(rng.uniform(0.1, 20.0)), size=n)
        positive = rng.random(n) < 1 / (1 + np.exp(-logits * rng.uniform(-0.5, 2.0)))
        t = fit_temperature(logits, positive)
        assert binary_nll(logits, positive, t) <= binary_nll(logits, positive) + 1e-12, trial


def test_temperature_undoes_overconfidence() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(scale=2.0, size=4000)
    positive = rng.random(true.size) < 1 / (1 + np.exp(-true))
    t = fit_temperature(5.0 * true, positive)  # logits 5x too sharp -> T close to 5
    assert t == pytest.approx(5.0, rel=0.15)


# -- (e) plot ---------------------------------------------------------------------------------
def test_importance_png_is_written(fitted: Probe, data: list[Structure], tmp_path: Path) -> None:
    imp = run(fitted, data[:1])[K.ATOM_IMPORTANCE].numpy()
    path = plot_atom_importance(data[0], imp, tmp_path / "plots" / "imp.png", title="ethanol")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
    with pytest.raises(ValueError, match="9 atoms"):
        plot_atom_importance(data[0], imp[:4], tmp_path / "bad.png")


def test_probe_on_any_model_kind(ethanol_file: Path, tmp_path: Path) -> None:
    """PROBE reads the embeddings of any model kind (here a stored scale mixture, which is not
    a Potential), keeps the base's kind in its checkpoint, and uq eval works on it."""
    from trustpot.cli.main import main
    from trustpot.io.checkpoint import load_model, read_checkpoint
    from trustpot.models.mixture import ScaleMixturePotential

    base = Path(__file__).parent / "fixtures" / "checkpoints" / "scale-mixture.ckpt"
    out = tmp_path / "probe"
    argv = ["uq", "fit", "probe", "--from", str(base), "--calibration", str(ethanol_file)]
    assert main([*argv, "--epochs", "2", "--out", str(out)]) == 0
    assert read_checkpoint(out / "uq.ckpt")["base_kind"] == "scale-mixture"
    probe = load_model(out / "uq.ckpt", Probe)
    assert isinstance(probe.base, ScaleMixturePotential)
    assert (
        main(["uq", "eval", str(out / "uq.ckpt"), str(ethanol_file), "--out", str(tmp_path)]) == 0
    )
    assert (tmp_path / "uq_metrics.json").is_file()


def test_reliability_falls_off_the_manifold() -> None:
    """PROBE fitted on calm ethanol frames only; structures with a C-O bond pulled to 2.6 Å
    (an environment the calibration data never show) get a large embedding distance, and their
    reliability falls to about zero although the classifier alone still calls them reliable
    (measured: 0.6-0.8), while frames like the calibration data keep their reliability."""
    calm = [atoms_to_structure(a) for a in labelled_molecules(40, seed=0, scale=0.02)]
    probe = fit_probe(
        make_base(calm), calm, top_fraction=0.25, hypers=SMALL, epochs=60, batch_size=8, log=quiet
    )
    assert math.isfinite(probe.ood_onset) and probe.ood_onset >= 1.0
    assert K.EMBEDDING_DISTANCE in probe.supported_outputs()
    near = [atoms_to_structure(a) for a in labelled_molecules(10, seed=7, scale=0.02)]
    far = []
    for atoms in labelled_molecules(10, seed=8, scale=0.02):
        c, o = 1, 2  # CH3CH2OH in ASE: C0, C1, O2 (C1-O2 bonded)
        direction = atoms.positions[o] - atoms.positions[c]
        direction /= np.linalg.norm(direction)
        atoms.positions[o] = atoms.positions[c] + 2.6 * direction
        far.append(atoms_to_structure(atoms))
    wanted = frozenset({K.ENERGY, K.FORCES, K.RELIABILITY, K.EMBEDDING_DISTANCE})

    def evaluate(
        structures: list[Structure], outputs: frozenset[str] = wanted
    ) -> dict[str, torch.Tensor]:
        graphs = [structure_to_graph(s, probe.neighbor_lists(), probe.dtype) for s in structures]
        return probe(collate(graphs), outputs)

    inside, outside = evaluate(near), evaluate(far)
    d_in, d_out = inside[K.EMBEDDING_DISTANCE], outside[K.EMBEDDING_DISTANCE]
    assert float(d_out.min()) > 3 * probe.ood_onset, "every far structure is well past the onset"
    assert float(d_in.median()) <= probe.ood_onset, "typical near structures are not"
    onset = probe.ood_onset
    try:  # the classifier alone
        probe.ood_onset = math.inf
        raw_out = evaluate(far, wanted - {K.EMBEDDING_DISTANCE})[K.RELIABILITY]
        raw_in = evaluate(near, wanted - {K.EMBEDDING_DISTANCE})[K.RELIABILITY]
    finally:
        probe.ood_onset = onset
    assert float(raw_out.min()) > 0.3, "the failure mode: the classifier alone trusts them"
    assert float(outside[K.RELIABILITY].max()) < 0.05
    # near the data the factor is (almost always) 1
    kept = (inside[K.RELIABILITY] - raw_in).abs() < 1e-12
    assert int(kept.sum()) >= 8
