"""Execute the book's notebooks in place and keep their outputs (used by `make book`).

    python book/execute.py [--scale book] [--timeout 7200] [NOTEBOOK ...]

Each notebook runs in a fresh kernel in its own folder with ``WM_SCALE`` set, through
nbclient with ``store_widget_state=True``, so that the widgets' state is saved in the
notebook and the static HTML can show them. Without arguments it runs every
``book/*.ipynb`` in order. A failing notebook is reported and left unchanged on disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

BOOK = Path(__file__).resolve().parent

NOTE_TAG = "scale-note"
"""Markdown cells with this tag say at which scale the committed outputs were produced."""

_NOTES = {
    "tiny": (
        "The outputs below were produced at the **tiny** scale (`WM_SCALE=tiny`), whose models "
        "are trained for seconds on a handful of episodes: the code paths are those of the real "
        "run, but the pictures and numbers show untrained models. Run the chapter at "
        "`WM_SCALE=book` (the default; `make book`) to see a trained agent."
    ),
    "book": (
        "The outputs below were produced at the **book** scale (`WM_SCALE=book`, the default): "
        "the models of a laptop-sized run, see chapter 1. Set `WM_SCALE=tiny` to run the chapter "
        "in about a minute with untrained models."
    ),
    "paper": (
        "The outputs below were produced at the **paper** scale (`WM_SCALE=paper`): the paper's "
        "hyperparameters, see chapter 8."
    ),
}


def scale_note(scale: str) -> str:
    """The text of a chapter's note on the scale of its outputs (a MyST note directive)."""
    return "```{note}\n" + _NOTES[scale] + "\n```"


def update_scale_notes(nb, scale: str) -> None:
    for cell in nb.cells:
        if cell.cell_type == "markdown" and NOTE_TAG in cell.get("metadata", {}).get("tags", []):
            cell.source = scale_note(scale)


def execute(path: Path, scale: str, timeout: int) -> float:
    """Execute one notebook in place; returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    os.environ["WM_SCALE"] = scale  # inherited by the kernel
    # figures inline in the outputs, whatever MPLBACKEND the caller set (the Makefile sets Agg)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
        record_timing=False,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    update_scale_notes(nb, scale)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks (default: book/*.ipynb)")
    parser.add_argument("--scale", default=os.environ.get("WM_SCALE", "book"), choices=("tiny", "book", "paper"))
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(BOOK.glob("*.ipynb"))
    failed = []
    for path in notebooks:
        print(f"executing {path} at WM_SCALE={args.scale} ...", flush=True)
        try:
            seconds = execute(path, args.scale, args.timeout)
        except CellExecutionError as e:
            print(f"FAILED {path}:\n{e}", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        print(f"  done in {seconds:.0f} s", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
