"""``trustpot learn``: active learning with a reference engine as the oracle.

::

    trustpot learn --smiles CCO CC=O --temperature 600 --uq ensemble --rounds 5 --out runs/al

Steps, each a folder of ``OUT`` run once under :func:`trustpot.train.reuse.run_step` (a rerun
reuses what is done, resumes what a kill interrupted, and refuses a folder made with other
settings, naming them):

1. ``start/start.xyz``: the labelled starting frames (``--initial``, or ``--initial-frames`` per
   system sampled by the engine's own MD at ``--temperature``); a seeded share of them is held
   out of training to calibrate the uncertainty (``al_role``).
2. ``test/test.xyz``: held-out labelled test frames (``--test``, or sampled at
   ``--test-temperature`` with an independent seed).
3. ``rounds/NN/fit``: train the round's potentials on every labelled training frame so far
   (warm-started from round NN-1's weights unless ``--cold-start``), fit and recalibrate the
   reliability wrapper, evaluate on the test frames (:func:`trustpot.learn.rounds.fit_round`).
4. ``rounds/NN/acquire/{explore,select,label}``: short MD from labelled seed frames with that
   model, every visited frame scored, ``--per-round`` frames chosen (selected by score with
   farthest-point sampling, plus a random calibration share), labelled by the engine
   (:func:`trustpot.learn.rounds.acquire`).

Rounds repeat until ``--rounds`` labelling rounds are done, the test force MAE reaches
``--target-mae`` or the labels reach ``--budget``; the model is trained once more after the
last labels. ``OUT/data.xyz`` then holds every labelled frame with its provenance in
``atoms.info``: ``al_id`` (unique), ``al_round`` (-1 for starting frames), ``al_role``,
``al_source`` (``start``, ``given`` or ``md``), and for explored frames ``al_score``,
``al_source_step`` (MD step), ``al_walker``, ``al_seed_frame`` (the ``al_id`` it started from),
plus what the engine records (``engine``, ``method``, ...). With ``--baseline`` random
selection runs the same way in ``OUT/baseline`` from the same start and test frames. The
report (:mod:`trustpot.learn.report`): ``report.json``, ``report.md``, ``learning_curve.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trustpot.config import config_to_dict
from trustpot.data.reader import file_sha256
from trustpot.data.splits import read_data
from trustpot.data.structures import Structure
from trustpot.engines.labelling import stable_seed
from trustpot.errors import ConfigError
from trustpot.learn.engines import Oracle
from trustpot.learn.options import LearnOptions
from trustpot.learn.rounds import (
    CALIBRATION,
    MIN_CALIBRATION,
    PLAIN,
    Strategy,
    acquire,
    fit_round,
    split_roles,
    write_frames,
)
from trustpot.train.reuse import run_step

Log = Callable[[str], None]


def _sampled(
    oracle: Oracle, out: Path, frames: int, temperature: float, seed: int, opts: LearnOptions
) -> list[Structure]:
    summary = oracle.sample(out, frames, temperature, seed, opts.executor, not opts.quiet)
    if summary.failed:
        raise ConfigError(
            f"{summary.failed} frame(s) of {out} failed ({summary.failed_path}); "
            "rerun to retry them"
        )
    return read_data(str(out))


def start_step(opts: LearnOptions, oracle: Oracle, folder: Path) -> dict[str, Any]:
    """Write ``folder/start.xyz``: the starting frames with their roles and provenance."""
    if opts.initial:
        frames, source = read_data(opts.initial), "given"
    else:
        frames = _sampled(
            oracle,
            folder / "sampled.xyz",
            opts.get("initial_frames"),
            opts.temperature,
            stable_seed(opts.seed, "start"),
            opts,
        )
        source = "start"
    fraction = opts.get("calibration_fraction") if opts.uq != "random" else None
    roles = split_roles(len(frames), fraction, stable_seed(opts.seed, "roles"), MIN_CALIBRATION)
    out = []
    for i, (s, role) in enumerate(zip(frames, roles)):
        atoms = s.to_atoms()
        atoms.info.update(al_round=-1, al_role=role, al_source=source)
        if source == "given":  # a given file's ids need not be unique: number the frames
            if "frame_id" in atoms.info:
                atoms.info["given_frame_id"] = atoms.info["frame_id"]
            atoms.info["frame_id"] = f"given-{i}"
        out.append(atoms)
    write_frames(folder / "start.xyz", out)
    return {
        "frames": len(out),
        "calibration": roles.count(CALIBRATION),
        "sha256": file_sha256(folder / "start.xyz"),
    }


def heldout_step(opts: LearnOptions, oracle: Oracle, folder: Path) -> dict[str, Any]:
    """The test frames: ``--test`` as given, else sampled into ``folder/test.xyz``."""
    if opts.test:
        frames, path = read_data(opts.test), Path(opts.test)
    else:
        path = folder / "test.xyz"
        frames = _sampled(
            oracle,
            path,
            opts.get("test_frames"),
            opts.test_temp,
            stable_seed(opts.seed, "test"),
            opts,
        )
    return {"file": str(path.resolve()), "frames": len(frames), "sha256": file_sha256(path)}


def read_pool(files: Sequence[tuple[str, Path]]) -> list[Structure]:
    """Every labelled frame of ``files`` (``(tag, path)``), each with a unique ``al_id``
    (``tag:frame_id``), in order."""
    pool: list[Structure] = []
    for tag, path in files:
        for s in read_data(str(path)):
            s.info["al_id"] = f"{tag}:{s.info.get('frame_id', len(pool))}"
            pool.append(s)
    return pool


def _digest(files: Sequence[tuple[str, Path]]) -> str:
    text = "|".join(f"{tag}={file_sha256(path)}" for tag, path in files)
    return hashlib.sha256(text.encode()).hexdigest()


def fit_config(opts: LearnOptions, strategy: Strategy) -> dict[str, Any]:
    """What shapes a round's model: method, its options, training (where it runs aside)."""
    training = config_to_dict(opts.run_config("", opts.seed))
    training["data"].pop("train")
    training["train"].pop("threads")
    cfg: dict[str, Any] = {
        "method": strategy.method,
        "training": training,
        "cold_start": opts.cold_start,
    }
    if strategy.calibrating:
        cfg["score"] = opts.score_kind
    for name in ("n_models", "uq_minutes"):
        if getattr(opts, name) is not None or (
            name == "n_models" and strategy.method == "ensemble"
        ):
            cfg[name] = opts.get(name)
    return cfg


