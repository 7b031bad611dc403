"""The timed loop the benchmarks share: one environment stepped with uniform random actions."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np


def random_steps_per_second(env: gym.Env, steps: int, seed: int = 0) -> float:
    """Steps per second of `env` under uniform random actions (resets on episode end; closes `env`).

    The first reset is not timed.
    """
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).uniform([-1, 0, 0], [1, 1, 1], size=(steps, 3)).astype(np.float32)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed
