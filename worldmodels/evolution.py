"""Training the controller with CMA-ES: parallel evaluation, checkpoints, resume.

The core, :func:`evolve`, is CMA-ES (the ``cma`` package) around a *task function*. Each
generation it asks CMA-ES for ``population`` candidate vectors, splits the
``population x episodes`` evaluations into :class:`Task` chunks, has an executor
(:mod:`worldmodels.parallel`) run them, and tells CMA-ES the fitnesses. The same core
trains the controller in the real environment (:func:`train_controller`), in M's dream
(:func:`worldmodels.dream.train_controller_in_dream`), and minimises a cheap analytic
function in the tests (:func:`sphere_task`).
"""

from __future__ import annotations

import csv
import io
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from worldmodels.config import CMA_VALIDATION_OFFSET, CMAConfig, Config, ConfigError
from worldmodels.parallel import Executor, TaskFn, make_executor
from worldmodels.runs import RunDir, as_run_dir, read_json, read_pickle, reading, save_tensors, write_bytes, write_json

VALIDATION_OFFSET = CMA_VALIDATION_OFFSET
"""Validation tracks use seeds ``cma.seed + 500_000 + i``; training tracks stay below them."""

HISTORY_FIELDS = (
    "generation",
    "fitness_mean",
    "fitness_max",
    "fitness_min",
    "fitness_std",
    "sigma",
    "val_mean",
    "val_std",
    "seconds",
)
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------
# Seeds and tasks
# --------------------------------------------------------------------------------------
def training_seeds(cma: CMAConfig, generation: int) -> np.ndarray:
    """The tracks of `generation`: every candidate is scored on the same ones (common random numbers)."""
    e = cma.episodes_per_candidate
    return cma.seed + generation * e + np.arange(e, dtype=np.int64)


def validation_seeds(cma: CMAConfig) -> np.ndarray:
    """The fixed tracks on which the distribution's mean is evaluated every ``eval_every`` generations."""
    return cma.seed + VALIDATION_OFFSET + np.arange(cma.eval_episodes, dtype=np.int64)


def selection_seeds(cma: CMAConfig) -> np.ndarray:
    """The further validation tracks of the final selection (after :func:`validation_seeds`)."""
    return cma.seed + VALIDATION_OFFSET + cma.eval_episodes + np.arange(cma.select_episodes, dtype=np.int64)


def _check_seed_ranges(cma: CMAConfig) -> None:
    if cma.generations * cma.episodes_per_candidate > VALIDATION_OFFSET:
        raise ConfigError(
            f"cma.generations * cma.episodes_per_candidate = {cma.generations * cma.episodes_per_candidate} "
            f"would reach the validation seeds (cma.seed + {VALIDATION_OFFSET:,}): allowed at most {VALIDATION_OFFSET:,}"
        )


def _ranges(values: np.ndarray) -> str:
    """Compact text for integer arrays: [3-6, 9]."""
    values = np.asarray(values).reshape(-1)
    if len(values) == 0:
        return "[]"
    parts, start, prev = [], int(values[0]), int(values[0])
    for v in map(int, values[1:]):
        if v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        start = prev = v
    parts.append(f"{start}-{prev}" if prev > start else f"{start}")
    return "[" + ", ".join(parts) + "]"


@dataclass(repr=False)
class Task:
    """A chunk of a generation's evaluations: episode ``i`` runs candidate ``candidates[i]``
    (parameters ``params[i]``) on the track of ``seeds[i]``. The task function returns
    one return per episode, an array (n,)."""

    kind: str
    """'train' (a generation's candidates) or 'validate' (the distribution's mean)."""
    generation: int
    candidates: np.ndarray
    params: np.ndarray
    seeds: np.ndarray
    max_steps: int
    early_stop_steps: int = 0

    def __len__(self) -> int:
        return len(self.seeds)

    def __repr__(self) -> str:
        return (
            f"Task({self.kind}, generation={self.generation}, candidates={_ranges(np.unique(self.candidates))}, "
            f"seeds={_ranges(np.unique(self.seeds))}, episodes={len(self)}, max_steps={self.max_steps})"
        )


