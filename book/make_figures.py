"""Draw the static figures of the book's Markdown pages and of the README into book/figures/
(`make book` runs it).

    python book/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np

from worldmodels import viz
from worldmodels.env import make_raw_env, transform_frame
from worldmodels.runs import atomic_path

FIGURES = Path(__file__).resolve().parent / "figures"


def raw_frame(seed: int = 3, steps: int = 60) -> np.ndarray:
    """A 96x96 frame after the zoom-in animation, driving gently forward."""
    env = make_raw_env()
    obs, _ = env.reset(seed=seed)
    for t in range(steps):
        obs, *_ = env.step(np.array([0.0, 0.2 if t % 3 == 0 else 0.0, 0.0], np.float32))
    env.close()
    return obs


def score_against_compute(cores: int = 2) -> matplotlib.figure.Figure:
    """The README's figure: the shipped book run's controllers (full model, final stage, ablations) against
    CPU-hours on the `cores` that ran them, beside the paper's curve."""
    from worldmodels import pretrained
    from worldmodels.ablations import cpu_hour_curves

    return viz.plot_score_vs_cpu_hours(cpu_hour_curves(pretrained.verify("book"), cores))


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    raw = raw_frame()
    figures = {
        "raw_vs_transformed.png": viz.raw_vs_transformed(raw, transform_frame(raw)),
        "score_vs_cpu_hours.png": score_against_compute(),
    }
    for name, fig in figures.items():
        with atomic_path(FIGURES / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        print(f"wrote {FIGURES / name}")


if __name__ == "__main__":
    main()
