"""The one reuse rule: state.json per step folder (reuse done, resume unfinished, refuse others)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trustpot.errors import ConfigError
from trustpot.train import reuse
from trustpot.train.reuse import config_differences, read_state, run_step, step_status


def test_done_step_is_reused_not_rerun(tmp_path: Path) -> None:
    calls: list[bool] = []

    def work(folder: Path, resuming: bool) -> dict:
        calls.append(resuming)
        (folder / "out.txt").write_text("x")
        return {"value": 3}

    config = {"lr": 0.1, "model": {"width": 8}, "sizes": (1, 2)}
    assert run_step(tmp_path / "s", config, work) == {"value": 3}
    again = run_step(tmp_path / "s", {"lr": 0.1, "model": {"width": 8}, "sizes": [1, 2]}, work)
    assert again == {"value": 3, "reused": True}
    assert calls == [False]
    state = json.loads((tmp_path / "s" / "state.json").read_text())
    assert state["status"] == "done" and state["result"] == {"value": 3}
    assert state["config"]["model"] == {"width": 8}


def test_other_config_is_an_error_naming_the_keys(tmp_path: Path) -> None:
    run_step(tmp_path / "s", {"lr": 0.1, "model": {"width": 8}}, lambda f, r: {})
    with pytest.raises(ConfigError, match=r"lr, model\.width differ"):
        run_step(tmp_path / "s", {"lr": 0.2, "model": {"width": 16}}, lambda f, r: {})
    with pytest.raises(ConfigError, match="seed differ"):
        step_status(tmp_path / "s", {"lr": 0.1, "model": {"width": 8}, "seed": 1})
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1}}) == []


def test_unfinished_step_is_resumed(tmp_path: Path) -> None:
    def crash(folder: Path, resuming: bool) -> dict:
        (folder / "partial").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_step(tmp_path / "s", {"n": 1}, crash)
    assert read_state(tmp_path / "s")["status"] == "running"  # type: ignore[index]
    seen: list[bool] = []

    def finish(folder: Path, resuming: bool) -> dict:
        seen.append(resuming)
        return {"partial_found": (folder / "partial").is_file()}

    assert run_step(tmp_path / "s", {"n": 1}, finish) == {"partial_found": True}
    assert seen == [True]
    with pytest.raises(ConfigError, match="n differ"):
        step_status(tmp_path / "s", {"n": 2})


def test_a_failed_write_keeps_the_previous_state(tmp_path: Path, monkeypatch) -> None:
    run_step(tmp_path / "s", {"n": 1}, lambda f, r: {"v": 1})
    before = (tmp_path / "s" / "state.json").read_text()

    def no_rename(src: str, dst: str) -> None:
        raise OSError("killed between write and rename")

    monkeypatch.setattr(reuse.os, "replace", no_rename)
    with pytest.raises(OSError):
        reuse.write_state(tmp_path / "s", {"status": "running", "config": {"n": 1}, "result": {}})
    assert (tmp_path / "s" / "state.json").read_text() == before
    assert read_state(tmp_path / "s")["status"] == "done"  # type: ignore[index]


def test_kill_during_a_step_leaves_a_running_state(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from trustpot.train.reuse import run_step

        def work(folder, resuming):
            Path({str(tmp_path)!r}, "started").write_text("1")
            time.sleep(60)
            return {{}}

        run_step(Path({str(folder)!r}), {{"n": 1}}, work)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    for _ in range(600):
        if (tmp_path / "started").exists():
            break
        proc.poll()
        assert proc.returncode is None, "the step ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_state(folder)
    assert state is not None and state["status"] == "running"
    assert not (folder / "state.json.tmp").exists()
    assert run_step(folder, {"n": 1}, lambda f, resuming: {"resumed": resuming}) == {
        "resumed": True
    }


def test_a_broken_state_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{half")
    with pytest.raises(ConfigError, match="unreadable step state"):
        step_status(tmp_path, {})
    (tmp_path / "state.json").write_text(json.dumps({"status": "maybe", "config": {}}))
    with pytest.raises(ConfigError, match="not a step state"):
        step_status(tmp_path, {})


def test_config_comparison_is_by_json_value() -> None:
    nan = float("nan")
    same = config_differences(
        {"a": 1, "b": nan, "c": [1, 2.0]}, {"a": 1.0, "b": nan, "c": [1.0, 2]}
    )
    assert same == []
    assert config_differences({"a": True}, {"a": 1}) == ["a"]
    assert config_differences({"a": [{"x": 1}]}, {"a": [{"x": 2}]}) == ["a"]
    assert config_differences({"a": {"b": 1}}, {"a": {}}) == ["a.b"]
