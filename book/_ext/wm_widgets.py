"""Sphinx extension: the book's widgets in the static HTML, with and without JavaScript.

* The pages load the widget manager (@jupyter-widgets/html-manager), RequireJS and MathJax
  from the build's own ``_static/vendor`` (copied from ``node_modules``, installed by
  ``npm ci`` from package-lock.json), never from a CDN, so that the book works offline.
* Each widget's place holds its static picture (layer 1 of the book's design): the image the
  widget showed when the chapter was executed, read from the notebook's saved widget state.
  A widget that works without a kernel (every control linked in the browser by ``jslink``)
  hides the picture once it has rendered (``wm-widgets.css``); a widget that needs a kernel
  shows the picture with a note that says so, instead of controls that would do nothing.
* ``wm-widgets.js`` adapts the widget manager to the theme: Font Awesome must not replace the
  ``<i>`` icons that ipywidgets' views update, and the manager's MathJax 2 call is served by
  MathJax 3.
* The widgets whose models run in the browser (``worldmodels.webwidgets``, anywidgets) are
  started by ``wm-web.js`` with the same module, ``worldmodels/webwidgets.js``, copied into
  ``_static``, and with V's decoder and M's dream step that the build exports from the shipped
  ``book`` run into ``_static/webmodels`` (never committed); onnxruntime-web comes from npm like
  the other vendor files. Their models are left out of the page's widget state, since the
  widget manager would fetch anywidget's front end from a CDN.
* A script that an extension registered twice (sphinx-thebe's ``THEBE_JS_URL`` and
  sphinx-togglebutton's settings) is written once.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
STATIC = Path(__file__).resolve().parent / "static"

VENDOR = {
    "html-manager": ("@jupyter-widgets/html-manager", "dist"),
    "requirejs": ("requirejs", "."),
    "mathjax": ("mathjax", "es5"),
}
"""Folder under ``_static/vendor`` -> (npm package, the folder of it that is copied)."""
VENDOR_FILES = {
    "onnxruntime-web": ("onnxruntime-web", "dist", ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")),
}
"""Folder under ``_static/vendor`` -> (npm package, its folder, the only files copied from it)."""
WEB_MODELS = "webmodels"
"""Folder under ``_static`` where the build writes the ONNX models of the web widgets."""
WEB_WIDGETS_JS = "wm-webwidgets.js"
"""Name under ``_static`` of ``worldmodels/webwidgets.js``, the web widgets' module."""
WEB_WIDGETS_CSS = "wm-webwidgets.css"
"""Name under ``_static`` of ``worldmodels/webwidgets.css``, their style."""

_SKIP = shutil.ignore_patterns("*.map", "embed.js", "libembed-amd.js", "*.LICENSE.txt", "bin", "*.md")

_CONTAINERS = {"BoxModel", "VBoxModel", "HBoxModel", "GridBoxModel", "StackModel", "TabModel", "AccordionModel"}
_DISPLAYS = {"ImageModel", "LabelModel", "HTMLModel", "HTMLMathModel", "ValidModel", "OutputModel"}
_LINKS = {"LinkModel", "DirectionalLinkModel"}


# --- the saved widget state -------------------------------------------------------------------


def widget_state(notebook: Path) -> dict:
    """The saved widget state of a notebook: model id -> {model_name, state, buffers}."""
    meta = json.loads(Path(notebook).read_text(encoding="utf-8")).get("metadata", {})
    return meta.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})


def _refs(value) -> list[str]:
    return re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(value))


def tree(state: dict, model_id: str) -> list[str]:
    """The ids of a widget and of every model it refers to (children, layouts, styles)."""
    seen: list[str] = []
    todo = [model_id]
    while todo:
        m = todo.pop()
        if m in seen or m not in state:
            continue
        seen.append(m)
        todo += _refs(state[m]["state"])
    return seen


def controls(state: dict, model_id: str) -> list[str]:
    """The ids of the controls (sliders, toggles, Play, buttons...) of a widget."""
    out = []
    for m in tree(state, model_id):
        name = state[m]["model_name"]
        if name.endswith(("LayoutModel", "StyleModel")) or name in _CONTAINERS | _DISPLAYS:
            continue
        out.append(m)
    return out


def needs_kernel(state: dict, model_id: str) -> bool:
    """Whether a widget needs a running kernel: one of its controls is not jslinked.

    A control that no link joins in the browser can only act through Python callbacks.
    """
    if is_web_widget(state, model_id):
        return False
    linked = set()
    for m in state.values():
        if m["model_name"] in _LINKS:
            for end in ("source", "target"):
                linked.update(_refs(m["state"].get(end)))
    return any(c not in linked for c in controls(state, model_id))


