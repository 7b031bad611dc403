"""The agent in the real CarRacing-v3: batched rollouts, and evolving its controller there.

One process steps K environments together. Each step is the paper's agent, V -> C -> M,
for all the environments still running in one batch: V encodes their frames (the
posterior mean ``mu``, as the authors did at rollout time), each environment's own
controller acts on ``[z, h]``, the environments step, and M's LSTM advances with the
actions taken. Environments that finish stop being stepped and their returns are frozen.

Early termination (``early_stop_steps > 0``, training rollouts only): an episode ends
after that many consecutive steps without a new track tile (CarRacing's reward is
``1000 / N - 0.1`` on a step that reaches a new tile and about ``-0.1`` otherwise, so a
new tile is a step with a positive reward). To keep returns comparable with full
episodes, the ended episode is charged ``-0.1`` for each of its remaining steps up to
``max_steps``: its return is what idling to the end would have given.

Exact driving (``float64=True``, what evaluations do): V, M and the controller
compute in float64 and the actions are rounded to float32 before they reach the
environment. In float32 the last bits of an action depend on the CPU's kernels and on the
batch size, and CarRacing turns one such bit into a different episode; in float64 those
differences stay far below float32's rounding, so the environment gets the same actions,
and an evaluation gives the same returns, on any CPU.

:func:`train_controller` evolves the controller with CMA-ES (:mod:`worldmodels.evolution`)
on rollouts run by an executor's workers (:func:`rollout_worker`, :func:`rollout_task`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from worldmodels.config import Config, ConfigError, EnvConfig
from worldmodels.controller import ACTION_SIZE, Controller, ControllerShape, load_controller, save_controller
from worldmodels.data import Episode
from worldmodels.env import make_env
from worldmodels.evolution import evolve, is_finished
from worldmodels.mdrnn import MDRNN
from worldmodels.parallel import Executor, make_executor, one_torch_thread
from worldmodels.runs import BEST_WEIGHTS, RunDir, as_run_dir, load_mdrnn, load_vae
from worldmodels.tasks import Task
from worldmodels.vae import VAE

STEP_PENALTY = 0.1
"""CarRacing's reward per frame without a new tile is -0.1."""


# --- the agent --------------------------------------------------------------------------


