"""Executors for the CPU-bound work: local worker processes by default, Dask when asked.

Collection, evolution and evaluation hand their episodes to an executor as a list of
*tasks* (:class:`worldmodels.tasks.Task`) and get the results back in order::

    with make_executor(workers=4, init=rollout_worker, init_args=(vae_state, mdrnn_state, cfg)) as ex:
        returns = ex.map_tasks(rollout_task, tasks, timeout=600)   # rollout_task(worker, task) in the workers

Three things that earlier World Models implementations got wrong are handled here:

* **State once per worker.** ``init(*init_args)`` runs once in every worker process (to
  build V, M and the environments), not once per task; its result is passed to every
  task as ``fn(state, task)``.
* **Workers that die.** A worker killed by the OS or a segfault breaks a
  ``ProcessPoolExecutor`` for good; :class:`LocalExecutor` notices, builds a new pool and
  runs the lost tasks again (at most ``max_retries`` times each). On Dask the scheduler
  reschedules the tasks of a lost worker; ``retries`` re-runs failed tasks.
* **Nothing hangs silently.** A task that runs longer than ``timeout`` seconds raises
  :class:`TaskTimeoutError` naming it (its index and its ``repr``, which for evolution
  shows the candidates and seeds).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol, Sequence

TaskFn = Callable[[Any, Any], Any]
"""``fn(state, task) -> result``, where ``state`` is what the executor's ``init`` returned."""
Progress = Callable[[Any], None]
"""Called with each task's result as it finishes (a progress bar's update, say)."""


class TaskError(RuntimeError):
    """A task that could not be completed; the message names it."""


class TaskTimeoutError(TaskError, TimeoutError):
    """A task ran past its time limit."""


