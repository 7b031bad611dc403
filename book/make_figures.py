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


def score_vs_cpu_hours(cores: int = 2):
    """The shipped book run's controllers (full model, ablations) against CPU-hours, beside the paper's."""
    from worldmodels import pretrained
    from worldmodels.ablations import ABLATIONS

    run = pretrained.verify("book")
    curves = {"full model (z, h)": (run / "controller" / "history.csv", cores)}
    for name, ablation in ABLATIONS.items():
        path = run / "ablations" / name / "controller" / "history.csv"
        if path.exists():
            curves[ablation.label] = (path, cores)
    return viz.plot_score_vs_cpu_hours(curves)


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    raw = raw_frame()
    figures = {
        "raw_vs_transformed.png": viz.raw_vs_transformed(raw, transform_frame(raw)),
        "score_vs_cpu_hours.png": score_vs_cpu_hours(),
    }
    for name, fig in figures.items():
        fig.savefig(FIGURES / name, dpi=110)
        print(f"wrote {FIGURES / name}")


if __name__ == "__main__":
    main()