@dataclass
class Agent:
    """V and M (None for the V-only controllers) and the shape of the controllers they feed.

    The models are put on the CPU in eval mode; V's encoder weights are switched to the
    channels-last memory layout (same values, faster convolutions on frames that arrive
    channels last).
    """

    vae: VAE
    mdrnn: MDRNN | None
    kind: str = "zh"
    z_size: int = 32
    hidden_size: int = 256
    hidden_units: int = 40
    encode_bf16: bool = False
    """Encode frames under bfloat16 autocast: about 1.8x faster V on CPUs with native bf16
    (AMX, AVX512-BF16), at a relative error of about 1e-3 in z; off by default, and
    ignored by exact driving (``float64``, module docstring)."""

    def __post_init__(self) -> None:
        self.vae = self.vae.cpu().eval()
        self.vae.encoder.to(memory_format=torch.channels_last)
        if self.shape.uses_h:
            if self.mdrnn is None:
                raise ValueError(f"controller kind {self.kind!r} needs M, got mdrnn=None")
            self.mdrnn = self.mdrnn.cpu().eval()

    @property
    def shape(self) -> ControllerShape:
        return ControllerShape(self.kind, self.z_size, self.hidden_size, self.hidden_units)

    @property
    def n_params(self) -> int:
        """Parameters of one controller of this agent."""
        return self.shape.n_params

    @classmethod
    def from_weights(cls, vae_state: dict[str, Tensor], mdrnn_state: dict[str, Tensor] | None, cfg: Config) -> Agent:
        """Build V and M from state dicts (as saved in a run) and the config's controller kind."""
        vae = VAE.from_config(cfg)
        vae.load_state_dict(vae_state)
        mdrnn = None
        if cfg.controller.kind == "zh":
            if mdrnn_state is None:
                raise ValueError("controller kind 'zh' needs M's weights, got mdrnn_state=None")
            heads = {"reward_head": "reward_head.weight" in mdrnn_state, "done_head": "done_head.weight" in mdrnn_state}
            mdrnn = MDRNN(cfg.vae.z_size, ACTION_SIZE, cfg.mdrnn.hidden_size, cfg.mdrnn.n_gaussians, **heads)
            mdrnn.load_state_dict(mdrnn_state)
        return cls.from_models(vae, mdrnn, cfg)

    @classmethod
    def from_models(cls, vae: VAE, mdrnn: MDRNN | None, cfg: Config) -> Agent:
        """An agent of V, M and the config's controller kind and sizes."""
        return cls(vae, mdrnn, cfg.controller.kind, cfg.vae.z_size, cfg.mdrnn.hidden_size, cfg.controller.hidden_units)

    @classmethod
    def from_run(cls, run: str | Path | RunDir, cfg: Config | None = None) -> Agent:
        """Load V (run/vae/vae.safetensors) and, for kind 'zh', M (run/mdrnn/mdrnn.safetensors).

        `cfg` defaults to the run's recorded config.
        """
        run = as_run_dir(run)
        cfg = cfg or run.load_config()
        if cfg is None:
            raise FileNotFoundError(f"{run.config_path}: no config recorded in this run directory")
        return cls.from_models(load_vae(run), load_mdrnn(run) if cfg.controller.kind == "zh" else None, cfg)

    def init_args(self, cfg: Config | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, Config]:
        """``(vae_state, mdrnn_state, cfg)`` for :func:`rollout_worker` in worker processes; `cfg`
        (default: the defaults) gives the environments, the agent its sizes (:func:`agent_config`)."""
        vae_state = {k: v.contiguous() for k, v in self.vae.state_dict().items()}
        mdrnn_state = self.mdrnn.state_dict() if self.mdrnn is not None else None
        return vae_state, mdrnn_state, agent_config(self, cfg)

    def models(self, float64: bool = False) -> tuple[VAE, MDRNN | None]:
        """V and M (None when the controller does not read h), or float64 copies of them for exact driving."""
        mdrnn = self.mdrnn if self.shape.uses_h else None
        if not float64:
            return self.vae, mdrnn
        return copy.deepcopy(self.vae).double(), copy.deepcopy(mdrnn).double() if mdrnn is not None else None

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, vae: VAE | None = None) -> Tensor:
        """V's posterior means (N, Z) of uint8 frames (N, 64, 64, 3), in the dtype of `vae` (default: the agent's V).

        The frames are read channels last without a copy, the layout of the encoder's weights.
        """
        vae = vae if vae is not None else self.vae
        dtype = vae.fc_mu.weight.dtype
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(dtype).div_(255.0)
        if self.encode_bf16 and dtype == torch.float32:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return vae.encode(x)[0].float()
        return vae.encode(x)[0]


def agent_config(agent: Agent, cfg: Config | None = None) -> Config:
    """A config whose sizes and controller kind are the agent's (other fields from `cfg`)."""
    cfg = cfg or Config()
    n_gaussians = agent.mdrnn.n_gaussians if agent.mdrnn is not None else cfg.mdrnn.n_gaussians
    return cfg.replace(
        **{
            "vae.z_size": agent.z_size,
            "mdrnn.hidden_size": agent.hidden_size,
            "mdrnn.n_gaussians": n_gaussians,
            "controller.kind": agent.kind,
            "controller.hidden_units": agent.hidden_units,
        }
    )


# --- rollouts ---------------------------------------------------------------------------


@dataclass
class Trace:
    """Per-step data of one episode (when a rollout is asked to record)."""

    frames: np.ndarray
    """(T, 64, 64, 3) uint8: the frame seen at each step."""
    z: np.ndarray
    """(T, Z) float32: V's mean code of each frame."""
    actions: np.ndarray
    """(T, 3) float32: the action taken."""
    rewards: np.ndarray
    """(T,) float64: the reward received."""
    terminated: np.ndarray
    """(T,) bool: the environment ended the episode after that action (time limits and
    early termination are not ends)."""
    final_frame: np.ndarray
    """(64, 64, 3) uint8: the frame after the last action."""

    def episode(self, seed: int) -> Episode:
        """The trace as an episode of the dataset (:class:`worldmodels.data.Episode`), driven on track `seed`."""
        truncated = np.zeros(len(self.actions), bool)
        if len(truncated) and not self.terminated[-1]:
            truncated[-1] = True
        return Episode(
            obs=self.frames, action=self.actions, reward=self.rewards.astype(np.float32), terminated=self.terminated,
            truncated=truncated, final_obs=self.final_frame, seed=int(seed),
        )