def _image_value(model: dict, trait: str = "value") -> bytes:
    for buf in model.get("buffers", []):
        if buf.get("path") == [trait]:
            return base64.b64decode(buf["data"])
    value = model["state"].get(trait, "")
    return base64.b64decode(value) if isinstance(value, str) else bytes(value)


def is_web_widget(state: dict, model_id: str) -> bool:
    """Whether a model is one of ``worldmodels.webwidgets``, whose models run in the browser."""
    model = state.get(model_id, {})
    return model.get("state", {}).get("component") == "worldmodels.webwidgets"


def shown_image(state: dict, model_id: str) -> tuple[bytes, str] | None:
    """The image (bytes, format) a widget showed when it was saved, following its Stacks
    and Boxes as ``worldmodels.widgets.shown_image`` does; None when it shows no image."""
    model = state.get(model_id)
    if model is None:
        return None
    name, s = model["model_name"], model["state"]
    if is_web_widget(state, model_id):
        return _image_value(model, "picture"), "png"
    if name == "ImageModel":
        return _image_value(model), s.get("format", "png")
    children = _refs(s.get("children", []))
    if name == "StackModel":
        index = s.get("selected_index")
        return shown_image(state, children[index]) if index is not None and index < len(children) else None
    if name in _CONTAINERS:
        for child in reversed(children):
            found = shown_image(state, child)
            if found is not None:
                return found
    return None


# --- the page's markup --------------------------------------------------------------------------


def _picture(state: dict, model_id: str) -> str:
    found = shown_image(state, model_id)
    if found is None:
        return ""
    data, fmt = found
    src = f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"
    return f'<img class="wm-widget-picture" src="{src}" alt="the picture the widget showed when the chapter was executed"/>'


_WEB_STATE = ("kind", "scale", "tau", "seed", "actions", "meta")
"""The traits of a web widget that its module reads in the static page."""


def web_widget_html(state: dict, model_id: str) -> str:
    """The place of a web widget: its picture, and its state for ``wm-web.js`` to start it."""
    saved = {k: state[model_id]["state"].get(k) for k in _WEB_STATE}
    script = json.dumps(saved).replace("</", "<\\/")
    return (
        f'<div class="wm-widget wm-web-widget" data-wm-model-id="{model_id}">'
        f'<div class="wm-widget-fallback">{_picture(state, model_id)}<p class="wm-widget-note wm-web-fallback-note">'
        "With JavaScript, this widget runs the book's models in your browser.</p></div>"
        '<div class="wm-web-view"></div>'
        f'<script type="application/json" class="wm-web-state">{script}</script></div>'
    )


def without_web_widgets(state_json: str) -> str:
    """A page's saved widget state (JSON) without the web widgets, which the widget manager cannot load offline."""
    saved = json.loads(state_json)
    state = saved.get("state", {})
    for model_id in [m for m in state if is_web_widget(state, m)]:
        del state[model_id]
    return json.dumps(saved)


def widget_html(state: dict, view_script: str, model_id: str) -> str:
    """The markup that replaces a widget view in the page (see the module's docstring)."""
    if is_web_widget(state, model_id):
        return web_widget_html(state, model_id)
    picture = _picture(state, model_id)
    if needs_kernel(state, model_id):
        return (
            f'<div class="wm-widget wm-needs-kernel" data-wm-model-id="{model_id}">'
            '<p class="wm-widget-note">This widget needs a running Python kernel: it calls the models '
            "on every change. Run the chapter in Jupyter, Colab or Binder to use it. Below, what it "
            "showed when the chapter was executed.</p>"
            f"{picture}</div>"
        )
    return (
        f'<div class="wm-widget wm-kernel-free" data-wm-model-id="{model_id}">'
        f'<div class="wm-widget-fallback">{picture}<p class="wm-widget-note">With JavaScript, '
        "this figure has controls that flip through its precomputed frames.</p></div>"
        f"{view_script}</div>"
    )


@lru_cache(maxsize=64)
def _notebook_state(path: str, mtime: float) -> dict:
    return widget_state(Path(path))


def replace_widget_views(app, doctree, docname: str) -> None:
    path = Path(app.env.doc2path(docname))
    if path.suffix != ".ipynb" or app.builder.format != "html":
        return
    state = _notebook_state(str(path), path.stat().st_mtime)
    for raw in list(doctree.findall(nodes.raw)):
        text = raw.astext()
        match = re.fullmatch(rf'\s*<script type="{re.escape(WIDGET_VIEW)}">(.*)</script>\s*', text, re.S)
        if not match:
            continue
        model_id = json.loads(html.unescape(match.group(1)))["model_id"]
        raw.replace_self(nodes.raw("", widget_html(state, text, model_id), format="html"))


# --- scripts and vendor files ---------------------------------------------------------------------


