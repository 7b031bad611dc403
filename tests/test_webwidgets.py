"""The widgets whose models run in the browser (worldmodels.webwidgets), on the Python side and in the book's build."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from worldmodels import webwidgets
from worldmodels.mdrnn import MDRNN
from worldmodels.vae import VAE
from worldmodels.widgets import ACTIONS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import wm_widgets  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def posteriors():
    g = np.random.default_rng(0)
    mu = g.normal(size=(20, 8)).astype(np.float32)
    logvar = np.full((20, 8), -2.0, np.float32)
    logvar[:, 5:] = 0.0  # dimensions 5.. match the prior: KL 0, unused
    mu[:, 5:] = 0.0
    return mu, logvar


@pytest.fixture(scope="module")
def dream(posteriors):
    return webwidgets.dream_driver(VAE(z_size=8).eval(), MDRNN(z_size=8, hidden_size=16, reward_head=True).eval(), *posteriors, start=2)


def _answers(widget, name):
    sent = []
    widget.send = lambda content, buffers=None: sent.append((content, buffers or []))
    widget._answer(widget, {"asset": name}, [])
    return sent


def test_dream_driver_state(dream, posteriors):
    assert dream.kind == "dream" and dream.component == webwidgets.COMPONENT
    assert dream.actions == [[k, list(v)] for k, v in ACTIONS.items()]
    assert dream.meta["dims"] == [0, 1, 2, 3, 4]
    assert dream.meta["z_start"] == [float(x) for x in posteriors[0][2]]
    assert dream.picture.startswith(b"\x89PNG")
    assert dream._esm.startswith("// V's decoder and M's dream in the browser")


def test_widget_sends_the_models_it_is_asked_for(dream):
    [(content, buffers)] = _answers(dream, "dream_step.onnx")
    assert content == {"asset": "dream_step.onnx"} and buffers == [dream.assets["dream_step.onnx"]]
    [(content, buffers)] = _answers(dream, "vae.pt")
    assert content["error"] == "no asset 'vae.pt'; this widget has ['decoder.onnx', 'dream_step.onnx']" and buffers == []


def test_dream_driver_lets_c_drive_when_given_one(posteriors):
    import onnxruntime as ort

    from worldmodels.controller import Controller, n_params

    w = webwidgets.dream_driver(VAE(z_size=8).eval(), MDRNN(z_size=8, hidden_size=16).eval(), *posteriors,
                                controller=Controller("zh", 8, 16, params=np.full(n_params("zh", 8, 16), 0.1)))
    assert w.meta["controller"] is True
    inputs = [i.name for i in ort.InferenceSession(w.assets["dream_step.onnx"]).get_inputs()]
    assert inputs == ["z", "action", "h", "c", "tau", "u", "eps", "autopilot"]


def test_latent_explorer_has_only_the_decoder(posteriors):
    w = webwidgets.latent_explorer(VAE(z_size=8).eval(), *posteriors)
    assert w.kind == "latent" and sorted(w.assets) == ["decoder.onnx"]


def test_dream_driver_needs_m(posteriors):
    with pytest.raises(ValueError, match="dream_driver needs M"):
        webwidgets.dream_driver(VAE(z_size=8), None, *posteriors)


def test_book_build_shows_the_picture_and_keeps_the_state_for_the_page(dream):
    state = {
        "w": {"model_name": "AnyModel", "model_module": "anywidget", "state": {**dream.get_state(), "picture": None},
              "buffers": [{"path": ["picture"], "encoding": "base64", "data": base64.b64encode(dream.picture).decode()}]},
        "s": {"model_name": "IntSliderModel", "model_module": "@jupyter-widgets/controls", "state": {}},
    }
    state["w"]["state"].pop("layout")
    assert wm_widgets.is_web_widget(state, "w") and not wm_widgets.is_web_widget(state, "s")
    assert not wm_widgets.needs_kernel(state, "w")
    assert wm_widgets.shown_image(state, "w") == (dream.picture, "png")
    html = wm_widgets.widget_html(state, "<script>view</script>", "w")
    saved = json.loads(html.split('class="wm-web-state">')[1].split("</script>")[0])
    assert saved == {k: dream.get_state()[k] for k in ("kind", "scale", "tau", "seed", "actions", "meta")}
    assert "<script>view</script>" not in html and base64.b64encode(dream.picture).decode() in html
    page_state = json.loads(wm_widgets.without_web_widgets(json.dumps({"version_major": 2, "state": state})))
    assert list(page_state["state"]) == ["s"]


def test_book_build_warns_when_a_chapter_was_executed_at_another_scale(dream):
    state = {"w": {"model_name": "AnyModel", "state": dream.get_state()}}
    assert wm_widgets.web_widget_mismatches(state, dict(dream.meta)) == []
    assert wm_widgets.web_widget_mismatches(state, {**dream.meta, "z_size": 32}) == [
        "web widget w has z_size 8, the shipped book run's models 32"
    ]
