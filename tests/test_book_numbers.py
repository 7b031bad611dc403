"""The numbers the book's prose states agree with the outputs of the cells that compute them.

Read from the committed notebooks (no execution): every value the prose pastes with myst-nb's
``{glue:text}`` role must have been glued by a cell of the notebook it names, and a number typed
by hand in the prose must not be a copy of a glued value (a copy drifts when the chapter is
executed again; paste it instead).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(BOOK.glob("0*.ipynb"))
PAGES = sorted(BOOK.glob("*.md"))

GLUE_ROLE = re.compile(r"\{glue(?::(?:text|any|md|figure|math))?\}`([^`]*)`")
GLUE_DIRECTIVE = re.compile(r"^```\{glue(?::\w+)?\}\s+(\S+)", re.MULTILINE)
NUMBER = re.compile(r"(?<![\w.])[-−]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.,])[-−]?\d+(?:\.\d+)?(?![\w])")
NOT_PROSE = [
    re.compile(r"\$\$.*?\$\$", re.DOTALL),  # display math
    re.compile(r"```.*?```", re.DOTALL),  # fences (directives, code)
    re.compile(r"`[^`]*`"),  # code, and the glue roles' content
    re.compile(r"\[[^\]]*\]\([^)]*\)"),  # links
    re.compile(r"#\d+"),  # issue numbers
    re.compile(r"\b(?:19|20)\d\d\b"),  # years
]
SMALLEST_CHECKED = 10
"""Typed integers below this (in absolute value) are not compared: small integers (counts,
chapter numbers, 2 cores) coincide with computed values too often to mean anything. Typed
decimals (2.4 h) are always compared."""
COINCIDENCES = {
    ("07_results.ipynb", "120"): "Tallec et al.'s spread, 870 ± 120",
    ("07_results.ipynb", "21"): "the paper's spread, 906 ± 21",
    ("07_results.ipynb", "64"): "the paper's 64 cores and 64 candidates",
    ("07_results.ipynb", "4.8"): "the days of the authors' log at generation 200",
    ("07_results.ipynb", "16"): "the first controller's 16 candidates, the paper's 16 episodes per candidate",
    ("intro.md", "64"): "the frame's 64 x 64 pixels",
    ("08_scaling.ipynb", "16"): "the paper's episodes per candidate, 64 x 16",
    ("intro.md", "0.4"): "M's size, 0.4 M parameters",
    ("intro.md", "32"): "the size of z",
    ("notation.md", "32"): "the size of z",
    ("teachers.md", "1.5"): "a temperature of the dream exercise, tau 1.5",
    ("teachers.md", "32"): "the size of z",
}
"""(file, typed number) pairs that equal a glued value by chance, each with what the number is."""


def read_notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def glued_values(nb: dict) -> dict[str, str]:
    """The text/plain of every value glued by the notebook's cells, by name."""
    values = {}
    for cell in nb["cells"]:
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            text = [v for k, v in out.get("data", {}).items() if k.endswith("text/plain")]
            values[name] = "".join(text[0]) if text else ""
    return values


def glue_references(markdown: str) -> list[tuple[str | None, str, str | None]]:
    """(document, key, format) of every glue role and directive: document None means this one."""
    refs = []
    for content in GLUE_ROLE.findall(markdown) + GLUE_DIRECTIVE.findall(markdown):
        doc, _, rest = content.rpartition("::")
        key, _, fmt = rest.partition(":")
        refs.append((doc or None, key, fmt or None))
    return refs


def typed_numbers(markdown: str) -> list[str]:
    """The numbers written by hand in a piece of prose and its inline math (display math, code,
    glue roles and links left out)."""
    markdown = markdown.replace("{,}", ",")  # 1{,}024 in math
    for pattern in NOT_PROSE:
        markdown = pattern.sub(" ", markdown)
    return NUMBER.findall(markdown)


def as_number(text: str) -> float | None:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def copies_of_glued(typed: str, glued: dict[str, str]) -> list[str]:
    """The glued measurements (floats) whose value, rounded as `typed` is written, equals the typed number.

    Glued integers (counts, config values) are left out: they coincide with the prose's round
    numbers (100 tracks, 1,000 steps) too often to tell a copy from a coincidence."""
    number = float(typed.replace(",", "").replace("−", "-"))
    decimals = len(typed.partition(".")[2])
    if abs(number) < SMALLEST_CHECKED and not decimals:
        return []
    hits = []
    for name, text in glued.items():
        value = as_number(text)
        measured = value is not None and not text.strip().lstrip("-").isdigit()  # a float: a score, a time
        if measured and round(value, decimals) == number:
            hits.append(name)
    return hits


def problems(markdown: str, where: str, glued_here: dict[str, str], glued_in) -> list[str]:
    """What is wrong with the numbers of one piece of prose; `glued_in(doc)` gives another document's values."""
    found = []
    for doc, key, fmt in glue_references(markdown):
        values = glued_here if doc is None else glued_in(doc)
        if key not in values:
            found.append(f"{where}: pastes {key!r} but {doc or 'this notebook'} glues no such value")
        elif fmt and fmt[-1] in "defgn%" and as_number(values[key]) is None:
            found.append(f"{where}: formats {key!r} as a number ({fmt}) but its glued value is {values[key]!r}")
    for typed in typed_numbers(markdown):
        if (where.split()[0], typed) in COINCIDENCES:
            continue
        for name in copies_of_glued(typed, glued_here):
            found.append(f"{where}: the number {typed} is typed by hand but is glued as {name!r}; paste it")
    return found