@dataclass
class RolloutResult:
    returns: np.ndarray
    """(K,) float64: each episode's return (with the early-stop penalty, see the module docstring)."""
    steps: np.ndarray
    """(K,) int64: environment steps simulated in each episode."""
    early_stopped: np.ndarray
    """(K,) bool: episodes ended by early termination."""
    traces: list[Trace] | None = None
    """Per-episode step data when `trace=True`."""


class _Episodes:
    """The running score of K episodes: returns, lengths, early termination, traces."""

    def __init__(self, k: int, max_steps: int, early_stop_steps: int, trace: bool):
        self.max_steps, self.early_stop_steps = max_steps, early_stop_steps
        self.returns = np.zeros(k, dtype=np.float64)
        self.steps = np.zeros(k, dtype=np.int64)
        self.since_tile = np.zeros(k, dtype=np.int64)
        self.early = np.zeros(k, dtype=bool)
        self.alive = np.ones(k, dtype=bool)
        self.log: list[list[tuple]] | None = [[] for _ in range(k)] if trace else None

    def add(self, i: int, reward: float, terminated: bool, truncated: bool, seen: tuple) -> None:
        """Episode `i` received `reward`, then the environment `terminated` or `truncated` it;
        `seen`: (frame, z, action) when tracing."""
        ended = terminated or truncated
        self.returns[i] += reward
        self.steps[i] += 1
        if self.log is not None:
            self.log[i].append((*seen, reward, terminated))
        self.since_tile[i] = 0 if reward > 0 else self.since_tile[i] + 1
        if ended:
            self.alive[i] = False
        elif self.early_stop_steps and self.since_tile[i] >= self.early_stop_steps and self.steps[i] < self.max_steps:
            self.returns[i] -= STEP_PENALTY * (self.max_steps - self.steps[i])
            self.alive[i], self.early[i] = False, True

    def result(self, final_frames: np.ndarray, z_size: int) -> RolloutResult:
        traces = None if self.log is None else [_trace(steps, last, z_size) for steps, last in zip(self.log, final_frames)]
        return RolloutResult(self.returns, self.steps, self.early, traces)


def _trace(steps: list[tuple], final_frame: np.ndarray, z_size: int) -> Trace:
    if not steps:
        return Trace(
            np.empty((0, *final_frame.shape), np.uint8), np.empty((0, z_size), np.float32),
            np.empty((0, ACTION_SIZE), np.float32), np.empty(0), np.empty(0, bool), final_frame.copy(),
        )
    frames, z, actions, rewards, terminated = zip(*steps)
    return Trace(np.stack(frames), np.stack(z), np.stack(actions), np.array(rewards, np.float64),
                 np.array(terminated, bool), final_frame.copy())


_ENVS: dict[tuple, list[gym.Env]] = {}


def _envs(env_cfg: EnvConfig, n: int) -> list[gym.Env]:
    """n environments of `env_cfg`, kept between calls (reset with a seed rebuilds the track)."""
    key = tuple(dataclasses.astuple(env_cfg))
    pool = _ENVS.setdefault(key, [])
    while len(pool) < n:
        pool.append(make_env(env_cfg))
    return pool[:n]


def close_envs() -> None:
    """Close the environments kept by :func:`rollout`."""
    for pool in _ENVS.values():
        for env in pool:
            env.close()
    _ENVS.clear()


