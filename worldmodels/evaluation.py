"""How well a trained controller drives: returns on unseen tracks, and videos of its episodes.

:func:`evaluate` runs full episodes of one controller over many seeds, exactly (float64
driving, see :mod:`worldmodels.rollout`), so that the returns are the same on any CPU,
optionally in worker processes that each build the agent once; :func:`evaluate_run` is
the paper's protocol on a run directory. :func:`record` writes a video of the real frame,
V's reconstruction and M's prediction side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from worldmodels.config import Config, EnvConfig
from worldmodels.controller import ControllerShape, load_controller
from worldmodels.evolution import read_history
from worldmodels.mdrnn import sample_next_z
from worldmodels.parallel import Executor, InlineExecutor, make_executor
from worldmodels.rollout import (
    Agent,
    RolloutResult,
    Trace,
    rollout,
    rollout_task,
    rollout_worker,
)
from worldmodels.runs import (
    BEST_WEIGHTS,
    DONE_FILE,
    HISTORY_FILE,
    RESULTS_FILE,
    RunDir,
    RunDirError,
    as_run_dir,
    read_json,
    weights_metadata,
    write_bytes,
    write_json,
)
from worldmodels.tasks import make_tasks, run_tasks
from worldmodels.vae import VAE


@dataclass
class EvalResult:
    """Returns of full episodes of one controller over fixed seeds."""

    returns: list[float]
    seeds: list[int]

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        """Population standard deviation (NumPy's default, as in the authors' code)."""
        return float(np.std(self.returns))

    @property
    def min(self) -> float:
        return float(np.min(self.returns))

    @property
    def max(self) -> float:
        return float(np.max(self.returns))

    def to_dict(self) -> dict[str, Any]:
        return {
            "returns": [float(r) for r in self.returns],
            "seeds": [int(s) for s in self.seeds],
            "episodes": len(self.returns),
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
        }


def evaluate(
    agent: Agent,
    params: np.ndarray,
    seeds: Sequence[int],
    env_cfg: EnvConfig | None = None,
    *,
    envs_per_batch: int = 8,
    max_steps: int = 1000,
    workers: int = 1,
    executor: Executor | None = None,
    timeout: float | None = None,
    float64: bool = True,
) -> EvalResult:
    """Full episodes (no early termination) of one controller `params` (P,) on each seed.

    The agent drives exactly (`float64`, see :mod:`worldmodels.rollout`), so the returns
    are the same on any CPU and for any `envs_per_batch`.

    The seeds are split into tasks of at most `envs_per_batch` environments. With
    `workers > 1` the tasks run in that many local processes (0: one per core), each
    building the agent once; or pass an executor of :mod:`worldmodels.parallel` made with
    ``init=rollout_worker, init_args=agent.init_args(cfg)``. `timeout`: seconds a task may run.
    """
    env_cfg = env_cfg or EnvConfig()
    seeds = [int(s) for s in seeds]
    params = np.asarray(params, dtype=np.float64).reshape(1, -1)
    tasks = make_tasks("evaluate", params, seeds, envs_per_batch, max_steps, float64=float64)
    own = executor is None
    if workers == 1 and own:
        executor = InlineExecutor(init=lambda: (agent, env_cfg))
    elif own:
        executor = make_executor(workers, init=rollout_worker, init_args=agent.init_args(Config(env=env_cfg)))
    try:
        returns = run_tasks(executor, rollout_task, tasks, timeout)
    finally:
        if own:
            executor.close()
    return EvalResult([float(r) for r in returns], seeds)


def load_agent_and_controller(
    run: str | Path | RunDir, cfg: Config | None = None, controller: str | Path | None = None
) -> tuple[Agent, np.ndarray, Path]:
    """A run's agent, the flat parameters of its controller (default: ``controller/best.safetensors``)
    and that file's path; a missing file or a controller of the wrong shape raises an error naming it."""
    run = as_run_dir(run)
    cfg = cfg or run.load_config()
    path = Path(controller) if controller is not None else run.controller / BEST_WEIGHTS["controller"]
    if not path.exists():
        raise RunDirError(f"{path}: no controller to evaluate (train one first, or pass --controller)")
    saved = load_controller(path)
    expected = ControllerShape.from_config(cfg)
    if saved.shape != expected:
        raise RunDirError(f"{path} holds a controller {saved.shape}, but the run's config needs {expected}")
    return Agent.from_run(run, cfg), saved.params, path