class WorkerLostError(TaskError):
    """The workers running a task kept dying."""


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """`workers`, or one per CPU core when 0."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return workers or cpu_count()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (the previous count restored after).

    A rollout's or a dream's step works on small batches, where intra-op threads only add
    synchronisation, ruinous on a busy machine (a dream step of the ``book`` scale: 1.4 ms
    on one thread, over 100 ms on two threads of a two-core machine kept busy by another
    job); parallelism comes from processes.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker; the processes are the parallelism


def mp_context() -> mp.context.BaseContext:
    """'fork' where the OS has it (fast start, works from scripts without a main guard and
    from notebooks, as torch's DataLoader does), 'spawn' elsewhere."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def describe_task(index: int, task: Any, limit: int = 300) -> str:
    """``task #index: repr(task)``, shortened to `limit` characters."""
    text = repr(task)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"task #{index}: {text}"


class Executor(Protocol):
    """What evolution needs from an executor."""

    workers: int
    """How many tasks run at once (used to size the tasks)."""

    def map_tasks(
        self, fn: TaskFn, tasks: Sequence[Any], timeout: float | None = None, progress: Progress | None = None
    ) -> list[Any]:
        """``[fn(state, task) for task in tasks]``, computed in the workers, in order; ``progress(result)``
        is called as each task finishes."""
        ...

    def close(self) -> None: ...


class _ExecutorBase:
    workers: int = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------
class InlineExecutor(_ExecutorBase):
    """Runs the tasks one after the other in this process (debugging, batched dreams).

    ``init`` runs once, on first use. ``timeout`` is not enforced (a task in this
    process cannot be interrupted safely).
    """

    def __init__(self, init: Callable[..., Any] | None = None, init_args: tuple = ()):
        self.workers = 1
        self._init, self._init_args = init, init_args
        self._state: Any = None
        self._ready = False

    def map_tasks(
        self, fn: TaskFn, tasks: Sequence[Any], timeout: float | None = None, progress: Progress | None = None
    ) -> list[Any]:
        if not self._ready:
            self._state = self._init(*self._init_args) if self._init is not None else None
            self._ready = True
        results = []
        for task in tasks:
            results.append(fn(self._state, task))
            if progress is not None:
                progress(results[-1])
        return results


# --------------------------------------------------------------------------------------
# Local processes
# --------------------------------------------------------------------------------------
_WORKER_STATE: Any = None


def _local_init(init: Callable[..., Any] | None, init_args: tuple) -> None:
    global _WORKER_STATE
    _init_worker()
    _WORKER_STATE = init(*init_args) if init is not None else None


def _local_call(fn: TaskFn, task: Any) -> Any:
    return fn(_WORKER_STATE, task)


class LocalExecutor(_ExecutorBase):
    """A pool of local worker processes that survives the death of a worker.

    The pool is kept between calls of :meth:`map_tasks` (the workers' state is built
    once). At most ``workers`` tasks are in flight at a time, so each submitted task
    starts at once and its time limit is measured from its start.
    """

    def __init__(
        self,
        workers: int = 0,
        init: Callable[..., Any] | None = None,
        init_args: tuple = (),
        max_retries: int = 3,
    ):
        self.workers = resolve_workers(workers)
        self.max_retries = max_retries
        self._init, self._init_args = init, init_args
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0
        """How many times the pool was rebuilt after a worker died."""

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp_context(),
                initializer=_local_init,
                initargs=(self._init, self._init_args),
            )
        return self._pool

    def _kill_pool(self) -> None:
        """Stop the pool now, killing its processes (a stuck worker never returns)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())  # private, but the only handle
        for p in processes:
            if p.is_alive():
                p.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def map_tasks(
        self, fn: TaskFn, tasks: Sequence[Any], timeout: float | None = None, progress: Progress | None = None
    ) -> list[Any]:
        tasks = list(tasks)
        results: list[Any] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        queue = list(range(len(tasks)))[::-1]  # pop() from the end: task 0 first
        running: dict[Future, tuple[int, float]] = {}
        try:
            while queue or running:
                pool = self._get_pool()
                while queue and len(running) < self.workers:
                    i = queue.pop()
                    attempts[i] += 1
                    running[pool.submit(_local_call, fn, tasks[i])] = (i, time.monotonic())
                wait_for = None
                if timeout is not None:
                    oldest = min(start for _, start in running.values())
                    wait_for = max(0.0, oldest + timeout - time.monotonic())
                done, _ = wait(list(running), timeout=wait_for, return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    i, _ = running.pop(fut)
                    try:
                        results[i] = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        self._retry_or_raise(i, tasks[i], attempts[i], queue)
                        continue
                    except Exception as e:
                        e.add_note(f"raised by {describe_task(i, tasks[i])}")
                        raise
                    if progress is not None:
                        progress(results[i])
                if broken:
                    # Every task still in the broken pool is lost with it: run them again.
                    for fut, (i, _) in list(running.items()):
                        self._retry_or_raise(i, tasks[i], attempts[i], queue)
                    running.clear()
                    self._kill_pool()
                    self.restarts += 1
                    continue
                if timeout is not None:
                    now = time.monotonic()
                    late = [(i, now - start) for i, start in running.values() if now - start >= timeout]
                    if late:
                        names = "; ".join(f"{describe_task(i, tasks[i])} (running {s:.0f} s)" for i, s in sorted(late))
                        raise TaskTimeoutError(f"{len(late)} task(s) ran past the {timeout:g} s limit: {names}")
        except BaseException:
            self._kill_pool()  # never leave stuck or orphaned workers behind
            raise
        return results

    def _retry_or_raise(self, i: int, task: Any, attempts: int, queue: list[int]) -> None:
        if attempts > self.max_retries:
            raise WorkerLostError(
                f"{describe_task(i, task)}: its worker process died {attempts} times "
                f"(max_retries={self.max_retries}); is it killed for memory, or crashing?"
            )
        queue.append(i)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------
# Dask
# --------------------------------------------------------------------------------------
_DASK_STATES: OrderedDict[str, Any] = OrderedDict()
_DASK_LOCK = threading.Lock()
_DASK_CACHE_SIZE = 2


def _dask_state(key: str, init: Callable[..., Any] | None, init_args: tuple) -> Any:
    """The worker's state for `key`, built once per worker process (threads share it)."""
    with _DASK_LOCK:
        if key not in _DASK_STATES:
            _init_worker()
            _DASK_STATES[key] = init(*init_args) if init is not None else None
            while len(_DASK_STATES) > _DASK_CACHE_SIZE:
                _DASK_STATES.popitem(last=False)
        _DASK_STATES.move_to_end(key)
        return _DASK_STATES[key]


