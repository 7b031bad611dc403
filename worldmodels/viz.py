"""Figures and videos for the book; its widgets are in :mod:`worldmodels.widgets`.

Every interactive figure of the book comes in three layers:

1. a static matplotlib figure (``frame_grid``, ``raw_vs_transformed``, ``plot_metrics``, ...),
   which every reader sees, on paper too;
2. a widget of *precomputed* frames whose controls are linked in the browser with
   ``ipywidgets.jslink`` (:mod:`worldmodels.widgets`: ``precomputed_slider``, ``precomputed_traversal``,
   ``precomputed_dream``): each frame is an ``Image`` inside a ``Stack`` whose
   ``selected_index`` follows a slider or a toggle, so the widget works in the static
   HTML of the book, with no kernel;
3. a live widget for a running kernel (``traversal_widget``, ``dream_widget``), which
   calls V and M on every change.

In the book's static pages (``book/_ext/wm_widgets.py``), each widget's place also holds the
picture it showed when the chapter was executed: hidden once a precomputed widget renders,
shown with a note that a kernel is needed in place of a live widget's inert controls.

The precomputed widgets also link their controls in Python (``ipywidgets.link``), so that
tests and a running kernel see the same effect as the browser; :func:`worldmodels.widgets.shown_image` returns
the PNG bytes a widget currently shows.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

# --- frames ------------------------------------------------------------------------------


def to_uint8(frames) -> np.ndarray:
    """Frames as uint8 (..., H, W, 3) numpy arrays.

    Accepts uint8 arrays (returned as they are), float arrays or tensors in [0, 1] with
    channels last, and torch tensors with channels first (..., 3, H, W) as V's decoder
    returns them.
    """
    if isinstance(frames, torch.Tensor):
        t = frames.detach().cpu()
        if t.ndim >= 3 and t.shape[-3] == 3 and t.shape[-1] != 3:
            t = t.movedim(-3, -1)
        frames = t.numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(frame, scale: int = 1) -> bytes:
    """One frame (H, W, 3) as PNG bytes, optionally enlarged `scale` times (nearest neighbour)."""
    from PIL import Image

    img = Image.fromarray(to_uint8(frame))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@torch.no_grad()
def decode(vae, z) -> np.ndarray:
    """Decode latent codes (N, z_size) with V into uint8 frames (N, 64, 64, 3)."""
    z = torch.as_tensor(np.asarray(z, np.float32) if not isinstance(z, torch.Tensor) else z)
    weight = next(vae.parameters())
    return to_uint8(vae.decode(z.to(weight.device, weight.dtype).reshape(-1, vae.z_size)))


@torch.no_grad()
def encode(vae, frames) -> np.ndarray:
    """The posterior means mu (N, z_size) of uint8 frames (N, 64, 64, 3)."""
    from worldmodels.vae import frames_to_tensor

    weight = next(vae.parameters())
    x = frames_to_tensor(np.asarray(frames)).to(weight.device, weight.dtype)
    return vae.encode(x)[0].cpu().numpy()


# --- static figures ------------------------------------------------------------------------


def frame_grid(
    frames,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    size: float = 1.3,
    suptitle: str | None = None,
):
    """A grid of frames (N, H, W, 3) as a matplotlib figure; returns the figure.

    `frames` may also be (rows, cols, H, W, 3), one row per group, labelled by `row_labels`.
    """
    import matplotlib.pyplot as plt

    frames = to_uint8(frames)
    if frames.ndim == 5:
        nrows, ncols = frames.shape[:2]
        frames = frames.reshape(-1, *frames.shape[2:])
    else:
        ncols = max(1, min(ncols, len(frames)))
        nrows = -(-len(frames) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if k < len(frames):
            ax.imshow(frames[k], interpolation="nearest")
            if titles is not None and k < len(titles):
                ax.set_title(titles[k], fontsize=8)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r, 0].set_ylabel(label, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def raw_vs_transformed(raw: np.ndarray, transformed: np.ndarray, crop_rows: int = 84):
    """CarRacing's raw 96x96 frame beside the 64x64 observation the agent sees.

    A dashed line marks where the crop cuts off the indicator bar.
    """
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(7, 3.6))
    a.imshow(to_uint8(raw), interpolation="nearest")
    a.axhline(crop_rows - 0.5, color="yellow", ls="--", lw=1.5)
    a.set_title(f"raw frame {raw.shape[0]}x{raw.shape[1]}\n(below the line: indicator bar)", fontsize=9)
    b.imshow(to_uint8(transformed), interpolation="nearest")
    b.set_title(f"observation {transformed.shape[0]}x{transformed.shape[1]}\n(rows 0-{crop_rows - 1}, resized)", fontsize=9)
    for ax in (a, b):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def reconstructions(originals, recons, n: int = 8, labels: tuple[str, str] = ("frame", "V's reconstruction")):
    """Two rows: frames on top, their reconstructions below; returns the figure."""
    originals, recons = to_uint8(originals)[:n], to_uint8(recons)[:n]
    return frame_grid(np.stack([originals, recons]), row_labels=list(labels))


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """A metrics CSV (a header row, then one row per logging step) as column -> array.

    Numeric columns become float arrays (empty cells NaN); other columns stay strings.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r.get(key, "") for r in rows]
        try:
            out[key] = np.array([float(v) if v not in ("", None) else np.nan for v in values])
        except ValueError:
            out[key] = np.array(values)
    return out


