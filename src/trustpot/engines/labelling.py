"""Robust, parallel, resumable labelling shared by every reference engine.

The work of a run is a list of :class:`Task` s. A task has a stable id and produces a known list
of frames, each with a stable ``frame_id`` (an MD task is one short trajectory that yields several
frames; a single-point task yields one). A task function runs in a worker process and yields, for
each of its frames, either a :class:`FrameRecord` or a :class:`Failure`.

Guarantees:

* **Append as finished.** Every frame is appended to the output (extended XYZ) as soon as the
  parent process receives it, then flushed and fsync-ed: a kill loses at most the frames in flight.
* **Resume without relabelling.** On start the output is scanned; frames whose ``frame_id`` is
  there are not computed again, and a task whose frames are all there is not started. A torn last
  frame (the process was killed mid-write) is cut off and recomputed.
* **Failures are recorded, never dropped.** A frame whose calculation fails (or whose worker
  died) is written to ``OUT.failed.jsonl`` with its reason; a rerun tries it again.
* **Same options or refuse.** The options that shape the data are stored in ``OUT.run.json``; a
  rerun into the same output with other options is an error, not a silent mix.
* **Deterministic order.** While running, frames are appended in completion order; when the run
  ends the file is rewritten (atomically) in task order, then frame order within a task.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.io.extxyz import key_val_str_to_dict

from trustpot.errors import ConfigError, DataError
from trustpot.parallel import DaskCluster, Workers, as_completed, killed_reason

#: Version of the ``OUT.run.json`` layout.
RUN_FORMAT = 1


@dataclass
class FrameRecord:
    """One labelled frame as plain arrays (cheap to send between processes).

    Attributes:
        numbers: [n_atoms] atomic numbers.
        positions: [n_atoms, 3] Å.
        energy: total energy, eV.
        forces: [n_atoms, 3] eV/Å.
        cell: [3, 3] Å (zeros when not periodic).
        pbc: [3] periodic directions.
        info: metadata written to ``atoms.info`` (provenance, temperature, ...).
    """

    numbers: np.ndarray
    positions: np.ndarray
    energy: float
    forces: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    info: dict[str, Any] = field(default_factory=dict)

    def to_atoms(self) -> Atoms:
        """ASE ``Atoms`` with the labels in a ``SinglePointCalculator``."""
        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        atoms.info.update(self.info)
        atoms.calc = SinglePointCalculator(atoms, energy=self.energy, forces=self.forces)
        return atoms


@dataclass(frozen=True)
class Failure:
    """A frame that could not be labelled, and why."""

    reason: str


@dataclass(frozen=True)
class Task:
    """A unit of work.

    Attributes:
        task_id: stable id (used in failure records).
        frame_ids: ids of the frames the task produces, in order.
        payload: picklable arguments of the task function.
    """

    task_id: str
    frame_ids: tuple[str, ...]
    payload: Any


#: ``fn(payload, needed_frame_ids)`` yields ``(frame_id, FrameRecord | Failure)``.
TaskFn = Callable[[Any, frozenset[str]], Iterator[tuple[str, "FrameRecord | Failure"]]]


@dataclass
class RunSummary:
    """What a labelling run did.

    Attributes:
        out: the output file.
        total: frames the run is asked for.
        resumed: frames found already finished in the output when the run started.
        written: frames labelled and written by this run.
        failed: frames that failed (listed in ``failed_path``).
        seconds: wall-clock time of the run.
        torn_bytes: bytes of a torn last frame cut from the output, 0 if none.
    """

    out: Path
    total: int
    resumed: int
    written: int
    failed: int
    seconds: float
    torn_bytes: int = 0

    @property
    def failed_path(self) -> Path:
        return failed_path(self.out)

    @property
    def frames_per_minute(self) -> float:
        return 60.0 * self.written / self.seconds if self.seconds > 0 else float("nan")


def failed_path(out: str | Path) -> Path:
    """Sidecar listing failed frames, one JSON object per line: ``OUT.failed.jsonl``."""
    return Path(str(out) + ".failed.jsonl")


def run_info_path(out: str | Path) -> Path:
    """Sidecar holding the options of the run that wrote ``out``: ``OUT.run.json``."""
    return Path(str(out) + ".run.json")


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (same on every machine and process, unlike hash)."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def trustpot_version() -> str:
    from trustpot import __version__

    return __version__


def chunked_ids(prefix: str, n_frames: int, chunk: int) -> list[tuple[int, tuple[str, ...]]]:
    """Split frames ``prefix#0 .. prefix#n-1`` into chunks of ``chunk``: ``(index, ids)``."""
    ids = [f"{prefix}#{k}" for k in range(n_frames)]
    return [(c, tuple(ids[s : s + chunk])) for c, s in enumerate(range(0, n_frames, chunk))]


