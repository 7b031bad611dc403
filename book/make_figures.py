"""Draw the static figures of the book's Markdown pages into book/figures/ (`make book` runs it).

    python book/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np

from worldmodels import viz
from worldmodels.env import make_raw_env, transform_frame

FIGURES = Path(__file__).resolve().parent / "figures"


def raw_frame(seed: int = 3, steps: int = 60) -> np.ndarray:
    """A 96x96 frame after the zoom-in animation, driving gently forward."""
    env = make_raw_env()
    obs, _ = env.reset(seed=seed)
    for t in range(steps):
        obs, *_ = env.step(np.array([0.0, 0.2 if t % 3 == 0 else 0.0, 0.0], np.float32))
    env.close()
    return obs


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    raw = raw_frame()
    fig = viz.raw_vs_transformed(raw, transform_frame(raw))
    fig.savefig(FIGURES / "raw_vs_transformed.png", dpi=110)
    print(f"wrote {FIGURES / 'raw_vs_transformed.png'}")


if __name__ == "__main__":
    main()
