"""Checks of the built book (`_build/html`), run by `make test-book` after the build.

* every page listed in _toc.yml was built;
* no page shows an error or a traceback;
* every widget view on a page has its model in the page's embedded widget state,
  so the widget renders in the static HTML without a kernel;
* every image resolves (a data: URI, or a file that exists in the build).

The checks of the build are skipped when the book has not been built (``make
test-package`` runs before the build); set ``WM_BOOK_HTML`` to check another build folder.
The checks of the notebooks' sources (parameters cell, NBVAL_CHECK_OUTPUT cells, scale
note, summary and exercises) always run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("WM_BOOK_HTML", ROOT / "_build" / "html"))

built = pytest.mark.skipif(not (HTML / "index.html").exists(), reason=f"the book is not built ({HTML})")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections"))
            walk(e.get("chapters"))
            for part in e.get("parts", []) or []:
                walk(part.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []) or []:
        walk(part.get("chapters"))
    return [re.sub(r"\.(md|ipynb)$", "", f) for f in files]


def pages() -> list[Path]:
    return [HTML / f"{f}.html" for f in toc_files()]


def soup(path: Path):
    from bs4 import BeautifulSoup

    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def test_toc_lists_pages():
    files = toc_files()
    assert len(files) >= 2
    for f in files:
        sources = [ROOT / f"{f}{ext}" for ext in (".md", ".ipynb")]
        assert any(s.exists() for s in sources), f"{f} in _toc.yml has no source"


@built
@pytest.mark.parametrize("page", toc_files())
def test_page_built(page):
    assert (HTML / f"{page}.html").exists(), f"{page}.html is missing from {HTML}"


@built
@pytest.mark.parametrize("page", toc_files())
def test_no_errors_or_tracebacks(page):
    doc = soup(HTML / f"{page}.html")
    main = doc.find("main") or doc
    tracebacks = main.select("div.output.traceback, div.output.error")
    assert not tracebacks, f"{page}: error output: {tracebacks[0].get_text()[:500]}"
    text = main.get_text()
    for marker in ("Traceback (most recent call last)", "CellExecutionError"):
        assert marker not in text, f"{page}: {marker!r} in the page"
    for out in main.select("div.output.stderr"):
        stderr = out.get_text()
        assert not re.search(r"\b\w*Error\b", stderr), f"{page}: error on stderr: {stderr[:500]}"


@built
@pytest.mark.parametrize("page", toc_files())
def test_widget_views_have_state(page):
    doc = soup(HTML / f"{page}.html")
    views = doc.find_all("script", attrs={"type": "application/vnd.jupyter.widget-view+json"})
    if not views:
        return
    states = doc.find_all("script", attrs={"type": "application/vnd.jupyter.widget-state+json"})
    assert states, f"{page}: {len(views)} widget views but no embedded widget state"
    models: dict = {}
    for s in states:
        models.update(json.loads(s.string)["state"])
    for v in views:
        model_id = json.loads(v.string)["model_id"]
        assert model_id in models, f"{page}: widget view {model_id} has no saved state"
        # the widget's children must be saved too, or the view renders empty
        todo = [model_id]
        seen = set()
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            assert m in models, f"{page}: widget {model_id} refers to {m}, which has no saved state"
            todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(models[m]["state"]))
    # links in the browser (jslink) must join widgets whose state is saved
    for m in models.values():
        if m["model_name"] == "LinkModel":
            for end in ("source", "target"):
                ref = m["state"][end][0]
                assert ref.removeprefix("IPY_MODEL_") in models, f"{page}: a jslink's {end} has no saved state"


@built
@pytest.mark.parametrize("page", toc_files())
def test_images_resolve(page):
    path = HTML / f"{page}.html"
    doc = soup(path)
    for img in doc.find_all("img"):
        src = img.get("src", "")
        assert src, f"{page}: an <img> without src"
        url = urlparse(src)
        if url.scheme in ("data", "http", "https"):
            if url.scheme == "data":
                assert "," in src and len(src.split(",", 1)[1]) > 0, f"{page}: empty data URI"
            continue
        target = (path.parent / unquote(url.path)).resolve()
        assert target.exists(), f"{page}: image {src} does not resolve ({target})"


# --- the notebooks' sources -------------------------------------------------------------------


def notebooks() -> list[Path]:
    return [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_notebook_conventions(path):
    import sys

    import nbformat

    sys.path.insert(0, str(ROOT / "book"))
    try:
        import execute
    finally:
        sys.path.pop(0)
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "WM_SCALE" in params[0].source, f"{path.name}: one parameters cell reading WM_SCALE"
    install = [c for c in code[:1] if "except ImportError:" in c.source and "%pip install" in c.source]
    assert code.index(params[0]) == len(install), f"{path.name}: the parameters cell comes first (after the install cell)"
    checked = [c for c in code if "# NBVAL_CHECK_OUTPUT" in c.source]
    assert len(checked) >= 3, f"{path.name}: {len(checked)} cells marked NBVAL_CHECK_OUTPUT, at least 3 wanted"
    for c in checked:
        assert c.get("outputs"), f"{path.name}: a checked cell has no committed output"
    notes = [c for c in nb.cells if execute.NOTE_TAG in c.metadata.get("tags", [])]
    assert len(notes) == 1, f"{path.name}: one scale note"
    assert notes[0].source in {execute.scale_note(s) for s in ("tiny", "book", "paper")}
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Summary" in text and "## Exercises" in text, f"{path.name}: summary and exercises"
    assert ":class: dropdown" in text, f"{path.name}: solutions behind a toggle"
    for c in code:
        for out in c.get("outputs", []):
            assert out.output_type != "error", f"{path.name}: an error output is committed"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_widgets_that_need_a_kernel_are_the_live_ones(path):
    """The page says that the live widgets (widgets.traversal_widget, widgets.dream_widget) need a
    kernel, and lets every precomputed one work without; each has a static picture."""
    import sys

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        import wm_widgets
    finally:
        sys.path.pop(0)
    nb = json.loads(path.read_text(encoding="utf-8"))
    state = wm_widgets.widget_state(path)
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(wm_widgets.WIDGET_VIEW)
            if not view:
                continue
            live = bool(re.search(r"\b(traversal_widget|dream_widget)\(", "".join(cell["source"])))
            model_id = view["model_id"]
            assert wm_widgets.needs_kernel(state, model_id) == live, f"{path.name}: {cell['source'][:80]!r}"
            picture = wm_widgets.shown_image(state, model_id)
            assert picture is not None and picture[0].startswith(b"\x89PNG"), f"{path.name}: widget {model_id} has no picture"
