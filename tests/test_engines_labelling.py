"""Resumable, parallel labelling: resume, torn writes, failures, option checks, kill and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase.io import read, write

from trustpot.engines.labelling import (
    Failure,
    FrameRecord,
    Task,
    chunked_ids,
    failed_path,
    run_tasks,
    scan_output,
    stable_seed,
)
from trustpot.engines.nbody import MCOptions, generate_nbody
from trustpot.errors import ConfigError, DataError

FAST = MCOptions(equilibration=5, interval=2, chunk=4)


def _ids(path: Path) -> list[str]:
    return [str(a.info["frame_id"]) for a in read(path, ":")]


def test_stable_seed_and_chunks() -> None:
    assert stable_seed(0, "CCO", 300.0, 1) == stable_seed(0, "CCO", 300.0, 1)
    assert stable_seed(0, "CCO", 300.0, 1) != stable_seed(0, "CCO", 300.0, 2)
    assert 0 <= stable_seed("x") < 2**31
    chunks = chunked_ids("a", 5, 2)
    assert chunks == [(0, ("a#0", "a#1")), (1, ("a#2", "a#3")), (2, ("a#4",))]


def test_run_resume_and_order(tmp_path: Path) -> None:
    out = tmp_path / "n.xyz"
    first = generate_nbody([3, 4], 6, out, workers=0, mc=FAST, progress=False)
    assert (first.total, first.written, first.failed) == (12, 12, 0)
    ids = _ids(out)
    expected = [f"nbody{n}@1000K#{k}" for n in (3, 4) for k in range(6)]
    assert ids == expected  # canonical order: task order, then frame order
    again = generate_nbody([3, 4], 6, out, workers=0, mc=FAST, progress=False)
    assert (again.resumed, again.written) == (12, 0)
    assert _ids(out) == expected
    assert not failed_path(out).exists()


def test_torn_last_frame_is_cut_and_redone(tmp_path: Path) -> None:
    out = tmp_path / "n.xyz"
    generate_nbody([5], 6, out, workers=0, mc=FAST, progress=False)
    reference = read(out, ":")
    blocks, _ = scan_output(out)
    # keep 3 whole frames and half of the 4th, as a kill during a write leaves it
    text = "".join(blocks[f"nbody5@1000K#{k}"] for k in range(3))
    half = blocks["nbody5@1000K#3"][: len(blocks["nbody5@1000K#3"]) // 2]
    out.write_text(text + half)
    summary = generate_nbody([5], 6, out, workers=0, mc=FAST, progress=False)
    assert summary.torn_bytes == len(half.encode())
    assert (summary.resumed, summary.written) == (3, 3)
    frames = read(out, ":")
    assert [a.info["frame_id"] for a in frames] == [a.info["frame_id"] for a in reference]
    for a, b in zip(frames, reference):  # the rerun chain is deterministic
        np.testing.assert_allclose(a.positions, b.positions)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy())


def test_parallel_equals_serial(tmp_path: Path) -> None:
    serial = generate_nbody([3, 5], 8, tmp_path / "s.xyz", workers=0, mc=FAST, progress=False)
    par = generate_nbody([3, 5], 8, tmp_path / "p.xyz", workers=2, mc=FAST, progress=False)
    assert serial.written == par.written == 16
    for a, b in zip(read(serial.out, ":"), read(par.out, ":")):
        assert a.info["frame_id"] == b.info["frame_id"]
        np.testing.assert_allclose(a.get_forces(), b.get_forces())


def _flaky(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """Test task: frame 1 fails, the task 'boom' raises after its first frame."""
    for k, frame_id in enumerate(payload["ids"]):
        if payload.get("boom") and k == 1:
            raise RuntimeError("engine exploded")
        if frame_id not in needed:
            continue
        if frame_id == "t0#1" and not payload.get("fixed"):
            yield frame_id, Failure("SCF not converged")
            continue
        pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0 + k]])
        yield frame_id, FrameRecord(np.array([1, 1]), pos, -1.0 * k, np.zeros((2, 3)))


def _flaky_tasks(fixed: bool) -> list[Task]:
    ids0, ids1 = ("t0#0", "t0#1", "t0#2"), ("t1#0", "t1#1", "t1#2")
    return [
        Task("t0", ids0, {"ids": ids0, "fixed": fixed}),
        Task("t1", ids1, {"ids": ids1, "boom": not fixed}),
    ]


def test_failures_are_recorded_and_retried(tmp_path: Path) -> None:
    out = tmp_path / "f.xyz"
    summary = run_tasks(_flaky_tasks(False), _flaky, out, {"v": 1}, workers=0, progress=False)
    assert (summary.written, summary.failed) == (3, 3)
    records = [json.loads(line) for line in failed_path(out).read_text().splitlines()]
    reasons = {r["frame_id"]: r["reason"] for r in records}
    assert reasons == {
        "t0#1": "SCF not converged",
        "t1#1": "RuntimeError: engine exploded",
        "t1#2": "RuntimeError: engine exploded",
    }
    assert _ids(out) == ["t0#0", "t0#2", "t1#0"]
    # a rerun retries exactly the failed frames; the payload is not part of the options here
    summary = run_tasks(_flaky_tasks(True), _flaky, out, {"v": 1}, workers=0, progress=False)
    assert (summary.resumed, summary.written, summary.failed) == (3, 3, 0)
    assert _ids(out) == ["t0#0", "t0#1", "t0#2", "t1#0", "t1#1", "t1#2"]
    assert not failed_path(out).exists()


def test_other_options_or_foreign_file_refused(tmp_path: Path) -> None:
    out = tmp_path / "n.xyz"
    generate_nbody([3], 2, out, workers=0, mc=FAST, progress=False)
    with pytest.raises(ConfigError, match="temperatures differ"):
        generate_nbody([3], 2, out, temperatures=[500.0], workers=0, mc=FAST, progress=False)
    foreign = tmp_path / "foreign.xyz"
    write(foreign, read(out, ":"))
    with pytest.raises(ConfigError, match="not written by this command"):
        generate_nbody([3], 2, foreign, workers=0, mc=FAST, progress=False)
    bare = tmp_path / "bare.xyz"
    atoms = read(out)
    del atoms.info["frame_id"]
    write(bare, atoms)
    with pytest.raises(DataError, match="frame_id"):
        scan_output(bare)
    with pytest.raises(ConfigError, match="workers"):
        generate_nbody([3], 2, tmp_path / "w.xyz", workers=-1, mc=FAST, progress=False)


@pytest.mark.integration
def test_cli_resume_after_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "kill.xyz"
    cmd = [
        sys.executable, "-m", "trustpot", "data", "nbody", "--particles", "5", "--frames", "16",
        "--interval", "600", "--equilibration", "0", "--chunk", "2", "--workers", "1",
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if out.exists() and out.read_text().count("frame_id=") >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    partial = len(scan_output(out)[0])
    assert 4 <= partial < 16
    time.sleep(0.5)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{partial} resumed" in done.stdout
    ids = _ids(out)
    assert ids == [f"nbody5@1000K#{k}" for k in range(16)]
