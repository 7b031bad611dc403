import os
import subprocess
import sys

import numpy as np
import pytest

from worldmodels.config import EnvConfig
from worldmodels.env import INDICATOR_ROWS, make_env, make_raw_env, transform_frame


def test_transform_crops_the_indicator_bar_and_resizes():
    frame = np.zeros((96, 96, 3), np.uint8)
    frame[INDICATOR_ROWS:] = 255  # the indicator bar region
    cropped = transform_frame(frame, crop=True, size=64)
    kept = transform_frame(frame, crop=False, size=64)
    assert cropped.shape == kept.shape == (64, 64, 3) and cropped.dtype == np.uint8
    assert cropped.max() == 0  # the bar is gone
    assert kept[-5:].min() == 255  # the bar is still there without the crop


def test_transform_antialiases_thin_lines():
    frame = np.zeros((84, 96, 3), np.uint8)
    frame[:, ::2] = 255  # one-pixel stripes: nearest-neighbour would alias them to 0 or 255
    out = transform_frame(frame, crop=False, size=64)
    assert 90 < out.mean() < 165 and out.std() < 60


def test_transform_rejects_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        transform_frame(np.zeros((96, 96, 3), np.float32))
    with pytest.raises(ValueError, match="H, W, 3"):
        transform_frame(np.zeros((96, 96), np.uint8))


@pytest.mark.parametrize("fast", [False, True])
def test_make_env_spaces_and_determinism_under_a_seed(fast):
    cfg = EnvConfig(fast_render=fast)
    actions = np.random.default_rng(0).uniform([-1, 0, 0], [1, 1, 1], size=(60, 3)).astype(np.float32)
    runs = []
    for _ in range(2):
        env = make_env(cfg)
        assert env.observation_space.shape == (64, 64, 3)
        assert env.action_space.shape == (3,)
        np.testing.assert_array_equal(env.action_space.low, [-1, 0, 0])
        obs, _ = env.reset(seed=123)
        frames, rewards = [obs], []
        for a in actions:
            obs, r, term, trunc, _ = env.step(a)
            frames.append(obs)
            rewards.append(r)
        env.close()
        runs.append((np.stack(frames), np.array(rewards)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][0].dtype == np.uint8 and runs[0][0].shape == (61, 64, 64, 3)


def test_different_seeds_give_different_tracks():
    env = make_env()
    a, _ = env.reset(seed=1)
    for _ in range(60):  # past the zoom-in
        a, *_ = env.step(np.zeros(3, np.float32))
    b, _ = env.reset(seed=2)
    for _ in range(60):
        b, *_ = env.step(np.zeros(3, np.float32))
    assert not np.array_equal(a, b)


def test_raw_env_keeps_96_pixel_frames():
    env = make_raw_env()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (96, 96, 3)


def test_runs_headless_without_a_display():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    code = "from worldmodels.env import make_env; e = make_env(); o, _ = e.reset(seed=0); print(o.shape)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(64, 64, 3)" in out.stdout
