"""The datasets V and M train on: frames of the collected episodes, and sequences of latents.

:class:`FrameDataset` streams shuffled frames of the episode files for V;
:func:`save_latents` / :func:`load_latents` are the latent files that ``encode`` writes
(``latents/episode_000123.npz``: V's ``mu`` and ``logvar`` of every frame, with the episode's
actions, rewards and ends); :class:`SequenceDataset` serves them as padded sequences for M.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from worldmodels.data import Episode, EpisodeError, load_episode, load_or_skip
from worldmodels.runs import open_npz, save_npz
# --- episode files, read for training -----------------------------------------------------------------------------



class FrameDataset(torch.utils.data.IterableDataset):
    """Shuffled batches of frames for V, holding at most `shuffle_episodes` episodes in memory.

    Each epoch visits the episodes in a new random order, `shuffle_episodes` at a time;
    from each it draws `frames_per_episode` frames (all when 0, including the final
    frame), shuffles the pooled frames and yields uint8 tensors (B, 64, 64, 3).
    Call :meth:`set_epoch` before each epoch for a new order.
    """

    def __init__(
        self,
        files: Sequence[Path],
        batch_size: int,
        *,
        frames_per_episode: int = 0,
        shuffle_episodes: int = 32,
        seed: int = 0,
        drop_last: bool = True,
        skip_corrupt: bool = False,
    ):
        if not files:
            raise ValueError("FrameDataset needs at least one episode file")
        self.files, self.batch_size = list(files), batch_size
        self.frames_per_episode, self.shuffle_episodes = frames_per_episode, shuffle_episodes
        self.seed, self.epoch, self.drop_last, self.skip_corrupt = seed, 0, drop_last, skip_corrupt

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _frames(self, path: Path, rng: np.random.Generator) -> np.ndarray | None:
        ep = load_or_skip(path, self.skip_corrupt)
        if ep is None:
            return None
        frames = ep.frames
        if self.frames_per_episode and self.frames_per_episode < len(frames):
            frames = frames[np.sort(rng.choice(len(frames), self.frames_per_episode, replace=False))]
        return frames

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.files))
        carry = np.zeros((0,), np.uint8)
        for k in range(0, len(order), self.shuffle_episodes):
            chunk = [self._frames(self.files[i], rng) for i in order[k : k + self.shuffle_episodes]]
            chunk = [c for c in chunk if c is not None]
            if not chunk:
                continue
            pool = np.concatenate(([carry] if len(carry) else []) + chunk)
            pool = pool[rng.permutation(len(pool))]
            n_full = len(pool) // self.batch_size * self.batch_size
            for b in range(0, n_full, self.batch_size):
                yield torch.from_numpy(pool[b : b + self.batch_size])
            carry = pool[n_full:]
        if len(carry) and not self.drop_last:
            yield torch.from_numpy(carry)

    def num_frames(self) -> int:
        """Frames per epoch (reads each file's actions only); a damaged file raises EpisodeError naming it."""
        total = 0
        for f in self.files:
            with open_npz(f, "episode file", EpisodeError) as z:
                n = len(z["action"]) + 1
            total += min(n, self.frames_per_episode) if self.frames_per_episode else n
        return total


def latent_path(latent_dir: str | Path, episode_file: str | Path) -> Path:
    return Path(latent_dir) / Path(episode_file).name


LATENT_KEYS = ("mu", "logvar", "action", "reward", "terminated")


def save_latents(path: str | Path, mu: np.ndarray, logvar: np.ndarray, ep: Episode) -> None:
    """An episode's latents: mu and logvar float16 (T + 1, Z) with its actions, rewards, ends."""
    save_npz(
        path,
        mu=np.asarray(mu, np.float16),
        logvar=np.asarray(logvar, np.float16),
        action=ep.action.astype(np.float32),
        reward=ep.reward.astype(np.float32),
        terminated=ep.terminated.astype(bool),
    )


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with open_npz(path, "latent file", EpisodeError) as f:
            out = {k: f[k] for k in LATENT_KEYS}
    except FileNotFoundError as e:
        raise EpisodeError(f"{path}: no such latent file") from e
    if out["mu"].shape != out["logvar"].shape or len(out["mu"]) != len(out["action"]) + 1:
        raise EpisodeError(f"{path}: mu {out['mu'].shape}, logvar {out['logvar'].shape}, action {out['action'].shape} disagree")
    return out


class SequenceDataset(torch.utils.data.Dataset):
    """Aligned windows of `seq_len` transitions for M, read from disk one episode at a time.

    Item keys (L = seq_len):

    * ``frames`` uint8 (L + 1, 64, 64, 3) with ``source='obs'``, or ``mu`` and ``logvar``
      float32 (L + 1, Z) with ``source='latent'``: frame t and, at t + 1, the frame
      that follows action t;
    * ``action`` (L, 3), ``reward`` (L,), ``done`` (L,) float32: the transition t -> t + 1;
    * ``mask`` (L,) bool: False on padding, when an episode is shorter than `seq_len`.

    Windows tile each episode from its start; a last window ends on its final
    transition, so that the end of every episode (and its done flag) is seen.
    """

    def __init__(
        self,
        files: Sequence[Path],
        seq_len: int,
        source: str = "latent",
        *,
        skip_corrupt: bool = False,
        cache_episodes: int = 0,
    ):
        """`cache_episodes` > 0 keeps the arrays of that many recently read episodes in memory."""
        if source not in ("obs", "latent"):
            raise ValueError(f"source must be 'obs' or 'latent', got {source!r}")
        self.seq_len, self.source = seq_len, source
        self.cache_episodes = cache_episodes
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.files: list[Path] = []
        self.index: list[tuple[int, int]] = []
        loader = load_episode if source == "obs" else load_latents
        for path in files:
            ep = load_or_skip(Path(path), skip_corrupt, loader)
            if ep is None:
                continue
            T = len(ep) if source == "obs" else len(ep["action"])
            starts = list(range(0, max(T - seq_len, 0) + 1, seq_len))
            if T > seq_len and starts[-1] != T - seq_len:
                starts.append(T - seq_len)
            self.index += [(len(self.files), s) for s in starts]
            self.files.append(Path(path))
        if not self.index:
            raise ValueError("SequenceDataset: no readable episodes")

    def __len__(self) -> int:
        return len(self.index)

    def _arrays(self, file_index: int) -> dict[str, np.ndarray]:
        if file_index in self._cache:
            self._cache.move_to_end(file_index)
            return self._cache[file_index]
        path = self.files[file_index]
        if self.source == "obs":
            ep = load_episode(path)
            arrays = {"frames": ep.frames, "action": ep.action, "reward": ep.reward, "done": ep.terminated}
        else:
            lat = load_latents(path)
            arrays = {
                "mu": lat["mu"].astype(np.float32),
                "logvar": lat["logvar"].astype(np.float32),
                "action": lat["action"],
                "reward": lat["reward"],
                "done": lat["terminated"],
            }
        if self.cache_episodes > 0:
            self._cache[file_index] = arrays
            while len(self._cache) > self.cache_episodes:
                self._cache.popitem(last=False)
        return arrays

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        file_index, s = self.index[i]
        L = self.seq_len
        arrays = self._arrays(file_index)
        T = len(arrays["action"])
        n = min(L, T - s)
        out = {}
        for key, value in arrays.items():
            length = L + 1 if key in ("frames", "mu", "logvar") else L
            window = value[s : s + min(length, n + length - L)]
            pad = length - len(window)
            if pad:
                window = np.concatenate([window, np.zeros((pad, *window.shape[1:]), window.dtype)])
            # a copy when cached, so that changing an item never changes the cache
            out[key] = torch.from_numpy(np.array(window) if self.cache_episodes > 0 else np.ascontiguousarray(window))
        for key in ("action", "reward", "done"):
            out[key] = out[key].float()
        mask = torch.zeros(L, dtype=torch.bool)
        mask[:n] = True
        out["mask"] = mask
        return out