def make_tasks(
    kind: str,
    generation: int,
    params: np.ndarray,
    seeds: np.ndarray,
    task_size: int,
    max_steps: int,
    early_stop_steps: int = 0,
) -> list[Task]:
    """Every candidate (row of `params`, (K, P)) on every seed, candidate-major, in tasks of at most `task_size`."""
    k, e = len(params), len(seeds)
    cand = np.repeat(np.arange(k), e)
    seed = np.tile(np.asarray(seeds, np.int64), k)
    n_tasks = math.ceil(k * e / task_size)
    return [
        Task(kind, generation, c, params[c], s, max_steps, early_stop_steps)
        for c, s in zip(np.array_split(cand, n_tasks), np.array_split(seed, n_tasks))
    ]


def run_tasks(executor: Executor, task_fn: TaskFn, tasks: list[Task], timeout: float | None) -> np.ndarray:
    """Run `tasks` on `executor` and concatenate their returns, in order."""
    results = executor.map_tasks(task_fn, tasks, timeout=timeout)
    out = []
    for task, r in zip(tasks, results):
        r = np.asarray(r, dtype=np.float64).reshape(-1)
        if len(r) != len(task):
            raise RuntimeError(f"{task!r} returned {len(r)} values for {len(task)} episodes")
        out.append(r)
    return np.concatenate(out)


# --------------------------------------------------------------------------------------
# The CMA-ES core
# --------------------------------------------------------------------------------------
class _Randn:
    """CMA-ES's sampler (its ``randn`` option): a private RandomState, pickled with the ES,
    so that a resumed run draws exactly the candidates the uninterrupted run would have."""

    def __init__(self, seed: int):
        self.rng = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def new_es(n_params: int, cma_cfg: CMAConfig):
    """``cma.CMAEvolutionStrategy`` at x0 = 0, sigma0, popsize, seeded by ``cma_cfg.seed``, silent."""
    import cma

    opts = {
        "popsize": cma_cfg.population,
        "seed": float("nan"),  # the seed goes to our own sampler, not to NumPy's global state
        "randn": _Randn(cma_cfg.seed),
        "verbose": -9,
        "verb_disp": 0,
        "verb_log": 0,  # no outcmaes/ files
    }
    return cma.CMAEvolutionStrategy(np.zeros(n_params), cma_cfg.sigma0, opts)


@dataclass
class EvolutionState:
    """Everything a run needs to continue: written to ``es.pkl`` after every generation."""

    es: Any
    generation: int = 0
    """Generations finished."""
    best_params: np.ndarray | None = None
    """The mean with the best validation score so far."""
    best_score: float = -math.inf
    best_generation: int = -1
    history: list[dict] = field(default_factory=list)
    numpy_random_state: tuple | None = None
    torch_random_state: Any = None
    validated: list[dict] = field(default_factory=list)
    """Every validated mean: generation, val_mean, val_std, params."""
    selection: dict | None = None
    """The final selection (see :func:`select_final`), once done."""

    @property
    def mean(self) -> np.ndarray:
        return np.array(self.es.mean, dtype=np.float64)


@dataclass
class EvolutionResult:
    """What :func:`evolve` returns."""

    best_params: np.ndarray
    """The best validated mean (the last mean when nothing was validated yet)."""
    best_score: float
    mean: np.ndarray
    generation: int
    history: list[dict]
    es: Any
    finished: bool


