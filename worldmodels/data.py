"""The random-policy dataset: policies, parallel collection, the episode format.

The datasets that V and M train on, and the latent files, are in :mod:`worldmodels.datasets`.

Episode format (one compressed ``.npz`` per episode, ``data/episode_000123.npz``):

==============  ====================  =================================================================
key             dtype, shape          meaning
==============  ====================  =================================================================
``obs``         uint8 (T, 64, 64, 3)  the frame the policy saw before action t
``action``      float32 (T, 3)        action t (steer, gas, brake)
``reward``      float32 (T,)          reward received for action t
``terminated``  bool (T,)             the episode ended after action t (left the field, lap done)
``truncated``   bool (T,)             the time limit cut the episode after action t
``final_obs``   uint8 (64, 64, 3)     the frame after the last action, so that every action
                                      has the frame that follows it
``seed``        int64 ()              the track's seed
==============  ====================  =================================================================

So the frame that follows action t is ``obs[t + 1]`` (``final_obs`` for the last one).
``manifest.json`` beside the episodes records the config, the seeds, the package
versions and per-episode counts.

Every episode is reproducible from its seed: episode i is driven on the track of seed
``data.seed + i`` by a policy whose random stream depends only on that seed, so
:func:`dataset_episodes` can hand out any episode without the files, regenerated
bit-identically, and :func:`policy_actions` recomputes the actions alone without driving.

Which random policy? The authors' dataset came from a random linear controller on
untrained V and M features, whose actions change smoothly over time; the presets use the
Brownian policy, a(t+1) = clip(a(t) + sqrt(dt) N(0, 1)), which shares that property
without needing models: the car accelerates, turns and drives off the road for whole
seconds, so the dataset covers speeds and positions that a policy re-drawing uniform
actions every step (which jitters in place) never reaches.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from worldmodels.config import Config, DataConfig, EnvConfig
from worldmodels.env import ACTION_HIGH, ACTION_LOW, make_env
from worldmodels.parallel import InlineExecutor, make_executor, resolve_workers
from worldmodels.runs import DONE_FILE, MANIFEST_FILE, RunDir, as_run_dir, open_npz, read_json, save_npz, write_json
from worldmodels.tasks import Task, make_tasks, run_tasks

log = logging.getLogger(__name__)

EPISODE_KEYS = ("obs", "action", "reward", "terminated", "truncated", "final_obs", "seed")


class EpisodeError(RuntimeError):
    """A missing, truncated or inconsistent episode file (the message names the file)."""


# --- random policies ---------------------------------------------------------------------


class RandomPolicy:
    """Random actions for a vector of environments, each with its own random stream.

    'uniform': every action drawn independently, uniformly within the action bounds.
    'brownian': a(t+1) = clip(a(t) + sqrt(dt) * N(0, 1), low, high), from a uniform a(0).

    `rngs` holds one generator per environment, so an episode's actions depend only on
    its own seed, not on which other episodes share the vector.
    """

    def __init__(self, kind: str, rngs: Sequence[np.random.Generator], dt: float = 1 / 50):
        if kind not in ("uniform", "brownian"):
            raise ValueError(f"policy must be 'uniform' or 'brownian', got {kind!r}")
        self.kind, self.rngs, self.dt = kind, list(rngs), dt
        self.n = len(self.rngs)
        self.action = np.zeros((self.n, 3), np.float32)
        self.reset()

    def _uniform(self, i: int) -> np.ndarray:
        return self.rngs[i].uniform(ACTION_LOW, ACTION_HIGH)

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Start new episodes in the environments where `mask` is True (all when None)."""
        mask = np.ones(self.n, bool) if mask is None else np.asarray(mask, bool)
        for i in np.flatnonzero(mask):
            self.action[i] = self._uniform(i)

    def __call__(self) -> np.ndarray:
        for i, rng in enumerate(self.rngs):
            if self.kind == "uniform":
                self.action[i] = self._uniform(i)
            else:
                step = math.sqrt(self.dt) * rng.standard_normal(3)
                self.action[i] = np.clip(self.action[i] + step, ACTION_LOW, ACTION_HIGH)
        return self.action.copy()


def policy_rngs(seeds: Sequence[int]) -> list[np.random.Generator]:
    """One generator per episode seed, independent of the environment's own seeding."""
    return [np.random.default_rng([s, 0x5EED]) for s in seeds]


# --- the episode file --------------------------------------------------------------------


