"""FastCarRacing must match gymnasium's CarRacing-v3 bit for bit, step by step."""

from __future__ import annotations

import math
import os

import gymnasium
import numpy as np
import pygame
import pytest
from gymnasium.envs.box2d.car_racing import CarRacing

from worldmodels import raster
from worldmodels.carracing import (
    ENV_ID,
    UPSTREAM_SHA256,
    VERIFIED_GYMNASIUM,
    VERIFIED_PYGAME,
    FastCarRacing,
    register,
    rotate,
    upstream_mismatches,
)

slow = pytest.mark.skipif(os.environ.get("WM_SLOW_TESTS") != "1", reason="set WM_SLOW_TESTS=1")
LOW, HIGH = np.array([-1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])


def random_actions(rng: np.random.Generator, steps: int) -> np.ndarray:
    return rng.uniform(LOW, HIGH, size=(steps, 3)).astype(np.float32)


def brownian_actions(rng: np.random.Generator, steps: int) -> np.ndarray:
    actions, a = [], np.zeros(3)
    for _ in range(steps):
        a = np.clip(a + math.sqrt(1 / 50) * rng.standard_normal(3), LOW, HIGH)
        actions.append(a)
    return np.array(actions, dtype=np.float32)


def assert_same_episode(seed: int, actions: np.ndarray, **kwargs) -> int:
    """Step both envs with the same actions; return the number of steps taken."""
    ref, fast = CarRacing(**kwargs), FastCarRacing(**kwargs)
    try:
        obs_ref, info_ref = ref.reset(seed=seed)
        obs_fast, info_fast = fast.reset(seed=seed)
        assert np.array_equal(obs_ref, obs_fast) and info_ref == info_fast
        for t, action in enumerate(actions):
            out_ref, out_fast = ref.step(action), fast.step(action)
            assert np.array_equal(out_ref[0], out_fast[0]), f"seed {seed}: obs differs at step {t}"
            assert out_ref[1:] == out_fast[1:], f"seed {seed}: reward/done/info differ at step {t}"
            if out_ref[2] or out_ref[3]:
                return t + 1
        return len(actions)
    finally:
        ref.close()
        fast.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("policy", [random_actions, brownian_actions])
def test_identical_short(seed: int, policy) -> None:
    assert_same_episode(seed, policy(np.random.default_rng(seed), 200))


def test_identical_off_playfield_termination() -> None:
    # Steady gas, no steering: the car leaves the track and, after ~350 steps, the playfield.
    actions = np.tile(np.array([0.0, 0.2, 0.0], dtype=np.float32), (1000, 1))
    ref = CarRacing()
    ref.reset(seed=0)
    last = None
    for action in actions:
        last = ref.step(action)
        if last[2]:
            break
    assert last is not None and last[2] and last[1] == -100, "scenario no longer leaves the playfield"
    assert assert_same_episode(0, actions) < len(actions)


def test_identical_domain_randomize() -> None:
    assert_same_episode(7, random_actions(np.random.default_rng(7), 60), domain_randomize=True)


def test_identical_on_the_pygame_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without numba (or off smoothscale's SSE2 backend) the renderer uses pygame's primitives.
    monkeypatch.setattr(raster, "supported", lambda: False)
    env = FastCarRacing()
    env.reset(seed=5)
    env.step(np.zeros(3, np.float32))
    assert env._pixels is None
    env.close()
    assert_same_episode(5, random_actions(np.random.default_rng(5), 80))


def test_reset_twice_and_reuse() -> None:
    rng = np.random.default_rng(3)
    ref, fast = CarRacing(), FastCarRacing()
    for seed in (11, 12, 12):
        obs_ref, _ = ref.reset(seed=seed)
        obs_fast, _ = fast.reset(seed=seed)
        assert np.array_equal(obs_ref, obs_fast)
        for action in random_actions(rng, 40):
            assert np.array_equal(ref.step(action)[0], fast.step(action)[0])


def test_rotate_matches_pygame() -> None:
    rng = np.random.default_rng(0)
    quarter = [k * math.pi / 2 + d for k in range(-8, 9) for d in (0.0, 5e-7, -5e-7, 2e-6, -2e-6)]
    for angle in list(rng.normal(0.0, 10.0, 300)) + quarter:
        xy = rng.normal(0.0, 300.0, size=(8, 2))
        xs, ys = rotate(xy[:, 0], xy[:, 1], float(angle))
        expected = [pygame.math.Vector2(p.tolist()).rotate_rad(float(angle)) for p in xy]
        assert xs.tolist() == [v[0] for v in expected] and ys.tolist() == [v[1] for v in expected]


def test_rgb_array_mode_matches() -> None:
    ref, fast = CarRacing(render_mode="rgb_array"), FastCarRacing(render_mode="rgb_array")
    ref.reset(seed=4)
    fast.reset(seed=4)
    for action in random_actions(np.random.default_rng(4), 30):
        assert np.array_equal(ref.step(action)[0], fast.step(action)[0])
    assert np.array_equal(ref.render(), fast.render())


def test_gymnasium_make() -> None:
    register()
    register()  # idempotent
    env = gymnasium.make(ENV_ID)
    assert isinstance(env.unwrapped, FastCarRacing)
    assert env.spec.max_episode_steps == gymnasium.spec("CarRacing-v3").max_episode_steps
    assert env.spec.reward_threshold == gymnasium.spec("CarRacing-v3").reward_threshold
    obs, _ = env.reset(seed=0)
    assert obs.shape == (96, 96, 3) and obs.dtype == np.uint8
    env.close()


def test_upstream_unchanged() -> None:
    changed = upstream_mismatches()
    assert not changed, (
        f"gymnasium code that FastCarRacing mirrors changed: {changed}; re-verify "
        "(run the slow tests) and update UPSTREAM_SHA256 in worldmodels/carracing.py"
    )
    assert set(UPSTREAM_SHA256) >= {"CarRacing._render", "CarRacing._render_road", "Car.draw"}
    assert gymnasium.__version__ == VERIFIED_GYMNASIUM, f"verified against gymnasium {VERIFIED_GYMNASIUM}"
    assert pygame.version.ver == VERIFIED_PYGAME, f"verified against pygame-ce {VERIFIED_PYGAME}"


@slow
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("policy", [random_actions, brownian_actions])
def test_identical_full_episodes(seed: int, policy) -> None:
    rng = np.random.default_rng(1000 + seed)
    assert_same_episode(100 + seed, policy(rng, 1000))