def save_checkpoint(path: Path, state: EvolutionState) -> None:
    """Pickle `state` atomically (a run-local file: pickle is fine here, never for shared weights)."""
    state.numpy_random_state = np.random.get_state()
    state.torch_random_state = torch.get_rng_state()
    payload = {"version": CHECKPOINT_VERSION, "state": state}
    write_bytes(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(path: Path) -> EvolutionState:
    payload = read_pickle(path)
    if payload.get("version") != CHECKPOINT_VERSION:
        raise RuntimeError(f"{path}: checkpoint version {payload.get('version')}, expected {CHECKPOINT_VERSION}")
    state: EvolutionState = payload["state"]
    for name, default in (("validated", []), ("selection", None)):  # checkpoints written before these fields
        if name not in state.__dict__:
            setattr(state, name, default)
    if state.numpy_random_state is not None:
        np.random.set_state(state.numpy_random_state)
    if state.torch_random_state is not None:
        torch.set_rng_state(state.torch_random_state)
    return state


def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})
    return buf.getvalue()


def read_history(path: str | Path) -> list[dict]:
    """history.csv back as a list of dicts of floats (None where empty)."""
    with reading(path, "history file"), open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _save_flat(path: Path, params: np.ndarray, metadata: dict[str, str]) -> None:
    save_tensors(path, {"params": torch.from_numpy(np.asarray(params, np.float64))}, metadata=metadata)