@dataclass
class Episode:
    """One episode in memory (see the module docstring for the fields)."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_obs: np.ndarray
    seed: int

    def __len__(self) -> int:
        return len(self.action)

    @property
    def frames(self) -> np.ndarray:
        """All T + 1 frames: obs followed by final_obs."""
        return np.concatenate([self.obs, self.final_obs[None]])

    @property
    def done(self) -> np.ndarray:
        """The episode really ended after action t (time-limit truncation is not an end)."""
        return self.terminated

    def head(self, steps: int) -> Episode:
        """The first `steps` actions, as a collection with ``episode_steps=steps`` records them.

        The cut is a truncation (``truncated[-1]`` set) and the frame after the last kept
        action becomes ``final_obs``; an episode no longer than `steps` is returned as it is.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if steps >= len(self):
            return self
        truncated = self.truncated[:steps].copy()
        truncated[-1] = True
        return Episode(
            obs=self.obs[:steps], action=self.action[:steps], reward=self.reward[:steps],
            terminated=self.terminated[:steps], truncated=truncated, final_obs=self.obs[steps], seed=self.seed,
        )


def episode_path(data_dir: str | Path, index: int) -> Path:
    return Path(data_dir) / f"episode_{index:06d}.npz"


def episode_index(path: str | Path) -> int:
    """The index of an episode file: 123 for ``episode_000123.npz``."""
    return int(Path(path).stem.split("_")[1])


def save_episode(path: str | Path, ep: Episode) -> None:
    """Write an episode atomically (temporary name, then rename)."""
    save_npz(
        path,
        obs=np.asarray(ep.obs, np.uint8),
        action=np.asarray(ep.action, np.float32),
        reward=np.asarray(ep.reward, np.float32),
        terminated=np.asarray(ep.terminated, bool),
        truncated=np.asarray(ep.truncated, bool),
        final_obs=np.asarray(ep.final_obs, np.uint8),
        seed=np.int64(ep.seed),
    )


def load_episode(path: str | Path) -> Episode:
    """Read and check one episode file; a truncated or inconsistent file raises EpisodeError."""
    path = Path(path)
    try:
        with open_npz(path, "episode file", EpisodeError) as f:
            missing = [k for k in EPISODE_KEYS if k not in f.files]
            if missing:
                raise EpisodeError(f"{path}: missing arrays {missing}")
            arrays = {k: f[k] for k in EPISODE_KEYS}
    except FileNotFoundError as e:
        raise EpisodeError(f"{path}: no such episode file") from e
    t = len(arrays["action"])
    expected = {
        "obs": (t,), "action": (t, 3), "reward": (t,), "terminated": (t,), "truncated": (t,),
    }
    for key, prefix in expected.items():
        if arrays[key].shape[: len(prefix)] != prefix:
            raise EpisodeError(f"{path}: {key} has shape {arrays[key].shape}, expected first dims {prefix}")
    if t == 0 or arrays["obs"].shape[1:] != arrays["final_obs"].shape:
        raise EpisodeError(f"{path}: empty episode or obs/final_obs shapes disagree")
    return Episode(**{k: arrays[k] for k in EPISODE_KEYS[:-1]}, seed=int(arrays["seed"]))


def episode_files(data_dir: str | Path) -> list[Path]:
    """The episode files of a data directory, sorted by index."""
    return sorted(Path(data_dir).glob("episode_*.npz"))


