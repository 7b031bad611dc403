"""The book's figures and widgets, checked without a browser."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from ipywidgets.widgets.widget_link import Link
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from worldmodels import viz, widgets
from worldmodels.mdrnn import MDRNN
from worldmodels.vae import VAE


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(z_size=8).eval()


@pytest.fixture(scope="module")
def mdrnn():
    torch.manual_seed(1)
    return MDRNN(z_size=8, hidden_size=16, n_gaussians=3).eval()


def frames(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def jslinked(links, source, target):
    """A browser-side link from source to target is among `links`."""
    return any(
        isinstance(l, Link) and l.source == source and l.target == target for l in links
    )


def test_to_uint8_accepts_channels_first_tensors_and_floats():
    t = torch.rand(2, 3, 64, 64)
    out = viz.to_uint8(t)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    assert viz.to_uint8(np.ones((4, 4, 3))).max() == 255
    f = frames(1)
    assert viz.to_uint8(f) is f


def test_png_bytes_scales():
    from PIL import Image
    import io

    img = Image.open(io.BytesIO(viz.png_bytes(frames(1)[0], scale=3)))
    assert img.size == (192, 192)


def test_encode_decode_shapes(vae):
    mu = viz.encode(vae, frames(3))
    assert mu.shape == (3, 8)
    out = viz.decode(vae, mu)
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8


def test_static_figures(tmp_path):
    fig = viz.frame_grid(frames(10), ncols=4, titles=[str(i) for i in range(10)])
    assert len(fig.axes) == 12
    plt.close(fig)
    raw = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    fig = viz.raw_vs_transformed(raw, frames(1)[0])
    assert len(fig.axes) == 2
    plt.close(fig)
    fig = viz.reconstructions(frames(4), frames(4, seed=1))
    assert len(fig.axes) == 8
    plt.close(fig)
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,loss,kl\n0,3.0,1.0\n1,2.0,\n2,1.0,0.5\n")
    m = viz.read_metrics(csv)
    assert m["loss"].tolist() == [3.0, 2.0, 1.0] and np.isnan(m["kl"][1])
    fig = viz.plot_metrics(csv, ys=["loss", "kl", "absent"])
    assert len(fig.axes[0].lines) == 2
    plt.close(fig)
    fig = viz.plot_actions({"uniform": np.zeros((10, 3)), "brownian": np.ones((10, 3))})
    assert len(fig.axes) == 2
    plt.close(fig)
    track = np.stack([np.cos(np.linspace(0, 6, 50)), np.sin(np.linspace(0, 6, 50))], 1) * 50
    fig = viz.plot_paths(track, {"a": track[:10]}, zoom=20.0)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["track", "a", "start"]
    np.testing.assert_array_equal(np.column_stack(ax.lines[1].get_data()), track[:10])  # the path as given
    np.testing.assert_array_equal(np.column_stack(ax.lines[2].get_data()), track[9:10])  # its end
    start = track[0]
    assert ax.get_xlim() == pytest.approx((start[0] - 20, start[0] + 20))  # zoomed on the start
    assert ax.get_ylim() == pytest.approx((start[1] - 20, start[1] + 20))
    plt.close(fig)


def test_es_panels():
    hist = [
        {"generation": g, "mean": np.zeros(2), "cov": np.eye(2) * 0.1, "samples": np.zeros((6, 2))}
        for g in range(3)
    ]
    fig = viz.plot_es_generations(lambda x: (x**2).sum(-1), hist, ncols=2)
    assert len(fig.axes) == 4
    plt.close(fig)


def test_video_html_embeds_the_video():
    html = viz.video_html(frames(4), fps=4, scale=1)
    assert "base64," in html and ("<video" in html or "<img" in html)


def test_precomputed_slider_changes_the_shown_image():
    box = widgets.precomputed_slider(frames(4), labels=list("abcd"))
    first = widgets.shown_image(box)
    box.slider.value = 2
    assert box.stack.selected_index == 2
    assert widgets.shown_image(box) != first
    assert widgets.shown_image(box) == bytes(box.stack.children[2].value)
    box.play.value = 3  # the Play button drives the slider
    assert box.slider.value == 3 and box.stack.selected_index == 3
    # linked in the browser too, so that the static HTML works without a kernel
    assert jslinked(box.links, (box.slider, "value"), (box.stack, "selected_index"))
    assert jslinked(box.links, (box.play, "value"), (box.slider, "value"))


def test_precomputed_slider_rejects_no_frames():
    with pytest.raises(ValueError):
        widgets.precomputed_slider(np.zeros((0, 64, 64, 3), np.uint8))


def test_precomputed_traversal(vae):
    z0 = np.zeros(8, np.float32)
    box = widgets.precomputed_traversal(vae, z0, dims=[0, 3], values=[-2.0, 0.0, 2.0])
    assert box.slider.value == 1
    before = widgets.shown_image(box)
    box.slider.value = 0
    after_value = widgets.shown_image(box)
    assert after_value != before
    box.dim.index = 1
    assert box.stack.selected_index == 1
    assert widgets.shown_image(box) != after_value
    assert jslinked(box.links, (box.dim, "index"), (box.stack, "selected_index"))


def test_traversal_frames_sets_one_dimension(vae):
    grid = widgets.traversal_frames(vae, np.zeros(8), dims=[1], values=[0.0, 1.0])
    assert grid.shape == (1, 2, 64, 64, 3)
    assert np.array_equal(grid[0, 0], viz.decode(vae, np.zeros((1, 8)))[0])


def test_traversal_widget_sliders_change_the_decoded_image(vae):
    box = widgets.traversal_widget(vae, frames(3), dims=[0, 1, 2])
    before = bytes(box.image.value)
    box.sliders[1].value = 2.5
    assert box.z[1] == pytest.approx(2.5)
    assert bytes(box.image.value) != before
    # picking another frame loads its code into the sliders and shows it
    original = bytes(box.original.value)
    box.frame.value = 2
    assert bytes(box.original.value) != original
    mu = viz.encode(vae, frames(3))[2]
    assert box.sliders[0].value == pytest.approx(float(np.clip(mu[0], -3, 3)), abs=1e-6)


def test_dream_frames_and_temperature(vae, mdrnn):
    a = np.tile([0.0, 0.5, 0.0], (5, 1))
    f1 = widgets.dream_frames(vae, mdrnn, np.zeros(8), a, tau=1.0, seed=3)
    f2 = widgets.dream_frames(vae, mdrnn, np.zeros(8), a, tau=1.0, seed=3)
    assert f1.shape == (6, 64, 64, 3)
    assert np.array_equal(f1, f2)  # seeded

    def spread(tau):
        """How far two dreams of other seeds drift apart at temperature tau (mean pixel difference)."""
        d1, d2 = (widgets.dream_frames(vae, mdrnn, np.zeros(8), a, tau=tau, seed=s).astype(int) for s in (3, 4))
        assert np.array_equal(d1[0], f1[0])  # the first frame is z0's, at any temperature
        return np.abs(d1 - d2).mean()

    # A cold dream stays near M's most likely next z whatever the seed; a hot one wanders.
    cold, warm, hot = spread(0.01), spread(0.5), spread(1.5)
    assert cold < warm < hot and hot > 5 * cold


def test_precomputed_dream(vae, mdrnn):
    box = widgets.precomputed_dream(vae, mdrnn, np.zeros(8), temperatures=(0.5, 1.5), steps=3)
    start = widgets.shown_image(box)
    box.slider.value = 3
    later = widgets.shown_image(box)
    assert later != start
    box.temperature.index = 1
    assert box.stack.children[0].selected_index == 1
    box.action.index = 2
    assert box.stack.selected_index == 2
    assert jslinked(box.links, (box.action, "index"), (box.stack, "selected_index"))


def test_dream_widget_buttons_step_the_dream(vae, mdrnn):
    box = widgets.dream_widget(vae, mdrnn, np.zeros(8))
    start = bytes(box.image.value)
    box.buttons["left"].click()
    assert box.t == 1
    assert bytes(box.image.value) != start
    box.temperature.value = 0.1
    box.buttons["gas"].click()
    assert box.t == 2
    box.reset.click()
    assert box.t == 0 and bytes(box.image.value) == start


def test_figure_to_array_and_video_file(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1])
    rgb = viz.figure_to_array(fig, dpi=50)
    assert rgb.shape == (50, 100, 3) and rgb.dtype == np.uint8
    gif = viz.save_video(frames(3), tmp_path / "v.gif", fps=5)
    assert viz.video_file_html(gif).startswith('<img src="data:image/gif;base64,')


def test_score_against_cpu_hours_beside_the_papers_curve(tmp_path):
    history = tmp_path / "history.csv"  # four generations of 36 s, validated at 1 and 3; no cumulative column
    history.write_text("generation,val_mean,seconds\n0,,36\n1,500.0,36\n2,,36\n3,600.0,36\n")
    hours, scores = viz.score_vs_cpu_hours(history, cores=2)
    np.testing.assert_allclose(hours, [72 / 3600 * 2, 144 / 3600 * 2])
    assert scores.tolist() == [500.0, 600.0]
    assert [(p.generation, p.score, p.days) for p in viz.PAPER_CURVE] == [(25, 822.9, 0.65), (200, 880.0, 4.8),
                                                                          (1800, 900.46, 46.6)]
    with pytest.raises(ValueError, match="cores = 0"):
        viz.score_vs_cpu_hours(history, cores=0)
    fig = viz.plot_score_vs_cpu_hours({"book": (history, 2)})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    ours, paper = ax.lines[0], ax.lines[1]
    np.testing.assert_allclose(ours.get_xdata(), [0.04, 0.08])
    np.testing.assert_allclose(ours.get_ydata(), [500.0, 600.0])
    np.testing.assert_allclose(paper.get_xdata(), [0.65 * 24 * 64, 4.8 * 24 * 64, 46.6 * 24 * 64])
    np.testing.assert_allclose(paper.get_ydata(), [822.9, 880.0, 900.46])
    assert [line.get_marker() for line in ax.lines[2:]] == ["o", "^", "o"]  # >= 880 is a lower bound
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["book", "paper (64 cores)"]
    later = viz.plot_score_vs_cpu_hours({"started after 3 CPU-hours": (history, 2, 3.0)}).axes[0].lines[0]
    np.testing.assert_allclose(later.get_xdata(), [3.04, 3.08])  # a run that began from another's controller
    plt.close(fig)