def evolve(
    task_fn: TaskFn,
    n_params: int,
    cma_cfg: CMAConfig,
    executor: Executor,
    *,
    checkpoint_dir: str | Path | None = None,
    task_size: int | None = None,
    eval_max_steps: int | None = None,
    max_generations: int | None = None,
    save_params: Callable[[Path, np.ndarray, dict[str, str]], None] | None = None,
    prefix: str = "",
    quiet: bool = False,
    desc: str = "CMA-ES",
) -> EvolutionResult:
    """Maximise the mean return of `task_fn` over controller parameters with CMA-ES.

    Each generation ``g``:

    1. ``X = es.ask()``: ``population`` candidates of `n_params` parameters;
    2. every candidate plays ``episodes_per_candidate`` episodes on the *same* tracks
       :func:`training_seeds` ``(cma_cfg, g)``, split into :class:`Task` chunks of at most
       `task_size` episodes (default ``cma_cfg.envs_per_worker``) and run on `executor`
       as ``task_fn(worker_state, task) -> returns (n,)``;
    3. ``fitness_k = mean_e R_ke - weight_decay * mean(theta_k^2)``; ``es.tell(X, -fitness)``
       (``cma`` minimises);
    4. every ``eval_every`` generations (and after the last) ``es.mean`` plays the fixed
       :func:`validation_seeds` without early termination, for at most `eval_max_steps`
       steps (default ``cma_cfg.max_steps``: CarRacing's full 1,000 in the ``book`` and
       ``paper`` presets); the best mean by
       validation score is kept (``{prefix}best.safetensors``); after the last
       generation, with ``select_top``, :func:`select_final` re-scores the best validated
       means on more validation tracks and keeps the winner (``{prefix}selection.json``);
    5. with a `checkpoint_dir`, ``{prefix}es.pkl`` (the pickled ES, generation, best,
       history, RNG states), ``{prefix}history.csv`` and ``{prefix}last.safetensors``
       (the current mean) are written atomically.

    Called again with a `checkpoint_dir` that holds a checkpoint, it continues after the
    last finished generation with the same mean, covariance and step size, and draws
    the same candidates the uninterrupted run would have; once all
    ``cma_cfg.generations`` are done it only loads and returns (with a larger
    ``generations`` than before, a finished run goes on). `max_generations` stops
    earlier (the run can be continued later).
    """
    _check_seed_ranges(cma_cfg)
    save_params = save_params or _save_flat
    task_size = task_size or cma_cfg.envs_per_worker
    eval_max_steps = eval_max_steps or cma_cfg.max_steps
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path = ckpt_dir / f"{prefix}es.pkl" if ckpt_dir else None

    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.es.N != n_params or state.es.popsize != cma_cfg.population:
            raise RuntimeError(
                f"{ckpt_path}: a checkpoint for {state.es.N} parameters and population {state.es.popsize}, "
                f"asked for {n_params} and {cma_cfg.population}; use a new run directory"
            )
    else:
        state = EvolutionState(es=new_es(n_params, cma_cfg))

    stop = cma_cfg.generations if max_generations is None else min(cma_cfg.generations, max_generations)
    bar = tqdm(total=stop, initial=min(state.generation, stop), desc=desc, disable=quiet, leave=False)
    try:
        for g in range(state.generation, stop):
            t0 = time.perf_counter()
            es = state.es
            X = np.asarray(es.ask(), dtype=np.float64)
            seeds = training_seeds(cma_cfg, g)
            tasks = make_tasks("train", g, X, seeds, task_size, cma_cfg.max_steps, cma_cfg.early_stop_steps)
            returns = run_tasks(executor, task_fn, tasks, cma_cfg.task_timeout).reshape(len(X), len(seeds))
            fitness = returns.mean(axis=1) - cma_cfg.weight_decay * np.mean(X**2, axis=1)
            es.tell(list(X), list(-fitness))

            row: dict[str, Any] = {
                "generation": g,
                "fitness_mean": float(fitness.mean()),
                "fitness_max": float(fitness.max()),
                "fitness_min": float(fitness.min()),
                "fitness_std": float(fitness.std()),
                "sigma": float(es.sigma),
                "val_mean": None,
                "val_std": None,
            }
            if (g + 1) % cma_cfg.eval_every == 0 or g + 1 == cma_cfg.generations:
                mean = state.mean
                val_tasks = make_tasks(
                    "validate", g, mean[None], validation_seeds(cma_cfg), task_size, eval_max_steps, 0
                )
                val = run_tasks(executor, task_fn, val_tasks, cma_cfg.task_timeout)
                row["val_mean"], row["val_std"] = float(val.mean()), float(val.std())
                state.validated.append({"generation": g, "val_mean": row["val_mean"], "val_std": row["val_std"], "params": mean})
                if row["val_mean"] > state.best_score:
                    state.best_params, state.best_score, state.best_generation = mean, row["val_mean"], g
                    if ckpt_dir is not None:
                        meta = {"generation": str(g), "val_mean": repr(row["val_mean"]), "val_std": repr(row["val_std"])}
                        save_params(ckpt_dir / f"{prefix}best.safetensors", mean, meta)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            state.history.append(row)
            state.generation = g + 1

            if ckpt_dir is not None:
                save_params(ckpt_dir / f"{prefix}last.safetensors", state.mean, {"generation": str(g)})
                write_bytes(ckpt_dir / f"{prefix}history.csv", history_csv(state.history).encode())
                save_checkpoint(ckpt_path, state)  # last: the checkpoint never runs ahead of the files above
            bar.update(1)
            post = {"fit": f"{row['fitness_mean']:.1f}/{row['fitness_max']:.1f}", "sigma": f"{row['sigma']:.3g}"}
            if row["val_mean"] is not None:
                post["val"] = f"{row['val_mean']:.1f}"
            bar.set_postfix(post)
    finally:
        bar.close()

    finished = state.generation >= cma_cfg.generations
    if finished and cma_cfg.select_top and (state.selection or {}).get("generation") != state.generation:
        select_final(state, task_fn, cma_cfg, executor, task_size, eval_max_steps)
        if ckpt_dir is not None:
            meta = {"generation": str(state.best_generation), "selection_score": repr(state.best_score)}
            save_params(ckpt_dir / f"{prefix}best.safetensors", state.best_params, meta)
            write_json(ckpt_dir / f"{prefix}selection.json", state.selection)
            save_checkpoint(ckpt_path, state)
    if finished and ckpt_dir is not None and _finished_generations(ckpt_dir / f"{prefix}done.json") != state.generation:
        write_json(
            ckpt_dir / f"{prefix}done.json",
            {"generations": state.generation, "best_score": state.best_score, "best_generation": state.best_generation},
        )
    best = state.best_params if state.best_params is not None else state.mean
    return EvolutionResult(best, state.best_score, state.mean, state.generation, state.history, state.es, finished)