def acquire_config(opts: LearnOptions, strategy: Strategy, oracle: Oracle) -> dict[str, Any]:
    """What shapes a round's exploration, selection and labels."""
    names = (
        "temperature",
        "walkers",
        "md_steps",
        "interval",
        "timestep",
        "friction",
        "min_distance",
        "seed",
    )
    cfg: dict[str, Any] = {name: getattr(opts, name) for name in names}
    cfg.update(method=strategy.method, rule=strategy.rule, engine=oracle.params())
    if strategy.calibrating:
        cfg.update(
            score=opts.score_kind,
            pool_factor=opts.get("pool_factor"),
            calibration_fraction=opts.get("calibration_fraction"),
            halt_std=opts.halt_std,
        )
    return cfg


def _fit(
    opts: LearnOptions,
    strategy: Strategy,
    pool: list[Structure],
    previous: Path | None,
    test: list[Structure],
    log: Log,
    folder: Path,
    resuming: bool,
) -> dict[str, Any]:
    return fit_round(opts, strategy, folder, pool, previous, test, log)


def _acquire(
    opts: LearnOptions,
    strategy: Strategy,
    oracle: Oracle,
    checkpoint: Path,
    pool: list[Structure],
    k: int,
    n: int,
    log: Log,
    folder: Path,
    resuming: bool,
) -> dict[str, Any]:
    return acquire(opts, strategy, oracle, checkpoint, pool, k, n, folder, log)


