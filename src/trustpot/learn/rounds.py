"""The two halves of a round of ``trustpot learn``, each a plain function of (inputs -> files).

:func:`fit_round` trains the round's potentials on the labelled training frames (warm-started
from the previous round's weights unless told otherwise), wraps them in the reliability method
and recalibrates it on the held-out calibration frames (:func:`trustpot.uq.fit.fit_uq`), and
scores the result on the test frames. :func:`acquire` explores with that model, selects frames
and labels them with the engine. Both write only under their folder and read only files and
options, so a pool of processes or a cluster could run them; the loop
(:mod:`trustpot.learn.loop`) wraps each in :func:`trustpot.train.reuse.run_step`.

Each labelling round spends ``n`` labels: ``c = round(calibration_fraction * n)`` of them on
frames drawn uniformly from the visited ones (held out of training; they calibrate the
uncertainty on the distribution that exploration visits, not on the frames chosen for being
uncertain), the other ``n - c`` on the selected frames. Without a reliability method
(``--uq random``) every label trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.io import write

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.data.structures import Structure
from trustpot.engines.labelling import stable_seed
from trustpot.learn.engines import Oracle
from trustpot.learn.explore import Walk, walk
from trustpot.learn.options import LearnOptions
from trustpot.learn.select import (
    frame_score,
    score_outputs,
    select_diverse,
    select_random,
    structure_descriptors,
)
from trustpot.metrics import uncertainty
from trustpot.metrics.accuracy import accuracy_metrics, per_structure_force_mae
from trustpot.models.contract import Model
from trustpot.parallel import DaskCluster
from trustpot.train.reuse import run_step

Log = Callable[[str], None]
#: Fewest calibration frames :func:`trustpot.uq.calibrate.recalibrate` works with.
MIN_CALIBRATION = 2
#: ``Strategy.method`` of random selection without a reliability method (``--uq random``).
PLAIN = "plain"
#: Role of a labelled frame (``atoms.info["al_role"]``).
TRAIN, CALIBRATION = "train", "calibration"


@dataclass(frozen=True)
class Strategy:
    """How a run chooses frames.

    Attributes:
        method: what each round trains: a reliability method (``ensemble``, ``mc-dropout``,
            ``probe``, ``perturb``) or :data:`PLAIN` (one potential, no uncertainty).
        rule: ``score`` (top scores, farthest-point sampling) or ``random`` (uniform among the
            visited frames).
    """

    method: str
    rule: str

    @property
    def name(self) -> str:
        """The report's label: the method for score selection, ``random`` otherwise."""
        return self.method if self.rule == "score" else "random"

    @property
    def calibrating(self) -> bool:
        """Whether a share of the labels is held out to calibrate a reliability method."""
        return self.method != PLAIN


