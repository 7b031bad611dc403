"""Finished runs shipped inside the package: loaded without pickle, checksums checked.

A shipped run ``worldmodels/pretrained/NAME/`` has the layout of a run directory (so a
chapter can copy it into ``runs/NAME`` and go on from there) with only what a reader
needs: the config, V's, M's and C's weights (float16 where that does not change the
score), the training metrics and the evaluation results, the dataset's manifest
(per-episode seeds, lengths and returns), the start latents of the dreams and the
results of training C in the dream, the iterations' and the final stage's records and
weights, and ``manifest.json`` with the SHA-256 of every file, checked on load. The agent
:func:`load` returns is the run's (:func:`worldmodels.final.agent_run`): the final stage's once
the run has one, else its first controller with its first M. The dataset itself is not shipped: any episode is regenerated
from its seed when needed (:func:`worldmodels.data.dataset_episodes`).

>>> import worldmodels as wm
>>> book = wm.pretrained.load("book")          # doctest: +SKIP
>>> book.agent, book.params, book.results["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worldmodels.config import Config
from worldmodels.runs import (
    ABLATIONS_FOLDER, BEST_WEIGHTS, CONFIG_FILE, DONE_FILE, DREAM_RESULTS_FILE, DREAM_SUMMARY, HISTORY_FILE,
    MANIFEST_FILE, METRICS_FILE, RECORD_FILE, RESULTS_FILE, SELECTION_FILE, RunDir, as_run_dir, file_sha256,
    FINAL_FOLDER, iteration_folder, load_tensors, read_json, reading, save_tensors, weights_metadata, write_bytes,
    write_json,
)

ROOT = Path(__file__).resolve().parent
MANIFEST = MANIFEST_FILE
"""In a shipped run's folder: the SHA-256 of each of its files."""

CONTROLLER = f"controller/{BEST_WEIGHTS['controller']}"
RESULTS = f"eval/{RESULTS_FILE}"
WEIGHTS = (f"vae/{BEST_WEIGHTS['vae']}", f"mdrnn/{BEST_WEIGHTS['mdrnn']}", CONTROLLER)
"""Weight files of a shipped run."""
HALF = {WEIGHTS[0]: ("fc_decode.", "decoder.")}
"""Tensors stored in float16 by :func:`export` when ``half`` is set: V's decoder only, which
draws pictures and never drives. Everything the agent drives with (V's encoder, M, C) stays
float32, so the shipped agent drives exactly like the run's and its evaluation returns the
run's own, track for track. Rounding those weights to float16 makes another agent: a change
in the last bits of an action sends CarRacing's car down another trajectory."""
DREAM_FILES = tuple(
    f"controller/dream_tau*_{f}" for f in (BEST_WEIGHTS["controller"], DONE_FILE, HISTORY_FILE, SELECTION_FILE)
)
"""A finished dream run's files at every temperature (no checkpoint: it only loads, see
:func:`worldmodels.dream.train_controller_in_dream`)."""
RECORDS = (
    CONFIG_FILE,
    f"data/{MANIFEST_FILE}",
    f"vae/{DONE_FILE}",
    f"vae/{METRICS_FILE}",
    f"mdrnn/{DONE_FILE}",
    f"mdrnn/{METRICS_FILE}",
    f"controller/{DONE_FILE}",
    f"controller/{HISTORY_FILE}",
    f"controller/{SELECTION_FILE}",
    f"controller/{DREAM_SUMMARY}",
    *DREAM_FILES,
    RESULTS,
)
"""Small files copied as they are (glob patterns: every match); those a run does not have are left out.

The dream's files are those of every temperature the run trained at (no checkpoint: a
finished dream run only loads, see :func:`worldmodels.dream.train_controller_in_dream`).
"""


ABLATION_FILES = (
    CONFIG_FILE,
    CONTROLLER,
    f"controller/{DONE_FILE}",
    f"controller/{HISTORY_FILE}",
    f"controller/{SELECTION_FILE}",
    RESULTS,
)
"""Files of each finished (evaluated) ablation run (``ablations/NAME/``, see
:mod:`worldmodels.ablations`) shipped with the run: its config, controller, CMA-ES history,
final selection and evaluation. V is the run's own, and an untrained M is rebuilt from the
config's seed, so no other weights are needed."""


FINAL_FILES = ABLATION_FILES
"""Files of a finished final stage (``final/``, see :mod:`worldmodels.final`), the run's agent:
its config, controller, CMA-ES history, final selection and evaluation. V is the run's and M
is its iteration's, both shipped already."""