def vendor_source(srcdir: Path, package: str, folder: str) -> Path:
    path = Path(srcdir) / "node_modules" / package / folder
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: run `npm ci` in {srcdir} (the book's JavaScript comes from npm)")
    return path


def use_vendor_scripts(app, config) -> None:
    config.html_static_path.append(str(STATIC))
    for package, folder, *_ in list(VENDOR.values()) + list(VENDOR_FILES.values()):
        vendor_source(Path(app.srcdir), package, folder)
    config.nb_ipywidgets_js = {
        "vendor/requirejs/require.js": {},
        "vendor/html-manager/embed-amd.js": {},
    }
    config.mathjax_path = "vendor/mathjax/tex-mml-chtml.js"
    # the theme logs an error on a first visit when no default colour mode is set
    config.html_context.setdefault("default_mode", "auto")


def copy_vendor_files(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    for target, (package, folder) in VENDOR.items():
        src = vendor_source(Path(app.srcdir), package, folder)
        shutil.copytree(src, Path(app.outdir) / "_static" / "vendor" / target, ignore=_SKIP, dirs_exist_ok=True)
    for target, (package, folder, files) in VENDOR_FILES.items():
        src = vendor_source(Path(app.srcdir), package, folder)
        (Path(app.outdir) / "_static" / "vendor" / target).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy2(src / name, Path(app.outdir) / "_static" / "vendor" / target / name)


def write_web_models(app, exception) -> None:
    """The web widgets' module and models (the shipped ``book`` run's V, M and C) into ``_static``."""
    if exception is not None or app.builder.format != "html":
        return
    import numpy as np

    import worldmodels
    from worldmodels.controller import Controller
    from worldmodels.webmodels import export_web_models
    from worldmodels.webwidgets import CSS, ESM

    static = Path(app.outdir) / "_static"
    shutil.copy2(ESM, static / WEB_WIDGETS_JS)
    shutil.copy2(CSS, static / WEB_WIDGETS_CSS)
    book = worldmodels.pretrained.load("book", controller="first")  # chapter 6: chapter 4's M, chapter 5's C
    starts = np.load(book.path / "controller" / "dream_starts.npz")
    controller = Controller.from_config(book.config).set_flat(book.params)
    exported = export_web_models(
        book.agent.vae, book.agent.mdrnn, starts["mu"], starts["logvar"], static / WEB_MODELS, controller=controller
    )
    logger.info(f"wm_widgets: web models in {exported.folder} ({exported.size_bytes() / 1e6:.1f} MB)")
    for docname in sorted(app.env.found_docs):
        path = Path(app.env.doc2path(docname))
        if path.suffix == ".ipynb":
            state = _notebook_state(str(path), path.stat().st_mtime)
            for fault in web_widget_mismatches(state, exported.meta):
                logger.warning(f"{path.name}: {fault}; execute it at WM_SCALE=book (book/execute.py)", location=docname)


def web_widget_mismatches(state: dict, meta: dict) -> list[str]:
    """Why the web widgets of a notebook's saved state cannot run the models the build exported."""
    faults = []
    for model_id in [m for m in state if is_web_widget(state, m)]:
        saved = state[model_id]["state"].get("meta", {})
        for key in ("z_size", "hidden_size"):
            if saved.get(key) is not None and saved.get(key) != meta[key]:
                faults.append(f"web widget {model_id[:8]} has {key} {saved.get(key)}, the shipped book run's models {meta[key]}")
    return faults


def drop_web_widgets_from_state(app, pagename, templatename, context, doctree) -> None:
    js_files = getattr(app.env, "nb_metadata", {}).get(pagename, {}).get("js_files", {})
    if "ipywidgets_state" in js_files:
        uri, kwargs = js_files["ipywidgets_state"]
        from myst_nb.core.render import sanitize_script_content

        body = without_web_widgets(kwargs["body"])
        js_files["ipywidgets_state"] = (uri, {**kwargs, "body": sanitize_script_content(body)})


def write_scripts_once(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        attributes = {k: v for k, v in getattr(js, "attributes", {}).items() if k != "priority"}
        key = (str(getattr(js, "filename", js) or ""), json.dumps(attributes, sort_keys=True, default=str))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app):
    app.connect("config-inited", use_vendor_scripts)
    # before the theme's scripts: Font Awesome reads its configuration when it loads
    app.add_js_file("wm-widgets.js", priority=100)
    app.add_js_file("wm-web.js")
    app.add_css_file("wm-widgets.css")
    app.add_css_file(WEB_WIDGETS_CSS)
    app.connect("doctree-resolved", replace_widget_views)
    app.connect("html-page-context", write_scripts_once, priority=900)
    # before myst-nb writes the page's widget state (priority 500)
    app.connect("html-page-context", drop_web_widgets_from_state, priority=400)
    app.connect("build-finished", copy_vendor_files)
    app.connect("build-finished", write_web_models)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