def plot_metrics(
    metrics: Mapping[str, np.ndarray] | str | Path,
    ys: Sequence[str] | None = None,
    x: str | None = None,
    title: str | None = None,
    logy: bool = False,
    ax=None,
):
    """Training curves: each column of `ys` against column `x` (default: the first column).

    `metrics` is a mapping column -> values or the path of a CSV (see :func:`read_metrics`).
    Columns that are absent are skipped, so one call fits several kinds of logs.
    """
    import matplotlib.pyplot as plt

    if not isinstance(metrics, Mapping):
        metrics = read_metrics(metrics)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
    else:
        fig = ax.figure
    keys = list(metrics)
    x = x if x is not None else (keys[0] if keys else None)
    ys = [k for k in (ys if ys is not None else keys) if k in metrics and k != x]
    for key in ys:
        y = np.asarray(metrics[key], float)
        xs = np.asarray(metrics[x], float) if x in metrics else np.arange(len(y))
        ok = ~np.isnan(y)
        ax.plot(xs[ok], y[ok], marker="." if ok.sum() < 30 else None, label=key)
    ax.set_xlabel(x or "step")
    if logy:
        ax.set_yscale("log")
    if ys:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_actions(actions: Mapping[str, np.ndarray], names: Sequence[str] = ("steer", "gas", "brake")):
    """Action trajectories (T, 3) of several policies, one row of panels per policy."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(actions), 1, figsize=(7, 1.9 * len(actions)), sharex=True, squeeze=False)
    for ax, (label, a) in zip(axes[:, 0], actions.items()):
        for j, name in enumerate(names):
            ax.plot(np.asarray(a)[:, j], lw=1, label=name)
        ax.set_ylabel(label)
        ax.set_ylim(-1.1, 1.1)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(ncol=3, fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def plot_paths(track_xy: np.ndarray, paths: Mapping[str, np.ndarray], zoom: float | None = 60.0):
    """The track's centre line and the car's positions (T, 2) under several policies.

    `zoom` limits the view to that many metres around the start (None: the whole track).
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    track_xy = np.asarray(track_xy)
    ax.plot(*np.vstack([track_xy, track_xy[:1]]).T, color="0.6", lw=6, alpha=0.5, label="track")
    for label, p in paths.items():
        p = np.asarray(p)
        ax.plot(p[:, 0], p[:, 1], lw=1.5, label=label)
        ax.plot(*p[-1], "o", color=ax.lines[-1].get_color())
    start = np.asarray(next(iter(paths.values())))[0] if paths else track_xy[0]
    ax.plot(*start, "k*", ms=10, label="start")
    if zoom is not None:
        ax.set_xlim(start[0] - zoom, start[0] + zoom)
        ax.set_ylim(start[1] - zoom, start[1] + zoom)
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    fig.tight_layout()
    return fig