def _dask_call(fn: TaskFn, key: str, init: Callable[..., Any] | None, init_args: tuple, task: Any) -> Any:
    return fn(_dask_state(key, init, init_args), task)


def _import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise ImportError(
            "a Dask scheduler was given but dask.distributed is not installed: "
            "pip install 'worldmodels[dask]' (or 'dask[distributed]')"
        ) from e
    return distributed


class DaskExecutor(_ExecutorBase):
    """Tasks on a Dask cluster (``dask.distributed``).

    ``scheduler`` is an address (``tcp://host:8786``), a ``distributed.Client`` or a
    cluster (e.g. ``LocalCluster``). ``init_args`` are sent to the workers once
    (``Client.scatter(broadcast=True)``) and every worker process builds its state once,
    cached under a hash of ``init`` and ``init_args``. A lost worker's tasks are
    rescheduled by Dask; ``retries`` re-runs tasks that failed.

    ``timeout``: with more tasks than worker threads a task's start is not observable,
    so the limit applies to progress: if no task finishes for ``timeout`` seconds (then
    every running task has run at least that long), :class:`TaskTimeoutError` names the
    unfinished tasks.
    """

    def __init__(
        self,
        scheduler: Any,
        init: Callable[..., Any] | None = None,
        init_args: tuple = (),
        retries: int = 2,
    ):
        distributed = _import_distributed()
        self._distributed = distributed
        self._own_client = False
        if isinstance(scheduler, distributed.Client):
            self.client = scheduler
        else:
            self.client = distributed.Client(scheduler)
            self._own_client = True
        self.retries = retries
        self._init = init
        self._key = hashlib.sha256(pickle.dumps((init, init_args), protocol=5)).hexdigest()[:16]
        self._init_args = self.client.scatter(init_args, broadcast=True) if init_args else ()
        threads = self.client.nthreads()
        self.workers = max(1, sum(threads.values()))

    def map_tasks(
        self, fn: TaskFn, tasks: Sequence[Any], timeout: float | None = None, progress: Progress | None = None
    ) -> list[Any]:
        tasks = list(tasks)
        futures = [
            self.client.submit(
                _dask_call, fn, self._key, self._init, self._init_args, task, retries=self.retries, pure=False
            )
            for task in tasks
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(tasks)
        pending = set(futures)
        try:
            while pending:
                try:
                    done = self._distributed.wait(list(pending), timeout=timeout, return_when="FIRST_COMPLETED").done
                except TimeoutError as e:  # nothing finished within `timeout` seconds
                    first = sorted(index[f.key] for f in pending)[:8]
                    names = "; ".join(describe_task(i, tasks[i]) for i in first)
                    raise TaskTimeoutError(
                        f"no task finished within {timeout:g} s; {len(pending)} unfinished, first: {names}"
                    ) from e
                for fut in done:
                    pending.discard(fut)
                    i = index[fut.key]
                    try:
                        results[i] = fut.result()
                    except self._distributed.KilledWorker as e:
                        raise WorkerLostError(f"{describe_task(i, tasks[i])}: Dask workers died running it ({e})") from e
                    except Exception as e:
                        e.add_note(f"raised by {describe_task(i, tasks[i])}")
                        raise
                    if progress is not None:
                        progress(results[i])
        finally:
            for fut in pending:
                fut.cancel()
        return results

    def close(self) -> None:
        if self._own_client:
            self.client.close()


def make_executor(
    workers: int = 0,
    scheduler: Any = "",
    init: Callable[..., Any] | None = None,
    init_args: tuple = (),
    max_retries: int = 3,
) -> LocalExecutor | DaskExecutor:
    """An executor: a Dask cluster when `scheduler` is given (address, Client or cluster),
    else `workers` local processes (0: one per core). See the module's docstring."""
    if scheduler is not None and not (isinstance(scheduler, str) and scheduler == ""):
        return DaskExecutor(scheduler, init=init, init_args=init_args, retries=max_retries)
    return LocalExecutor(workers, init=init, init_args=init_args, max_retries=max_retries)
