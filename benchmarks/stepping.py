"""The timed loop the benchmarks share: one environment stepped with uniform random actions."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np


def random_actions(steps: int, seed: int = 0) -> np.ndarray:
    """(steps, 3) float32 CarRacing actions drawn uniformly (steer, gas, brake)."""
    return np.random.default_rng(seed).uniform([-1, 0, 0], [1, 1, 1], size=(steps, 3)).astype(np.float32)


def step_block(env: gym.Env, actions: np.ndarray) -> float:
    """Seconds taken to step `env` through `actions` (resetting on episode end)."""
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    return time.perf_counter() - start


def random_steps_per_second(env: gym.Env, steps: int, seed: int = 0) -> float:
    """Steps per second of `env` under uniform random actions (resets on episode end; closes `env`).

    The first reset is not timed.
    """
    env.reset(seed=seed)
    elapsed = step_block(env, random_actions(steps, seed))
    env.close()
    return steps / elapsed
