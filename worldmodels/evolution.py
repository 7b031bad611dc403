"""CMA-ES (the ``cma`` package) around a task function, with checkpoints and exact resume.

:func:`evolve` maximises the mean return of controllers over their flat parameter
vectors. One generation (:func:`generation`) asks CMA-ES for ``population`` candidates,
has an executor (:mod:`worldmodels.parallel`) run every candidate on the generation's
tracks as :class:`~worldmodels.tasks.Task` chunks, and tells CMA-ES the fitnesses. The
task function decides where the episodes happen: the real CarRacing
(:func:`worldmodels.rollout.train_controller`), M's dream
(:func:`worldmodels.dream.train_controller_in_dream`), or a cheap analytic function in
the tests (:func:`sphere_task`).

A run may start its mean at given parameters (`x0`, a controller file) and may continue,
from its checkpoint, with a larger population (:func:`resized_es`) or more episodes per
candidate; history.csv records both per generation with the wall time.
"""

from __future__ import annotations

import csv
import hashlib
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

from worldmodels.config import CMA_VALIDATION_OFFSET, CMAConfig, ConfigError
from worldmodels.parallel import Executor, TaskFn
from worldmodels.runs import (
    BEST_WEIGHTS,
    DONE_FILE,
    ES_CHECKPOINT,
    HISTORY_FILE,
    LAST_WEIGHTS,
    SELECTION_FILE,
    load_tensors,
    read_json,
    read_pickle,
    reading,
    save_tensors,
    write_bytes,
    write_json,
)
from worldmodels.tasks import Task, make_tasks, run_tasks

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
    "cumulative_seconds",
    "population",
    "episodes_per_candidate",
)
"""The columns of history.csv, one row per generation: the fitness, CMA-ES's step size, the
validation of the mean (where validated), the generation's wall seconds and their running total,
and the population and episodes per candidate it had."""
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------
# Tracks
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


def _es(x0: np.ndarray, sigma0: float, popsize: int, randn: _Randn):
    """A silent ``cma.CMAEvolutionStrategy`` that draws its candidates from `randn`."""
    import cma

    opts = {
        "popsize": popsize,
        "seed": float("nan"),  # the seed goes to our own sampler, not to NumPy's global state
        "randn": randn,
        "verbose": -9,
        "verb_disp": 0,
        "verb_log": 0,  # no outcmaes/ files
    }
    return cma.CMAEvolutionStrategy(np.asarray(x0, dtype=np.float64), sigma0, opts)


def new_es(n_params: int, cma_cfg: CMAConfig, x0: np.ndarray | None = None):
    """``cma.CMAEvolutionStrategy`` at `x0` (default zeros), sigma0, popsize, seeded by ``cma_cfg.seed``, silent."""
    return _es(np.zeros(n_params) if x0 is None else x0, cma_cfg.sigma0, cma_cfg.population, _Randn(cma_cfg.seed))


def resized_es(es, population: int):
    """The strategy `es` continued with `population` candidates per generation.

    pycma cannot change a running strategy's population: ``popsize`` is read-only, and the
    recombination weights, learning rates and step-size damping all derive from it. So a new
    strategy, built by pycma for the new population, starts at the old one's mean, step size
    and covariance matrix; its evolution paths start at zero, as on a restart. It draws from
    the old one's sampler, so a resumed run draws what the uninterrupted one did.
    """
    import copy

    new = _es(es.mean, es.sigma, population, es.opts["randn"])
    new.sm.C = np.array(es.sm.C, copy=True)
    new.sm.update_now(-1)  # eigendecomposition of the covariance now, not after the first update
    new._updateBDfromSM(new.sm)
    new.sigma_vec = copy.deepcopy(es.sigma_vec)
    return new


ZEROS_START = {"x0": "zeros"}
"""The start of a run whose mean began at zeros (what ``done.json`` records as ``start``)."""


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
    start: dict = field(default_factory=lambda: dict(ZEROS_START))
    """Where the mean started: ``{"x0": "zeros"}`` or ``{"x0": path, "sha256": the file's hash}``."""

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
    defaults = (("validated", []), ("selection", None), ("start", dict(ZEROS_START)))
    for name, default in defaults:  # checkpoints written before these fields
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


def history_seconds(history: list[dict]) -> float:
    """The wall seconds of the generations in a history (:func:`read_history`'s rows); a final selection's are not recorded."""
    return float(sum(row["seconds"] or 0.0 for row in history))


