"""Where independent tasks run: this process, a local process pool, or a Dask cluster.

Work that splits into independent tasks (labelling frames with a reference engine, training
the members of an ensemble, the training of an active-learning round's potentials) takes a
``workers`` argument of type :data:`Workers`:

- an ``int``: the no-dependency default. ``0`` runs the tasks in this process; ``N >= 1``
  labels with ``N`` local worker processes (:func:`trustpot.engines.labelling.run_tasks`) and
  trains ensemble members one after another in this process (each one already uses the
  cores through torch threads).
- a :class:`DaskCluster`: the tasks are submitted to Dask distributed, either a
  ``LocalCluster`` this process starts (``--dask local``) or any running scheduler
  (``--dask tcp://host:8786``, for example one started by dask-jobqueue on a SLURM
  cluster). Workers must see the same files as this process (a shared file system) and
  have trustpot installed: tasks read their inputs and write their outputs (checkpoints,
  frames) by path.

What a task finishes is never lost: labelled frames are appended to the output as each task's
result arrives, and a task whose worker is killed is run again by Dask on another worker (up
to Dask's ``distributed.scheduler.allowed-failures``, then recorded as failed, naming the
task). Training one model across several processes keeps torchrun DDP
(:mod:`trustpot.train.distributed`); Dask places whole tasks, it does not split one.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from trustpot.errors import ConfigError

#: ``--dask`` value that starts a LocalCluster.
LOCAL = "local"


@dataclasses.dataclass(frozen=True)
class DaskCluster:
    """Run tasks on Dask distributed.

    Attributes:
        address: scheduler address (``tcp://host:8786``), or ``"local"`` to start a
            ``LocalCluster`` in this process.
        workers: worker processes of the LocalCluster (one thread each); with an address the
            cluster's own workers run the tasks and this must be 0.
    """

    address: str = LOCAL
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.address:
            raise ConfigError("--dask needs 'local' or a scheduler address (tcp://host:8786)")
        if self.address == LOCAL and self.workers < 1:
            raise ConfigError(f"--dask local needs --workers >= 1, got {self.workers}")
        if self.address != LOCAL and self.workers:
            raise ConfigError(
                f"--workers {self.workers} cannot be used with --dask {self.address}: the "
                "scheduler's own workers run the tasks (drop --workers)"
            )

    def describe(self) -> str:
        """``LocalCluster (2 workers)`` or the scheduler address."""
        if self.address == LOCAL:
            return f"Dask LocalCluster ({self.workers} workers)"
        return f"Dask scheduler {self.address}"


#: Where independent tasks run: an int (this process / local pool) or a Dask cluster.
Workers = int | DaskCluster

_CLIENTS: dict[DaskCluster, Any] = {}


def require_dask() -> None:
    """Raise :class:`ConfigError` when Dask distributed is not installed."""
    try:
        import distributed  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "--dask needs Dask distributed: pip install 'trustpot[dask]' "
            "(or pip install distributed)"
        ) from err


def client(cluster: DaskCluster) -> Any:
    """The ``distributed.Client`` of ``cluster``, started once per process and reused.

    A LocalCluster's workers are processes with one thread each (Dask's nanny sets
    ``OMP_NUM_THREADS=1`` in them). Clients are closed at exit or by :func:`close_clients`.
    """
    require_dask()
    from distributed import Client, LocalCluster

    if cluster in _CLIENTS:
        return _CLIENTS[cluster]
    if cluster.address == LOCAL:
        local = LocalCluster(
            n_workers=cluster.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        handle = Client(local)
    else:
        try:
            handle = Client(cluster.address, timeout="30s")
        except OSError as err:
            raise ConfigError(f"cannot reach the Dask scheduler {cluster.address}: {err}") from err
    _CLIENTS[cluster] = handle
    return handle


def close_clients() -> None:
    """Close every client (and LocalCluster) this process started."""
    for handle in list(_CLIENTS.values()):
        cluster = getattr(handle, "cluster", None)
        handle.close()
        if cluster is not None:
            cluster.close()
    _CLIENTS.clear()


atexit.register(close_clients)


def as_completed(
    cluster: DaskCluster, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], name: str
) -> Iterator[tuple[int, Any, BaseException | None]]:
    """Submit ``fn(*args)`` for each of ``calls``; yield ``(index, result, error)`` as each ends.

    ``error`` is the exception a call raised, or Dask's ``KilledWorker`` when its worker died
    more often than the scheduler allows; ``result`` is then ``None``. ``fn`` must be a
    module-level function importable on the workers.
    """
    import uuid

    from distributed import as_completed as dask_as_completed

    handle = client(cluster)
    token = uuid.uuid4().hex[:8]
    futures = {
        handle.submit(fn, *args, key=f"trustpot-{name}-{k}-{token}", pure=False): k
        for k, args in enumerate(calls)
    }
    for future in dask_as_completed(futures):
        k = futures[future]
        if future.status == "error":
            yield k, None, future.exception()
        else:
            yield k, future.result(), None
        future.release()


def killed_reason(error: BaseException) -> str:
    """One line for a failed task: a killed worker is named as such."""
    if type(error).__name__ == "KilledWorker":
        return "the Dask worker running this task died (as often as the scheduler allows)"
    return f"{type(error).__name__}: {error}"


def map_tasks(
    workers: Workers, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], name: str
) -> list[Any]:
    """``[fn(*args) for args in calls]``, on Dask when ``workers`` is a :class:`DaskCluster`.

    The results keep the order of ``calls``. With an ``int`` the calls run here, one after
    another. On Dask every call runs even when one fails; the first failure is then raised
    as a :class:`ConfigError` naming the task (the others' results, written by path, stay).
    """
    if not isinstance(workers, DaskCluster):
        return [fn(*args) for args in calls]
    results: list[Any] = [None] * len(calls)
    failures: list[str] = []
    for k, result, error in as_completed(workers, fn, calls, name):
        if error is not None:
            failures.append(f"{name} task {k}: {killed_reason(error)}")
        results[k] = result
    if failures:
        raise ConfigError("; ".join(failures))
    return results


def workers_from_flags(workers: int, dask: str | None, workers_given: bool = True) -> Workers:
    """The :data:`Workers` of the ``--workers`` and ``--dask`` flags.

    Args:
        workers: ``--workers``.
        dask: ``--dask`` (``None`` when not given): ``local`` or a scheduler address.
        workers_given: whether ``--workers`` was set by the user (with a scheduler address it
            is then an error; its default is simply not used).
    """
    if not dask:
        return workers
    if dask != LOCAL and not workers_given:
        workers = 0
    return DaskCluster(address=dask, workers=workers)