def split_episodes(files: Sequence[Path], test_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split episode files into (train, test) by episode, reproducibly for a given seed.

    At least one test episode when `test_fraction` > 0 and there are two or more episodes.
    """
    files = sorted(files)
    n_test = int(round(len(files) * test_fraction))
    if test_fraction > 0 and len(files) >= 2:
        n_test = max(n_test, 1)
    order = np.random.default_rng(seed).permutation(len(files))
    test = sorted(files[i] for i in order[:n_test])
    train = sorted(files[i] for i in order[n_test:])
    return train, test


def split_indices(cfg: Config) -> tuple[list[int], list[int]]:
    """Episode indices (train, test) of the config's dataset: the split V and M train and test on.

    The same as :func:`split_episodes` over the files ``collect`` writes, without needing them.
    """
    names = [episode_path("", i) for i in range(cfg.data.episodes)]
    train, test = split_episodes(names, cfg.data.test_fraction, cfg.train_seed)
    return [episode_index(f) for f in train], [episode_index(f) for f in test]


# --- collection --------------------------------------------------------------------------


def _drive_group(env_cfg: EnvConfig, data_cfg: DataConfig, indices: Sequence[int], steps: int | None = None) -> list[Episode]:
    """Drive one vector of environments in lockstep, one episode each (episode i on seed data.seed + i).

    The policy acts for the whole vector each step, but each episode's actions depend only
    on its seed; an environment that has ended is no longer stepped. Episodes stop after
    `steps` actions (``data_cfg.episode_steps`` when None).
    """
    n = len(indices)
    seeds = [data_cfg.seed + i for i in indices]
    envs = [make_env(env_cfg) for _ in range(n)]
    policy = RandomPolicy(data_cfg.policy, policy_rngs(seeds), data_cfg.brownian_dt)
    obs = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])
    T = data_cfg.episode_steps if steps is None else min(steps, data_cfg.episode_steps)
    buf = {
        "obs": np.zeros((n, T, *obs.shape[1:]), np.uint8),
        "action": np.zeros((n, T, 3), np.float32),
        "reward": np.zeros((n, T), np.float32),
        "terminated": np.zeros((n, T), bool),
        "truncated": np.zeros((n, T), bool),
    }
    length = np.full(n, T)
    alive = np.ones(n, bool)
    for t in range(T):
        action = policy()
        for j in np.flatnonzero(alive):
            buf["obs"][j, t], buf["action"][j, t] = obs[j], action[j]
            obs[j], reward, terminated, truncated, _ = envs[j].step(action[j])
            truncated = truncated or t == T - 1
            buf["reward"][j, t], buf["terminated"][j, t], buf["truncated"][j, t] = reward, terminated, truncated
            if terminated or truncated:
                alive[j], length[j] = False, t + 1
        if not alive.any():
            break
    for env in envs:
        env.close()
    return [
        Episode(**{k: v[j, : length[j]] for k, v in buf.items()}, final_obs=obs[j].copy(), seed=seeds[j])
        for j in range(n)
    ]


@dataclass
class Collector:
    """A collection worker's state: where and how its episodes are driven and written."""

    env_cfg: EnvConfig
    data_cfg: DataConfig
    data_dir: str


def collect_task(collector: Collector, task: Task) -> list[int]:
    """The task function of collection: the task's random-policy episodes as one vector of
    environments (``_drive_group``), each written to its file; their indices.

    Episode i is the one on the track of seed ``data.seed + i``.
    """
    indices = [int(s) - collector.data_cfg.seed for s in task.seeds]
    for index, ep in zip(indices, _drive_group(collector.env_cfg, collector.data_cfg, indices)):
        save_episode(episode_path(collector.data_dir, index), ep)
    return indices


def episode_record(path: Path) -> dict:
    """The manifest's record of an episode, reading only its small arrays (not the frames)."""
    with open_npz(path, "episode file", EpisodeError) as f:
        reward, terminated, seed = f["reward"], f["terminated"], int(f["seed"])
    return {
        "index": episode_index(path),
        "file": path.name,
        "seed": seed,
        "steps": len(reward),
        "return": float(reward.sum()),
        "terminated": bool(terminated[-1]),
        "bytes": path.stat().st_size,
    }


def _versions() -> dict[str, str]:
    import gymnasium

    import worldmodels

    return {
        "worldmodels": worldmodels.__version__,
        "gymnasium": gymnasium.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def collect(cfg: Config, run: str | Path | RunDir, *, quiet: bool = False, workers: int | None = None) -> list[Path]:
    """Collect `cfg.data.episodes` random-policy episodes into ``run/data`` in parallel.

    Episode i is driven on the track of seed ``cfg.data.seed + i``. The episodes not yet on
    disk are split into tasks of ``cfg.data.envs_per_worker`` episodes, run by `workers`
    local processes (default ``cfg.data.workers``; 0: one per core) that are replaced when
    they die, each task within ``cfg.data.task_timeout`` seconds. Episodes already on disk
    are kept, so a second call after an interruption resumes where the first stopped.
    Returns the episode files.
    """
    run = as_run_dir(run)
    run.bind(cfg)
    data_dir = run.data
    for stray in data_dir.glob(".*.tmp"):  # left by a killed collection; never a finished episode
        stray.unlink()
    todo = [i for i in range(cfg.data.episodes) if not episode_path(data_dir, i).exists()]
    seeds = cfg.data.seed + np.array(todo, np.int64)
    tasks = make_tasks("collect", None, seeds, cfg.data.envs_per_worker, cfg.data.episode_steps)
    n_workers = min(resolve_workers(workers if workers is not None else cfg.data.workers), max(len(tasks), 1))
    init_args = (cfg.env, cfg.data, str(data_dir))
    if n_workers <= 1:
        executor = InlineExecutor(Collector, init_args)
    else:
        executor = make_executor(n_workers, init=Collector, init_args=init_args)
    done = cfg.data.episodes - len(todo)
    bar = tqdm(total=cfg.data.episodes, initial=done, desc="collect", unit="ep", disable=quiet or None)
    with executor, bar:
        run_tasks(executor, collect_task, tasks, cfg.data.task_timeout, progress=lambda done: bar.update(len(done)))
    write_manifest(cfg, run)
    return [episode_path(data_dir, i) for i in range(cfg.data.episodes)]


def write_manifest(cfg: Config, run: RunDir) -> dict:
    """Write ``data/manifest.json`` from the episode files on disk."""
    records = []
    for path in episode_files(run.data):
        try:
            records.append(episode_record(path))
        except EpisodeError:
            if not cfg.data.skip_corrupt:
                raise
            warnings.warn(f"manifest: skipping corrupt {path}", stacklevel=2)
    config = cfg.to_dict()
    manifest = {
        "env": config["env"],
        "data": config["data"],
        "versions": _versions(),
        "episodes": len(records),
        "steps": int(sum(r["steps"] for r in records)),
        "seeds": [r["seed"] for r in records],
        "per_episode": records,
    }
    write_json(run.data / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(run: str | Path | RunDir) -> dict:
    path = as_run_dir(run).data / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; collect the data first")
    return read_json(path)


# --- a few episodes, with or without the dataset on disk ------------------------------------


DATASET_STAGES = ("vae", "mdrnn")
"""The stages that read the whole dataset: V trains on its frames, M on its encoded episodes."""


def needs_dataset(run: str | Path | RunDir) -> bool:
    """Whether a stage that reads the whole dataset (V or M) is unfinished in `run`.

    When both are finished (a shipped run, for instance), nothing needs ``run/data``: a
    chapter that only looks at some episodes gets them from :func:`dataset_episodes`.
    """
    path = as_run_dir(run).path
    return not all((path / stage / DONE_FILE).exists() for stage in DATASET_STAGES)


def dataset_episodes(
    cfg: Config, run: str | Path | RunDir, indices: Sequence[int], *, steps: int | None = None
) -> list[Episode]:
    """Episodes `indices` of the run's dataset: read from ``run/data``, or regenerated from their seeds.

    An episode whose file is not on disk is driven again in memory through the code that
    :func:`collect` runs (episode i on the track of seed ``cfg.data.seed + i``, with a
    policy whose random stream depends only on that seed), so it is bit-identical to the
    file ``collect`` writes; nothing is written. With `steps`, each episode stops after
    its first `steps` actions (:meth:`Episode.head`), which makes regenerating cheap when
    only the first frames matter. A damaged file raises :class:`EpisodeError`, or, with
    ``cfg.data.skip_corrupt``, is regenerated with a warning.

    Regenerating costs about as much as collecting: some 500 steps per second per core.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    run = as_run_dir(run)
    if run.config_path.exists():
        run.bind(cfg)  # the files on disk must belong to this config
    for i in indices:
        if not 0 <= i < cfg.data.episodes:
            raise IndexError(f"episode {i} is not in the dataset of {cfg.data.episodes} episodes")
    found: dict[int, Episode] = {}
    for i in indices:
        path = episode_path(run.data, i)
        ep = load_or_skip(path, cfg.data.skip_corrupt) if path.exists() else None
        if ep is not None:
            found[i] = ep if steps is None else ep.head(steps)
    missing = [i for i in dict.fromkeys(indices) if i not in found]
    per = cfg.data.envs_per_worker
    for k in range(0, len(missing), per):
        group = missing[k : k + per]
        found.update(zip(group, _drive_group(cfg.env, cfg.data, group, steps)))
    return [found[i] for i in indices]


def held_out_episodes(cfg: Config, run: str | Path | RunDir, n: int, *, steps: int | None = None) -> list[Episode]:
    """The first `n` episodes of the test split (:func:`split_indices`), as :func:`dataset_episodes` gives them."""
    return dataset_episodes(cfg, run, split_indices(cfg)[1][:n], steps=steps)


def policy_actions(data_cfg: DataConfig, indices: Sequence[int], steps: Sequence[int]) -> list[np.ndarray]:
    """The recorded actions (steps[j], 3) of episodes `indices`, without driving them.

    The random policy never looks at the frames and each episode's random stream depends
    only on its seed, so its actions follow from the seed and the episode's length alone
    (``steps`` from the manifest's ``per_episode`` records).
    """
    if len(indices) != len(steps):
        raise ValueError(f"{len(indices)} indices but {len(steps)} lengths")
    policy = RandomPolicy(data_cfg.policy, policy_rngs([data_cfg.seed + i for i in indices]), data_cfg.brownian_dt)
    actions = np.zeros((len(indices), max(steps, default=0), 3), np.float32)
    for t in range(actions.shape[1]):
        actions[:, t] = policy()
    return [actions[j, :s] for j, s in enumerate(steps)]

def load_or_skip(path: Path, skip_corrupt: bool, loader=load_episode):
    """`loader(path)`, or None with a warning when the file is corrupt and `skip_corrupt` is set."""
    try:
        return loader(path)
    except EpisodeError as e:
        if not skip_corrupt:
            raise
        warnings.warn(f"skipping {e}", stacklevel=3)
        return None