def evaluate_run(
    run: str | Path | RunDir,
    cfg: Config | None = None,
    *,
    episodes: int | None = None,
    seed: int | None = None,
    workers: int | None = None,
    controller: str | Path | None = None,
    max_steps: int | None = None,
    results_file: str = RESULTS_FILE,
) -> dict[str, Any]:
    """The paper's protocol on a run: its best controller drives full episodes on unseen tracks.

    Tracks ``seed, seed + 1, ...`` (default ``cfg.eval.seed`` and ``cfg.eval.episodes``),
    episodes of at most `max_steps` steps (default ``cfg.eval.max_steps``), in ``workers``
    processes (default ``cfg.cma.workers``; 0: one per core), each task of
    ``cfg.cma.envs_per_worker`` episodes within ``cfg.cma.task_timeout`` seconds. Writes and
    returns ``run/eval/{results_file}`` (default ``results.json``): returns, seeds, episodes, mean, std, min, max,
    the controller's path, max_steps, the seconds it took and, for the run's own best
    controller, ``controller_generations`` (the generations it was chosen from) and
    ``controller_generation`` (the one chosen), so that results of a controller since evolved
    for longer, or chosen again by a larger final selection, are known to be stale.
    """
    run = as_run_dir(run)
    cfg = cfg or run.load_config()
    agent, params, path = load_agent_and_controller(run, cfg, controller)
    episodes = cfg.eval.episodes if episodes is None else episodes
    seed = cfg.eval.seed if seed is None else seed
    max_steps = cfg.eval.max_steps if max_steps is None else max_steps
    start = time.perf_counter()
    result = evaluate(
        agent, params, range(seed, seed + episodes), cfg.env, envs_per_batch=cfg.cma.envs_per_worker,
        max_steps=max_steps, workers=cfg.cma.workers if workers is None else workers, timeout=cfg.cma.task_timeout,
    )
    seconds = round(time.perf_counter() - start, 3)
    out = {**result.to_dict(), "controller": str(path), "max_steps": max_steps, "seconds": seconds}
    done = run.controller / DONE_FILE
    if controller is None and done.exists():
        out["controller_generations"] = read_json(done)["generations"]
        chosen = weights_metadata(path).get("generation")
        if chosen is not None:
            out["controller_generation"] = int(chosen)
    write_json(run.eval / results_file, out)
    return out


def current_results(run: RunDir) -> dict[str, Any] | None:
    """``run/eval/results.json``, or None when there is none or it evaluated a controller that has
    since evolved for more generations (its ``controller_generations`` is not the number in
    ``done.json`` or in ``history.csv``, which grows first when a run is continued) or been
    replaced by another final selection (its ``controller_generation`` is not the one in
    ``best.safetensors``)."""
    results_path = run.eval / RESULTS_FILE
    if not results_path.exists():
        return None
    results = read_json(results_path)
    evaluated = results.get("controller_generations")
    done_path, history_path = run.controller / DONE_FILE, run.controller / HISTORY_FILE
    trained = [read_json(done_path)["generations"]] if done_path.exists() else []
    trained += [len(read_history(history_path))] if history_path.exists() else []
    if evaluated is not None and any(t != evaluated for t in trained):
        return None
    best = run.controller / BEST_WEIGHTS["controller"]
    chosen = results.get("controller_generation")
    if chosen is not None and best.exists() and weights_metadata(best).get("generation") != str(chosen):
        return None
    return results


# --- videos -----------------------------------------------------------------------------


@torch.inference_mode()
def predicted_frames(agent: Agent, tr: Trace, tau: float | None = None, seed: int = 0) -> np.ndarray:
    """M's prediction of each frame from the step before, decoded by V: (T, 64, 64, 3) uint8.

    Frame 0 has no prediction (black). `tau=None` takes, in each latent dimension, the
    mean of the most likely component; otherwise a sample at temperature `tau`.
    """
    pred = np.zeros_like(tr.frames)
    if agent.mdrnn is None or len(tr.frames) < 2:
        return pred
    z = torch.from_numpy(tr.z).unsqueeze(0)
    a = torch.from_numpy(tr.actions).unsqueeze(0)
    out, _ = agent.mdrnn(z, a)
    if tau is None:
        best = out.logpi.argmax(-1, keepdim=True)
        z_next = out.mu.gather(-1, best).squeeze(-1)
    else:
        z_next = sample_next_z(out, tau, torch.Generator().manual_seed(seed))
    pred[1:] = _decode(agent.vae, z_next[0, :-1])
    return pred


def _decode(vae: VAE, z: Tensor, batch: int = 256) -> np.ndarray:
    parts = [vae.decode(z[i : i + batch]) for i in range(0, len(z), batch)]
    x = torch.cat(parts) if parts else torch.empty(0, 3, 64, 64)
    return (x.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def record(
    agent: Agent,
    params: np.ndarray,
    seed: int,
    path: str | Path,
    env_cfg: EnvConfig | None = None,
    max_steps: int = 1000,
    *,
    tau: float | None = None,
    scale: int = 4,
    fps: int = 50,
) -> RolloutResult:
    """Write a video of one episode (MP4 or GIF, chosen by the extension of `path`).

    Each video frame shows, side by side and upscaled `scale` times: the real 64x64
    frame, V's reconstruction of it, and (with M) M's prediction of it made at the step
    before (see :func:`predicted_frames`). Returns the episode's rollout with its trace.
    """
    import imageio.v3 as iio

    path = Path(path)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"{path}: the video must be a .gif or a .mp4")
    result = rollout(agent, np.asarray(params)[None], [seed], env_cfg, max_steps=max_steps, trace=True)
    tr = result.traces[0]
    with torch.inference_mode():
        recon = _decode(agent.vae, torch.from_numpy(tr.z))
    panels = [tr.frames, recon]
    if agent.mdrnn is not None:
        panels.append(predicted_frames(agent, tr, tau, seed))
    video = np.concatenate(panels, axis=2)
    video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    kwargs = {"duration": 1000 / fps, "loop": 0} if path.suffix.lower() == ".gif" else {"fps": fps}
    # encoded in memory: ffmpeg picks its muxer from the file name, which a temporary name hides
    write_bytes(path, iio.imwrite("<bytes>", video, extension=path.suffix.lower(), **kwargs))
    return result