def read_history(path: str | Path) -> list[dict]:
    """history.csv back as a list of dicts of floats, one key per :data:`HISTORY_FIELDS` (None where
    empty or absent); a history written before ``cumulative_seconds`` gets it summed from ``seconds``."""
    with reading(path, "history file"), open(path, newline="") as f:
        rows = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]
    total = 0.0
    for row in rows:
        total += row.get("seconds") or 0.0
        if row.get("cumulative_seconds") is None and row.get("seconds") is not None:
            row["cumulative_seconds"] = round(total, 3)
        for k in HISTORY_FIELDS:
            row.setdefault(k, None)
    return rows


def _save_flat(path: Path, params: np.ndarray, metadata: dict[str, str]) -> None:
    save_tensors(path, {"params": torch.from_numpy(np.asarray(params, np.float64))}, metadata=metadata)


def _load_flat(path: Path) -> np.ndarray:
    return load_tensors(path)["params"].double().numpy()


def _new_state(
    n_params: int, cma_cfg: CMAConfig, x0: str | Path | None, load_params: Callable[[Path], np.ndarray]
) -> EvolutionState:
    """Generation 0's state: the mean at zeros, or at the parameters in the file `x0`."""
    if not x0:
        return EvolutionState(es=new_es(n_params, cma_cfg))
    path = Path(x0)
    if not path.exists():
        raise FileNotFoundError(f"cma.x0: {path}: no such file (the controller where CMA-ES should start)")
    params = np.asarray(load_params(path), dtype=np.float64).reshape(-1)
    if params.shape[0] != n_params:
        raise ConfigError(f"cma.x0: {path} holds {params.shape[0]} parameters, but this run evolves {n_params}")
    start = {"x0": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return EvolutionState(es=new_es(n_params, cma_cfg, params), start=start)


@dataclass
class Scorer:
    """Runs episodes of parameter vectors on an executor: what a generation needs besides CMA-ES."""

    task_fn: TaskFn
    executor: Executor
    cma: CMAConfig
    task_size: int
    """Episodes per task (at most)."""
    eval_max_steps: int
    """Length of the validation and selection episodes (training episodes: ``cma.max_steps``)."""

    def returns(self, kind: str, generation: int, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Returns (K, E) of every row of `params` on every seed; only 'train' episodes stop early."""
        train = kind == "train"
        tasks = make_tasks(
            kind, params, seeds, self.task_size, self.cma.max_steps if train else self.eval_max_steps,
            early_stop_steps=self.cma.early_stop_steps if train else 0, generation=generation,
        )
        return run_tasks(self.executor, self.task_fn, tasks, self.cma.task_timeout).reshape(len(params), len(seeds))


def generation(state: EvolutionState, scorer: Scorer) -> dict[str, Any]:
    """One generation: ask, score every candidate on the generation's tracks, tell; every
    ``eval_every`` generations (and after the last) validate the mean and keep the best.
    Returns the generation's row of the history."""
    g, cma_cfg, start = state.generation, scorer.cma, time.perf_counter()
    candidates = np.asarray(state.es.ask(), dtype=np.float64)
    returns = scorer.returns("train", g, candidates, training_seeds(cma_cfg, g))
    fitness = returns.mean(axis=1) - cma_cfg.weight_decay * np.mean(candidates**2, axis=1)
    state.es.tell(list(candidates), list(-fitness))  # cma minimises
    row: dict[str, Any] = {
        "generation": g, "fitness_mean": float(fitness.mean()), "fitness_max": float(fitness.max()),
        "fitness_min": float(fitness.min()), "fitness_std": float(fitness.std()), "sigma": float(state.es.sigma),
        "val_mean": None, "val_std": None,
        "population": len(candidates), "episodes_per_candidate": returns.shape[1],
    }
    if (g + 1) % cma_cfg.eval_every == 0 or g + 1 == cma_cfg.generations:
        mean = state.mean
        val = scorer.returns("validate", g, mean[None], validation_seeds(cma_cfg))[0]
        row["val_mean"], row["val_std"] = float(val.mean()), float(val.std())
        state.validated.append({**{k: row[k] for k in ("generation", "val_mean", "val_std")}, "params": mean})
        if row["val_mean"] > state.best_score:
            state.best_params, state.best_score, state.best_generation = mean, row["val_mean"], g
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["cumulative_seconds"] = round(sum(h["seconds"] for h in state.history) + row["seconds"], 3)
    state.history.append(row)
    state.generation = g + 1
    return row


@dataclass
class Checkpoint:
    """An evolution's files in `folder` (none when None), each name after `prefix` (runs in a
    dream at several temperatures share a folder)."""

    folder: Path | None
    prefix: str = ""
    save_params: Callable[[Path, np.ndarray, dict[str, str]], None] = _save_flat
    """Writes a flat parameter vector with its metadata (a controller file, say)."""

    def path(self, name: str) -> Path:
        return self.folder / f"{self.prefix}{name}"

    def load(self, n_params: int, cma_cfg: CMAConfig) -> EvolutionState | None:
        """The state saved after the last finished generation, None when there is none."""
        if self.folder is None or not self.path(ES_CHECKPOINT).exists():
            return None
        state = load_checkpoint(self.path(ES_CHECKPOINT))
        if state.es.N != n_params:
            raise RuntimeError(
                f"{self.path(ES_CHECKPOINT)}: a checkpoint for {state.es.N} parameters, asked for {n_params}; "
                "use a new run directory"
            )
        return state

    def save(self, state: EvolutionState, row: dict[str, Any]) -> None:
        """After a generation: the best mean (when it changed), the last mean, the history, and the
        ES last, so that the checkpoint never runs ahead of the other files."""
        if self.folder is None:
            return
        g = row["generation"]
        if state.best_generation == g:
            meta = {"generation": str(g), "val_mean": repr(row["val_mean"]), "val_std": repr(row["val_std"])}
            self.save_params(self.path(BEST_WEIGHTS["controller"]), state.best_params, meta)
        self.save_params(self.path(LAST_WEIGHTS), state.mean, {"generation": str(g)})
        write_bytes(self.path(HISTORY_FILE), history_csv(state.history).encode())
        save_checkpoint(self.path(ES_CHECKPOINT), state)

    def save_selection(self, state: EvolutionState) -> None:
        if self.folder is None:
            return
        meta = {"generation": str(state.best_generation), "selection_score": repr(state.best_score)}
        self.save_params(self.path(BEST_WEIGHTS["controller"]), state.best_params, meta)
        write_json(self.path(SELECTION_FILE), state.selection)
        save_checkpoint(self.path(ES_CHECKPOINT), state)

    def mark_done(self, state: EvolutionState) -> None:
        if self.folder is None or _finished_generations(self.path(DONE_FILE)) == state.generation:
            return
        write_json(
            self.path(DONE_FILE),
            {
                "generations": state.generation, "best_score": state.best_score,
                "best_generation": state.best_generation, "start": state.start,
            },
        )


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
    x0: str | Path | None = None,
    load_params: Callable[[Path], np.ndarray] | None = None,
    prefix: str = "",
    quiet: bool = False,
    desc: str = "CMA-ES",
) -> EvolutionResult:
    """Maximise the mean return of `task_fn` over `n_params` parameters with CMA-ES.

    Each generation (:func:`generation`) scores ``population`` candidates on the same
    ``episodes_per_candidate`` tracks (:func:`training_seeds`), in tasks of at most
    `task_size` episodes (default ``cma_cfg.envs_per_worker``) that `executor` runs as
    ``task_fn(worker_state, task) -> returns (n,)``; the fitness is the mean return minus
    ``weight_decay * mean(theta^2)``. The mean is validated on fixed tracks
    (:func:`validation_seeds`, episodes of `eval_max_steps`, default ``cma_cfg.max_steps``,
    without early termination) and the best validated mean kept; after the last generation,
    with ``select_top``, :func:`select_final` chooses among the best validated means.

    With a `checkpoint_dir`, every generation writes ``{prefix}es.pkl`` (the pickled ES,
    history and RNG states), ``{prefix}history.csv``, ``{prefix}last.safetensors`` and,
    when it improves, ``{prefix}best.safetensors`` (through `save_params`); a finished run
    writes ``{prefix}done.json`` (and ``{prefix}selection.json``). Called again, it goes on
    after the last finished generation and draws the candidates the uninterrupted run
    would have; once ``cma_cfg.generations`` are done it only loads (a larger
    ``generations`` goes on). `max_generations` stops earlier (to be continued later).

    A new run's mean starts at the parameters in the file `x0` (read with `load_params`,
    default: the flat vector of `save_params`' files), or at zeros; a run that has a
    checkpoint never reads `x0` again. A run continued with a larger ``population`` goes on
    from its mean, step size and covariance (:func:`resized_es`); with more
    ``episodes_per_candidate``, from its next generation.
    """
    _check_seed_ranges(cma_cfg)
    files = Checkpoint(Path(checkpoint_dir) if checkpoint_dir is not None else None, prefix, save_params or _save_flat)
    task_size, eval_max_steps = task_size or cma_cfg.envs_per_worker, eval_max_steps or cma_cfg.max_steps
    scorer = Scorer(task_fn, executor, cma_cfg, task_size, eval_max_steps)
    state = files.load(n_params, cma_cfg) or _new_state(n_params, cma_cfg, x0, load_params or _load_flat)
    if state.es.popsize != cma_cfg.population and state.generation < cma_cfg.generations:
        state.es = resized_es(state.es, cma_cfg.population)
    stop = cma_cfg.generations if max_generations is None else min(cma_cfg.generations, max_generations)
    with tqdm(total=stop, initial=min(state.generation, stop), desc=desc, disable=quiet, leave=False) as bar:
        while state.generation < stop:
            row = generation(state, scorer)
            files.save(state, row)
            bar.update(1)
            bar.set_postfix(_postfix(row))
    finished = state.generation >= cma_cfg.generations
    if finished and cma_cfg.select_top and not _selection_is_current(state.selection, state.generation, cma_cfg):
        select_final(state, scorer)
        files.save_selection(state)
    if finished:
        files.mark_done(state)
    best = state.best_params if state.best_params is not None else state.mean
    return EvolutionResult(best, state.best_score, state.mean, state.generation, state.history, state.es, finished)


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows of a generation."""
    post = {"fit": f"{row['fitness_mean']:.1f}/{row['fitness_max']:.1f}", "sigma": f"{row['sigma']:.3g}"}
    if row["val_mean"] is not None:
        post["val"] = f"{row['val_mean']:.1f}"
    return post


def select_final(state: EvolutionState, scorer: Scorer) -> dict:
    """Choose the final controller among the validated means more reliably than one validation allows.

    The ``select_top`` validated means with the highest validation scores (the best mean so
    far always among them) each drive the ``select_episodes`` tracks of
    :func:`selection_seeds`, full episodes; the winner has the best mean over its
    validation and selection tracks together. It becomes ``state.best_params``;
    ``state.selection`` records every candidate's scores.
    """
    cma_cfg = scorer.cma
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
    returns = scorer.returns("select", state.generation, np.stack([v["params"] for v in top]), seeds)
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
        "select_top": cma_cfg.select_top,
        "selection_episodes": len(seeds),
        "candidates": rows,
        "chosen_generation": state.best_generation,
    }
    return state.selection


def _selection_is_current(selection: dict | None, generation: int, cma_cfg: CMAConfig) -> bool:
    """Whether `selection` chose among the means of `generation` generations as ``cma_cfg`` asks
    (a selection written before ``select_top`` was recorded is taken to have used the config's)."""
    return (
        selection is not None and selection["generation"] == generation
        and selection.get("select_top", cma_cfg.select_top) == cma_cfg.select_top
        and selection["selection_episodes"] == cma_cfg.select_episodes
    )


def _finished_generations(done_path: Path) -> int | None:
    """Generations recorded in a ``done.json``, None when there is none."""
    if not done_path.exists():
        return None
    return int(read_json(done_path)["generations"])


def is_finished(folder: Path, cma_cfg: CMAConfig, prefix: str = "") -> bool:
    """True when ``folder`` holds a finished run of at least ``cma_cfg.generations`` generations."""
    files = Checkpoint(Path(folder), prefix)
    done = _finished_generations(files.path(DONE_FILE))
    if done is None or done < cma_cfg.generations or not files.path(BEST_WEIGHTS["controller"]).exists():
        return False
    if cma_cfg.select_top:  # the final selection must have run on the last generation, at the config's size
        selection = files.path(SELECTION_FILE)
        return selection.exists() and _selection_is_current(read_json(selection), done, cma_cfg)
    return True


# --------------------------------------------------------------------------------------
# An analytic problem for tests and demonstrations
# --------------------------------------------------------------------------------------
SPHERE_SHIFT = np.array([0.5, -0.3, 0.2, 0.4, -0.1])
"""The optimum of the test problem :func:`sphere_task` (5 dimensions)."""


def sphere_task(shift: np.ndarray | None, task: Task) -> np.ndarray:
    """Task function of a shifted sphere: the "return" is ``-|theta - shift|^2`` (max 0 at theta = shift).

    The worker state is the shift (default :data:`SPHERE_SHIFT`); seeds are ignored.
    """
    shift = SPHERE_SHIFT if shift is None else np.asarray(shift)
    return -np.sum((task.params - shift) ** 2, axis=1)
