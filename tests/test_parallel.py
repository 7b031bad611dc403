"""Executors: state built once per worker, workers that die, stuck tasks, Dask."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from worldmodels.config import CMAConfig
from worldmodels.evolution import SPHERE_SHIFT, evolve, sphere_task
from worldmodels.parallel import (
    DaskExecutor,
    InlineExecutor,
    LocalExecutor,
    TaskTimeoutError,
    WorkerLostError,
    make_executor,
)


def _counting_init(log_dir: str, value: int) -> dict:
    """Records one file per call, so the test can count the initialisations."""
    Path(log_dir, f"init-{os.getpid()}-{time.monotonic_ns()}").touch()
    return {"value": value, "pid": os.getpid()}


def _state_task(state: dict, task: int) -> tuple[int, int]:
    return state["value"] + task, state["pid"]


def _die_once_task(state, task: tuple[int, str]) -> int:
    i, marker = task
    if i == 3 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)  # the worker process dies without a word, as on a segfault or OOM kill
    return i * 10


def _always_die_task(state, task: int) -> int:
    if task == 1:
        os._exit(1)
    return task


def _sleepy_task(state, task: tuple[int, float]) -> int:
    i, seconds = task
    time.sleep(seconds)
    return i


def _failing_task(state, task: int) -> int:
    if task == 2:
        raise ValueError("bad candidate")
    return task


def test_local_init_once_per_worker_and_results_in_order(tmp_path):
    with LocalExecutor(2, init=_counting_init, init_args=(str(tmp_path), 100)) as ex:
        first = ex.map_tasks(_state_task, list(range(12)), timeout=60)
        second = ex.map_tasks(_state_task, list(range(5)), timeout=60)
    assert [v for v, _ in first] == [100 + i for i in range(12)]
    assert [v for v, _ in second] == [100 + i for i in range(5)]
    pids = {pid for _, pid in first + second}
    assert os.getpid() not in pids  # ran in worker processes
    n_inits = len(list(tmp_path.glob("init-*")))
    assert n_inits == len(pids) <= 2  # once per worker, not per task or per call


def test_local_worker_death_is_retried(tmp_path):
    marker = str(tmp_path / "died")
    tasks = [(i, marker) for i in range(8)]
    with LocalExecutor(2, max_retries=2) as ex:
        out = ex.map_tasks(_die_once_task, tasks, timeout=60)
        assert os.path.exists(marker)  # the task really killed its worker once
        assert ex.restarts == 1
        assert out == [i * 10 for i in range(8)]
        assert ex.map_tasks(_die_once_task, tasks[:2], timeout=60) == [0, 10]  # the rebuilt pool keeps working


def test_local_worker_that_always_dies_raises_naming_the_task():
    with LocalExecutor(2, max_retries=1) as ex:
        with pytest.raises(WorkerLostError, match="task #1"):
            ex.map_tasks(_always_die_task, [0, 1, 2], timeout=60)


def test_local_stuck_task_times_out_naming_it():
    tasks = [(0, 0.0), (1, 0.0), (2, 60.0), (3, 0.0)]
    t0 = time.monotonic()
    with LocalExecutor(2) as ex:
        with pytest.raises(TaskTimeoutError, match=r"task #2: \(2, 60\.0\)"):
            ex.map_tasks(_sleepy_task, tasks, timeout=1.0)
        assert time.monotonic() - t0 < 15  # the stuck worker was killed, not waited for
        assert ex.map_tasks(_sleepy_task, [(5, 0.0)], timeout=10) == [5]


def test_task_exception_propagates_with_its_name():
    with LocalExecutor(2) as ex:
        with pytest.raises(ValueError, match="bad candidate") as info:
            ex.map_tasks(_failing_task, [0, 1, 2, 3], timeout=60)
    assert any("task #2" in note for note in getattr(info.value, "__notes__", []))


def test_inline_executor_runs_init_once():
    calls = []
    ex = InlineExecutor(init=lambda: calls.append(1) or 7)
    assert ex.map_tasks(lambda s, t: s * t, [1, 2]) == [7, 14]
    assert ex.map_tasks(lambda s, t: s * t, [3]) == [21]
    assert calls == [1]


@pytest.mark.parametrize("make", [lambda: InlineExecutor(init=lambda: 100), lambda: LocalExecutor(2, init=int, init_args=(100,))])
def test_progress_sees_every_result_once(make):
    seen = []
    with make() as ex:
        out = ex.map_tasks(_plus_state, [1, 2, 3, 4, 5], timeout=60, progress=seen.append)
    assert out == [101, 102, 103, 104, 105]
    assert sorted(seen) == out  # in the order the tasks finished


def _plus_state(state: int, task: int) -> int:
    return state + task


def test_missing_dask_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"worldmodels\[dask\]"):
        make_executor(scheduler="tcp://127.0.0.1:8786")


# ------------------------------------------------------------------------------ Dask
distributed = pytest.importorskip("distributed")

_DASK_INIT_CALLS: list[int] = []


def _dask_init(value: int) -> int:
    _DASK_INIT_CALLS.append(value)
    return value


def test_dask_threads_state_once_and_timeout():
    _DASK_INIT_CALLS.clear()
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            ex = make_executor(scheduler=client, init=_dask_init, init_args=(100,))
            assert isinstance(ex, DaskExecutor)
            assert ex.map_tasks(_state_task_plain, [1, 2, 3], timeout=30) == [101, 102, 103]
            assert ex.map_tasks(_state_task_plain, [4], timeout=30) == [104]
            assert _DASK_INIT_CALLS == [100]  # built once on the worker, reused across calls
            with pytest.raises(TaskTimeoutError, match=r"task #0: \(0, 3\.0\)"):
                ex.map_tasks(_sleepy_task, [(0, 3.0)], timeout=0.5)


def _state_task_plain(state: int, task: int) -> int:
    return state + task


def test_dask_processes_runs_the_same_evolution():
    cfg = CMAConfig(
        population=8, episodes_per_candidate=1, sigma0=0.3, generations=40, eval_every=40, eval_episodes=1,
        envs_per_worker=4, task_timeout=60,
    )
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        with make_executor(scheduler=cluster, init=np.asarray, init_args=(SPHERE_SHIFT,)) as ex:
            result = evolve(sphere_task, 5, cfg, ex, quiet=True)
    np.testing.assert_allclose(result.best_params, SPHERE_SHIFT, atol=0.02)
    # The same seed gives the same run on local processes.
    with make_executor(2, init=np.asarray, init_args=(SPHERE_SHIFT,)) as ex:
        local = evolve(sphere_task, 5, cfg, ex, quiet=True)
    np.testing.assert_array_equal(local.mean, result.mean)


def test_dask_worker_death_is_rescheduled(tmp_path):
    marker = str(tmp_path / "died")
    tasks = [(i, marker) for i in range(6)]
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        with make_executor(scheduler=cluster) as ex:
            assert ex.map_tasks(_die_once_task, tasks, timeout=60) == [i * 10 for i in range(6)]
    assert os.path.exists(marker)  # a worker really died once