def run_strategy(
    opts: LearnOptions,
    oracle: Oracle,
    root: Path,
    strategy: Strategy,
    start: Path,
    test: dict[str, Any],
    log: Log,
    first_fit: Path | None = None,
) -> dict[str, Any]:
    """The rounds of one selection strategy in ``root``; writes ``root/data.xyz``.

    ``first_fit``: the folder of round 0's fit when another strategy trains the same model on
    the same starting frames (the ``--baseline`` run shares the main run's).
    """
    test_frames = read_data(test["file"])
    files: list[tuple[str, Path]] = [("start", start)]
    rows: list[dict[str, Any]] = []
    stopped_by = "rounds"
    base_fit = {**fit_config(opts, strategy), "test_sha256": test["sha256"]}
    base_acquire = acquire_config(opts, strategy, oracle)
    previous: Path | None = None
    for k in range(opts.rounds + 1):
        pool = read_pool(files)
        folder = root / "rounds" / f"{k:02d}"
        fit_dir = first_fit if k == 0 and first_fit is not None else folder / "fit"
        fit = run_step(
            fit_dir,
            {**base_fit, "round": k, "pool": _digest(files)},
            functools.partial(_fit, opts, strategy, pool, previous, test_frames, log),
            log,
        )
        fit.pop("reused", None)
        rows.append({"round": k, **fit})
        previous = fit_dir
        n = opts.per_round if not opts.budget else min(opts.per_round, opts.budget - len(pool))
        if opts.target_mae is not None and fit["test"]["forces_mae"] <= opts.target_mae:
            stopped_by = "target"
        elif k == opts.rounds:
            stopped_by = "rounds"
        elif n <= 0:
            stopped_by = "budget"
        else:
            checkpoint = Path(fit["checkpoint"])
            acq = run_step(
                folder / "acquire",
                {**base_acquire, "round": k, "n_labels": n},
                functools.partial(_acquire, opts, strategy, oracle, checkpoint, pool, k, n, log),
                log,
            )
            acq.pop("reused", None)
            rows[-1]["acquire"] = acq
            labelled = folder / "acquire" / "label" / "labelled.xyz"
            if acq["labelled"] == 0 or not labelled.is_file():
                stopped_by = "nothing labelled"
                break
            files.append((f"round{k}", labelled))
            continue
        break
    frames = [s.to_atoms() for s in read_pool(files)]
    write_frames(root / "data.xyz", frames)
    log(f"{root / 'data.xyz'}: {len(frames)} labelled frames; stopped by {stopped_by}")
    return {
        "strategy": strategy.name,
        "method": strategy.method,
        "rule": strategy.rule,
        "rounds": rows,
        "stopped_by": stopped_by,
        "labels": len(frames),
        "data": str(root / "data.xyz"),
    }


def run_learn(opts: LearnOptions, log: Log = print) -> dict[str, Any]:
    """Run (or resume) every step; write the report. Returns ``report.json``'s content."""
    from trustpot.learn.report import write_report

    opts.check_systems()
    oracle = opts.oracle()
    oracle.check()
    if opts.threads > 0:
        import torch

        torch.set_num_threads(opts.threads)
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    given = {"initial_sha256": file_sha256(opts.initial)} if opts.initial else {}
    start_cfg = {
        "engine": oracle.params(),
        "temperature": opts.temperature,
        "seed": opts.seed,
        "frames": None if opts.initial else opts.get("initial_frames"),
        "calibration_fraction": opts.get("calibration_fraction") if opts.uq != "random" else None,
        **given,
    }
    start = run_step(out / "start", start_cfg, lambda f, _: start_step(opts, oracle, f), log)
    if opts.uq == "probe":
        from trustpot.uq.probe import MIN_STRUCTURES

        if start["calibration"] < MIN_STRUCTURES:
            raise ConfigError(
                f"--uq probe: {start['calibration']} of the {start['frames']} starting frames "
                f"are held out for calibration; PROBE needs at least {MIN_STRUCTURES}: raise "
                "--calibration-fraction or the starting frames (--initial-frames, --initial)"
            )
    test_cfg = {
        "engine": oracle.params(),
        "seed": opts.seed,
        "given": opts.test or None,
        "frames": None if opts.test else opts.get("test_frames"),
        "temperature": None if opts.test else opts.test_temp,
    }
    test = run_step(out / "test", test_cfg, lambda f, _: heldout_step(opts, oracle, f), log)
    if opts.test and test["sha256"] != file_sha256(opts.test):
        raise ConfigError(f"--test {opts.test}: the file changed since {out / 'test'} used it")
    main = Strategy(PLAIN, "random") if opts.uq == "random" else Strategy(opts.uq, "score")
    strategies = [(main, out)]
    if opts.baseline:  # the same models and exploration, frames drawn at random
        strategies.append((Strategy(opts.uq, "random"), out / "baseline"))
    shared = out / "rounds" / "00" / "fit"
    results = [
        run_strategy(
            opts,
            oracle,
            root,
            strategy,
            out / "start" / "start.xyz",
            test,
            log,
            None if root == out else shared,
        )
        for strategy, root in strategies
    ]
    (out / "learn.json").write_text(json.dumps(dataclasses.asdict(opts), indent=1))
    report = write_report(out, opts, start, test, results, time.perf_counter() - t0)
    log(f"report: {out / 'report.md'}")
    return report
