"""Agent rollouts in the real CarRacing-v3, batched over a vector of environments.

One process steps K environments together. At every step it encodes all the frames of
the environments still running with V in one batch (the posterior mean ``mu``, as the
authors did at rollout time), applies each environment's own controller through one
:class:`~worldmodels.controller.BatchedController` call, steps the environments, and
advances M's LSTM in one batch with the actions taken. Environments that finish stop
being stepped and their returns are frozen.

Early termination (``early_stop_steps > 0``, training rollouts only): an episode ends
after that many consecutive steps without a new track tile (CarRacing's reward is
``1000 / N - 0.1`` on a step that reaches a new tile and about ``-0.1`` otherwise, so a
new tile is a step with a positive reward). To keep returns comparable with full
episodes, the ended episode is charged ``-0.1`` for each of its remaining steps up to
``max_steps``: its return is what idling to the end would have given.

Exact driving (``float64=True``, what :func:`evaluate` does): V, M and the controller
compute in float64 and the actions are rounded to float32 before they reach the
environment. In float32 the last bits of an action depend on the CPU's kernels and on the
batch size, and CarRacing turns one such bit into a different episode; in float64 those
differences stay far below float32's rounding, so the environment gets the same actions,
and an evaluation gives the same returns, on any CPU.

:func:`evaluate` runs full episodes of one controller over many seeds (optionally in
worker processes, each of which builds the agent once), and :func:`record` writes a
video of the real frame, V's reconstruction and M's prediction side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from worldmodels.config import Config, EnvConfig
from worldmodels.controller import ACTION_SIZE, BatchedController, ControllerShape
from worldmodels.env import make_env
from worldmodels.mdrnn import MDRNN, sample_next_z
from worldmodels.parallel import one_torch_thread
from worldmodels.runs import RunDir, as_run_dir, load_mdrnn, load_vae
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
        vae = VAE(cfg.vae.z_size)
        vae.load_state_dict(vae_state)
        mdrnn = None
        if cfg.controller.kind == "zh":
            if mdrnn_state is None:
                raise ValueError("controller kind 'zh' needs M's weights, got mdrnn_state=None")
            mdrnn = MDRNN(
                cfg.vae.z_size,
                ACTION_SIZE,
                cfg.mdrnn.hidden_size,
                cfg.mdrnn.n_gaussians,
                reward_head="reward_head.weight" in mdrnn_state,
                done_head="done_head.weight" in mdrnn_state,
            )
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
        return cls.from_models(*_load_models(run, cfg), cfg)

    def init_args(self) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, Config]:
        """``(vae_state, mdrnn_state, cfg)`` for :func:`build_agent` in worker processes."""
        vae_state = {k: v.contiguous() for k, v in self.vae.state_dict().items()}
        mdrnn_state = self.mdrnn.state_dict() if self.mdrnn is not None else None
        return vae_state, mdrnn_state, agent_config(self)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> Tensor:
        """V's posterior means (N, Z) of uint8 frames (N, 64, 64, 3), as rollouts compute them."""
        return _Encoder(self.vae, self.encode_bf16)(frames)


def _load_models(run: RunDir, cfg: Config) -> tuple[VAE, MDRNN | None]:
    """V, and M when the controller reads h, of a run (safetensors, no pickle)."""
    return load_vae(run), load_mdrnn(run) if cfg.controller.kind == "zh" else None