def rollout(
    agent: Agent,
    params: np.ndarray,
    seeds: Sequence[int],
    env_cfg: EnvConfig | None = None,
    *,
    max_steps: int = 1000,
    early_stop_steps: int = 0,
    fast: bool | None = None,
    trace: bool = False,
    float64: bool = False,
) -> RolloutResult:
    """Run K episodes at once: environment k on the track of `seeds[k]` with controller `params[k]`.

    `params` is (K, P) (a (P,) vector is one controller); `fast` overrides
    `env_cfg.fast_render`. Episodes end when the environment terminates or truncates,
    after `max_steps` steps, or by early termination (module docstring). With
    `trace=True` the result keeps every step's frame, z, action and reward. `float64`:
    exact driving (module docstring).
    """
    env_cfg = env_cfg or EnvConfig()
    if fast is not None and fast != env_cfg.fast_render:
        env_cfg = dataclasses.replace(env_cfg, fast_render=fast)
    params = np.atleast_2d(np.asarray(params))
    if len(params) != len(seeds):
        raise ValueError(f"params has {len(params)} rows but {len(seeds)} seeds were given")
    vae, mdrnn = agent.models(float64)
    controller = Controller.from_shape(agent.shape, params, torch.float64 if float64 else torch.float32)
    envs = _envs(env_cfg, len(seeds))
    frames = np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)])
    episodes = _Episodes(len(seeds), max_steps, early_stop_steps, trace)
    running = np.arange(len(seeds))
    with one_torch_thread(), torch.inference_mode():
        h, c = mdrnn.initial_state(len(seeds)) if mdrnn is not None else (None, None)
        for _ in range(max_steps):
            rows = slice(None) if len(running) == len(seeds) else running  # all rows: views, no copies
            z = agent.encode(frames[rows], vae)  # V
            state = (h[rows], c[rows]) if mdrnn is not None else (None, None)
            actions = controller(z, state[0], rows).float()  # C; float32, what the environments get
            if mdrnn is not None:
                h[rows], c[rows] = mdrnn.cell(z, actions.to(z.dtype), state)  # M
            z, actions = z.float().numpy(), actions.numpy()
            for j, i in enumerate(running):
                seen = (frames[i].copy(), z[j], actions[j]) if trace else ()
                frames[i], reward, terminated, truncated, _ = envs[i].step(actions[j])
                episodes.add(i, reward, terminated, truncated, seen)
            running = np.flatnonzero(episodes.alive)
            if len(running) == 0:
                break
    return episodes.result(frames, agent.z_size)


# --- evolving the controller in the real environment ------------------------------------


def rollout_worker(
    vae_state: dict[str, Tensor], mdrnn_state: dict[str, Tensor] | None, cfg: Config
) -> tuple[Agent, EnvConfig]:
    """An executor's ``init`` for the real environment: the agent and the environments'
    config, built once in each worker (see :meth:`Agent.init_args`)."""
    return Agent.from_weights(vae_state, mdrnn_state, cfg), cfg.env


def rollout_task(worker: tuple[Agent, EnvConfig], task: Task) -> np.ndarray:
    """The task function of the real environment: the task's episodes as one vector of
    environments, with V, M and the task's controllers batched across them; their returns (n,)."""
    agent, env_cfg = worker
    result = rollout(
        agent, task.params, task.seeds, env_cfg,
        max_steps=task.max_steps, early_stop_steps=task.early_stop_steps, float64=task.float64,
    )
    return result.returns


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
    each builds V and M once (or pass an `executor` made with ``init=rollout_worker``).
    Episodes end after ``cfg.cma.max_steps`` steps, or ``cfg.cma.early_stop_steps`` steps
    without a new tile; validation episodes run ``cfg.cma.max_steps`` steps without early termination.

    The mean starts at zeros, or at the controller in the file ``cfg.cma.x0`` (the dream's,
    or another run's best), which must have this run's kind and sizes; ``done.json``
    records which (``start``). A finished run continues when ``cma.generations`` grows,
    with a larger ``cma.population`` or more ``cma.episodes_per_candidate`` if those grow too.

    Writes to ``run/controller/``: ``es.pkl`` (checkpoint, every generation),
    ``history.csv``, ``best.safetensors``, ``last.safetensors``, ``done.json``. Resumes
    an interrupted run exactly; when finished, only loads.

    Returns the best controller's flat parameters (P,).
    """
    run = as_run_dir(run)
    cfg = run.bind(cfg)
    out = run.controller
    if is_finished(out, cfg.cma):
        return load_controller(out / BEST_WEIGHTS["controller"]).params
    shape = ControllerShape.from_config(cfg)

    def save(path: Path, params: np.ndarray, metadata: dict[str, str]) -> None:
        save_controller(path, params, shape, metadata)

    def load(path: Path) -> np.ndarray:
        saved = load_controller(path)
        if saved.shape != shape:
            raise ConfigError(f"cma.x0: {path} holds a controller {saved.shape}, but this run's controller is {shape}")
        return saved.params

    own = executor is None
    if own:
        init_args = Agent.from_run(run, cfg).init_args(cfg)
        executor = make_executor(cfg.cma.workers, cfg.cma.scheduler, init=rollout_worker, init_args=init_args)
    try:
        result = evolve(
            rollout_task, shape.n_params, cfg.cma, executor, checkpoint_dir=out, max_generations=max_generations,
            save_params=save, x0=cfg.cma.x0 or None, load_params=load, quiet=quiet, desc="train-controller",
        )
    finally:
        if own:
            executor.close()
    return result.best_params
