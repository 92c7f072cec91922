"""Tasks on Dask distributed: a 2-worker LocalCluster gives what the local process pool gives,
and a worker killed mid-task loses no finished frame."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed", reason="Dask distributed not installed (extra: dask)")

import cloudpickle

from trustpot.engines.labelling import FrameRecord, Task, run_tasks
from trustpot.engines.nbody import MCOptions, generate_nbody
from trustpot.errors import ConfigError
from trustpot.parallel import DaskCluster, client, close_clients, workers_from_flags

# the workers cannot import this test module: send its task functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster() -> Iterator[DaskCluster]:
    target = DaskCluster("local", workers=2)
    client(target)
    yield target
    close_clients()


def _frame(k: int) -> FrameRecord:
    rng = np.random.default_rng(k)
    return FrameRecord(
        numbers=np.array([1, 1]),
        positions=rng.normal(size=(2, 3)),
        energy=float(k),
        forces=rng.normal(size=(2, 3)),
        info={"k": k},
    )


def _killing_task(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    """Logs every start; task ``t0`` kills its worker the first time, once another task's frames
    are in the output (finished frames exist when the worker dies)."""
    with open(payload["log"], "a") as handle:
        handle.write(payload["task"] + "\n")
    marker = Path(payload["marker"])
    if payload["task"] == "t0" and not marker.exists():
        deadline = time.time() + 60
        while time.time() < deadline and Path(payload["out"]).stat().st_size == 0:
            time.sleep(0.05)
        marker.write_text("killed")
        os._exit(1)  # the worker process dies mid-task
    for frame_id in payload["frame_ids"]:
        if frame_id in needed:
            yield frame_id, _frame(int(frame_id.split("#")[1]))


def _tasks(tmp_path: Path, out: Path) -> list[Task]:
    tasks = []
    for t in range(4):
        ids = tuple(f"f#{3 * t + j}" for j in range(3))
        payload = {
            "task": f"t{t}",
            "frame_ids": ids,
            "log": str(tmp_path / "starts.log"),
            "marker": str(tmp_path / "killed"),
            "out": str(out),
        }
        tasks.append(Task(f"t{t}", ids, payload))
    return tasks


def test_nbody_frames_on_a_local_cluster_equal_the_local_pool(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    mc = MCOptions(equilibration=20, interval=5, chunk=3)
    kwargs: dict[str, Any] = dict(
        particles=[3, 4], frames=6, temperatures=[800.0], seed=3, mc=mc, progress=False
    )
    pool = generate_nbody(out=tmp_path / "pool.xyz", workers=2, **kwargs)
    dask = generate_nbody(out=tmp_path / "dask.xyz", workers=cluster, **kwargs)
    assert pool.written == dask.written == 12 and dask.failed == 0
    assert (tmp_path / "dask.xyz").read_text() == (tmp_path / "pool.xyz").read_text()
    # a rerun on Dask resumes: nothing left to label
    again = generate_nbody(out=tmp_path / "dask.xyz", workers=cluster, **kwargs)
    assert (again.resumed, again.written) == (12, 0)


def test_a_worker_killed_mid_task_loses_no_finished_frame(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    out = tmp_path / "frames.xyz"
    out.write_text("")
    (tmp_path / "starts.log").write_text("")
    tasks = _tasks(tmp_path, out)
    summary = run_tasks(tasks, _killing_task, out, {"test": 1}, workers=cluster, progress=False)
    assert (tmp_path / "killed").exists(), "the worker was never killed"
    starts = (tmp_path / "starts.log").read_text().split()
    assert starts.count("t0") == 2, starts  # killed once, rerun by Dask on a live worker
    assert (summary.written, summary.failed) == (12, 0)
    reference = tmp_path / "reference.xyz"
    run_tasks(_tasks(tmp_path, reference), _killing_task, reference, {"test": 1}, 0, progress=False)
    assert out.read_text() == reference.read_text()


def _always_fails(payload: dict[str, Any], needed: frozenset[str]) -> Iterator[tuple[str, Any]]:
    if payload["task"] == "t1":
        raise RuntimeError("engine exploded")
    for frame_id in payload["frame_ids"]:
        yield frame_id, _frame(int(frame_id.split("#")[1]))


def test_a_failing_task_is_recorded_and_the_others_kept(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    out = tmp_path / "frames.xyz"
    summary = run_tasks(
        _tasks(tmp_path, out), _always_fails, out, {"test": 2}, workers=cluster, progress=False
    )
    assert (summary.written, summary.failed) == (9, 3)
    failed = summary.failed_path.read_text()
    assert "RuntimeError: engine exploded" in failed and '"task_id": "t1"' in failed


def test_ensemble_members_trained_on_dask_equal_the_local_ones(
    cluster: DaskCluster, tmp_path: Path, ethanol_file: Path
) -> None:
    import torch

    from trustpot.config import load_config
    from trustpot.io.checkpoint import load_model
    from trustpot.uq.fit import train_ensemble_members

    cfg = load_config(
        None,
        ["model.hypers.n_features=8", "model.hypers.n_layers=1"],
        {
            "data": {"train": str(ethanol_file)},
            "model": {"name": "schnet"},
            "train": {"epochs": 2, "threads": 1, "seed": 5, "batch_size": 8},
        },
    )
    here = train_ensemble_members(cfg, tmp_path / "here", 2, log=lambda _: None)
    there = train_ensemble_members(cfg, tmp_path / "dask", 2, lambda _: None, workers=cluster)
    assert [p.parent.name for p in there] == ["member_0", "member_1"]
    for a, b in zip(here, there, strict=True):
        wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(*(next(iter(load_model(p).state_dict().values())) for p in here))


def test_flags_resolve_and_refuse_what_cannot_be_used() -> None:
    assert workers_from_flags(3, None) == 3
    assert workers_from_flags(3, "local") == DaskCluster("local", 3)
    assert workers_from_flags(1, "tcp://h:8786", workers_given=False) == DaskCluster(
        "tcp://h:8786", 0
    )
    with pytest.raises(ConfigError, match="--workers 2 cannot be used with --dask tcp"):
        workers_from_flags(2, "tcp://h:8786")
    with pytest.raises(ConfigError, match="--dask local needs --workers >= 1"):
        DaskCluster("local", 0)
    assert dataclasses.asdict(DaskCluster()) == {"address": "local", "workers": 2}


def test_cli_labels_on_a_local_cluster(tmp_path: Path) -> None:
    from trustpot.cli.main import main

    argv = ["data", "nbody", "--particles", "3", "--frames", "4", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a.xyz"), "--workers", "0"]) == 0
    assert main([*argv, "--out", str(tmp_path / "b.xyz"), "--dask", "local", "--workers", "2"]) == 0
    assert (tmp_path / "a.xyz").read_text() == (tmp_path / "b.xyz").read_text()
    assert (
        main([*argv, "--out", str(tmp_path / "c.xyz"), "--dask", "tcp://h:1", "--workers", "2"])
        == 2
    )


def test_learn_on_a_local_cluster_labels_the_same_frames(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    """An active-learning run whose labelling and members run as Dask tasks picks, labels and
    learns the same frames as the run in this process."""
    from ase.io import read

    from trustpot.cli.main import main

    argv = ["learn", "--quick", "--engine", "nbody", "--quiet", "--rounds", "1"]
    assert main([*argv, "--out", str(tmp_path / "here")]) == 0
    assert main([*argv, "--out", str(tmp_path / "dask"), "--dask", "local", "--workers", "2"]) == 0
    here, there = (read(str(tmp_path / d / "data.xyz"), ":") for d in ("here", "dask"))
    assert [a.info["al_id"] for a in here] == [a.info["al_id"] for a in there]
    for a, b in zip(here, there, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-5)
