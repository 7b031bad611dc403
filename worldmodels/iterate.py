"""The iterative training procedure: collect with the current controller, retrain M on all
the data so far, evolve C again; repeat (the paper's section "Iterative Training Procedure").

M learned the world from random driving, which never follows the track at speed; the
controller then drives where M has never been. Each iteration shows M the agent's own
driving. Iteration ``k`` (``run/iterations/NN``, NN = 01, 02, ...) runs five steps:

1. **collect** ``iterate.episodes`` episodes with the controller that iteration ``k - 1``
   produced (iteration 1: ``run/controller/best.safetensors``, train-controller's), driven
   with the M it was evolved with, under *parameter noise*: episode ``i`` drives
   ``theta + sigma_i * N(0, I)``, the noise drawn from ``default_rng(seed_i)`` with
   ``sigma_i = iterate.noise[i % len(noise)]`` on the track of ``seed_i = iterate.seed +
   100,000 (k - 1) + i``. The large sigmas produce the failures (spin-outs, leaving the
   playfield) that the agent's own driving rarely shows. Files: ``data/`` (the dataset's
   episode format) with ``data/manifest.json``.
2. **encode** them with the run's V (``latents/``; V stays the run's V).
3. **mdrnn**: fine-tune M, from the previous iteration's, on the union of ``run/latents``
   and the latents of iterations 1..k, each folder split into train and test episodes as
   the run's own (``mdrnn/``, the fit loop's files).
4. **controller**: evolve C again against this M: in its dream (``iterate.controller =
   'dream'``, :func:`worldmodels.dream.train_controller_in_dream`) or in CarRacing ('real',
   :func:`worldmodels.rollout.train_controller`), into ``controller/``; the chosen
   controller is ``controller/best.safetensors`` either way.
5. **score** it, and the controller the iteration started from, in the real CarRacing on
   ``iterate.score_episodes`` of CMA-ES's *validation* tracks (never the evaluation's).

Each step, once finished, is written into ``record.json`` with its wall seconds; a
step that is there is never run again, and an interrupted step resumes as its stage does
(episodes on disk are kept, M and CMA-ES continue from their checkpoints). ``done.json``
marks the iteration finished. The record (paths relative to the run directory):

==============  ===================================================================================
``collect``     episodes, steps, episodes that ended early (``terminated``), the controller file
                and its sha256, per noise level: episodes, mean return, ended early
``encode``      episodes encoded
``mdrnn``       the weights it started from, train and test episodes of each latent folder,
                epochs, steps, best step and its test losses (``best_test``)
``controller``  mode, file, best CMA-ES score (on the dream's validation dreams for 'dream', on
                CarRacing's validation tracks for 'real'), its generation, generations run
``score``       tracks, episodes, max_steps, and for the new controller (``new``) and the one the
                iteration started from (``start``): mean, std, returns
==============  ===================================================================================

The stages run unchanged on an :class:`IterationRun`, a view of the run directory in
which every stage's folder but V's is the iteration's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from worldmodels.config import CMA_VALIDATION_OFFSET, ITERATION_SEED_STRIDE, Config, ConfigError, EnvConfig
from worldmodels.controller import ControllerShape, load_controller, save_controller
from worldmodels.data import episode_path, episode_record, save_episode, split_episodes
from worldmodels.dream import dream_controller_path, dream_prefix, train_controller_in_dream
from worldmodels.evaluation import evaluate
from worldmodels.parallel import InlineExecutor, make_executor, resolve_workers
from worldmodels.rollout import Agent, rollout, rollout_worker, train_controller
from worldmodels.runs import (
    BEST_WEIGHTS,
    DONE_FILE,
    ITERATIONS_FOLDER,
    MANIFEST_FILE,
    RECORD_FILE,
    RunDir,
    RunDirError,
    as_run_dir,
    file_sha256,
    iteration_folder,
    read_json,
    write_json,
)
from worldmodels.tasks import Task, run_tasks
from worldmodels.train import encode, encoded_files, train_mdrnn

STEPS = ("collect", "encode", "mdrnn", "controller", "score")
"""An iteration's steps, in order; each has its entry in ``record.json`` once finished."""


# --- the iteration as a run directory -----------------------------------------------------


