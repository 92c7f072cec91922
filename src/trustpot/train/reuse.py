"""One rule for "a finished step is reused on a rerun".

A step (a training run, a data build, a benchmark model...) owns a folder. Its ``state.json``
holds ``{"status": "running" | "done", "config": <resolved config>, "result": {...}}`` and is
replaced atomically (written to ``state.json.tmp``, flushed, renamed), so a kill at any moment
leaves either the previous state or the new one, never half a file. On a rerun:

* ``done`` with an equal config: the step is not run again; its stored result is returned;
* ``running`` with an equal config: the step runs again in the same folder, which lets it
  resume from what it left there (e.g. the trainer's ``last.ckpt``);
* any other config: :class:`~trustpot.errors.ConfigError` naming the differing keys (a step
  trained with other settings is never reused silently);
* no ``state.json``: a new step (the folder may not hold anything else of a step).

Configs are compared after a JSON round trip (tuples become lists, keys strings).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trustpot.errors import ConfigError

STATE_FILE = "state.json"


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (raises on what JSON cannot hold)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"a step's config and result must be JSON data: {err}") from None


def _same(a: Any, b: Any) -> bool:
    """Equal JSON values; numbers by value (``1 == 1.0``), NaN equal to NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    same: bool = a == b
    return same


def config_differences(
    before: Mapping[str, Any], now: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ between two configs (nested dicts compared by key)."""
    before, now = _plain(dict(before)), _plain(dict(now))
    out: list[str] = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key, "<missing>"), now.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, f"{prefix}{key}."))
        elif not _same(a, b):
            out.append(f"{prefix}{key}")
    return out


def write_state(folder: Path, state: Mapping[str, Any]) -> None:
    """Replace ``folder/state.json`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(_plain(dict(state)), handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_state(folder: Path) -> dict[str, Any] | None:
    """The step state of ``folder`` (``None`` when it has none).

    Raises:
        ConfigError: ``state.json`` is unreadable or not a step state.
    """
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable step state ({err}); delete the folder") from None
    if (
        not isinstance(state, dict)
        or state.get("status") not in ("running", "done")
        or not isinstance(state.get("config"), dict)
    ):
        raise ConfigError(f"{path}: not a step state (status/config missing); delete the folder")
    return state


def step_status(folder: Path, config: Mapping[str, Any]) -> str:
    """``"new"``, ``"running"`` (unfinished, same config) or ``"done"`` (same config).

    Raises:
        ConfigError: the folder holds a step with another config (names the keys).
    """
    state = read_state(folder)
    if state is None:
        return "new"
    diff = config_differences(state["config"], config)
    if diff:
        raise ConfigError(
            f"{folder}: holds a step made with other settings ({', '.join(diff)} differ); "
            "use another folder or delete it"
        )
    return str(state["status"])


def run_step(
    folder: str | Path,
    config: Mapping[str, Any],
    fn: Callable[[Path, bool], Mapping[str, Any]],
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a step once; reuse it when done, resume it when unfinished.

    Args:
        folder: the step's folder.
        config: its resolved config (JSON data); must equal the stored one.
        fn: ``fn(folder, resuming) -> result`` does the work (``resuming`` is ``True`` when
            an earlier run of this step was interrupted); its result must be JSON data.
        log: told when a step is reused or resumed.

    Returns:
        The step's result (stored in ``state.json``), with ``"reused": True`` added when the
        step was done already.
    """
    folder = Path(folder)
    status = step_status(folder, config)
    if status == "done":
        state = read_state(folder)
        assert state is not None
        if log is not None:
            log(f"{folder}: done already, reused")
        return {**dict(state.get("result") or {}), "reused": True}
    if status == "running" and log is not None:
        log(f"{folder}: unfinished, resuming")
    write_state(folder, {"status": "running", "config": config, "result": {}})
    result = _plain(dict(fn(folder, status == "running")))
    write_state(folder, {"status": "done", "config": config, "result": result})
    return dict(result)


def timed_step(
    folder: str | Path,
    config: Mapping[str, Any],
    fn: Callable[[Path, bool], Mapping[str, Any]],
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`run_step` whose result also holds the step's wall-clock ``seconds`` (those of
    the run that finished it: a resumed step counts only its last part)."""

    def work(where: Path, resuming: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = dict(fn(where, resuming))
        return {**result, "seconds": time.perf_counter() - t0}

    return run_step(folder, config, work, log)