def video_html(frames, fps: int = 25, scale: int = 3) -> str:
    """An HTML ``<video>`` tag with the frames as an embedded MP4 (H.264), for notebooks.

    Falls back to an animated GIF ``<img>`` when no ffmpeg is available.
    """
    import imageio.v3 as iio
    from PIL import Image

    frames = to_uint8(frames)
    if scale != 1:
        frames = np.stack(
            [np.asarray(Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)) for f in frames]
        )
    try:
        data = iio.imwrite("<bytes>", frames, extension=".mp4", fps=fps, codec="libx264", macro_block_size=16)
        b64 = base64.b64encode(data).decode()
        return f'<video controls loop width="{frames.shape[2]}" src="data:video/mp4;base64,{b64}"></video>'
    except Exception:  # no ffmpeg plugin: a GIF plays everywhere
        data = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
        b64 = base64.b64encode(data).decode()
        return f'<img src="data:image/gif;base64,{b64}" width="{frames.shape[2]}"/>'


def video_file_html(path: str | Path, width: int | None = None) -> str:
    """An HTML tag embedding a video file (.mp4 as ``<video>``, .gif as ``<img>``) as a data URI."""
    path = Path(path)
    b64 = base64.b64encode(path.read_bytes()).decode()
    size = f' width="{width}"' if width else ""
    if path.suffix.lower() == ".gif":
        return f'<img src="data:image/gif;base64,{b64}"{size}/>'
    return f'<video controls loop{size} src="data:video/mp4;base64,{b64}"></video>'


def figure_to_array(fig, dpi: int = 80) -> np.ndarray:
    """Render a matplotlib figure to an RGB uint8 array (H, W, 3) and close it."""
    import matplotlib.pyplot as plt

    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def save_video(frames, path: str | Path, fps: int = 25) -> Path:
    """Write frames (T, H, W, 3) to a video file (format from the suffix: .mp4, .gif)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        iio.imwrite(path, to_uint8(frames), duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, to_uint8(frames), fps=fps)
    return path


# --- the score against compute --------------------------------------------------------------


class PaperPoint(NamedTuple):
    """One point of the paper's CarRacing learning curve."""

    generation: int
    score: float
    """The mean's score on the authors' 1,024 validation episodes."""
    days: float
    """Wall time since the start of the controller's training."""
    at_least: bool = False
    """The log gives a lower bound (">= 880"), not the score itself."""


PAPER_CURVE = (PaperPoint(25, 822.9, 0.65), PaperPoint(200, 880.0, 4.8, at_least=True), PaperPoint(1800, 900.46, 46.6))
"""The paper's controller on CarRacing: score against generation and days (Ha & Schmidhuber 2018,
arXiv 1803.10122, and the CarRacing training log of the authors' code, hardmaru/WorldModelsExperiments)."""
PAPER_CORES = 64
"""Cores of the machine that ran :data:`PAPER_CURVE` (one worker per core, 64 candidates per generation)."""


def cpu_hours(days: float, cores: int) -> float:
    """Wall days on `cores` cores as CPU-hours."""
    return days * 24 * cores