def iteration_config(cfg: Config, index: int) -> Config:
    """The config the stages of iteration `index` run with: `cfg` with its dataset the
    iteration's episodes (``data.episodes``, and ``data.seed`` the track of episode 0), M's
    epochs ``iterate.mdrnn_epochs`` and reward weighting ``iterate.reward_overprediction``, C's
    generations ``iterate.controller_generations``
    (each when set), and no iterations of its own."""
    it = cfg.iterate
    overrides: dict[str, Any] = {
        "data.episodes": it.episodes,
        "data.seed": first_seed(cfg, index),
        "iterate.iterations": 0,
    }
    if it.mdrnn_epochs:
        overrides["mdrnn.epochs"] = it.mdrnn_epochs
    if it.reward_overprediction:
        overrides["mdrnn.reward_overprediction"] = it.reward_overprediction
    if it.controller_generations:
        overrides["dream.generations" if it.controller == "dream" else "cma.generations"] = it.controller_generations
    return cfg.replace(**overrides)


def first_seed(cfg: Config, index: int) -> int:
    """The track of iteration `index`'s episode 0 (episode i: this + i)."""
    return cfg.iterate.seed + ITERATION_SEED_STRIDE * (index - 1)


class IterationRun(RunDir):
    """Iteration `index` of `run` as a run directory: V and config.json are the run's,
    every other stage's folder (data, latents, mdrnn, controller, eval) is the iteration's.

    Its config is :func:`iteration_config` of the run's; binding another one raises
    :class:`~worldmodels.runs.RunDirError`.
    """

    def __init__(self, run: str | Path | RunDir, index: int, cfg: Config):
        run = as_run_dir(run)
        super().__init__(iteration_folder(run, index))
        self.run, self.index, self.cfg = run, index, iteration_config(cfg, index)
        if cfg.iterate.controller == "real":  # CMA-ES in CarRacing starts from the controller it improves on
            start = previous_run(cfg, run, index).controller / BEST_WEIGHTS["controller"]
            self.cfg = self.cfg.replace(**{"cma.x0": str(start)})

    def __repr__(self) -> str:
        return f"IterationRun({str(self.run.path)!r}, {self.index})"

    @property
    def config_path(self) -> Path:
        return self.run.config_path

    def stage(self, name: str) -> Path:
        return self.run.stage(name) if name == "vae" else super().stage(name)

    def load_config(self) -> Config:
        return self.cfg

    def bind(self, cfg: Config) -> Config:
        """Check that `cfg` is the iteration's config (runtime fields aside); never writes."""
        diff = self.cfg.differences(cfg)
        if diff:
            raise RunDirError(f"{self.path}: iteration {self.index} runs with its own config; got {'; '.join(diff)}")
        return cfg


def iterations_held(run: str | Path | RunDir) -> int:
    """How many iterations the run directory holds (finished or started)."""
    folder = as_run_dir(run).path / ITERATIONS_FOLDER
    return len([p for p in folder.glob("[0-9][0-9]") if p.is_dir()]) if folder.exists() else 0


def previous_run(cfg: Config, run: RunDir, index: int) -> RunDir:
    """Where iteration `index` starts from: the run itself (index 1) or iteration index - 1."""
    return run if index == 1 else IterationRun(run, index - 1, cfg)


def start_controller(cfg: Config, run: RunDir, index: int) -> tuple[Path, np.ndarray]:
    """The controller file iteration `index` drives with and its flat parameters.

    Raises RunDirError naming the file when it is missing (and the command that makes it)
    or holds a controller of another shape than the run's config describes.
    """
    previous = previous_run(cfg, run, index)
    path = previous.controller / BEST_WEIGHTS["controller"]
    if not path.exists():
        command = "train-controller" if index == 1 else "iterate"
        raise RunDirError(
            f"{path}: no trained controller to start iteration {index} from; "
            f"make it first (python -m worldmodels {command} --run-dir {run.path})"
        )
    saved = load_controller(path)
    expected = ControllerShape.from_config(cfg)
    if saved.shape != expected:
        raise RunDirError(f"{path} holds a controller {saved.shape}, but the run's config needs {expected}")
    return path, saved.params


# --- step 1: collect with the controller ---------------------------------------------------