def _glued_in(base: Path):
    cache: dict[Path, dict[str, str]] = {}

    def lookup(doc: str) -> dict[str, str]:
        path = (base / doc).resolve()
        if path not in cache:
            cache[path] = glued_values(read_notebook(path)) if path.exists() else {}
        return cache[path]

    return lookup


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_prose_agrees_with_its_outputs(path):
    nb = read_notebook(path)
    glued = glued_values(nb)
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            found += problems("".join(cell["source"]), f"{path.name} cell {i}", glued, _glued_in(BOOK))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_each_value_is_glued_once(path):
    # myst-nb warns on a key glued twice in a notebook, and the book builds with -W: the build fails
    names = [out["metadata"]["scrapbook"]["name"] for cell in read_notebook(path)["cells"] if cell["cell_type"] == "code"
             for out in cell.get("outputs", []) if "scrapbook" in out.get("metadata", {})]
    assert sorted({n for n in names if names.count(n) > 1}) == []


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_page_pastes_only_glued_values(path):
    lookup = _glued_in(path.parent)
    everything = {}
    for chapter in CHAPTERS:
        everything.update(lookup(chapter.name))
    found = problems(path.read_text(), path.name, {}, lookup)
    # a page glues nothing itself: its hand-typed numbers are compared with every chapter's values
    for typed in typed_numbers(path.read_text()):
        if (path.name, typed) in COINCIDENCES:
            continue
        for name in copies_of_glued(typed, everything):
            found.append(f"{path.name}: the number {typed} is typed by hand but a chapter glues it as {name!r}; paste it")
    assert not found, "\n".join(found)


def test_the_chapters_glue_what_their_prose_depends_on():
    """The committed outputs hold the glued values (an execution that lost them would fail here)."""
    assert "parked_return" in glued_values(read_notebook(BOOK / "02_environment.ipynb"))
    assert {"pipeline_c_hours", "full_mean", "episodes_ratio"} <= set(glued_values(read_notebook(BOOK / "07_results.ipynb")))


def _glue_output(name: str, text: str) -> dict:
    return {
        "output_type": "display_data",
        "metadata": {"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}},
        "data": {"application/papermill.record/text/plain": text},
    }


def test_the_check_finds_a_copied_number_and_a_missing_value():
    glued = glued_values({"cells": [{"cell_type": "code", "source": "", "outputs": [_glue_output("score", "842.8008590525794")]}]})
    assert glued == {"score": "842.8008590525794"}
    copied = "The controller scores 842.8 on average, 843 rounded; the paper's is 906."
    assert problems(copied, "ch", glued, lambda doc: {}) == [
        "ch: the number 842.8 is typed by hand but is glued as 'score'; paste it",
        "ch: the number 843 is typed by hand but is glued as 'score'; paste it",
    ]
    assert problems("It scores {glue:text}`score:.1f`; $$842.8$$ in display math.", "ch", glued, lambda doc: {}) == []
    assert problems("It drove $-42.6 \\pm 32$.", "ch", {"mean": "-42.55844973579693"}, lambda doc: {}) == [
        "ch: the number -42.6 is typed by hand but is glued as 'mean'; paste it"
    ]
    assert problems("See {glue:text}`other.ipynb::hours:.1f` and {glue:text}`scor:.0f`.", "ch", glued, lambda doc: {}) == [
        "ch: pastes 'hours' but other.ipynb glues no such value",
        "ch: pastes 'scor' but this notebook glues no such value",
    ]


def test_typed_numbers_leave_out_math_code_links_and_years():
    text = "In 2018, $$x = 842.8$$ and `843` and [v 906](https://a/906) gave $1{,}024$ episodes and -42.6."
    assert typed_numbers(text) == ["1,024", "-42.6"]


def test_each_chapter_installs_the_package_from_the_books_repository():
    """The first cell installs the package where it is missing (Colab), from the repository the
    launch buttons name in _config.yml."""
    url = re.search(r"^repository:\n\s+url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.MULTILINE)
    assert url, "_config.yml: no repository url"
    for path in CHAPTERS:
        first = next(c for c in read_notebook(path)["cells"] if c["cell_type"] == "code")
        source = "".join(first["source"])
        assert "except ImportError:" in source and f"git+{url.group(1)}" in source, path.name


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_each_chapter_states_objectives_prerequisites_and_run_times(path):
    second = read_notebook(path)["cells"][1]
    text = "".join(second["source"])
    assert "objectives" in second["metadata"].get("tags", []), path.name
    for part in ("**You will learn to**", "**Prerequisites**", "**Time**", "`tiny`", "`book`"):
        assert part in text, f"{path.name}: the chapter's second cell lacks {part}"