def write_frames(path: Path, frames: Sequence[Atoms]) -> None:
    """Write ``frames`` to ``path`` (extended XYZ) through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    write(str(tmp), list(frames), format="extxyz")
    tmp.replace(path)


def split_roles(n: int, fraction: float | None, seed: int, minimum: int = 0) -> list[str]:
    """Roles of ``n`` frames: ``round(fraction * n)`` (at least ``minimum``, at most ``n - 1``)
    drawn with ``seed`` are calibration frames, the rest training frames."""
    if not fraction or n < 2:
        return [TRAIN] * n
    n_cal = min(max(round(fraction * n), minimum), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_cal].tolist())
    return [CALIBRATION if i in chosen else TRAIN for i in range(n)]


# -- fit -----------------------------------------------------------------------------------
def _train_members(
    opts: LearnOptions, method: str, folder: Path, train: Path, previous: Path | None, log: Log
) -> list[Path]:
    from trustpot.uq.fit import train_many
    from trustpot.uq.options import MCDropoutOptions

    n = opts.get("n_models") if method == "ensemble" else 1
    dropout = MCDropoutOptions().dropout if method == "mc-dropout" else 0.0
    runs = []
    for k in range(n):
        init = ""
        if previous is not None and not opts.cold_start:
            init = str(previous / "models" / f"member_{k}" / "best.ckpt")
        cfg = opts.run_config(str(train), opts.seed + k, init, dropout)
        runs.append((cfg, folder / "models" / f"member_{k}"))
    executor = opts.executor
    return train_many(runs, executor if isinstance(executor, DaskCluster) else 0, log)


def _wrap(
    opts: LearnOptions,
    method: str,
    members: list[Path],
    train: Path,
    calibration: Path | None,
    folder: Path,
    log: Log,
) -> Path:
    """Fit the reliability wrapper ``method`` around ``members``; its checkpoint."""
    from trustpot.uq.fit import fit_uq
    from trustpot.uq.options import (
        EnsembleOptions,
        MCDropoutOptions,
        PerturbOptions,
        ProbeOptions,
        UQOptions,
    )

    cal = str(calibration) if calibration is not None else None
    options: UQOptions
    if method == "ensemble":
        options = EnsembleOptions(members=tuple(str(p) for p in members), calibration=cal)
    elif method == "mc-dropout":
        options = MCDropoutOptions(base=str(members[0]), calibration=cal)
    elif method == "probe":
        options = ProbeOptions(
            base=str(members[0]),
            calibration=cal,
            seed=opts.seed,
            max_minutes=opts.get("uq_minutes"),
        )
    else:
        options = PerturbOptions(
            base=str(members[0]),
            train=str(train),
            calibration=cal,
            max_minutes=opts.get("uq_minutes"),
            seed=opts.seed,
        )
    fit_uq(method, options, folder / "uq", log)
    return folder / "uq" / "uq.ckpt"


def evaluate(checkpoint: Path, test: Sequence[Structure], score: str | None) -> dict[str, Any]:
    """Errors on the test frames and how well the score ranks them.

    Returns:
        ``forces_mae``, ``forces_rmse`` (eV/Å, components), ``energy_mae_per_atom`` (eV),
        ``n_frames``; with a score: ``spearman`` (score vs per-frame force MAE), ``auroc``
        (flagging the 20% largest per-frame errors), ``mean_score``; with ``forces_std``:
        ``z_rms``, the RMS of force-component errors divided by the calibrated std (1 when
        calibrated).
    """
    predictor = Predictor.from_checkpoint(checkpoint)
    have = predictor.supported_outputs()
    outputs = {K.ENERGY, K.FORCES} | ({K.FORCES_STD, K.FORCES_STD_RAW, K.RELIABILITY} & have)
    preds = predictor.predict_structures(test, outputs, source="test frames")
    acc = accuracy_metrics(test, preds)
    out: dict[str, Any] = {
        key: float(acc[key]) for key in ("forces_mae", "forces_rmse", "energy_mae_per_atom")
    }
    out["n_frames"] = len(test)
    errors = per_structure_force_mae(test, preds)
    if score is not None:
        scores = np.array([frame_score(p, score) for p in preds])
        ranked = len(test) >= 3 and np.ptp(scores) > 0 and np.ptp(errors) > 0
        out["spearman"] = uncertainty.spearman(scores, errors) if ranked else float("nan")
        labels = uncertainty.high_error_labels(errors)
        out["auroc"] = (
            uncertainty.auroc(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")
        )
        out["mean_score"] = float(np.mean(scores))
    if K.FORCES_STD in preds[0]:
        z = np.concatenate(
            [
                ((p[K.FORCES] - s.forces) / p[K.FORCES_STD][:, None]).ravel()
                for s, p in zip(test, preds)
                if s.forces is not None
            ]
        )
        out["z_rms"] = float(np.sqrt(np.mean(z**2)))
    return out


def fit_round(
    opts: LearnOptions,
    strategy: Strategy,
    folder: Path,
    pool: Sequence[Structure],
    previous: Path | None,
    test: Sequence[Structure],
    log: Log,
) -> dict[str, Any]:
    """Train and wrap the round's model on ``pool``; evaluate it on ``test``.

    Writes ``folder/train.xyz``, ``calibration.xyz`` (with a reliability method),
    ``models/member_k/`` (training runs), ``uq/`` (the wrapper). ``previous``: the last
    round's fit folder (warm start from its members, unless ``--cold-start``).
    """
    t0 = time.perf_counter()
    calibrating = strategy.calibrating
    train = [s for s in pool if not calibrating or s.info.get("al_role") != CALIBRATION]
    cal = [s for s in pool if calibrating and s.info.get("al_role") == CALIBRATION]
    train_file, cal_file = folder / "train.xyz", folder / "calibration.xyz"
    write_frames(train_file, [s.to_atoms() for s in train])
    if cal:
        write_frames(cal_file, [s.to_atoms() for s in cal])
    members = _train_members(opts, strategy.method, folder, train_file, previous, log)
    checkpoint = members[0]
    if calibrating:
        checkpoint = _wrap(
            opts, strategy.method, members, train_file, cal_file if cal else None, folder, log
        )
    metrics = evaluate(checkpoint, test, opts.score_kind if calibrating else None)
    log(
        f"{folder}: {len(pool)} labels, test force MAE {metrics['forces_mae']:.4f} eV/Å"
        + (f", Spearman {metrics['spearman']:.2f}" if "spearman" in metrics else "")
    )
    return {
        "checkpoint": str(checkpoint),
        "labels": len(pool),
        "train_frames": len(train),
        "calibration_frames": len(cal),
        "test": metrics,
        "seconds": time.perf_counter() - t0,
    }


# -- acquire -------------------------------------------------------------------------------
def seed_frames(pool: Sequence[Structure], walkers: int, seed: int, k: int) -> list[Structure]:
    """``walkers`` seed frames per system (chemical formula), drawn from ``pool`` (the starting
    frames: walkers always start from configurations the engine sampled, so exploration does
    not drift further round after round) with a seed per (round, system); systems sorted."""
    systems: dict[str, list[Structure]] = {}
    for s in pool:
        systems.setdefault(s.to_atoms(with_labels=False).get_chemical_formula(), []).append(s)
    out: list[Structure] = []
    for formula in sorted(systems):
        frames = systems[formula]
        rng = np.random.default_rng(stable_seed(seed, "seeds", k, formula))
        order = rng.permutation(len(frames))
        out.extend(frames[int(order[w % len(frames)])] for w in range(walkers))
    return out


@torch.no_grad()
def descriptors(model: Model, frames: Sequence[Atoms], batch_size: int = 32) -> np.ndarray:
    """[n_frames, n_species * F] structure descriptors from ``model.embed``
    (:func:`trustpot.learn.select.structure_descriptors`)."""
    from trustpot.data.graph import collate, structure_to_graph
    from trustpot.data.reader import atoms_to_structure

    model.eval()
    structures = [atoms_to_structure(a) for a in frames]
    per_frame: list[np.ndarray] = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        g = collate([structure_to_graph(s, model.neighbor_lists(), model.dtype) for s in chunk])
        node = model.embed(g)["node"].double().cpu().numpy()
        bounds = np.cumsum([0] + [s.n_atoms for s in chunk])
        per_frame.extend(node[bounds[i] : bounds[i + 1]] for i in range(len(chunk)))
    return structure_descriptors(per_frame, [s.numbers for s in structures], model.species)


def halt_level(opts: LearnOptions, strategy: Strategy, pool: Sequence[Structure]) -> float | None:
    """The ``forces_std`` (eV/Å) that stops a walker: ``--halt-std``, else the RMS force
    component of the labelled training frames (an uncertainty as large as the forces
    themselves); ``None`` for methods without ``forces_std`` (PROBE, random)."""
    if strategy.method in (PLAIN, "probe"):
        return None
    if opts.halt_std is not None:
        return float(opts.halt_std)
    forces = [
        s.forces.ravel()
        for s in pool
        if s.forces is not None and s.info.get("al_role") != CALIBRATION
    ]
    return float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))


def explore(
    opts: LearnOptions,
    strategy: Strategy,
    checkpoint: Path,
    pool: Sequence[Structure],
    k: int,
    folder: Path,
    carry: Sequence[str],
) -> dict[str, Any]:
    """Run the walkers of round ``k``; write ``folder/candidates.xyz``."""
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    predictor = Predictor.from_checkpoint(checkpoint)
    halt = halt_level(opts, strategy, pool)
    settings = Walk(
        opts.md_steps,
        opts.interval,
        opts.temperature,
        opts.timestep,
        opts.friction,
        opts.min_distance,
        halt,
    )
    frames: list[Atoms] = []
    walks = []
    starts = [s for s in pool if s.info.get("al_round") == -1]
    for w, start in enumerate(seed_frames(starts, opts.walkers, opts.seed, k)):
        got, summary = walk(
            predictor,
            start.to_atoms(with_labels=False),
            settings,
            stable_seed(opts.seed, "md", k, w),
            carry,
            w,
        )
        frames.extend(got)
        walks.append(summary)
    if strategy.calibrating and frames:
        kind = opts.score_kind
        preds = predictor.predict(frames, {K.ENERGY, K.FORCES} | score_outputs(kind))
        for atoms, p in zip(frames, preds):
            atoms.info["al_score"] = frame_score(p, kind)
    write_frames(folder / "candidates.xyz", frames)
    return {
        "candidates": len(frames),
        "walkers": len(walks),
        "segments": sum(s["segments"] for s in walks),
        "stops": [reason for s in walks for reason in s["stops"]],
        "halt_std": halt,
    }


def select(
    opts: LearnOptions,
    strategy: Strategy,
    checkpoint: Path,
    candidates: list[Atoms],
    k: int,
    n_labels: int,
    folder: Path,
) -> dict[str, Any]:
    """Choose ``n_labels`` candidates (selected + calibration); write ``folder/selected.xyz``."""
    rng_seed = stable_seed(opts.seed, "select", k)
    calibrating = strategy.calibrating
    fraction = opts.get("calibration_fraction") if calibrating else None
    roles = split_roles(n_labels, fraction, rng_seed)
    n_cal = roles.count(CALIBRATION)
    n_sel = min(n_labels - n_cal, len(candidates))
    if strategy.rule == "random":
        picked = select_random(len(candidates), n_sel, rng_seed)
    else:
        from trustpot.io.checkpoint import load_model

        scores = np.array([float(a.info.get("al_score", np.nan)) for a in candidates])
        desc = descriptors(load_model(checkpoint), candidates)
        picked = select_diverse(scores, desc, n_sel, opts.get("pool_factor"))
    rest = [i for i in range(len(candidates)) if i not in set(picked)]
    calibration = [rest[i] for i in select_random(len(rest), n_cal, rng_seed + 1)]
    out = []
    for rank, (i, role) in enumerate(
        [(i, TRAIN) for i in picked] + [(i, CALIBRATION) for i in calibration]
    ):
        atoms = candidates[i].copy()
        atoms.info.update(
            al_round=k,
            al_uq=strategy.method,
            al_rule=strategy.rule,
            al_role=role,
            al_rank=rank,
            al_source="md",
            al_candidate=i,
        )
        out.append(atoms)
    write_frames(folder / "selected.xyz", out)
    chosen = np.array([float(a.info.get("al_score", np.nan)) for a in out[: len(picked)]])
    return {
        "selected": len(picked),
        "calibration": len(calibration),
        "mean_selected_score": float(np.mean(chosen)) if len(chosen) else float("nan"),
    }


def acquire(
    opts: LearnOptions,
    strategy: Strategy,
    oracle: Oracle,
    checkpoint: Path,
    pool: Sequence[Structure],
    k: int,
    n_labels: int,
    folder: Path,
    log: Log,
) -> dict[str, Any]:
    """Explore, select and label ``n_labels`` frames in round ``k``: three steps in
    ``folder/{explore,select,label}``, each reused after a kill; ``label/labelled.xyz`` holds
    the labelled frames (resumed frame by frame)."""
    from ase.io import read

    t0 = time.perf_counter()
    e = run_step(
        folder / "explore",
        {"round": k},
        lambda f, _: explore(opts, strategy, checkpoint, pool, k, f, oracle.carry),
        log,
    )
    candidates = read(str(folder / "explore" / "candidates.xyz"), ":") if e["candidates"] else []
    s = run_step(
        folder / "select",
        {"round": k, "n": n_labels},
        lambda f, _: select(opts, strategy, checkpoint, list(candidates), k, n_labels, f),
        log,
    )
    source = folder / "select" / "selected.xyz"

    def label(f: Path, _: bool) -> dict[str, Any]:
        if s["selected"] + s["calibration"] == 0:
            return {"labelled": 0, "failed": 0}
        summary = oracle.label(source, f / "labelled.xyz", opts.executor, not opts.quiet)
        return {
            "labelled": summary.total - summary.failed,
            "failed": summary.failed,
            "seconds": summary.seconds,
        }

    lab = run_step(folder / "label", {"round": k, "engine": oracle.params()}, label, log)
    log(
        f"{folder}: {e['candidates']} frames visited, {s['selected']} selected + "
        f"{s['calibration']} for calibration, {lab['labelled']} labelled ({lab['failed']} failed)"
    )
    out = {**e, **s, **lab, "seconds": time.perf_counter() - t0}
    out.pop("reused", None)
    return out
