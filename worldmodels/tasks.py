"""The unit of work that executors carry: a vector of episodes.

Collection, evolution and evaluation all hand their workers the same thing, a
:class:`Task`: episode ``i`` drives on the track of ``seeds[i]``, with the controller
``params[i]`` (collection: the dataset's random policy, ``params`` None). An executor of
:mod:`worldmodels.parallel` runs a list of tasks as ``fn(worker_state, task)`` in its
workers, with its retries and time limits; the task function returns one value per
episode (a return; for collection, the episode's index), and :func:`run_tasks` puts
them back in order.

The task functions: :func:`worldmodels.rollout.rollout_task` (the real CarRacing),
:func:`worldmodels.dream.dream_task` (M's dream), :func:`worldmodels.data.collect_task`
(the random-policy dataset), and :func:`worldmodels.evolution.sphere_task` (a test problem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from worldmodels.parallel import Executor, TaskFn

KINDS = ("collect", "train", "validate", "select", "evaluate")


@dataclass(repr=False)
class Task:
    """A vector of episodes for one worker: episode ``i`` on the track of ``seeds[i]``, driven by ``params[i]``."""

    kind: str
    """What the episodes are for: 'collect', 'train' (a generation's candidates), 'validate' (the
    distribution's mean), 'select' (the final selection) or 'evaluate'."""
    seeds: np.ndarray
    """(n,) int64: the tracks."""
    params: np.ndarray | None = None
    """(n, P): each episode's controller; None for collection (the random policy)."""
    max_steps: int = 1000
    early_stop_steps: int = 0
    """End an episode after this many steps without a new tile (0: never)."""
    float64: bool = False
    """Exact driving (see :mod:`worldmodels.rollout`), as evaluations do."""
    generation: int = 0
    """The CMA-ES generation the task belongs to."""
    candidates: np.ndarray | None = None
    """(n,): which row of the generation's candidates each episode scores (evolution only)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        self.seeds = np.asarray(self.seeds, dtype=np.int64).reshape(-1)
        if self.params is not None and len(self.params) != len(self.seeds):
            raise ValueError(f"a task of {len(self.seeds)} seeds got {len(self.params)} rows of params")

    def __len__(self) -> int:
        return len(self.seeds)

    def __repr__(self) -> str:  # short: executors name a failing task by its repr
        parts = [self.kind, f"generation={self.generation}"] if self.candidates is not None else [self.kind]
        if self.candidates is not None:
            parts.append(f"candidates={_ranges(np.unique(self.candidates))}")
        parts += [f"seeds={_ranges(np.unique(self.seeds))}", f"episodes={len(self)}", f"max_steps={self.max_steps}"]
        return f"Task({', '.join(parts)})"


def make_tasks(
    kind: str,
    params: np.ndarray | None,
    seeds: np.ndarray,
    task_size: int,
    max_steps: int,
    *,
    early_stop_steps: int = 0,
    float64: bool = False,
    generation: int = 0,
) -> list[Task]:
    """Every controller (row of `params`, (K, P)) on every seed, controller-major, in near-equal tasks
    of at most `task_size` episodes. `params` None: one random-policy episode per seed (collection)."""
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    k = 1 if params is None else len(params)
    candidates = np.repeat(np.arange(k), len(seeds))
    all_seeds = np.tile(seeds, k)
    n_tasks = max(1, math.ceil(len(all_seeds) / task_size))
    return [
        Task(
            kind, s, None if params is None else params[c], max_steps, early_stop_steps, float64, generation,
            None if kind in ("collect", "evaluate") else c,
        )
        for c, s in zip(np.array_split(candidates, n_tasks), np.array_split(all_seeds, n_tasks))
        if len(s)
    ]


def run_tasks(
    executor: Executor, task_fn: TaskFn, tasks: list[Task], timeout: float | None, progress: Any = None
) -> np.ndarray:
    """Run `tasks` on `executor` and concatenate their per-episode results, in order.

    `progress`, when given, is called with each task's results as it finishes.
    """
    results = executor.map_tasks(task_fn, tasks, timeout=timeout, progress=progress)
    for task, r in zip(tasks, results):
        if len(r) != len(task):
            raise RuntimeError(f"{task!r} returned {len(r)} values for {len(task)} episodes")
    return np.concatenate([np.asarray(r).reshape(-1) for r in results]) if results else np.empty(0)


def _ranges(values: np.ndarray) -> str:
    """Compact text for sorted integers: [3-6, 9]."""
    values = np.asarray(values).reshape(-1)
    if len(values) == 0:
        return "[]"
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(values) - 1]])
    return "[" + ", ".join(f"{values[a]}-{values[b]}" if b > a else f"{values[a]}" for a, b in zip(starts, ends)) + "]"
