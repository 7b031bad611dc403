"""Widgets whose models run in the reader's browser: V's latent explorer and a drive in M's dream.

One JavaScript module, ``webwidgets.js`` (an anywidget: ``render({model, el})``), runs V's
decoder and M's dream step with onnxruntime-web (:mod:`worldmodels.webmodels` writes them).
In a running kernel the widget below sends the models to the page when it asks for them;
in the book's static pages the same module runs from the build's ``_static`` with the
models the build exported (``book/_ext/wm_widgets.py``), no kernel needed. The widget's
``picture`` (V's decoding of the start frame) is what a reader without JavaScript sees.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import anywidget
import numpy as np
import traitlets

from worldmodels.viz import decode, png_bytes
from worldmodels.webmodels import DECODER_FILE, DREAM_STEP_FILE, export_web_models
from worldmodels.widgets import ACTIONS

COMPONENT = "worldmodels.webwidgets"
"""The value of every web widget's ``component`` trait: how the book's build recognises them."""
ESM = Path(__file__).with_name("webwidgets.js")

CSS = Path(__file__).with_name("webwidgets.css")


class WebWidget(anywidget.AnyWidget):
    """A widget whose models run in the browser (see the module's docstring).

    ``kind`` is ``"latent"`` (a slider for each dimension V uses, the decoded frame) or
    ``"dream"`` (buttons and keys step M from the start frame's code at temperature ``tau``).
    Build one with :func:`latent_explorer` or :func:`dream_driver`.
    """

    _esm = ESM
    _css = CSS
    component = traitlets.Unicode(COMPONENT).tag(sync=True)
    kind = traitlets.Enum(["latent", "dream"], default_value="latent").tag(sync=True)
    scale = traitlets.Int(4).tag(sync=True)
    tau = traitlets.Float(1.0).tag(sync=True)
    seed = traitlets.Int(0).tag(sync=True)
    actions = traitlets.List().tag(sync=True)
    """The dream's actions, in the order of their buttons: [name, [steer, gas, brake]] each."""
    meta = traitlets.Dict().tag(sync=True)
    """``web_models.json`` of the models (:func:`worldmodels.webmodels.export_web_models`)."""
    picture = traitlets.Bytes().tag(sync=True)

    def __init__(self, assets: Mapping[str, bytes], **kwargs):
        super().__init__(**kwargs)
        self.assets = dict(assets)
        self.on_msg(self._answer)

    def _answer(self, _widget, content, _buffers) -> None:
        name = content.get("asset") if isinstance(content, dict) else None
        if name is None:
            return
        if name not in self.assets:
            self.send({"asset": name, "error": f"no asset {name!r}; this widget has {sorted(self.assets)}"})
            return
        self.send({"asset": name}, [self.assets[name]])


def _assets(vae, mdrnn, mu, logvar, start: int, controller=None) -> tuple[dict[str, bytes], dict]:
    with tempfile.TemporaryDirectory() as folder:
        exported = export_web_models(vae, mdrnn, mu, logvar, folder, start=start, controller=controller)
        names = [DECODER_FILE] + ([DREAM_STEP_FILE] if mdrnn is not None else [])
        return {n: (Path(folder) / n).read_bytes() for n in names}, exported.meta


def latent_explorer(vae, mu: np.ndarray, logvar: np.ndarray, start: int = 0, scale: int = 4) -> WebWidget:
    """V's latent explorer: one slider for each dimension V uses, starting from frame `start`'s code.

    ``mu`` and ``logvar`` (N, z_size) are V's posteriors of real frames (see
    :func:`worldmodels.webmodels.export_web_models`).
    """
    assets, meta = _assets(vae, None, mu, logvar, start)
    picture = png_bytes(decode(vae, np.asarray(meta["z_start"], np.float32)[None])[0], scale)
    return WebWidget(assets, kind="latent", scale=scale, picture=picture, meta=meta)


def dream_driver(
    vae,
    mdrnn,
    mu: np.ndarray,
    logvar: np.ndarray,
    start: int = 0,
    tau: float = 1.0,
    scale: int = 4,
    seed: int = 0,
    actions: Mapping[str, Sequence[float]] | None = None,
    controller=None,
) -> WebWidget:
    """Drive in M's dream from frame `start`'s code: each action (default ``worldmodels.widgets.ACTIONS``)
    is one step of M at temperature `tau` (a slider in the page), with M's predicted reward.

    With a `controller` (:class:`worldmodels.controller.Controller`) a button lets C drive.
    """
    if mdrnn is None:
        raise ValueError("dream_driver needs M (mdrnn), got None")
    assets, meta = _assets(vae, mdrnn, mu, logvar, start, controller)
    picture = png_bytes(decode(vae, np.asarray(meta["z_start"], np.float32)[None])[0], scale)
    actions = [[k, [float(x) for x in v]] for k, v in (actions or ACTIONS).items()]
    return WebWidget(assets, kind="dream", scale=scale, tau=tau, seed=seed, actions=actions, picture=picture, meta=meta)