def frame_to_text(record: FrameRecord, frame_id: str) -> str:
    """One extended XYZ block (ends with a newline) carrying ``frame_id`` in its info."""
    atoms = record.to_atoms()
    atoms.info["frame_id"] = frame_id
    buffer = io.StringIO()
    write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def scan_output(path: Path) -> tuple[dict[str, str], int]:
    """Complete frames of an extended XYZ output, by ``frame_id``, and the end of the last one.

    Returns:
        ``(blocks, good_bytes)``: the text of each complete frame keyed by its ``frame_id`` and
        the byte offset after the last complete frame (anything after it is a torn write).

    Raises:
        DataError: when a complete-looking frame has no ``frame_id`` (the file was not written
            by a trustpot engine) or its header cannot be parsed.
    """
    blocks: dict[str, str] = {}
    data = path.read_bytes()
    pos, frame = 0, 0
    while pos < len(data):
        start = pos
        lines: list[bytes] = []
        end = data.find(b"\n", pos)
        if end < 0:
            break
        first = data[pos : end + 1]
        try:
            n_atoms = int(first.strip())
        except ValueError:
            break
        pos = end + 1
        lines.append(first)
        complete = True
        for _ in range(n_atoms + 1):
            end = data.find(b"\n", pos)
            if end < 0:
                complete = False
                break
            lines.append(data[pos : end + 1])
            pos = end + 1
        if not complete:
            pos = start
            break
        text = b"".join(lines).decode()
        if len(lines[-1].split()) < 4:  # a torn write always ends the file; be safe anyway
            pos = start
            break
        try:
            header = key_val_str_to_dict(lines[1].decode().strip())
        except Exception as err:
            raise DataError(str(path), f"cannot parse frame header: {err}", frame) from err
        if "frame_id" not in header:
            raise DataError(
                str(path),
                "frame has no frame_id: the file was not written by a trustpot engine; "
                "choose another --out",
                frame,
                "frame_id",
            )
        blocks[str(header["frame_id"])] = text
        frame += 1
    return blocks, pos