def select_final(
    state: EvolutionState,
    task_fn: TaskFn,
    cma_cfg: CMAConfig,
    executor: Executor,
    task_size: int,
    max_steps: int,
) -> dict:
    """Choose the final controller among the validated means more reliably than one validation allows.

    The ``select_top`` validated means with the highest validation scores (the best mean so
    far always among them) each drive the ``select_episodes`` tracks of
    :func:`selection_seeds`, full episodes; the winner has the best mean over its
    validation and selection tracks together. It becomes ``state.best_params``;
    ``state.selection`` records every candidate's scores.
    """
    candidates = {v["generation"]: v for v in state.validated}
    if state.best_params is not None and state.best_generation not in candidates:
        # validated before the checkpoint kept every validated mean: the best one is still known
        row = next((h for h in state.history if h["generation"] == state.best_generation), {})
        candidates[state.best_generation] = {
            "generation": state.best_generation, "val_mean": state.best_score,
            "val_std": row.get("val_std"), "params": state.best_params,
        }
    top = sorted(candidates.values(), key=lambda v: v["val_mean"], reverse=True)[: cma_cfg.select_top]
    seeds = selection_seeds(cma_cfg)
    params = np.stack([v["params"] for v in top])
    tasks = make_tasks("select", state.generation, params, seeds, task_size, max_steps, 0)
    returns = run_tasks(executor, task_fn, tasks, cma_cfg.task_timeout).reshape(len(top), len(seeds))
    n_val = cma_cfg.eval_episodes
    rows = []
    for v, r in zip(top, returns):
        combined = (v["val_mean"] * n_val + r.sum()) / (n_val + len(r))
        rows.append({
            "generation": v["generation"], "val_mean": v["val_mean"], "val_std": v["val_std"],
            "select_mean": float(r.mean()), "select_std": float(r.std()), "combined_mean": float(combined),
        })
    winner = max(range(len(rows)), key=lambda i: rows[i]["combined_mean"])
    state.best_params = top[winner]["params"]
    state.best_score = rows[winner]["combined_mean"]
    state.best_generation = rows[winner]["generation"]
    state.selection = {
        "generation": state.generation,
        "tracks": [int(seeds[0]), int(seeds[-1])] if len(seeds) else [],
        "validation_episodes": n_val,
        "selection_episodes": len(seeds),
        "candidates": rows,
        "chosen_generation": state.best_generation,
    }
    return state.selection


def _finished_generations(done_path: Path) -> int | None:
    """Generations recorded in a ``done.json``, None when there is none."""
    if not done_path.exists():
        return None
    return int(read_json(done_path)["generations"])


def is_finished(folder: Path, cma_cfg: CMAConfig, prefix: str = "") -> bool:
    """True when ``folder`` holds a finished run of at least ``cma_cfg.generations`` generations."""
    folder = Path(folder)
    done = _finished_generations(folder / f"{prefix}done.json")
    if done is None or done < cma_cfg.generations or not (folder / f"{prefix}best.safetensors").exists():
        return False
    if cma_cfg.select_top:  # the final selection must have run on the last generation
        selection = folder / f"{prefix}selection.json"
        return selection.exists() and read_json(selection)["generation"] == done
    return True


# --------------------------------------------------------------------------------------
# An analytic problem for tests and demonstrations
# --------------------------------------------------------------------------------------
SPHERE_SHIFT = np.array([0.5, -0.3, 0.2, 0.4, -0.1])
"""The optimum of :func:`sphere_task` when its worker state gives none."""


def sphere_task(shift: np.ndarray | None, task: Task) -> np.ndarray:
    """Task function of a shifted sphere: "return" = ``-|theta - shift|^2`` (max 0 at theta = shift).

    The worker state is the shift (default :data:`SPHERE_SHIFT`); seeds are ignored.
    """
    shift = SPHERE_SHIFT if shift is None else np.asarray(shift)
    return -np.sum((task.params - shift) ** 2, axis=1)