ITERATION_FILES = (
    RECORD_FILE,
    DONE_FILE,
    f"data/{MANIFEST_FILE}",
    f"mdrnn/{BEST_WEIGHTS['mdrnn']}",
    f"mdrnn/{DONE_FILE}",
    f"mdrnn/{METRICS_FILE}",
    CONTROLLER,
    *DREAM_FILES,
    f"controller/{DREAM_SUMMARY}",
    f"controller/{HISTORY_FILE}",
    f"controller/{DONE_FILE}",
    f"controller/{SELECTION_FILE}",
    f"eval/{DREAM_RESULTS_FILE}",
)
"""Files of each finished iteration (``iterations/NN/``, see :mod:`worldmodels.iterate`) shipped
with the run: its record, data manifest, M (float32: its dream controller drives with it),
M's metrics, its controller and that controller's evolution, and its evaluation; with
the dreams' start latents of the iteration, the controller can be trained, evaluated and
watched again without the iteration's episodes."""


class ChecksumError(RuntimeError):
    """A shipped file that is missing or whose SHA-256 differs from its manifest (the message names it)."""


@dataclass
class Pretrained:
    """A loaded shipped run."""

    name: str
    path: Path
    config: Config
    """The config of the agent's run directory (the final stage's own, with its CMA-ES settings)."""
    agent: Any
    """The run's agent (:func:`worldmodels.final.agent_run`: the final stage's once it is finished),
    a :class:`worldmodels.rollout.Agent` with V and M (M only for the 'zh' controller)."""
    params: np.ndarray
    """Its controller's flat parameter vector."""
    results: dict | None
    """Its ``eval/results.json``: the evaluation with the paper's protocol, when shipped."""
    agent_path: Path | None = None
    """The run directory the agent's controller and evaluation are in (``path``, or ``path/final``)."""


def available(root: Path = ROOT) -> list[str]:
    """Names of the shipped runs."""
    return sorted(p.parent.name for p in Path(root).glob(f"*/{MANIFEST}"))


def verify(name: str, root: Path = ROOT) -> Path:
    """The folder of shipped run `name`, after checking every file against its manifest."""
    folder = Path(root) / name
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path}: no shipped run {name!r}; available: {', '.join(available(root)) or 'none'}"
        )
    for rel, expected in _checksums(manifest_path).items():
        path = folder / rel
        if not path.exists():
            raise ChecksumError(f"{path}: listed in {manifest_path} but missing")
        if file_sha256(path) != expected:
            raise ChecksumError(f"{path}: SHA-256 differs from {manifest_path}; the file is damaged or was changed")
    return folder


def _checksums(manifest_path: Path) -> dict[str, str]:
    """A shipped run's manifest: file -> SHA-256; a damaged manifest raises ChecksumError naming it."""
    with reading(manifest_path, "manifest", ChecksumError):
        checksums = read_json(manifest_path)["sha256"]
        if not isinstance(checksums, dict):
            raise ValueError(f"sha256 is a {type(checksums).__name__}, not an object")
        return checksums


def load(name: str = "book", device: str = "cpu", root: Path = ROOT, controller: str = "main") -> Pretrained:
    """Load shipped run `name` (checksums checked; safetensors only, no pickle): its agent
    (`controller` 'main', :func:`worldmodels.final.agent_run`) or its first controller with the
    first M ('first', what chapters 4 to 6 and the book's dream widget use)."""
    from worldmodels.controller import load_controller
    from worldmodels.final import agent_run
    from worldmodels.rollout import Agent

    if controller not in ("main", "first"):
        raise ValueError(f"controller = {controller!r}: 'main' (the run's agent) or 'first'")
    folder = verify(name, root)
    run, config = agent_run(folder) if controller == "main" else (RunDir(folder), RunDir(folder).load_config())
    agent = Agent.from_run(run, config)
    if device != "cpu":
        agent.vae.to(device)
        if agent.mdrnn is not None:
            agent.mdrnn.to(device)
    params = load_controller(run.path / CONTROLLER).params
    results_path = run.path / RESULTS
    results = read_json(results_path) if results_path.exists() else None
    return Pretrained(name, folder, config, agent, params, results, run.path)


def install(name: str, run: str | Path | RunDir, root: Path = ROOT) -> RunDir:
    """Copy shipped run `name` into a run directory (checksums checked), keeping what is there."""
    folder = verify(name, root)
    run = as_run_dir(run)
    for rel in _checksums(folder / MANIFEST):  # the files verify() checked
        dst = run.path / rel
        if not dst.exists():
            write_bytes(dst, (folder / rel).read_bytes())
    return run


