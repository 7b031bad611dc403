"""World Models (Ha & Schmidhuber, 2018) in PyTorch on gymnasium's CarRacing-v3.

``import worldmodels as wm`` is light: each submodule (``wm.config``, ``wm.data``,
``wm.vae``, ...) is imported the first time it is used.
"""

import importlib

__version__ = "0.1.0"

FAST_CARRACING_ID = "worldmodels/CarRacing-v3"
"""Gymnasium id of the package's bit-identical, faster CarRacing-v3 renderer."""

_SUBMODULES = (
    "ablations", "carracing", "checkpoint", "cli", "config", "controller", "data", "datasets", "dream", "env", "evaluation",
    "evolution", "final", "fit", "iterate", "mdrnn", "parallel", "prefetch", "pretrained", "quality", "rollout", "runs", "tasks", "train", "vae",
    "viz", "webmodels", "webwidgets", "widgets",
)


def register_envs() -> None:
    """Register ``worldmodels/CarRacing-v3`` (the fast, bit-identical renderer) with gymnasium.

    Called on import; idempotent. The entry point is a string, so nothing heavy
    (pygame, Box2D) is imported until the environment is made.
    """
    import gymnasium

    if FAST_CARRACING_ID not in gymnasium.registry:
        gymnasium.register(
            id=FAST_CARRACING_ID,
            entry_point="worldmodels.carracing:FastCarRacing",
            max_episode_steps=1000,
            reward_threshold=900,
        )


register_envs()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"worldmodels.{name}")
    raise AttributeError(f"module 'worldmodels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