def noisy_params(theta: np.ndarray, seeds: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """(n, P): row i is ``theta + sigmas[i] * N(0, I)``, the noise drawn from ``default_rng(seeds[i])``."""
    theta = np.asarray(theta, np.float64)
    rows = [theta + s * np.random.default_rng(int(seed)).standard_normal(theta.shape) for seed, s in zip(seeds, sigmas)]
    return np.stack(rows)


def episode_sigmas(cfg: Config) -> np.ndarray:
    """The parameter noise of each of an iteration's episodes: ``noise[i % len(noise)]``."""
    noise = np.asarray(cfg.iterate.noise, np.float64)
    return noise[np.arange(cfg.iterate.episodes) % len(noise)]


@dataclass
class DrivingCollector:
    """A worker's state for collecting the agent's episodes: the agent, and where they go."""

    agent: Agent
    env_cfg: EnvConfig
    data_dir: str
    first_seed: int


def driving_collector(
    vae_state: dict, mdrnn_state: dict | None, cfg: Config, data_dir: str, first: int
) -> DrivingCollector:
    """An executor's ``init``: the agent built once in each worker (see :meth:`worldmodels.rollout.Agent.init_args`)."""
    agent, env_cfg = rollout_worker(vae_state, mdrnn_state, cfg)
    return DrivingCollector(agent, env_cfg, data_dir, first)


def collect_driving_task(worker: DrivingCollector, task: Task) -> np.ndarray:
    """The task function: the task's episodes, episode j on track ``seeds[j]`` driven by
    ``params[j]``, as one vector of environments; each written unless already on disk. Their indices."""
    result = rollout(worker.agent, task.params, task.seeds, worker.env_cfg, max_steps=task.max_steps, trace=True)
    indices = task.seeds - worker.first_seed
    for index, seed, trace in zip(indices, task.seeds, result.traces):
        path = episode_path(worker.data_dir, int(index))
        if not path.exists():
            save_episode(path, trace.episode(int(seed)))
    return indices


@dataclass
class _Iteration:
    """What every step of iteration `index` needs."""

    cfg: Config
    """The run's config."""
    run: RunDir
    view: IterationRun
    index: int
    quiet: bool


def _collect(it: _Iteration) -> dict[str, Any]:
    cfg, view = it.cfg, it.view
    path, theta = start_controller(cfg, it.run, it.index)
    data_dir = view.data
    for stray in data_dir.glob(".*.tmp"):  # left by a killed collection; never a finished episode
        stray.unlink()
    n, first, sigmas = cfg.iterate.episodes, first_seed(cfg, it.index), episode_sigmas(cfg)
    seeds = first + np.arange(n, dtype=np.int64)
    per = cfg.data.envs_per_worker
    # Fixed groups of episodes, whatever is on disk: a resumed collection drives every episode
    # in the same vector of environments as an uninterrupted one, so it gets the same frames.
    groups = [np.arange(k, min(k + per, n)) for k in range(0, n, per)]
    todo = [g for g in groups if not all(episode_path(data_dir, int(i)).exists() for i in g)]
    tasks = [Task("collect", seeds[g], noisy_params(theta, seeds[g], sigmas[g]), cfg.data.episode_steps) for g in todo]
    agent = Agent.from_run(previous_run(cfg, it.run, it.index), cfg)  # the M this controller was evolved with
    init_args = (*agent.init_args(cfg), str(data_dir), first)
    workers = min(resolve_workers(cfg.data.workers), max(len(tasks), 1))
    if workers <= 1:
        executor = InlineExecutor(driving_collector, init_args)
    else:
        executor = make_executor(workers, init=driving_collector, init_args=init_args)
    done = n - sum(len(g) for g in todo)
    bar = tqdm(total=n, initial=done, desc=f"iteration {it.index}: collect", unit="ep", disable=it.quiet or None)
    with executor, bar:
        run_tasks(executor, collect_driving_task, tasks, cfg.data.task_timeout, progress=lambda r: bar.update(len(r)))
    records = [{**episode_record(episode_path(data_dir, i)), "sigma": float(sigmas[i])} for i in range(n)]
    controller = str(path.relative_to(it.run.path))
    manifest = {
        "iteration": it.index, "controller": controller, "controller_sha256": file_sha256(path),
        "noise": list(cfg.iterate.noise), "episodes": n, "steps": int(sum(r["steps"] for r in records)),
        "seeds": [r["seed"] for r in records], "per_episode": records,
    }
    write_json(data_dir / MANIFEST_FILE, manifest)
    return {
        "episodes": n, "steps": manifest["steps"], "controller": controller,
        "controller_sha256": manifest["controller_sha256"],
        "terminated": sum(r["terminated"] for r in records),
        "by_sigma": {
            f"{s:g}": {
                "episodes": len(rs), "return_mean": float(np.mean([r["return"] for r in rs])),
                "terminated": sum(r["terminated"] for r in rs),
            }
            for s in dict.fromkeys(float(x) for x in sigmas)
            for rs in [[r for r in records if r["sigma"] == s]]
        },
    }


# --- steps 2 to 5 -----------------------------------------------------------------------------


def _encode(it: _Iteration) -> dict[str, Any]:
    return {"episodes": len(encode(it.view.cfg, it.view, quiet=it.quiet))}


def latent_folders(run: RunDir, index: int) -> list[Path]:
    """M's data in iteration `index`: the run's latents, then iterations 1..index's."""
    return [run.latents] + [iteration_folder(run, j) / "latents" for j in range(1, index + 1)]


def _mdrnn(it: _Iteration) -> dict[str, Any]:
    cfg, view = it.cfg, it.view
    folders = latent_folders(it.run, it.index)
    initial = previous_run(cfg, it.run, it.index).mdrnn / BEST_WEIGHTS["mdrnn"]
    train_mdrnn(view.cfg, view, quiet=it.quiet, latent_folders=folders, initial=initial)
    done = read_json(view.mdrnn / DONE_FILE)
    split = []
    for folder in folders:
        train, test = split_episodes(encoded_files(folder), cfg.data.test_fraction, cfg.train_seed)
        split.append({"folder": str(folder.relative_to(it.run.path)), "train": len(train), "test": len(test)})
    return {
        "initial": str(initial.relative_to(it.run.path)), "latents": split, "epochs": done["epochs"],
        "steps": done["steps"], "best_step": done["best_step"], "best_test": done["best_test"],
    }


def _controller(it: _Iteration) -> dict[str, Any]:
    cfg, view = it.view.cfg, it.view
    best = view.controller / BEST_WEIGHTS["controller"]
    if cfg.iterate.controller == "dream":
        result = train_controller_in_dream(cfg, view, quiet=it.quiet, evaluate_real=False)
        prefix = dream_prefix(result.temperature)
        shape = ControllerShape.from_config(cfg)
        save_controller(best, result.params, shape, {"source": f"{prefix}{BEST_WEIGHTS['controller']}"})
    else:
        prefix = ""  # x0 = 0: evolution starts afresh against the new M
        train_controller(cfg, view, quiet=it.quiet)
    done = read_json(view.controller / f"{prefix}{DONE_FILE}")
    return {
        "mode": cfg.iterate.controller, "file": str(best.relative_to(it.run.path)), "best_score": done["best_score"],
        "best_generation": done["best_generation"], "generations": done["generations"],
    }


def score_seeds(cfg: Config) -> np.ndarray:
    """The tracks an iteration's controller is scored on: the first ``iterate.score_episodes``
    of CMA-ES's validation tracks (``cma.seed + 500,000 + i``), never the evaluation's."""
    return cfg.cma.seed + CMA_VALIDATION_OFFSET + np.arange(cfg.iterate.score_episodes, dtype=np.int64)


def _score(it: _Iteration) -> dict[str, Any]:
    cfg, seeds = it.cfg, score_seeds(it.cfg)
    start_path, start_params = start_controller(cfg, it.run, it.index)
    new_params = load_controller(it.view.controller / BEST_WEIGHTS["controller"]).params
    scored = {
        "new": (Agent.from_run(it.view, it.view.cfg), new_params),
        "start": (Agent.from_run(previous_run(cfg, it.run, it.index), cfg), start_params),
    }
    out: dict[str, Any] = {
        "seeds": [int(seeds[0]), int(seeds[-1])], "episodes": len(seeds), "max_steps": cfg.eval.max_steps,
    }
    for name, (agent, params) in scored.items():
        result = evaluate(
            agent, params, seeds, cfg.env, envs_per_batch=cfg.cma.envs_per_worker, max_steps=cfg.eval.max_steps,
            workers=cfg.cma.workers, timeout=cfg.cma.task_timeout,
        )
        out[name] = {"mean": result.mean, "std": result.std, "returns": [float(r) for r in result.returns]}
    out["start"]["controller"] = str(start_path.relative_to(it.run.path))
    return out


_STEP_FUNCTIONS: dict[str, Callable[[_Iteration], dict[str, Any]]] = {
    "collect": _collect, "encode": _encode, "mdrnn": _mdrnn, "controller": _controller, "score": _score,
}


# --- the loop -----------------------------------------------------------------------------


def run_iteration(cfg: Config, run: str | Path | RunDir, index: int, *, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume, or load when finished) iteration `index` of `run`; its record.

    The run's own episodes are encoded first when they are not (M trains on them too). The
    steps already in ``record.json`` are skipped; each step finished is added to it with
    its wall seconds (of the call that finished it); ``done.json`` is written last.
    """
    run = as_run_dir(run)
    folder = iteration_folder(run, index)
    if (folder / DONE_FILE).exists():
        return read_json(folder / RECORD_FILE)
    it = _Iteration(cfg, run, IterationRun(run, index, cfg), index, quiet)
    encode(cfg, run, quiet=quiet)  # M's data includes the run's own episodes: missing ones fail before any work
    if not (folder / RECORD_FILE).exists():
        write_json(folder / RECORD_FILE, {"iteration": index})
    record = read_json(folder / RECORD_FILE)
    for name in STEPS:
        if name in record:
            continue
        start = time.perf_counter()
        entry = _STEP_FUNCTIONS[name](it)
        record[name] = {**entry, "seconds": round(time.perf_counter() - start, 3)}
        write_json(folder / RECORD_FILE, record)
    write_json(folder / DONE_FILE, {"iteration": index, "seconds": round(sum(record[s]["seconds"] for s in STEPS), 3)})
    return record


def iterate(cfg: Config, run: str | Path | RunDir, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Run the iterations 1..``cfg.iterate.iterations`` of `run` (module docstring); their records.

    The run must have its V, M and controller (train-controller) finished and its episodes
    encoded (or collected, to be encoded). Finished iterations are loaded, an interrupted
    one resumes, and a run whose ``iterate.iterations`` grows continues with the new ones.

    Raises:
        ConfigError: ``iterate.iterations`` is below the iterations the run already holds.

        RunDirError: the starting controller is missing or of another shape (names the file),
        or the run was made with another config.
    """
    run = as_run_dir(run)
    held = iterations_held(run)
    if cfg.iterate.iterations < held:
        raise ConfigError(
            f"iterate.iterations = {cfg.iterate.iterations} is below the {held} iterations that "
            f"{run.path / ITERATIONS_FOLDER} already holds: allowed [{held}, 99]"
        )
    cfg = run.bind(cfg)
    if cfg.iterate.iterations:
        start_controller(cfg, run, 1)  # a missing or misshapen controller fails before any work
    return [run_iteration(cfg, run, k, quiet=quiet) for k in range(1, cfg.iterate.iterations + 1)]


def iteration_summary(record: dict[str, Any]) -> str:
    """One line on a finished iteration: its data, M's test loss, C's scores."""
    collect, mdrnn, controller, score = (record[s] for s in ("collect", "mdrnn", "controller", "score"))
    loss = mdrnn["best_test"].get("loss")
    return (
        f"iteration {record['iteration']}: {collect['episodes']} episodes ({collect['terminated']} ended early), "
        + (f"M's best test loss {loss:.4g}, " if loss is not None else "M without a test split, ")
        + f"C ({controller['mode']}) {controller['best_score']:.1f} at generation {controller['best_generation']}; "
        f"real score on {score['episodes']} validation tracks {score['new']['mean']:.1f} +- {score['new']['std']:.1f} "
        f"(the controller it started from: {score['start']['mean']:.1f} +- {score['start']['std']:.1f})"
    )


def finished_iterations(run: str | Path | RunDir) -> int:
    """How many iterations of `run` are finished (1..k each with its ``done.json``)."""
    run, k = as_run_dir(run), 0
    while (iteration_folder(run, k + 1) / DONE_FILE).exists():
        k += 1
    return k


def dream_controller(cfg: Config, run: str | Path | RunDir, tau: float | None = None) -> tuple[RunDir, Path]:
    """Where `run`'s dream-trained controller lives: the run (as a run directory) whose M it
    dreamt in, and the controller's file.

    Of the finished iterations that evolved C in the dream (``iterate.controller = 'dream'``),
    the one whose controller scored best on the real *validation* tracks of its ``score`` step
    (the latest of equals): its M and its ``controller/dream_tau{tau}_best.safetensors``. One
    seed's iterations do not improve steadily, so the choice is made like CMA-ES's final
    selection, on validation tracks, never on the evaluation tracks. Without such an iteration,
    the run's own dream (:func:`worldmodels.dream.dream_controller_path`). `tau` defaults to
    ``dream.temperature``.
    """
    run = as_run_dir(run)
    index = best_dream_iteration(run)
    if index:
        view = IterationRun(run, index, cfg)
        return view, dream_controller_path(view, cfg.dream.temperature if tau is None else tau)
    return run, dream_controller_path(run, tau)


def best_dream_iteration(run: str | Path | RunDir) -> int:
    """Of the finished iterations that evolved C in the dream, the one whose controller scored
    best on the real validation tracks of its ``score`` step (the latest of equals); 0 when none did."""
    run = as_run_dir(run)
    scored = []
    for index in range(1, finished_iterations(run) + 1):
        record = read_json(iteration_folder(run, index) / RECORD_FILE)
        if record.get("controller", {}).get("mode") == "dream":
            scored.append((record["score"]["new"]["mean"], index))
    return max(scored)[1] if scored else 0
