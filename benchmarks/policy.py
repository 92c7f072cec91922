"""Trust policies on paths far from the training data: which method would have halted, and when.

Ethanol sampled at 300 K with GFN2-xTB (``--engine xtb``, the default; ``--quick`` uses ASE's
EMT on rattled frames so that it runs in seconds, for CI). On these frames: a deep ensemble,
MC dropout, PROBE (on ensemble member 0) and learned perturbations (fine-tuned from member 0),
each recalibrated on held-out calibration frames (PROBE calibrates itself), as in
``benchmarks/uq.py``. Then three paths, labelled by the same engine:

- ``stretch``: the C-O bond of a calibration frame pulled from its length to +1.2 Å (the O and
  its H move together): bond breaking, never in the data;
- ``torsion``: the methyl group rotated rigidly about the C-C bond in steps over 360 degrees
  (eclipsed conformers are rare at 300 K);
- ``hot``: Langevin MD driven by ensemble member 0 (a plain potential, as a user would run it)
  at ``--hot-temperature`` from a start compressed to ``--compress`` of its size (0.95), every
  ``--stride``-th step kept;

and the in-domain test frames (unordered), where a halt is a false alarm.

Each method's halt rules go through :class:`trustpot.policy.TrustPolicy`, the code ``trustpot
md --halt`` runs: ``force-error>T@P`` (std methods) and ``reliability<R`` (every method that
gives a reliability). Truth: a frame is bad when some atom's force error exceeds T. Reported per
path, method and rule: the first frame the rule fires at, the first bad frame, precision and
recall of the fired frames, and for the probability rule the mean predicted P(|error| > T) of
all atoms beside the observed fraction (is the probability statement calibrated?).

With ``--foundation NAME`` (``chgnet``, ``sevennet-0``) the methods are the pretrained adapter
wrapped instead, as in ``benchmarks/foundation.py``: an ensemble of ``NAME`` fine-tunes
(``trustpot finetune --from NAME`` with seeds s, s+1, ...; the first, fine-tune 0, drives the
hot path), PROBE on fine-tune 0, perturbations fine-tuned from fine-tune 0 (P-CHGNet,
P-SevenNet; lr 1e-3) and zero-shot PROBE on the untouched adapter (its predictions are the
pretrained model's, energies on the pretrained model's zero). MC dropout does not apply (the
adapters have no head dropout).

    python benchmarks/policy.py --quick --out /tmp/policy-quick       # seconds, for CI
    python benchmarks/policy.py --out benchmarks/results/policy        # about 15 minutes
    python benchmarks/policy.py --foundation chgnet --out benchmarks/results/policy/chgnet

Writes ``OUT/policy.json`` (settings, every row, per-frame series) and ``OUT/policy.md``.
Trained models are reused on a rerun (the one reuse rule of ``trustpot.train.reuse``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.io import read, write

from trustpot import keys as K
from trustpot.bench.paths import bond_stretch, torsion_scan
from trustpot.calculator import CALCULATOR_OUTPUTS, Predictor, TrustpotCalculator
from trustpot.config import load_config
from trustpot.data.reader import atoms_to_structure, file_sha256
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import load_model, load_potential
from trustpot.monitor import capabilities
from trustpot.policy import TrustPolicy, force_error_exceedance
from trustpot.uq import fit as F
from trustpot.uq.base import UQModel
from trustpot.uq.ensemble import DeepEnsemble
from trustpot.uq.perturb import fit_perturbation
from trustpot.uq.probe import fit_probe

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ensemble", "mc-dropout", "probe", "perturb")
#: the methods on a pretrained adapter (no head dropout: no MC dropout)
ADAPTER_METHODS = ("ensemble", "probe", "perturb", "zero-shot-probe")
FINETUNE_LR = 1e-4  # a pretrained network, fully fine-tuned (as benchmarks/foundation.py)
ADAPTER_PERTURB_LR = 1e-3  # 1e-2 diverged on CHGNet (benchmarks/foundation.py)


@dataclass
class Mode:
    """Sizes and budgets."""

    engine: str
    n_train: int
    n_cal: int
    n_test: int
    members: int
    minutes: float  # per trained model (perturbations: half)
    epochs: int
    scan_points: int
    hot_steps: int
    stride: int
    hypers: dict[str, Any] = field(default_factory=dict)


MODES = {
    "quick": Mode("emt", 30, 12, 10, 2, 0.2, 40, 7, 30, 5, {"n_features": 16, "n_layers": 2}),
    "full": Mode("xtb", 200, 50, 50, 4, 1.5, 100000, 25, 400, 10),  # 300 frames in all
}


# -- engines ---------------------------------------------------------------------------------
def label(frames: list[Atoms], engine: str, work: Path, workers: int) -> list[Atoms | None]:
    """The frames with the engine's energy and forces (as ``info``/``arrays`` labels), None
    where the engine failed (e.g. an SCF that does not converge on a broken molecule)."""
    if engine == "emt":
        from ase.calculators.emt import EMT

        out: list[Atoms | None] = []
        for a in frames:
            b = Atoms(numbers=a.numbers, positions=a.positions)
            b.calc = EMT()
            b.info["energy"], b.arrays["forces"] = b.get_potential_energy(), b.get_forces()
            b.calc = None
            out.append(b)
        return out
    from trustpot.engines.xtb import label_file

    work.mkdir(parents=True, exist_ok=True)
    source, target = work / "unlabelled.xyz", work / "labelled.xyz"
    write(source, [Atoms(numbers=a.numbers, positions=a.positions) for a in frames])
    label_file(source, target, workers=workers, progress=False)
    by_index: dict[int, Atoms] = {int(a.info["source_frame"]): a for a in read(target, ":")}
    return [by_index.get(k) for k in range(len(frames))]


def sample(mode: Mode, out: Path, seed: int, workers: int, given: str | None) -> list[Atoms]:
    """Labelled in-domain frames: ``given``, else xTB Langevin MD at 300 K (the frames of
    ``trustpot data molecules --smiles CCO --frames N --seed SEED``, also the quickstart's),
    or rattled EMT ethanol."""
    path = Path(given) if given else out / "data.xyz"
    if not path.is_file():
        if mode.engine == "xtb":
            from trustpot.engines.xtb import generate_molecules

            n = mode.n_train + mode.n_cal + mode.n_test
            generate_molecules(["CCO"], [300.0], n, path, seed, workers, progress=False)
        else:
            from ase.build import molecule

            rng = np.random.default_rng(seed)
            frames = []
            for _ in range(mode.n_train + mode.n_cal + mode.n_test):
                a = molecule("CH3CH2OH")
                a.positions += rng.normal(scale=0.03, size=a.positions.shape)
                frames.append(a)
            labelled = label(frames, "emt", out, workers)
            write(path, [a for a in labelled if a is not None])
    return read(path, ":")


# -- paths -----------------------------------------------------------------------------------
def _bonded(atoms: Atoms, i: int, z: int) -> int:
    """The atom of element ``z`` nearest to atom ``i``."""
    d = np.linalg.norm(atoms.positions - atoms.positions[i], axis=1)
    d[atoms.numbers != z] = np.inf
    d[i] = np.inf
    return int(np.argmin(d))


def stretch_path(start: Atoms, n: int, extra: float = 1.2) -> tuple[list[Atoms], list[float]]:
    """The C-O bond pulled by 0..``extra`` Å (O and its H move together, the smaller side of
    the bond); coordinate: r(C-O)."""
    o = int(np.flatnonzero(start.numbers == 8)[0])
    return bond_stretch(start, (_bonded(start, o, 6), o), n, extra)


def torsion_path(start: Atoms, n: int) -> tuple[list[Atoms], list[float]]:
    """The methyl group (the smaller side of the C-C bond) rotated about the C-C bond by
    0..360 degrees; coordinate: degrees."""
    o = int(np.flatnonzero(start.numbers == 8)[0])
    c1 = _bonded(start, o, 6)
    return torsion_scan(start, (c1, _bonded(start, c1, 6)), n)


class _Broken(Exception):
    """The molecule came apart (stops the hot path's MD)."""


#: an atom with no other atom this close (Å) has left the molecule (bonds are under 1.6 Å)
DETACHED = 2.0


def detached(atoms: Atoms) -> bool:
    """Whether some atom's nearest neighbour is farther than :data:`DETACHED`."""
    d = atoms.get_all_distances()
    np.fill_diagonal(d, np.inf)
    return bool(d.min(axis=1).max() > DETACHED)


def hot_path(
    model: Path, start: Atoms, mode: Mode, temperature: float, compress: float, seed: int
) -> tuple[list[Atoms], list[float], int | None]:
    """Langevin MD with the plain potential from a compressed start; coordinate: MD step.

    The run stops at the first kept frame where the molecule has come apart (its step is
    returned, else None): the engine's labels of fragments are slow and beside the point, a
    policy that has not fired by then has failed.
    """
    from ase import units
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin

    # ASE >= 3.29 renamed MaxwellBoltzmannDistribution thermalize_momenta
    thermalize = getattr(vd, "thermalize_momenta", vd.MaxwellBoltzmannDistribution)

    atoms = Atoms(numbers=start.numbers, positions=start.positions.copy())
    centre = atoms.positions.mean(axis=0)
    atoms.positions = centre + compress * (atoms.positions - centre)
    atoms.calc = TrustpotCalculator.from_checkpoint(model)
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms,
        0.5 * units.fs,
        temperature_K=temperature,
        friction=0.01 / units.fs,
        rng=rng,
        fixcm=False,
    )
    frames, coords = [], []

    def keep() -> None:
        frames.append(Atoms(numbers=atoms.numbers, positions=atoms.positions.copy()))
        coords.append(float(dyn.nsteps))
        if detached(atoms):
            raise _Broken

    dyn.attach(keep, interval=mode.stride)
    try:
        dyn.run(mode.hot_steps)
    except _Broken:
        return frames, coords, int(dyn.nsteps)
    return frames, coords, None


# -- models ----------------------------------------------------------------------------------
def fit_models(
    mode: Mode, out: Path, train: list[Atoms], cal: list[Atoms], seed: int, threads: int
) -> dict[str, Path]:
    """Train (or reuse) every method's wrapper; returns ``uq.ckpt`` per method."""
    log_path = out / "log.txt"

    def log(message: str) -> None:
        with open(log_path, "a") as handle:
            handle.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")

    write(out / "train.xyz", train)
    cal_s = [atoms_to_structure(a) for a in cal]
    train_s = [atoms_to_structure(a) for a in train]
    cfg = load_config(
        None,
        [f"model.hypers.{k}={v}" for k, v in mode.hypers.items()],
        {
            "data": {"train": str(out / "train.xyz"), "valid_fraction": 0.1},
            "model": {"name": "painn"},
            "train": {
                "max_minutes": mode.minutes,
                "epochs": mode.epochs,
                "seed": seed,
                "threads": threads,
            },
        },
    )
    ckpts = {m: out / m / "uq.ckpt" for m in METHODS}
    members = F.train_ensemble_members(cfg, out / "ensemble", mode.members, log)
    if not ckpts["ensemble"].is_file():
        ens = DeepEnsemble([load_potential(p) for p in members])
        F.finish(ens, out / "ensemble", cal_s, "calibration", {"method": "ensemble"}, log=log)
    if not ckpts["mc-dropout"].is_file():
        mc = F.train_mc_dropout(cfg, out / "mc-dropout", 0.1, 16, log)
        F.finish(mc, out / "mc-dropout", cal_s, "calibration", {"method": "mc-dropout"}, log=log)
    if not ckpts["probe"].is_file():
        probe = fit_probe(
            load_potential(members[0]),
            cal_s,
            max_minutes=mode.minutes,
            epochs=min(200, mode.epochs),  # 200: fit_probe's default
            seed=seed,
            log=log,
            source="calibration",
        )
        F.finish(probe, out / "probe", None, "", {"method": "probe"}, log=log)
    if not ckpts["perturb"].is_file():
        n_val = max(1, len(train_s) // 10)
        pert = fit_perturbation(
            load_potential(members[0]),
            train_s[n_val:],
            train_s[:n_val],
            max_minutes=mode.minutes / 2,
            epochs=mode.epochs,
            lr=1e-2,
            seed=seed,
            progress=False,
            log=log,
        )
        F.finish(pert, out / "perturb", cal_s, "calibration", {"method": "perturb"}, log=log)
    return {**ckpts, "base": members[0]}


def fit_adapter_models(
    name: str, mode: Mode, out: Path, train: list[Atoms], cal: list[Atoms], seed: int,
    threads: int,
) -> dict[str, Path | str]:  # fmt: skip
    """The ``--foundation`` methods (module docstring), trained or reused; ``uq.ckpt`` per
    method and ``base``, the first fine-tune (the hot path's driver)."""
    from trustpot.finetune import FinetuneOptions, run_finetune
    from trustpot.train.reuse import run_step

    log_path = out / "log.txt"

    def log(message: str) -> None:
        with open(log_path, "a") as handle:
            handle.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")

    write(out / "train.xyz", train)
    cal_s = [atoms_to_structure(a) for a in cal]
    train_s = [atoms_to_structure(a) for a in train]
    members = []
    for k in range(mode.members):
        opts = FinetuneOptions(
            base=name, train=str(out / "train.xyz"), valid_fraction=0.1, lr=FINETUNE_LR,
            epochs=mode.epochs, max_minutes=mode.minutes, seed=seed + k, threads=threads,
            no_maps=True,
        )  # fmt: skip
        config = {key: v for key, v in dataclasses.asdict(opts).items() if key != "threads"}

        def work(where: Path, resuming: bool, o: Any = opts) -> dict[str, Any]:
            run_finetune(o, where / "run", resume=resuming and (where / "run/last.ckpt").is_file())
            return {"ckpt": str(where / "run" / "best.ckpt")}

        log(f"{name} fine-tune {k + 1}/{mode.members} (seed {seed + k})")
        members.append(run_step(out / "ensemble" / f"member_{k}", config, work, log)["ckpt"])
    ckpts: dict[str, Path | str] = {m: out / m / "uq.ckpt" for m in ADAPTER_METHODS}
    if not Path(ckpts["ensemble"]).is_file():
        ens = DeepEnsemble([load_model(p) for p in members])
        F.finish(ens, out / "ensemble", cal_s, "calibration", {"method": "ensemble"}, log=log)
    for method, base in (("probe", members[0]), ("zero-shot-probe", name)):
        if not Path(ckpts[method]).is_file():
            probe = fit_probe(
                load_model(base), cal_s, max_minutes=mode.minutes, epochs=min(200, mode.epochs),
                seed=seed, log=log, source="calibration",
            )  # fmt: skip
            F.finish(probe, out / method, None, "", {"method": method, "base": base}, log=log)
    if not Path(ckpts["perturb"]).is_file():
        n_val = max(1, len(train_s) // 10)
        pert = fit_perturbation(
            load_model(members[0]), train_s[n_val:], train_s[:n_val],
            max_minutes=mode.minutes / 2, epochs=mode.epochs, lr=ADAPTER_PERTURB_LR, seed=seed,
            progress=False, log=log,
        )  # fmt: skip
        F.finish(pert, out / "perturb", cal_s, "calibration", {"method": "perturb"}, log=log)
    return {**ckpts, "base": members[0]}


# -- evaluation ------------------------------------------------------------------------------
def reference(atoms: Atoms) -> tuple[float, np.ndarray]:
    """The label (eV, [n_atoms, 3] eV/Å): from a read file's calculator or from info/arrays."""
    if atoms.calc is not None:
        return float(atoms.get_potential_energy()), np.asarray(atoms.get_forces())
    return float(atoms.info["energy"]), np.asarray(atoms.arrays["forces"])


def rules_for(
    model: UQModel, threshold: float, probabilities: list[float], reliability: float
) -> list[TrustPolicy]:
    """The halt rules a method can evaluate (checked as ``trustpot md`` checks them)."""
    calc = TrustpotCalculator(Predictor(model))
    out = []
    specs = [f"force-error>{threshold!r}@{p!r}" for p in probabilities]
    for spec in [*specs, f"reliability<{reliability!r}"]:
        policy = TrustPolicy.from_specs(halt=[spec])
        try:
            policy.check_model(*capabilities(calc))
        except ConfigError:  # a quantity this method does not give
            continue
        out.append(policy)
    return out


def evaluate(
    model: UQModel, frames: list[Atoms], truth: list[Atoms | None], policies: list, t: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per policy) of one method on one path, and its per-frame series."""
    outputs = set(CALCULATOR_OUTPUTS) & model.supported_outputs()
    preds = Predictor(model).predict(frames, outputs)
    ok = [k for k, a in enumerate(truth) if a is not None]
    errors = np.full(len(frames), np.nan)
    energy_errors = np.full(len(frames), np.nan)
    atom_errors: list[np.ndarray] = []
    for k in ok:
        ref = truth[k]
        assert ref is not None
        ref_energy, ref_forces = reference(ref)
        e = np.linalg.norm(preds[k][K.FORCES] - ref_forces, axis=1)
        errors[k] = e.max()
        energy_errors[k] = abs(float(preds[k][K.ENERGY]) - ref_energy)
        atom_errors.append(e)
    bad = errors > t  # NaN (no label) is not bad
    series: dict[str, Any] = {
        "max_force_error": errors.tolist(),
        "energy_error": energy_errors.tolist(),
    }
    if K.FORCES_STD in outputs:
        series["max_forces_std"] = [float(p[K.FORCES_STD].max()) for p in preds]
    if K.RELIABILITY in outputs:
        series["reliability"] = [float(p[K.RELIABILITY]) for p in preds]
    rows = []
    for policy in policies:
        rule = policy.rules[0]
        fired = np.array(
            [bool(policy.evaluate(p, f.numbers, k)) for k, (p, f) in enumerate(zip(preds, frames))]
        )
        row: dict[str, Any] = {
            "rule": rule.spec,
            "fired": fired.tolist(),
            "first_fired": int(np.argmax(fired)) if fired.any() else None,
            "first_bad": int(np.argmax(bad)) if bad.any() else None,
            "n_fired": int(fired.sum()),
            "n_bad": int(bad.sum()),
            "n_unlabelled": len(frames) - len(ok),
            "precision": float(bad[fired].mean()) if fired.any() else math.nan,
            "recall": float(fired[bad].mean()) if bad.any() else math.nan,
        }
        if rule.quantity == "force-error" and atom_errors:
            std = np.concatenate([preds[k][K.FORCES_STD] for k in ok])
            row["mean_predicted_p"] = float(force_error_exceedance(t, std).mean())
            row["observed_fraction"] = float((np.concatenate(atom_errors) > t).mean())
        rows.append(row)
    return rows, series


def _at(coords: list[float], k: int | None, unit: str) -> str:
    return "never" if k is None else f"frame {k} ({coords[k]:.4g}{unit})"


def plot(
    series: dict[str, Any], args: argparse.Namespace, out: Path, methods: tuple[str, ...]
) -> list[str]:
    """One PNG per path: the true largest force error, the std methods' largest calibrated std
    against the std where ``force-error>T@P`` fires, and every reliability against R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trustpot.policy import sigma_for_exceedance

    written = []
    labels = {"stretch": "r(C-O), Å", "torsion": "methyl torsion, degrees", "hot": "MD step"}
    for path, xlabel in labels.items():
        fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
        for k, method in enumerate(methods):
            s = series[f"{path}/{method}"]
            x, style = s["coords"], {"marker": ".", "label": method, "color": f"C{k}"}
            axes[0].plot(x, s["max_force_error"], **style)
            if "max_forces_std" in s:
                axes[1].plot(x, s["max_forces_std"], **style)
            if "reliability" in s:
                axes[2].plot(x, s["reliability"], **style)
        axes[0].axhline(args.error, color="k", ls="--", lw=0.8, label=f"T = {args.error}")
        for p, ls in zip(args.probability, (":", "-.", "--", "-"), strict=False):
            sigma = sigma_for_exceedance(args.error, p)
            axes[1].axhline(sigma, color="k", ls=ls, lw=0.8, label=f"force-error fires, P = {p}")
        axes[2].axhline(args.reliability, color="k", ls="--", lw=0.8)
        axes[0].set_ylabel("largest force error, eV/Å")
        axes[1].set_ylabel("largest calibrated std, eV/Å")
        axes[2].set_ylabel("reliability")
        axes[2].set_xlabel(xlabel)
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        name = f"policy_{path}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| path | method | halt rule | fires at | first frame with error > T | fired frames "
        "(precision / recall) | P(err > T) predicted / observed, atoms | max energy error |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for r in rows:
        unit = {"stretch": " Å", "torsion": " deg", "hot": " steps"}.get(r["path"], "")
        coords = r["coords"]
        if r["path"] == "test_id":
            fires = f"{r['n_fired']} of {len(coords)} frames"
            first_bad = f"{r['n_bad']} of {len(coords)} frames"
        else:
            fires = _at(coords, r["first_fired"], unit)
            first_bad = _at(coords, r["first_bad"], unit)
        if r["n_unlabelled"]:
            first_bad += f" ({r['n_unlabelled']} unlabelled)"
        prob = (
            f"{r['mean_predicted_p']:.3f} / {r['observed_fraction']:.3f}"
            if "mean_predicted_p" in r
            else ""
        )
        body.append(
            f"| {r['path']} | {r['method']} | `{r['rule']}` | {fires} | "
            f"{first_bad} | {r['n_fired']} ({r['precision']:.2f} / "
            f"{r['recall']:.2f}) | {prob} | {r['max_energy_error']:.3g} eV |"
        )
    return head + "\n".join(body) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="EMT, tiny models and paths (CI)")
    p.add_argument("--engine", choices=("xtb", "emt"), help="reference engine (mode default)")
    p.add_argument("--error", type=float, default=0.5, help="T of the rules, eV/Å (0.5)")
    p.add_argument(
        "--probability",
        type=float,
        nargs="+",
        default=[0.5, 0.95],
        help="P of force-error, one rule each (0.5 0.95)",
    )
    p.add_argument("--reliability", type=float, default=0.5, help="R of reliability< (0.5)")
    p.add_argument("--hot-temperature", type=float, default=1000.0, help="K (1000)")
    p.add_argument("--compress", type=float, default=0.95, help="start size factor (0.95)")
    p.add_argument(
        "--data",
        help="labelled in-domain ethanol frames instead of sampling them "
        "(e.g. a quickstart's data_300K.xyz; at least the mode's frames)",
    )
    p.add_argument(
        "--foundation",
        choices=("chgnet", "sevennet-0"),
        help="wrap this pretrained adapter instead of training PaiNN models (module docstring)",
    )
    p.add_argument("--minutes", type=float, help="budget per trained model (mode default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="xTB labelling processes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    mode_name = "quick" if args.quick else "full"
    mode = dataclasses.replace(MODES[mode_name], engine=args.engine or MODES[mode_name].engine)
    if args.minutes is not None:
        if args.minutes <= 0:
            p.error(f"--minutes must be positive, got {args.minutes}")
        mode = dataclasses.replace(mode, minutes=args.minutes)
    methods = ADAPTER_METHODS if args.foundation else METHODS
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = sample(mode, out, args.seed, args.workers, args.data)
    data_path = Path(args.data) if args.data else out / "data.xyz"
    need = mode.n_train + mode.n_cal + mode.n_test
    if len(data) < need:
        raise SystemExit(f"{args.data or out / 'data.xyz'}: {len(data)} frames, need {need}")
    order = np.random.default_rng(args.seed).permutation(len(data))
    split = np.split(order[:need], [mode.n_train, mode.n_train + mode.n_cal])
    train, cal, test = ([data[i] for i in idx] for idx in split)
    ckpts: dict[str, Any] = (
        fit_adapter_models(args.foundation, mode, out, train, cal, args.seed, args.threads)
        if args.foundation
        else fit_models(mode, out, train, cal, args.seed, args.threads)
    )
    hot = hot_path(
        Path(ckpts["base"]), cal[0], mode, args.hot_temperature, args.compress, args.seed
    )
    paths: dict[str, tuple[list[Atoms], list[float]]] = {
        "stretch": stretch_path(cal[0], mode.scan_points),
        "torsion": torsion_path(cal[0], mode.scan_points),
        "hot": hot[:2],
        "test_id": (test, [float(k) for k in range(len(test))]),
    }
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {}
    for name, (frames, coords) in paths.items():
        folder = out / (
            f"hot_{args.hot_temperature:g}K_{args.compress:g}" if name == "hot" else name
        )
        truth = test if name == "test_id" else label(frames, mode.engine, folder, args.workers)
        for method in methods:
            model = load_model(ckpts[method], UQModel)
            policies = rules_for(model, args.error, args.probability, args.reliability)
            found, s = evaluate(model, frames, truth, policies, args.error)
            series[f"{name}/{method}"] = {"coords": coords, **s}
            worst = float(np.nanmax(s["energy_error"])) if s["energy_error"] else math.nan
            for row in found:
                rows.append(
                    {
                        "path": name,
                        "method": method,
                        "coords": coords,
                        "max_energy_error": worst,
                        **row,
                    }
                )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    settings = {
        "mode": mode_name,
        **dataclasses.asdict(mode),
        "error": args.error,
        "probability": args.probability,
        "reliability": args.reliability,
        "hot_temperature": args.hot_temperature,
        "compress": args.compress,
        "foundation": args.foundation,
        "hot_came_apart_at_step": hot[2],
        "data": data_path.name,  # no machine path in a committed result
        "data_sha256": file_sha256(data_path),
        "threads": args.threads,
        "seed": args.seed,
        "git": commit,
        "platform": platform.platform(),
        "wall_s": time.perf_counter() - t0,
    }
    (out / "policy.json").write_text(
        json.dumps({"settings": settings, "rows": rows, "series": series}, indent=1)
    )
    broke = (
        f"the molecule came apart (an atom {DETACHED} Å from all others) at step {hot[2]}, "
        "where the MD stopped"
        if hot[2] is not None
        else "the molecule stayed whole"
    )
    text = (
        f"# Trust policies on out-of-domain paths ({mode_name}, {mode.engine})\n\n"
        f"Ethanol, {len(train)} training frames; T = {args.error} eV/Å; halt rules "
        f"`force-error>{args.error}@P` (P = {', '.join(map(str, args.probability))}) and "
        f"`reliability<{args.reliability}`; "
        f"hot path: {args.hot_temperature:g} K from a start compressed to {args.compress}, "
        f"every {mode.stride} steps ({broke}); git {commit}; {settings['wall_s'] / 60:.1f} min."
        + (
            f" Methods: {args.foundation} wrapped: an ensemble of {mode.members} fine-tunes (lr "
            f"{FINETUNE_LR}, {mode.minutes:g} min each; fine-tune 0 drives the hot path), PROBE "
            f"on fine-tune 0, perturbations fine-tuned from fine-tune 0 (lr "
            f"{ADAPTER_PERTURB_LR}, {mode.minutes / 2:g} min) and zero-shot PROBE on the "
            f"untouched {args.foundation}, whose energies keep the pretrained model's zero (its "
            "energy error is mostly that offset)."
            if args.foundation
            else ""
        )
        + "\n\n"
        + table(rows)
    )
    figures = plot(series, args, out, methods)
    text += "\n" + "\n".join(f"![{name}]({name})" for name in figures) + "\n"
    (out / "policy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