def export(
    run: str | Path | RunDir, name: str, *, half: bool = True, evaluate: bool = False, root: Path = ROOT
) -> Path:
    """Pack a finished run as shipped run `name`: weights (float16 when `half`), records, manifest.

    Besides the files of :data:`WEIGHTS` and :data:`RECORDS` (and :data:`ABLATION_FILES` of
    every ablation run), it writes the dreams' start latents
    (:func:`worldmodels.dream.save_initial_latents`: from the run's encoded episodes, or
    regenerated from their seeds when the run has none, about a minute at the ``book``
    scale).

    It also ships every finished iteration's :data:`ITERATION_FILES` and, when the run has a
    finished final stage, its :data:`FINAL_FILES` (an unfinished one is left out).

    With `evaluate`, the shipped weights themselves are evaluated with the run's protocol
    (``eval.episodes`` tracks from ``eval.seed``, every core) into the shipped
    ``eval/results.json`` (and the final stage's into ``final/eval/results.json``), which
    ``python -m worldmodels evaluate --pretrained NAME`` (``--controller first`` for the former)
    then reproduces on any CPU (the evaluation drives exactly, see :mod:`worldmodels.evaluation`).
    When the run has an evaluation of the same tracks, the returns must be the same: the
    shipped weights drive like the run's, or a :class:`ValueError` names both files.

    The manifest is written last, so an interrupted export is never loadable.
    """
    from worldmodels.dream import STARTS_FILE, save_initial_latents
    from worldmodels.final import FinalRun, is_final_finished
    from worldmodels.iterate import IterationRun, finished_iterations

    run = as_run_dir(run)
    folder = Path(root) / name
    previous = {rel: (folder / rel).read_bytes() for rel in WEIGHTS if (folder / rel).exists()}
    if folder.exists():
        shutil.rmtree(folder)
    files = []
    for rel in WEIGHTS:
        tensors = load_tensors(run.path / rel)
        if half and rel in HALF:
            tensors = {k: v.half() if k.startswith(HALF[rel]) and v.is_floating_point() else v for k, v in tensors.items()}
        metadata = weights_metadata(run.path / rel)
        save_tensors(folder / rel, tensors, metadata)
        if rel in previous and _same_safetensors(previous[rel], (folder / rel).read_bytes()):
            write_bytes(folder / rel, previous[rel])  # keep the bytes: safetensors orders metadata at random
        files.append(rel)
    ablations = sorted(  # the finished ones: evaluated
        p.parents[1].relative_to(run.path).as_posix() for p in run.path.glob(f"{ABLATIONS_FOLDER}/*/{RESULTS}")
    )
    iterations = [
        iteration_folder(run, k).relative_to(run.path).as_posix() for k in range(1, finished_iterations(run) + 1)
    ]
    final = is_final_finished(run)
    patterns = [
        *RECORDS, *(f"{a}/{f}" for a in ablations for f in ABLATION_FILES),
        *(f"{i}/{f}" for i in iterations for f in ITERATION_FILES),
        *(f"{FINAL_FOLDER}/{f}" for f in FINAL_FILES if final),
    ]
    for pattern in patterns:
        for path in sorted(run.path.glob(pattern)):
            rel = path.relative_to(run.path).as_posix()
            write_bytes(folder / rel, path.read_bytes())
            files.append(rel)
    save_initial_latents(run, folder / STARTS_FILE)
    files.append(STARTS_FILE)
    cfg = run.load_config()
    for k, rel in enumerate(iterations, start=1):  # each iteration's dreams start from its own episodes
        save_initial_latents(IterationRun(run, k, cfg), folder / rel / STARTS_FILE)
        files.append(f"{rel}/{STARTS_FILE}")
    if evaluate:
        pairs = [(RunDir(folder), run)] + ([(FinalRun(folder), FinalRun(run))] if final else [])
        for shipped, own in pairs:  # each shipped agent's weights, against the run's own evaluation
            _evaluate_shipped(shipped, own.path / RESULTS, folder)
            rel = (shipped.path / RESULTS).relative_to(folder).as_posix()
            if rel not in files:  # the run had no evaluation of its own
                files.append(rel)
    write_json(folder / MANIFEST, {"name": name, "sha256": {rel: file_sha256(folder / rel) for rel in files}})
    return folder


def _evaluate_shipped(shipped: RunDir, run_results: Path, folder: Path) -> None:
    """Evaluate the weights of `shipped` (the shipped run in `folder`, or its final stage) into
    its eval/results.json, checked against the run's own evaluation `run_results` where it has
    one of the same tracks; when they agree, the run's evaluation (and the wall time it took)
    is the one shipped."""
    from worldmodels.evaluation import evaluate_run

    path = shipped.path / RESULTS
    results = evaluate_run(shipped)
    own = read_json(run_results) if run_results.exists() else {}
    same_protocol = own.get("seeds") == results["seeds"] and own.get("max_steps") == results["max_steps"]
    if same_protocol and own.get("returns") != results["returns"]:
        raise ValueError(
            f"{path}: the shipped weights score {results['mean']:.1f} on the tracks "
            f"where {run_results} has {own['mean']:.1f}; they do not drive like the run's (see HALF)"
        )
    results = {**results, **own} if same_protocol else results
    controller = (shipped.path / CONTROLLER).relative_to(folder).as_posix()
    write_json(path, {**results, "controller": controller})


def _same_safetensors(a: bytes, b: bytes) -> bool:
    """Whether two safetensors files hold the same header (as JSON, in any key order) and data."""
    n, m = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
    return json.loads(a[8 : 8 + n]) == json.loads(b[8 : 8 + m]) and a[8 + n :] == b[8 + m :]


__all__ = ["ABLATION_FILES", "FINAL_FILES", "ChecksumError", "Pretrained", "available", "export", "install", "load", "verify"]