def score_vs_cpu_hours(
    history: list[dict] | str | Path, cores: int, start_hours: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A controller's learning curve in compute: (CPU-hours, validation mean) at each validated generation.

    `history` is a run's ``history.csv`` (or its rows, :func:`worldmodels.evolution.read_history`);
    CPU-hours are `start_hours` (the compute of the controllers it started from, if any) plus the
    cumulative wall seconds / 3600 times `cores`, the cores that ran it.
    """
    from worldmodels.evolution import read_history

    if cores < 1:
        raise ValueError(f"cores = {cores}: the cores that ran the history must be 1 or more")
    rows = read_history(history) if isinstance(history, (str, Path)) else history
    validated = [r for r in rows if r.get("val_mean") is not None]
    hours = np.array([start_hours + r["cumulative_seconds"] / 3600 * cores for r in validated], dtype=float)
    return hours, np.array([r["val_mean"] for r in validated], dtype=float)


def plot_score_vs_cpu_hours(
    runs: Mapping[str, tuple[list[dict] | str | Path, int] | tuple[list[dict] | str | Path, int, float]], ax=None
):
    """Validation mean against CPU-hours (log scale) of each run, beside the paper's curve.

    `runs` maps a label to (its history, the cores that ran it) or (its history, cores, the
    CPU-hours it starts at); see :func:`score_vs_cpu_hours`.
    The paper's points (:data:`PAPER_CURVE`, on :data:`PAPER_CORES` cores) are labelled with their
    generation; the one the log gives as a lower bound is drawn as an upward triangle.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
    else:
        fig = ax.figure
    for label, curve in runs.items():
        hours, scores = score_vs_cpu_hours(*curve)
        ax.plot(hours, scores, marker=".", label=label)
    x = [cpu_hours(p.days, PAPER_CORES) for p in PAPER_CURVE]
    y = [p.score for p in PAPER_CURVE]
    ax.plot(x, y, color="k", ls=":", lw=1, label=f"paper ({PAPER_CORES} cores)")
    for p, xi in zip(PAPER_CURVE, x):
        ax.plot(xi, p.score, "k^" if p.at_least else "ko", ms=6)
        ax.annotate(f"{'≥ ' if p.at_least else ''}{p.score:g}, gen. {p.generation}", (xi, p.score),
                    textcoords="offset points", xytext=(-6, 7), ha="right", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("CPU-hours of the controller's evolution (wall hours × cores)")
    ax.set_ylabel("validation mean")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# --- the toy problem of chapter 5 ------------------------------------------------------------


def plot_es_generations(
    f: Callable[[np.ndarray], np.ndarray],
    history: Iterable[dict],
    lim: float = 3.0,
    ncols: int = 4,
):
    """Panels of a 2-D evolution strategy: the function's contours, each generation's
    samples, the search distribution's mean and its 1- and 2-sigma ellipses.

    `history` holds dicts with ``mean`` (2,), ``cov`` (2, 2), ``samples`` (n, 2) and
    optionally ``generation``.
    """
    import matplotlib.pyplot as plt

    history = list(history)
    nrows = -(-len(history) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), squeeze=False)
    g = np.linspace(-lim, lim, 200)
    X, Y = np.meshgrid(g, g)
    Z = f(np.stack([X, Y], -1))
    # log-spaced levels for a non-negative function, so that the valley floor shows
    levels = np.geomspace(max(Z.min(), 1e-3 * Z.max()) + 1e-3, Z.max(), 15) if Z.min() >= 0 else 15
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])
    for ax, h in zip(axes.flat, history):
        ax.contour(X, Y, Z, levels=levels, cmap="viridis", linewidths=0.6)
        s = np.asarray(h["samples"])
        ax.scatter(s[:, 0], s[:, 1], s=8, color="tab:red", zorder=3)
        m = np.asarray(h["mean"])
        vals, vecs = np.linalg.eigh(np.asarray(h["cov"]))
        root = vecs @ np.diag(np.sqrt(np.maximum(vals, 0)))
        for k in (1, 2):
            e = m[:, None] + k * root @ circle
            ax.plot(e[0], e[1], color="k", lw=1, ls="-" if k == 1 else ":")
        ax.plot(*m, "k+", ms=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"generation {h.get('generation', '?')}", fontsize=9)
    for ax in list(axes.flat)[len(history):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
