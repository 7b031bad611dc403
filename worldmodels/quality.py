"""How good M is: its predictions scored on held-out episodes against simple baselines.

M's output at step t predicts the transition t -> t + 1 (as in training, see
:mod:`worldmodels.datasets`): the code ``z_{t+1}``, the reward ``r_t`` and whether the
episode ends after action ``a_t``. Here the target ``z_{t+1}`` is V's posterior *mean* of
frame t + 1 (training draws a sample; the mean is the deterministic choice), and M reads
the means too. Each latent dimension's NLL (nats) is compared with

* **persistence**: ``z_{t+1} ~ N(z_t, s^2)``, with ``s^2`` the mean of ``(z_{t+1} - z_t)^2``
  over the same episodes (the variance fitted to the data it is scored on, so the baseline
  is as good as a persistence Gaussian can be);
* **the prior**: ``z_{t+1} ~ N(0, 1)``, what V's KL term pulls the codes towards.

The reward head is compared with the constant that best fits the same rewards (their
mean), the done head's ends (``p > 0.5``) with the ends seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from worldmodels.data import Episode
from worldmodels.mdrnn import MDRNN, mdn_loss
from worldmodels.vae import VAE, frames_to_tensor, kl_per_dimension

USED_KL = 0.1
"""A latent dimension whose mean KL exceeds this many nats is one that V uses."""


@dataclass
class LatentEpisode:
    """One episode as M is scored on it: V's codes with the actions, rewards and ends.

    ``mu`` and ``logvar`` are (N, Z) with N = T + 1 (every frame, the last included) or
    N = T (a trace that did not keep the frame after its last action: the last
    transition's code is then not scored, its reward and end still are).
    """

    mu: np.ndarray
    """(N, Z) V's posterior means."""
    logvar: np.ndarray
    """(N, Z) V's posterior log-variances."""
    action: np.ndarray
    """(T, 3) the action taken at each step."""
    reward: np.ndarray
    """(T,) the reward of each transition."""
    done: np.ndarray
    """(T,) bool: the episode ended after that action."""

    def __post_init__(self) -> None:
        t = len(self.action)
        if len(self.mu) not in (t, t + 1) or self.logvar.shape != self.mu.shape:
            raise ValueError(f"LatentEpisode: mu {self.mu.shape} and logvar {self.logvar.shape} need T or T + 1 = {t + 1} rows")
        if len(self.reward) != t or len(self.done) != t:
            raise ValueError(f"LatentEpisode: reward ({len(self.reward)}) and done ({len(self.done)}) need T = {t} entries")


@dataclass
class MQuality:
    """M's scores over a set of episodes; per-dimension arrays are (Z,), NLLs in nats."""

    nll_m: np.ndarray
    """M's mixture NLL of ``z_{t+1}`` per latent dimension."""
    nll_persistence: np.ndarray
    """NLL of the persistence Gaussian ``N(z_t, s^2)`` per latent dimension."""
    nll_prior: np.ndarray
    """NLL of the prior ``N(0, 1)`` per latent dimension."""
    kl: np.ndarray
    """V's mean KL per latent dimension over the frames."""
    used: np.ndarray
    """bool: the dimensions V uses (``kl > USED_KL``)."""
    reward_actual: np.ndarray
    """(steps,) the rewards seen."""
    reward_predicted: np.ndarray | None
    """(steps,) the reward head's predictions (None without a head)."""
    reward_mse: float | None
    """Mean squared error of the reward head."""
    reward_mse_constant: float
    """Mean squared error of the best constant (the rewards' mean): their variance."""
    reward_explained_variance: float | None
    """``1 - reward_mse / reward_mse_constant``: 1 for a perfect head, 0 for the mean."""
    ends_seen: int
    """Transitions after which an episode ended."""
    ends_predicted: int | None
    """Transitions the done head calls ends (``p > 0.5``)."""
    ends_hit: int | None
    """Predicted ends that were real ends."""

    @property
    def m_beats_persistence(self) -> np.ndarray:
        """bool (Z,): dimensions where M's NLL is below the persistence baseline's."""
        return self.nll_m < self.nll_persistence


def latent_episode(vae: VAE, frames: np.ndarray, action: np.ndarray, reward: np.ndarray, done: np.ndarray) -> LatentEpisode:
    """Encode `frames` (N, 64, 64, 3) uint8 with V and pair them with the transitions."""
    with torch.no_grad():
        mu, logvar = vae.encode(frames_to_tensor(frames).to(next(vae.parameters()).device))
    return LatentEpisode(
        mu.float().cpu().numpy(), logvar.float().cpu().numpy(), np.asarray(action, np.float32),
        np.asarray(reward, np.float32), np.asarray(done, bool),
    )


def from_episode(vae: VAE, ep: Episode) -> LatentEpisode:
    """A recorded episode (:class:`worldmodels.data.Episode`), all T + 1 frames encoded."""
    return latent_episode(vae, ep.frames, ep.action, ep.reward, ep.terminated)


def from_trace(vae: VAE, frames: np.ndarray, action: np.ndarray, reward: np.ndarray, ended: bool) -> LatentEpisode:
    """A rollout's trace (T frames seen, T actions and rewards); `ended`: the environment
    ended the episode after the last action (not a step limit)."""
    done = np.zeros(len(action), bool)
    if len(done):
        done[-1] = ended
    return latent_episode(vae, frames, action, reward, done)


def sample_codes(ep: LatentEpisode, rng: np.random.Generator) -> LatentEpisode:
    """The episode with its codes drawn from V's posterior, ``mu + exp(logvar / 2) * eps``,
    as M's training sees them (scoring it then compares M with what it was trained on)."""
    z = ep.mu + np.exp(0.5 * ep.logvar) * rng.standard_normal(ep.mu.shape).astype(np.float32)
    return LatentEpisode(z.astype(np.float32), ep.logvar, ep.action, ep.reward, ep.done)


def persistence_variance(episodes: Sequence[LatentEpisode], floor: float = 1e-6) -> np.ndarray:
    """(Z,) the mean of ``(z_{t+1} - z_t)^2`` over all scored steps, at least `floor`."""
    diffs = np.concatenate([_targets(ep) - ep.mu[: len(_targets(ep))] for ep in episodes])
    return np.maximum((diffs.astype(np.float64) ** 2).mean(0), floor)


def gaussian_nll(x: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Elementwise ``-log N(x; mean, variance)`` in nats."""
    return 0.5 * (np.log(2 * math.pi * variance) + (x - mean) ** 2 / variance)


def explained_variance(predicted: np.ndarray, actual: np.ndarray) -> float:
    """``1 - MSE / Var(actual)``; raises when the actual values do not vary."""
    var = float(np.var(actual))
    if var == 0:
        raise ValueError("explained_variance: the actual values are constant")
    return 1.0 - float(np.mean((predicted - actual) ** 2)) / var


def m_quality(vae: VAE, mdrnn: MDRNN, episodes: Sequence[LatentEpisode]) -> MQuality:
    """Score M (and V's usage of its dimensions) on `episodes`, see the module docstring."""
    if not episodes:
        raise ValueError("m_quality needs at least one episode")
    outs = [_predict(mdrnn, ep) for ep in episodes]
    targets = [_targets(ep) for ep in episodes]
    nll_m = np.concatenate([nll for nll, _, _ in outs]).mean(0)
    variance = persistence_variance(episodes)
    nll_persistence = np.concatenate([gaussian_nll(z, ep.mu[: len(z)], variance) for z, ep in zip(targets, episodes)]).mean(0)
    nll_prior = np.concatenate([gaussian_nll(z, 0.0, 1.0) for z in targets]).mean(0)
    kl = kl_per_dimension(torch.from_numpy(np.concatenate([ep.mu for ep in episodes])),
                          torch.from_numpy(np.concatenate([ep.logvar for ep in episodes]))).numpy()
    reward = np.concatenate([ep.reward for ep in episodes]).astype(np.float64)
    done = np.concatenate([ep.done for ep in episodes])
    reward_pred = None if outs[0][1] is None else np.concatenate([r for _, r, _ in outs]).astype(np.float64)
    done_pred = None if outs[0][2] is None else np.concatenate([d for _, _, d in outs])
    mse_constant = float(np.var(reward))
    mse = None if reward_pred is None else float(np.mean((reward_pred - reward) ** 2))
    return MQuality(
        nll_m=nll_m, nll_persistence=nll_persistence, nll_prior=nll_prior, kl=kl, used=kl > USED_KL,
        reward_actual=reward, reward_predicted=reward_pred, reward_mse=mse, reward_mse_constant=mse_constant,
        reward_explained_variance=None if mse is None or mse_constant == 0 else explained_variance(reward_pred, reward),
        ends_seen=int(done.sum()),
        ends_predicted=None if done_pred is None else int(done_pred.sum()),
        ends_hit=None if done_pred is None else int((done_pred & done).sum()),
    )


def _targets(ep: LatentEpisode) -> np.ndarray:
    """The codes ``z_{t+1}`` that can be scored: (min(N - 1, T), Z)."""
    return ep.mu[1 : len(ep.action) + 1]


def _predict(mdrnn: MDRNN, ep: LatentEpisode) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """M over the episode: per-step, per-dimension NLL of the targets, rewards, ends (p > 0.5)."""
    device = next(mdrnn.parameters()).device
    t = len(ep.action)
    z = torch.from_numpy(ep.mu[:t]).to(device)[None]
    with torch.no_grad():
        out, _ = mdrnn(z, torch.from_numpy(ep.action).to(device)[None])
        target = torch.from_numpy(_targets(ep)).to(device)
        scored = len(target)
        cut = type(out)(*(x[:, :scored] if x is not None else None for x in out))
        nll = mdn_loss(cut, target[None], reduction="none")[0].double().cpu().numpy()
    reward = None if out.reward is None else out.reward[0].double().cpu().numpy()
    done = None if out.done_logit is None else (out.done_logit[0] > 0).cpu().numpy()
    return nll, reward, done
