"""The book's widgets: precomputed frames linked in the browser, and live widgets for a kernel.

Layer 2 of an interactive figure (see :mod:`worldmodels.viz`): each frame is an ``Image``
inside a ``Stack`` whose ``selected_index`` follows a slider or a toggle through
``ipywidgets.jslink``, so the widget works in the book's static HTML with no kernel; the
same controls are linked in Python too (``ipywidgets.link``), so that tests and a running
kernel see what the browser shows (:func:`shown_image`). Layer 3: ``traversal_widget`` and
``dream_widget`` call V and M on every change and need a running kernel.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import ipywidgets
import numpy as np
import torch

from worldmodels.viz import decode, encode, png_bytes, to_uint8


# --- layer 2: precomputed frames, linked in the browser -----------------------------------------


def _image(frame, scale: int, width: int | None):
    data = png_bytes(frame, scale)
    h, w = to_uint8(frame).shape[:2]
    px = width if width is not None else w * scale
    return ipywidgets.Image(value=data, format="png", width=px, height=int(round(px * h / w)))


def _stack(children, index: int = 0):
    return ipywidgets.Stack(children=list(children), selected_index=index)


def _link_both(source: tuple, target: tuple) -> list:
    """Link two traits in the browser (jslink) and in the kernel (link); returns both links."""
    return [ipywidgets.jslink(source, target), ipywidgets.link(source, target)]


def precomputed_slider(
    frames,
    description: str = "step",
    labels: Sequence[str] | None = None,
    scale: int = 3,
    width: int | None = None,
    play: bool = True,
    interval: int = 120,
):
    """A slider over precomputed frames that works without a kernel.

    Each frame becomes an ``Image`` in a ``Stack``; the slider's value is jslinked to the
    stack's ``selected_index`` (and, with `play`, a ``Play`` button to the slider), so the
    static HTML flips through the frames in the browser. Returns a ``VBox`` with
    attributes ``slider``, ``stack``, ``play`` (or None) and ``links``.
    """
    frames = to_uint8(frames)
    if len(frames) == 0:
        raise ValueError("precomputed_slider needs at least one frame")
    stack = _stack([_image(f, scale, width) for f in frames])
    slider = ipywidgets.IntSlider(value=0, min=0, max=len(frames) - 1, description=description, continuous_update=True)
    links = _link_both((slider, "value"), (stack, "selected_index"))
    controls = [slider]
    player = None
    if play:
        player = ipywidgets.Play(value=0, min=0, max=len(frames) - 1, interval=interval, description="play")
        links += _link_both((player, "value"), (slider, "value"))
        controls.insert(0, player)
    children = [ipywidgets.HBox(controls), stack]
    if labels is not None:
        caption = _stack([ipywidgets.Label(str(t)) for t in labels])
        links += _link_both((slider, "value"), (caption, "selected_index"))
        children.insert(1, caption)
    box = ipywidgets.VBox(children)
    box.slider, box.stack, box.play, box.links = slider, stack, player, links
    return box


def traversal_frames(vae, z0, dims: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """Decoded traversals: frame [i, j] has z0 with dimension dims[i] set to values[j].

    Returns uint8 (len(dims), len(values), 64, 64, 3).
    """
    z0 = np.asarray(z0, np.float32).reshape(-1)
    zs = np.repeat(z0[None, None], len(dims), 0).repeat(len(values), 1)
    for i, d in enumerate(dims):
        zs[i, :, d] = values
    return decode(vae, zs.reshape(-1, z0.size)).reshape(len(dims), len(values), *(64, 64, 3))


def precomputed_traversal(
    vae,
    z0,
    dims: Sequence[int],
    values: Sequence[float] = tuple(np.linspace(-3, 3, 13)),
    scale: int = 3,
):
    """Latent traversals one dimension at a time, precomputed, linked in the browser.

    A toggle picks the dimension (outer ``Stack``), one slider picks the value (the inner
    stacks' ``selected_index``). Returns a ``VBox`` with ``dim``, ``slider``, ``stack``
    (the outer one) and ``links``.
    """
    values = [float(v) for v in values]
    grid = traversal_frames(vae, z0, dims, values)
    mid = int(np.argmin(np.abs(np.asarray(values))))
    slider = ipywidgets.IntSlider(value=mid, min=0, max=len(values) - 1, description="value", readout=False)
    value_label = _stack([ipywidgets.Label(f"z = {v:+.2f}") for v in values], index=mid)
    inner = [_stack([_image(f, scale, None) for f in row], index=mid) for row in grid]
    outer = _stack(inner)
    dim = ipywidgets.ToggleButtons(options=[f"z[{d}]" for d in dims], description="dimension", index=0)
    dim.style.button_width = "56px"
    links = _link_both((dim, "index"), (outer, "selected_index"))
    for s in inner + [value_label]:
        links += _link_both((slider, "value"), (s, "selected_index"))
    box = ipywidgets.VBox([dim, ipywidgets.HBox([slider, value_label]), outer])
    box.dim, box.slider, box.stack, box.links = dim, slider, outer, links
    return box


def shown_image(widget) -> bytes:
    """The PNG bytes of the image a widget currently shows (follows Stacks and Boxes)."""
    w = getattr(widget, "stack", None) or getattr(widget, "image", None) or widget
    while True:
        if isinstance(w, ipywidgets.Image):
            return bytes(w.value)
        if isinstance(w, ipywidgets.Stack):
            w = w.children[w.selected_index]
        elif isinstance(w, ipywidgets.Box):
            images = [c for c in w.children if isinstance(c, (ipywidgets.Image, ipywidgets.Stack, ipywidgets.Box))]
            if not images:
                raise ValueError("no image in this widget")
            w = images[-1]
        else:
            raise ValueError(f"cannot find the shown image in {type(w).__name__}")


# --- layer 3: live widgets (need a kernel) ---------------------------------------------------


def traversal_widget(vae, frames, dims: Sequence[int] | None = None, value_range: float = 3.0, scale: int = 4):
    """Live latent traversal: pick a frame, move sliders on latent dimensions, see V decode.

    `frames` is (N, 64, 64, 3) uint8; the frame slider loads a frame's posterior mean into
    the latent sliders (`dims`, default the first 8). Returns a ``VBox`` with ``frame``,
    ``sliders``, ``image`` (the decoded frame), ``original`` and ``z`` (the current code).
    """
    frames = to_uint8(frames)
    mus = encode(vae, frames)
    dims = list(range(min(8, vae.z_size))) if dims is None else list(dims)
    frame = ipywidgets.IntSlider(value=0, min=0, max=len(frames) - 1, description="frame")
    sliders = [
        ipywidgets.FloatSlider(value=0.0, min=-value_range, max=value_range, step=0.05, description=f"z[{d}]", continuous_update=False)
        for d in dims
    ]
    original = ipywidgets.Image(value=png_bytes(frames[0], scale), format="png")
    image = ipywidgets.Image(value=png_bytes(decode(vae, mus[:1])[0], scale), format="png")
    reset = ipywidgets.Button(description="reset to the frame's z")
    box = ipywidgets.VBox(
        [
            ipywidgets.HBox([frame, reset]),
            ipywidgets.HBox([ipywidgets.VBox([ipywidgets.Label("frame"), original]), ipywidgets.VBox([ipywidgets.Label("decoded z"), image])]),
            ipywidgets.VBox(sliders),
        ]
    )
    box.frame, box.sliders, box.image, box.original, box.dims = frame, sliders, image, original, dims
    box.z = mus[0].copy()
    state = {"loading": False}

    def redraw(_=None):
        if state["loading"]:
            return
        z = mus[frame.value].copy()
        for d, s in zip(dims, sliders):
            z[d] = s.value
        box.z = z
        image.value = png_bytes(decode(vae, z[None])[0], scale)

    def load(_=None):
        state["loading"] = True
        for d, s in zip(dims, sliders):
            s.value = float(np.clip(mus[frame.value, d], -value_range, value_range))
        state["loading"] = False
        original.value = png_bytes(frames[frame.value], scale)
        redraw()

    frame.observe(load, names="value")
    reset.on_click(load)
    for s in sliders:
        s.observe(redraw, names="value")
    load()
    return box


ACTIONS = {
    "left": (-1.0, 0.3, 0.0),
    "straight": (0.0, 0.3, 0.0),
    "right": (1.0, 0.3, 0.0),
    "gas": (0.0, 1.0, 0.0),
    "brake": (0.0, 0.0, 0.8),
}
"""Named actions (steer, gas, brake) of the dream ipywidgets."""


@torch.no_grad()
def dream_frames(
    vae,
    mdrnn,
    z0,
    actions: np.ndarray,
    tau: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Dream from latent z0 under a sequence of actions (T, 3) at temperature `tau`.

    M predicts each next z from (z, a, h); the sampled z is decoded by V. Returns the
    uint8 frames (T + 1, 64, 64, 3), the first being V's decoding of z0.
    """
    from worldmodels.mdrnn import sample_next_z

    weight = next(mdrnn.parameters())
    g = torch.Generator(device=weight.device).manual_seed(seed)
    z = torch.as_tensor(np.asarray(z0, np.float32)).reshape(1, -1).to(weight.device, weight.dtype)
    state = None
    zs = [z]
    for a in np.asarray(actions, np.float32):
        out, state = mdrnn.step(z, torch.as_tensor(a).reshape(1, 3).to(weight.device, weight.dtype), state)
        z = sample_next_z(out, tau, g)
        zs.append(z)
    return decode(vae, torch.cat(zs))


def precomputed_dream(
    vae,
    mdrnn,
    z0,
    actions: Mapping[str, Sequence[float]] | None = None,
    temperatures: Sequence[float] = (0.5, 1.0, 1.5),
    steps: int = 16,
    scale: int = 3,
    seed: int = 0,
):
    """Dreams for a few fixed actions and temperatures, precomputed, linked in the browser.

    For each named action (held for `steps` steps) and each temperature, one dreamed
    sequence; toggles pick the action and the temperature, a slider (and Play) the step.
    Returns a ``VBox`` with ``action``, ``temperature``, ``slider``, ``stack``, ``links``.
    """
    actions = dict(actions) if actions is not None else {k: ACTIONS[k] for k in ("left", "straight", "right")}
    slider = ipywidgets.IntSlider(value=0, min=0, max=steps, description="step")
    player = ipywidgets.Play(value=0, min=0, max=steps, interval=150, description="play")
    links = _link_both((player, "value"), (slider, "value"))
    per_action = []
    temp_toggle = ipywidgets.ToggleButtons(options=[f"τ = {t:g}" for t in temperatures], description="temperature", index=0)
    action_toggle = ipywidgets.ToggleButtons(options=list(actions), description="action", index=0)
    for name, a in actions.items():
        per_temp = []
        for k, tau in enumerate(temperatures):
            frames = dream_frames(vae, mdrnn, z0, np.tile(np.asarray(a, np.float32), (steps, 1)), tau, seed + k)
            s = _stack([_image(f, scale, None) for f in frames])
            links += _link_both((slider, "value"), (s, "selected_index"))
            per_temp.append(s)
        t_stack = _stack(per_temp)
        links += _link_both((temp_toggle, "index"), (t_stack, "selected_index"))
        per_action.append(t_stack)
    outer = _stack(per_action)
    links += _link_both((action_toggle, "index"), (outer, "selected_index"))
    box = ipywidgets.VBox([action_toggle, temp_toggle, ipywidgets.HBox([player, slider]), outer])
    box.action, box.temperature, box.slider, box.stack, box.links = action_toggle, temp_toggle, slider, outer, links
    return box


def dream_widget(vae, mdrnn, z0, scale: int = 4, seed: int = 0, tau: float = 1.0):
    """Drive in the dream, live: action buttons step M, V decodes its sampled z.

    Each button press (left, straight, right, gas, brake) runs one step of M from the
    current (z, h) with that action, samples the next z at the slider's temperature and
    shows V's decoding of it. "reset" goes back to z0. Returns a ``VBox`` with
    ``buttons`` (name -> Button), ``temperature``, ``reset``, ``image``, ``z``, ``t``.
    """
    from worldmodels.mdrnn import sample_next_z

    weight = next(mdrnn.parameters())
    z_start = torch.as_tensor(np.asarray(z0, np.float32)).reshape(1, -1).to(weight.device, weight.dtype)
    temperature = ipywidgets.FloatSlider(value=tau, min=0.05, max=2.0, step=0.05, description="temperature τ")
    image = ipywidgets.Image(value=png_bytes(decode(vae, z_start)[0], scale), format="png")
    status = ipywidgets.Label("step 0")
    buttons = {name: ipywidgets.Button(description=name, layout=ipywidgets.Layout(width="80px")) for name in ACTIONS}
    reset = ipywidgets.Button(description="reset", button_style="warning", layout=ipywidgets.Layout(width="80px"))
    box = ipywidgets.VBox([ipywidgets.HBox(list(buttons.values()) + [reset]), temperature, status, image])
    box.buttons, box.temperature, box.reset, box.image = buttons, temperature, reset, image
    sim = {"z": z_start, "state": None, "t": 0, "g": torch.Generator(device=weight.device).manual_seed(seed)}
    box.z, box.t = z_start[0].cpu().numpy(), 0

    def act(name):
        def on_click(_=None):
            a = torch.tensor([ACTIONS[name]], dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                out, sim["state"] = mdrnn.step(sim["z"], a, sim["state"])
                sim["z"] = sample_next_z(out, temperature.value, sim["g"])
            sim["t"] += 1
            box.z, box.t = sim["z"][0].cpu().numpy(), sim["t"]
            status.value = f"step {sim['t']}: {name}"
            image.value = png_bytes(decode(vae, sim["z"])[0], scale)

        return on_click

    def on_reset(_=None):
        sim.update(z=z_start, state=None, t=0, g=torch.Generator(device=weight.device).manual_seed(seed))
        box.z, box.t = z_start[0].cpu().numpy(), 0
        status.value = "step 0"
        image.value = png_bytes(decode(vae, z_start)[0], scale)

    for name, b in buttons.items():
        b.on_click(act(name))
    reset.on_click(on_reset)
    return box
