"""The CarRacing-v3 environment as the agent sees it: 64x64x3 uint8 frames.

``make_env`` builds gymnasium's ``CarRacing-v3`` (continuous actions: steer in [-1, 1],
gas and brake in [0, 1]), or the package's bit-identical faster renderer
``worldmodels/CarRacing-v3``, and wraps it in :class:`FrameTransform`:

1. crop: keep rows 0-83 of the 96x96 frame, dropping the indicator bar at the bottom (the
   authors' code did this; the bar shows speed, steering and the gyroscope, which a
   controller that sees only z would otherwise lack, so cropping is a config flag);
2. resize to 64x64 with an antialiasing filter (Pillow's bilinear filter, which widens its
   support when shrinking, so thin lines average instead of flickering).

Rendering is software-only (pygame surfaces): no display or X server is needed.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from worldmodels import FAST_CARRACING_ID
from worldmodels.config import EnvConfig

UPSTREAM_ID = "CarRacing-v3"
FAST_ID = FAST_CARRACING_ID  # registered by `import worldmodels`
INDICATOR_ROWS = 84
"""Rows 0-83 of CarRacing's 96x96 frame show the track; rows 84-95 hold the indicator bar."""

ACTION_LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)


def transform_frame(frame: np.ndarray, crop: bool = True, size: int = 64) -> np.ndarray:
    """One 96x96x3 uint8 CarRacing frame to a size x size x 3 uint8 observation."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be an (H, W, 3) uint8 array, got {frame.shape} {frame.dtype}")
    if crop:
        frame = frame[:INDICATOR_ROWS]
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))


class FrameTransform(gym.ObservationWrapper):
    """Crop (optionally) and resize CarRacing's frames to size x size x 3 uint8."""

    def __init__(self, env: gym.Env, crop: bool = True, size: int = 64):
        super().__init__(env)
        self.crop, self.size = crop, size
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return transform_frame(observation, self.crop, self.size)


def make_env(cfg: EnvConfig | None = None, render_mode: str | None = None, **kwargs) -> gym.Env:
    """CarRacing-v3 with continuous actions and the observation transform of `cfg`.

    `render_mode` ('human', 'rgb_array') is passed to gymnasium; extra keyword arguments
    (for example ``max_episode_steps``) go to ``gymnasium.make``.
    """
    cfg = cfg or EnvConfig()
    env = gym.make(
        FAST_ID if cfg.fast_render else UPSTREAM_ID,
        render_mode=render_mode,
        continuous=True,
        domain_randomize=False,
        lap_complete_percent=0.95,
        **kwargs,
    )
    return FrameTransform(env, crop=cfg.crop_indicator_bar, size=cfg.frame_size)


def make_raw_env(fast_render: bool = False, **kwargs) -> gym.Env:
    """CarRacing-v3 without the transform (96x96 frames), upstream or the fast renderer."""
    return gym.make(FAST_ID if fast_render else UPSTREAM_ID, continuous=True, **kwargs)