# --------------------------------------------------------------------------------------
# The controller in the real environment
# --------------------------------------------------------------------------------------
def _worker_agent(vae_state: dict, mdrnn_state: dict, cfg: Config):
    """Worker initializer: V, M and the environments' config, built once per worker."""
    from worldmodels.rollout import Agent

    return Agent.from_weights(vae_state, mdrnn_state, cfg), cfg.env


def rollout_task(state: tuple, task: Task) -> np.ndarray:
    """Task function of the real environment: one vector of ``len(task)`` CarRacing envs."""
    from worldmodels.rollout import rollout

    agent, env_cfg = state
    result = rollout(
        agent, task.params, task.seeds, env_cfg, max_steps=task.max_steps, early_stop_steps=task.early_stop_steps
    )
    return np.asarray(result.returns, dtype=np.float64)


def _model_states(run: RunDir, cfg: Config) -> tuple[dict, dict | None]:
    """V's and M's state dicts from the run (CPU tensors, sent to the workers once)."""
    from worldmodels.rollout import Agent

    vae_state, mdrnn_state, _ = Agent.from_run(run, cfg).init_args()
    return vae_state, mdrnn_state


def train_controller(
    cfg: Config,
    run: str | Path | RunDir,
    *,
    quiet: bool = False,
    max_generations: int | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """Evolve the controller C with CMA-ES in the real CarRacing-v3, V and M frozen.

    Pseudocode (one generation; ``P`` = C's parameters, ``K`` = ``cfg.cma.population``,
    ``E`` = ``cfg.cma.episodes_per_candidate``)::

        theta_1..theta_K ~ N(m, sigma^2 C)                    # es.ask()
        tracks = seeds s_g..s_g+E-1, the same for all K       # common random numbers
        F_k = mean_e return(theta_k, track_e) - 0.01 * mean(theta_k^2)
        es.tell(theta, -F)                                    # CMA-ES minimises
        every eval_every generations: score m on eval_episodes fixed validation tracks,
                                      keep the best m as run/controller/best.safetensors

    The ``K x E`` episodes are split into tasks of ``cfg.cma.envs_per_worker`` episodes;
    a worker runs one task as one vector of environments with V, M and the task's
    controllers batched across them. Workers are local processes
    (``cfg.cma.workers``), or a Dask cluster when ``cfg.cma.scheduler`` is an address;
    each builds V and M once. Episodes end after ``cfg.cma.max_steps`` steps, or
    ``cfg.cma.early_stop_steps`` steps without a new tile; validation episodes run
    ``cfg.cma.max_steps`` steps (1,000, CarRacing's full episode, but in ``tiny``) without early termination.

    Writes to ``run/controller/``: ``es.pkl`` (checkpoint, every generation),
    ``history.csv``, ``best.safetensors``, ``last.safetensors``, ``done.json``. Resumes
    an interrupted run exactly; when finished, only loads.

    Returns the best controller's flat parameters (P,).
    """
    from worldmodels.controller import ControllerShape, load_controller, save_controller

    run = as_run_dir(run)
    cfg = run.bind(cfg)
    out = run.controller
    if is_finished(out, cfg.cma):
        return load_controller(out / "best.safetensors").params

    shape = ControllerShape.from_config(cfg)

    def save(path: Path, params: np.ndarray, metadata: dict[str, str]) -> None:
        save_controller(path, params, shape, metadata)

    own = executor is None
    if own:
        vae_state, mdrnn_state = _model_states(run, cfg)
        executor = make_executor(
            cfg.cma.workers, cfg.cma.scheduler, init=_worker_agent, init_args=(vae_state, mdrnn_state, cfg)
        )
    try:
        result = evolve(
            rollout_task,
            shape.n_params,
            cfg.cma,
            executor,
            checkpoint_dir=out,
            max_generations=max_generations,
            save_params=save,
            quiet=quiet,
            desc="train-controller",
        )
    finally:
        if own:
            executor.close()
    return result.best_params