class _Encoder:
    """V's encoder for rollouts: uint8 frames (N, 64, 64, 3) to the posterior means (N, Z).

    The same function as ``vae.encode(x)[0]`` (up to float rounding), arranged for small
    CPU batches: the frames are read channels last without a copy, and the last
    convolution, whose output is only 2x2, is one matrix product over its four
    receptive fields (about twice as fast as the convolution kernel at this size), with
    ``fc_mu``'s columns permuted to the (h, w, c) order that product yields.
    """

    def __init__(self, vae: VAE, bf16: bool = False, dtype: torch.dtype = torch.float32):
        enc, fc_mu = vae.encoder, vae.fc_mu
        if dtype != torch.float32:  # a copy of the encoder's part only: the decoder never drives
            enc, fc_mu = copy.deepcopy(enc).to(dtype), copy.deepcopy(fc_mu).to(dtype)
        self.enc, self.fc_mu, self.bf16, self.dtype = enc, fc_mu, bf16, dtype
        self.convs = [enc[0], enc[2], enc[4]]
        conv4 = enc[6]
        c_out, c_in, k, _ = conv4.weight.shape
        self.k, self.c_out = k, c_out
        self.w4 = conv4.weight.detach().permute(0, 2, 3, 1).reshape(c_out, -1).T.contiguous()  # rows (h, w, c)
        self.b4 = conv4.bias.detach()
        z = fc_mu.weight.shape[0]
        w_mu = fc_mu.weight.detach().view(z, c_out, 2, 2).permute(0, 2, 3, 1).reshape(z, -1)
        self.w_mu, self.b_mu = w_mu.T.contiguous(), fc_mu.bias.detach()

    def __call__(self, frames: np.ndarray) -> Tensor:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(self.dtype).div_(255.0)  # channels last, no copy
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._encode(x).float()
        return self._encode(x)

    def _encode(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = torch.relu_(conv(x))
        n, _, height, width = x.shape
        if (height, width) != (6, 6):  # another frame size: the plain modules
            return self.fc_mu(self.enc[6:](x))
        x = x.permute(0, 2, 3, 1)  # (N, 6, 6, C)
        k = self.k
        fields = torch.stack([x[:, i : i + k, j : j + k] for i in (0, 2) for j in (0, 2)], dim=1)
        h = torch.relu(torch.addmm(self.b4, fields.reshape(n * 4, -1), self.w4))  # (N * 4, C_out)
        return torch.addmm(self.b_mu, h.reshape(n, -1), self.w_mu)


class _LSTMCell:
    """M's LSTM cell without the mixture heads (a rollout needs only h), as one addmm.

    Same weights and gate order as :meth:`MDRNN.step`; the constant-1 input column of
    ``weight_ih`` (M's bias) becomes the addmm's bias.
    """

    def __init__(self, mdrnn: MDRNN, dtype: torch.dtype = torch.float32):
        w_ih, w_hh = (w.detach().to(dtype) for w in (mdrnn.lstm.weight_ih_l0, mdrnn.lstm.weight_hh_l0))
        self.bias = w_ih[:, -1].contiguous()
        self.weight_t = torch.cat([w_ih[:, :-1], w_hh], dim=1).T.contiguous()  # (Z + A + H, 4H)

    def __call__(self, z: Tensor, a: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        gates = torch.addmm(self.bias, torch.cat([z, a, h], dim=1), self.weight_t)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


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
    with one_torch_thread(), torch.inference_mode():
        return _rollout(agent, params, seeds, env_cfg, max_steps, early_stop_steps, fast, trace, float64)


def _rollout(
    agent: Agent,
    params: np.ndarray,
    seeds: Sequence[int],
    env_cfg: EnvConfig | None,
    max_steps: int,
    early_stop_steps: int,
    fast: bool | None,
    trace: bool,
    float64: bool,
) -> RolloutResult:
    env_cfg = env_cfg or EnvConfig()
    if fast is not None and fast != env_cfg.fast_render:
        env_cfg = dataclasses.replace(env_cfg, fast_render=fast)
    params = np.atleast_2d(np.asarray(params))
    k = len(seeds)
    if params.shape[0] != k:
        raise ValueError(f"params has {params.shape[0]} rows but {k} seeds were given")
    dtype = torch.float64 if float64 else torch.float32
    controller = BatchedController(agent.shape, params, dtype)
    encode = _Encoder(agent.vae, agent.encode_bf16 and not float64, dtype)
    cell = _LSTMCell(agent.mdrnn, dtype) if agent.shape.uses_h else None

    envs = _envs(env_cfg, k)
    first = envs[0].observation_space.shape
    frames = np.empty((k, *first), dtype=np.uint8)
    for i, (env, seed) in enumerate(zip(envs, seeds)):
        frames[i], _ = env.reset(seed=int(seed))
    if cell is not None:
        h = torch.zeros(k, agent.hidden_size, dtype=dtype)
        c = torch.zeros(k, agent.hidden_size, dtype=dtype)
    returns = np.zeros(k, dtype=np.float64)
    steps = np.zeros(k, dtype=np.int64)
    since_tile = np.zeros(k, dtype=np.int64)
    early = np.zeros(k, dtype=bool)
    alive = np.ones(k, dtype=bool)
    idx = np.arange(k)
    log: list[list[tuple]] | None = [[] for _ in range(k)] if trace else None

    for t in range(max_steps):
        full = len(idx) == k
        z = encode(frames if full else frames[idx])
        sel = None if full else idx
        if cell is not None:
            hs, cs = (h, c) if full else (h[idx], c[idx])
            actions = controller(z, hs, sel).float().to(dtype)  # the float32 actions the environment gets
            h_new, c_new = cell(z, actions, hs, cs)
            if full:
                h, c = h_new, c_new
            else:
                h[idx], c[idx] = h_new, c_new
        else:
            actions = controller(z, None, sel)
        actions_np = actions.float().numpy()
        if log is not None:
            z_np = z.float().numpy()
            for j, i in enumerate(idx):
                log[i].append((frames[i].copy(), z_np[j].copy(), actions_np[j].copy()))

        ended = False
        for j, i in enumerate(idx):
            obs, reward, terminated, truncated, _ = envs[i].step(actions_np[j])
            frames[i] = obs
            returns[i] += reward
            steps[i] += 1
            if log is not None:
                log[i][-1] += (reward,)
            since_tile[i] = 0 if reward > 0 else since_tile[i] + 1
            if terminated or truncated:
                alive[i], ended = False, True
            elif early_stop_steps and since_tile[i] >= early_stop_steps and t + 1 < max_steps:
                returns[i] -= STEP_PENALTY * (max_steps - steps[i])
                alive[i], early[i], ended = False, True, True
        if ended:
            idx = np.flatnonzero(alive)
            if len(idx) == 0:
                break

    traces = None
    if log is not None:
        traces = [
            Trace(
                frames=np.stack([s[0] for s in steps_]) if steps_ else np.empty((0, *first), np.uint8),
                z=np.stack([s[1] for s in steps_]) if steps_ else np.empty((0, agent.z_size), np.float32),
                actions=np.stack([s[2] for s in steps_]) if steps_ else np.empty((0, ACTION_SIZE), np.float32),
                rewards=np.array([s[3] for s in steps_], dtype=np.float64),
            )
            for steps_ in log
        ]
    return RolloutResult(returns, steps, early, traces)


# --- evaluation -------------------------------------------------------------------------


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


@dataclass
class RolloutTask:
    """A vector of episodes for a worker: the arguments of :func:`rollout` besides the agent."""

    params: np.ndarray
    """(K, P) controllers, one per seed."""
    seeds: list[int]
    env_cfg: EnvConfig
    max_steps: int = 1000
    early_stop_steps: int = 0
    float64: bool = False
    """Exact driving (see the module docstring)."""

    def __repr__(self) -> str:  # short: executors name failing tasks by their repr
        return (
            f"RolloutTask(K={len(self.seeds)}, seeds={self.seeds[:4]}{'...' if len(self.seeds) > 4 else ''}, "
            f"max_steps={self.max_steps}, early_stop_steps={self.early_stop_steps})"
        )


def build_agent(vae_state: dict[str, Tensor], mdrnn_state: dict[str, Tensor] | None, cfg: Config) -> Agent:
    """An executor's `init`: the agent, built once in each worker (see :meth:`Agent.init_args`)."""
    return Agent.from_weights(vae_state, mdrnn_state, cfg)


def run_task(agent: Agent, task: RolloutTask) -> RolloutResult:
    """An executor's task function: :func:`rollout` of `task` with the worker's agent."""
    return rollout(
        agent,
        task.params,
        task.seeds,
        task.env_cfg,
        max_steps=task.max_steps,
        early_stop_steps=task.early_stop_steps,
        float64=task.float64,
    )


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


def evaluate(
    agent: Agent,
    params: np.ndarray,
    seeds: Sequence[int],
    env_cfg: EnvConfig | None = None,
    *,
    envs_per_batch: int = 8,
    max_steps: int = 1000,
    workers: int = 1,
    executor: Any = None,
    timeout: float | None = None,
    float64: bool = True,
) -> EvalResult:
    """Full episodes (no early termination) of one controller `params` (P,) on each seed.

    The agent drives exactly (`float64`, see the module docstring), so the returns are the
    same on any CPU and for any `envs_per_batch`.

    Seeds are split into vectors of `envs_per_batch` environments. With `workers > 1`
    the vectors run in that many local processes (0: one per core), each building the
    agent once; or pass an executor of :mod:`worldmodels.parallel` made with
    ``init=build_agent, init_args=agent.init_args()``.
    """
    env_cfg = env_cfg or EnvConfig()
    params = np.asarray(params, dtype=np.float64).reshape(-1)
    seeds = [int(s) for s in seeds]
    tasks = [
        RolloutTask(np.tile(params, (len(ch), 1)), ch, env_cfg, max_steps, float64=float64)
        for ch in (seeds[i : i + envs_per_batch] for i in range(0, len(seeds), envs_per_batch))
    ]
    if executor is None and workers == 1:
        results = [run_task(agent, task) for task in tasks]
    elif executor is not None:
        results = executor.map_tasks(run_task, tasks, timeout=timeout)
    else:
        from worldmodels.parallel import make_executor

        with make_executor(workers, init=build_agent, init_args=agent.init_args()) as ex:
            results = ex.map_tasks(run_task, tasks, timeout=timeout)
    returns = [float(r) for res in results for r in res.returns]
    return EvalResult(returns, seeds)


def load_agent_and_controller(
    run: str | Path | RunDir, cfg: Config | None = None, controller: str | Path | None = None
) -> tuple[Agent, np.ndarray, Path]:
    """A run's agent, the flat parameters of its controller (default: ``controller/best.safetensors``)
    and that file's path; a missing file or a controller of the wrong shape raises an error naming it."""
    from worldmodels.controller import load_controller
    from worldmodels.runs import RunDirError

    run = as_run_dir(run)
    cfg = cfg or run.load_config()
    path = Path(controller) if controller is not None else run.path / "controller" / "best.safetensors"
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
) -> dict[str, Any]:
    """The paper's protocol on a run: its best controller drives full episodes on unseen tracks.

    Tracks ``seed, seed + 1, ...`` (default ``cfg.eval.seed`` and ``cfg.eval.episodes``),
    episodes of at most `max_steps` steps (default ``cfg.eval.max_steps``), in ``workers``
    processes (default ``cfg.cma.workers``; 0: one per core). Writes and
    returns ``run/eval/results.json``: returns, seeds, episodes, mean, std, min, max,
    the controller's path, max_steps, the seconds it took and, for the run's own best
    controller, ``controller_generations`` (the generations it was chosen from, so that
    results of a controller since evolved for longer are known to be stale).
    """
    import time

    from worldmodels.runs import read_json, write_json

    run = as_run_dir(run)
    cfg = cfg or run.load_config()
    agent, params, path = load_agent_and_controller(run, cfg, controller)
    episodes = cfg.eval.episodes if episodes is None else episodes
    seed = cfg.eval.seed if seed is None else seed
    max_steps = cfg.eval.max_steps if max_steps is None else max_steps
    start = time.perf_counter()
    result = evaluate(
        agent,
        params,
        range(seed, seed + episodes),
        cfg.env,
        envs_per_batch=cfg.cma.envs_per_worker,
        max_steps=max_steps,
        workers=cfg.cma.workers if workers is None else workers,
    )
    seconds = round(time.perf_counter() - start, 3)
    out = {**result.to_dict(), "controller": str(path), "max_steps": max_steps, "seconds": seconds}
    done = run.controller / "done.json"
    if controller is None and done.exists():
        out["controller_generations"] = read_json(done)["generations"]
    write_json(run.eval / "results.json", out)
    return out


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        iio.imwrite(tmp, video, extension=path.suffix.lower(), **kwargs)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return result