def _check_run_info(out: Path, params: dict[str, Any]) -> None:
    info_file = run_info_path(out)
    wanted = {"format": RUN_FORMAT, "params": params}
    if out.exists() and out.stat().st_size > 0:
        if not info_file.is_file():
            raise ConfigError(
                f"{out} exists but has no {info_file.name}: it was not written by this "
                "command; choose another --out or remove it"
            )
        old = json.loads(info_file.read_text())
        if old != json.loads(json.dumps(wanted)):
            diff = sorted(
                k
                for k in set(old.get("params", {})) | set(params)
                if old.get("params", {}).get(k) != json.loads(json.dumps(params)).get(k)
            )
            raise ConfigError(
                f"{out} was written with other options ({', '.join(diff) or 'format'} differ); "
                "rerun with the same options to resume, or choose another --out"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    info_file.write_text(json.dumps(wanted, indent=1, sort_keys=True))


class _Writer:
    """Appends frames and failure records; keeps the bookkeeping."""

    def __init__(self, out: Path, done: set[str], progress: Any) -> None:
        self.out = out
        self.done = done
        self.failures: dict[str, dict[str, Any]] = {}
        self.written = 0
        self.progress = progress
        self.handle = open(out, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.failed_handle = open(failed_path(out), "a", encoding="utf-8")  # noqa: SIM115

    def frame(self, task_id: str, frame_id: str, result: FrameRecord | Failure) -> None:
        if frame_id in self.done:
            return
        if isinstance(result, Failure):
            self.fail(task_id, frame_id, result.reason)
            return
        self.handle.write(frame_to_text(result, frame_id))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.done.add(frame_id)
        self.failures.pop(frame_id, None)
        self.written += 1
        self.progress.update(1)

    def fail(self, task_id: str, frame_id: str, reason: str) -> None:
        if frame_id in self.done or frame_id in self.failures:
            return
        record = {"frame_id": frame_id, "task_id": task_id, "reason": reason, "time": time.time()}
        self.failures[frame_id] = record
        self.failed_handle.write(json.dumps(record) + "\n")
        self.failed_handle.flush()
        self.progress.update(1)
        self.progress.set_postfix(failed=len(self.failures))

    def close(self) -> None:
        self.handle.close()
        self.failed_handle.close()


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def _worker_main(
    fn: TaskFn, tasks: Any, results: Any, worker: int, env: dict[str, str], parent: int
) -> None:  # pragma: no cover - runs in a child process
    os.environ.update(env)
    while True:
        item = tasks.get()
        if item is None or _orphaned(parent):
            return
        task, needed = item
        results.put(("start", worker, task.task_id))
        try:
            for frame_id, result in fn(task.payload, needed):
                if _orphaned(parent):  # the parent was killed: stop, nobody writes our frames
                    os._exit(1)
                results.put(("frame", task.task_id, frame_id, result))
        except Exception as err:
            results.put(("error", task.task_id, f"{type(err).__name__}: {err}"))
        results.put(("done", worker, task.task_id))


def _finish_task(writer: _Writer, task: Task, reason: str) -> None:
    for frame_id in task.frame_ids:
        writer.fail(task.task_id, frame_id, reason)


def _run_serial(fn: TaskFn, pending: list[tuple[Task, frozenset[str]]], writer: _Writer) -> None:
    for task, needed in pending:
        try:
            for frame_id, result in fn(task.payload, needed):
                writer.frame(task.task_id, frame_id, result)
            reason = "the engine returned no result for this frame"
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
        _finish_task(writer, task, reason)


def _run_parallel(
    fn: TaskFn,
    pending: list[tuple[Task, frozenset[str]]],
    writer: _Writer,
    workers: int,
    env: dict[str, str],
) -> None:
    ctx = mp.get_context("spawn")  # no fork: engines load OpenMP runtimes
    task_q, result_q = ctx.Queue(), ctx.Queue()
    by_id = {task.task_id: task for task, _ in pending}
    for item in pending:
        task_q.put(item)
    procs: dict[int, Any] = {}
    current: dict[int, str | None] = {}
    errors: dict[str, str] = {}

    def start(worker: int) -> None:
        task_q.put(None)
        p = ctx.Process(
            target=_worker_main, args=(fn, task_q, result_q, worker, env, os.getpid()), daemon=True
        )
        p.start()
        procs[worker], current[worker] = p, None

    n_workers = min(workers, len(pending))
    for w in range(n_workers):
        start(w)
    remaining = set(by_id)
    next_worker = n_workers
    try:
        while remaining:
            try:
                msg = result_q.get(timeout=0.5)
            except queue.Empty:
                for w, p in list(procs.items()):
                    if p.is_alive() or p.exitcode == 0:
                        continue
                    task_id = current.get(w)
                    del procs[w]
                    if task_id is not None and task_id in remaining:
                        remaining.discard(task_id)
                        _finish_task(
                            writer, by_id[task_id], f"worker process died (exit code {p.exitcode})"
                        )
                        # replace a worker that died in a task; one that dies before taking a
                        # task cannot start at all, and replacing it would loop forever
                        if remaining:
                            start(next_worker)
                            next_worker += 1
                if not procs and remaining:
                    for task_id in sorted(remaining):
                        _finish_task(writer, by_id[task_id], "no worker left to run the task")
                    remaining.clear()
                continue
            kind = msg[0]
            if kind == "start":
                current[msg[1]] = msg[2]
            elif kind == "frame":
                writer.frame(msg[1], msg[2], msg[3])
            elif kind == "error":
                errors[msg[1]] = msg[2]
            elif kind == "done":
                current[msg[1]] = None
                task_id = msg[2]
                reason = errors.get(task_id, "the engine returned no result for this frame")
                _finish_task(writer, by_id[task_id], reason)
                remaining.discard(task_id)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
        for p in procs.values():
            p.join(timeout=5)


def _dask_task(
    fn: TaskFn, payload: Any, needed: frozenset[str], env: dict[str, str]
) -> tuple[list[tuple[str, FrameRecord | Failure]], str | None]:  # pragma: no cover - on a worker
    """One task on a Dask worker: its frames and, if it raised, the reason (frames it finished
    before raising are kept, as in a local worker)."""
    for key, value in env.items():
        os.environ.setdefault(key, value)
    frames: list[tuple[str, FrameRecord | Failure]] = []
    try:
        for frame_id, result in fn(payload, needed):
            frames.append((frame_id, result))
    except Exception as err:
        return frames, f"{type(err).__name__}: {err}"
    return frames, None


def _run_dask(
    fn: TaskFn,
    pending: list[tuple[Task, frozenset[str]]],
    writer: _Writer,
    cluster: DaskCluster,
    env: dict[str, str],
    desc: str,
) -> None:
    """Each task a Dask task; its frames are written as soon as its result arrives."""
    calls = [(fn, task.payload, needed, env) for task, needed in pending]
    name = desc.replace(" ", "-")
    for k, result, error in as_completed(cluster, _dask_task, calls, name):
        task = pending[k][0]
        reason = "the engine returned no result for this frame"
        if error is not None:
            reason = killed_reason(error)
        else:
            frames, raised = result
            for frame_id, record in frames:
                writer.frame(task.task_id, frame_id, record)
            reason = raised or reason
        _finish_task(writer, task, reason)


def _rewrite_in_order(out: Path, order: Sequence[str]) -> None:
    blocks, _ = scan_output(out)
    rank = {frame_id: k for k, frame_id in enumerate(order)}
    ids = sorted(blocks, key=lambda f: (rank.get(f, len(rank)), f))
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for frame_id in ids:
            handle.write(blocks[frame_id])
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)


def run_tasks(
    tasks: Sequence[Task],
    fn: TaskFn,
    out: str | Path,
    params: dict[str, Any],
    workers: Workers = 1,
    desc: str = "labelling",
    progress: bool = True,
    threads_per_worker: int = 1,
) -> RunSummary:
    """Run ``tasks`` with ``fn``, appending frames to ``out``; resume what a previous run left.

    Args:
        tasks: the work; frame ids must be unique across tasks.
        fn: module-level function (it is sent to worker processes by name).
        out: extended XYZ output.
        params: options that shape the data (stored in ``OUT.run.json``, compared on resume).
        workers: worker processes (each started fresh, so a crash in an engine's native code
            costs one task, not the run); 0 runs the tasks in this process; a
            :class:`trustpot.parallel.DaskCluster` submits each task to Dask (a killed worker's
            task is rerun elsewhere; frames of finished tasks are already written).
        desc: progress bar label.
        progress: show a tqdm progress bar (on stderr).
        threads_per_worker: ``OMP_NUM_THREADS`` for each worker unless already set (OpenMP
            engines slow down many times over when their threads compete for cores).

    Returns:
        A :class:`RunSummary`.

    Raises:
        ConfigError: ``out`` holds another run's data, or ``workers`` < 1.
    """
    from tqdm.auto import tqdm

    if not isinstance(workers, DaskCluster) and workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    out = Path(out)
    order = [frame_id for task in tasks for frame_id in task.frame_ids]
    if len(set(order)) != len(order):
        raise ConfigError("duplicate frame ids in the task list (internal error)")
    _check_run_info(out, params)
    t0 = time.perf_counter()
    torn = 0
    done: set[str] = set()
    if out.exists():
        blocks, good = scan_output(out)
        torn = out.stat().st_size - good
        if torn:
            with open(out, "r+b") as handle:
                handle.truncate(good)
        done = set(blocks) & set(order)
    resumed = len(done)
    pending = []
    for task in tasks:
        needed = frozenset(task.frame_ids) - done
        if needed:
            pending.append((task, needed))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_worker))}
    bar = tqdm(total=len(order), initial=resumed, desc=desc, unit="frame", disable=not progress)
    writer = _Writer(out, done, bar)
    try:
        if isinstance(workers, DaskCluster):
            if pending:
                _run_dask(fn, pending, writer, workers, env, desc)
        elif workers == 0:
            for key, value in env.items():  # effective only if no OpenMP runtime is loaded yet
                os.environ.setdefault(key, value)
            _run_serial(fn, pending, writer)
        elif pending:
            _run_parallel(fn, pending, writer, workers, env)
    finally:
        writer.close()
        bar.close()
    _rewrite_in_order(out, order)
    outstanding = [writer.failures[f] for f in order if f in writer.failures]
    fpath = failed_path(out)
    if outstanding:
        fpath.write_text("".join(json.dumps(r) + "\n" for r in outstanding))
    else:
        with contextlib.suppress(FileNotFoundError):
            fpath.unlink()
    return RunSummary(
        out=out,
        total=len(order),
        resumed=resumed,
        written=writer.written,
        failed=len(outstanding),
        seconds=time.perf_counter() - t0,
        torn_bytes=torn,
    )
