"""The paper's ablations at the budget of the main run: which parts of the World Model matter.

Each ablation is a run directory of its own, ``RUN/ablations/NAME``, whose config is the
main run's with one change. It shares V (and, where it reads a trained M, M) with the
main run, so the only difference is the controller's input or M's training; it evolves
its controller with the main run's CMA-ES budget (population, episodes per candidate,
generations) and is evaluated on the same unseen tracks with the paper's protocol.

=================  ================================================  =====================
name               what the controller sees                          paper (100 tracks)
=================  ================================================  =====================
``z``              V only: a = W z + b                               632 ± 251
``z_hidden``       V only, 40 tanh hidden units                      788 ± 141
(the main run)     V and M: a = W [z, h] + b                         906 ± 21
``untrained_m``    V and an *untrained* M's h (random LSTM weights)  CT: 870 ± 120
=================  ================================================  =====================

>>> import worldmodels as wm
>>> wm.ablations.run_ablation(cfg, "runs/book", "z")       # doctest: +SKIP
>>> wm.ablations.table("runs/book")                         # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmodels.config import Config
from worldmodels.runs import (
    ABLATIONS_FOLDER, BEST_WEIGHTS, DONE_FILE, HISTORY_FILE, METRICS_FILE, RESULTS_FILE, SELECTION_FILE, RunDir,
    as_run_dir, atomic_path, read_json,
)


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation table."""

    label: str
    overrides: dict[str, Any]
    """Changes to the main run's config (dotted names)."""
    paper: str
    """The score reported for this setting (the paper, or Tallec et al. for an untrained M)."""


MAIN = "full"
"""The name of the main run's row in :func:`table`."""

ABLATIONS: dict[str, Ablation] = {
    "z": Ablation("V only, a = W z + b", {"controller.kind": "z"}, "632 ± 251"),
    "z_hidden": Ablation("V only, 40 tanh hidden units", {"controller.kind": "z_hidden"}, "788 ± 141"),
    "untrained_m": Ablation("V and an untrained M, a = W [z, h] + b", {"mdrnn.untrained": True}, "870 ± 120 (Tallec et al.)"),
}
MAIN_ROW = Ablation("World Model, a = W [z, h] + b", {}, "906 ± 21")

_SHARED_FILES = (DONE_FILE, METRICS_FILE)
"""Besides the weights, what an ablation copies of the main run's finished V and M."""


def ablation_dir(run: str | Path | RunDir, name: str) -> RunDir:
    """``RUN/ablations/NAME``; an unknown name raises ValueError listing the known ones."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}: choose one of {', '.join(ABLATIONS)}")
    return RunDir(as_run_dir(run).path / ABLATIONS_FOLDER / name)


def ablation_config(cfg: Config, name: str) -> Config:
    """The main run's config `cfg` with ablation `name`'s change."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}: choose one of {', '.join(ABLATIONS)}")
    return cfg.replace(**ABLATIONS[name].overrides)


def _share(main: RunDir, sub: RunDir, stage: str) -> None:
    """Copy the main run's finished stage (weights, done.json, metrics) into the ablation's run."""
    src = main.stage(stage)
    if not (src / DONE_FILE).exists():
        raise FileNotFoundError(
            f"{src / DONE_FILE}: the main run's {stage} stage is not finished; train it first "
            f"(python -m worldmodels train-{'vae' if stage == 'vae' else 'mdrnn'} --run-dir {main.path})"
        )
    dst = sub.stage(stage)
    for name in (BEST_WEIGHTS[stage], *_SHARED_FILES):
        if (src / name).exists() and not (dst / name).exists():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)


def current_results(run: RunDir) -> dict[str, Any] | None:
    """``run/eval/results.json``, or None when there is none or it evaluated a controller that has
    since evolved for more generations (its ``controller_generations`` is not the number in
    ``done.json`` or in ``history.csv``, which grows first when a run is continued)."""
    from worldmodels.evolution import read_history

    results_path = run.eval / RESULTS_FILE
    if not results_path.exists():
        return None
    results = read_json(results_path)
    evaluated = results.get("controller_generations")
    done_path, history_path = run.controller / DONE_FILE, run.controller / HISTORY_FILE
    trained = [read_json(done_path)["generations"]] if done_path.exists() else []
    trained += [len(read_history(history_path))] if history_path.exists() else []
    if evaluated is not None and any(t != evaluated for t in trained):
        return None
    return results


def is_evaluated(run: str | Path | RunDir, name: str) -> bool:
    """Whether ablation `name` of the main run `run` is finished and its evaluation is current."""
    return current_results(ablation_dir(run, name)) is not None


def run_ablation(
    cfg: Config,
    run: str | Path | RunDir,
    name: str,
    *,
    quiet: bool = False,
    max_generations: int | None = None,
    evaluate: bool = True,
) -> dict[str, Any] | None:
    """Train and evaluate ablation `name` of the main run `run` (config `cfg`); resumes like every stage.

    V (and M where the ablation reads a trained one) are copied from the main run, which
    must have finished them; an untrained M is built from ``cfg.train_seed``. The
    controller is evolved with ``cfg.cma`` in ``RUN/ablations/NAME/controller`` and, once
    finished, evaluated on ``cfg.eval``'s tracks into ``RUN/ablations/NAME/eval/results.json``.
    Returns those results, or None while the controller is unfinished.
    """
    from worldmodels.evaluation import evaluate_run
    from worldmodels.evolution import is_finished
    from worldmodels.rollout import train_controller
    from worldmodels.train import train_mdrnn

    main = as_run_dir(run)
    main_cfg = main.bind(cfg)
    sub_cfg = ablation_config(main_cfg, name)
    sub = ablation_dir(main, name)
    sub_cfg = sub.bind(sub_cfg)
    _share(main, sub, "vae")
    if sub_cfg.controller.kind == "zh":
        if sub_cfg.mdrnn.untrained:
            train_mdrnn(sub_cfg, sub, quiet=quiet)
        else:
            _share(main, sub, "mdrnn")
    train_controller(sub_cfg, sub, quiet=quiet, max_generations=max_generations)
    if not is_finished(sub.controller, sub_cfg.cma):
        return None
    results = current_results(sub)
    if results is not None:
        return results
    if not evaluate:
        return None
    return evaluate_run(sub, sub_cfg)


def _row(name: str, ablation: Ablation, run: RunDir) -> dict[str, Any]:
    from worldmodels.evolution import read_history

    row: dict[str, Any] = {"name": name, "label": ablation.label, "paper": ablation.paper}
    history_path = run.controller / HISTORY_FILE
    history = read_history(history_path) if history_path.exists() else None
    if history is not None:
        row["generations"] = len(history)
        row["controller_seconds"] = sum(h["seconds"] or 0.0 for h in history)
    cfg = run.load_config()
    if cfg is not None:
        row["kind"] = cfg.controller.kind
        row["episodes_per_generation"] = cfg.cma.population * cfg.cma.episodes_per_candidate
    if cfg is not None and history is not None:  # training, validation of the mean, final selection
        validations = sum(h["val_mean"] is not None for h in history)
        row["controller_episodes"] = len(history) * row["episodes_per_generation"] + validations * cfg.cma.eval_episodes
        selection_path = run.controller / SELECTION_FILE
        if selection_path.exists():
            selection = read_json(selection_path)
            row["controller_episodes"] += len(selection["candidates"]) * selection["selection_episodes"]
    results = current_results(run)
    if results is not None:
        row.update({k: results[k] for k in ("episodes", "mean", "std", "min", "max")})
        row["eval_seconds"] = results.get("seconds")
    return row


def table(run: str | Path | RunDir) -> list[dict[str, Any]]:
    """The ablation table of a main run: one dict per row (the main run first, then each ablation
    that has a run directory), with the paper's score, the evaluation (episodes, mean, std, min,
    max, seconds) and the controller's compute (generations, episodes per generation, episodes
    in all with validation and final selection, seconds)."""
    main = as_run_dir(run)
    rows = [_row(MAIN, MAIN_ROW, main)]
    for name, ablation in ABLATIONS.items():
        sub = ablation_dir(main, name)
        if sub.config_path.exists():
            rows.append(_row(name, ablation, sub))
    return rows


def _controller_hours(row: dict[str, Any]) -> float:
    """A row's "C hours": the wall time of the controller's evolution plus its evaluation."""
    return ((row.get("controller_seconds") or 0.0) + (row.get("eval_seconds") or 0.0)) / 3600


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`table` as a fixed-width text table; "C episodes" counts the controller's
    training, validation and selection episodes, "C hours" adds the evaluation's time to theirs."""
    lines = [
        f"{'setting':40s} {'paper':>26s} {'this run':>18s} {'min':>5s} {'max':>5s} "
        f"{'generations':>11s} {'C episodes':>10s} {'C hours':>8s}"
    ]
    for r in rows:
        score = f"{r['mean']:.0f} ± {r['std']:.0f}" if "mean" in r else "not evaluated"
        low = f"{r['min']:.0f}" if "min" in r else ""
        high = f"{r['max']:.0f}" if "max" in r else ""
        lines.append(
            f"{r['label']:40s} {r['paper']:>26s} {score:>18s} {low:>5s} {high:>5s} "
            f"{r.get('generations', 0):>11d} {r.get('controller_episodes', 0):>10,d} {_controller_hours(r):>8.2f}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`table` as a Markdown table (the README's), scores in bold; a row not
    evaluated yet says so and leaves its other cells empty."""
    lines = [
        "| setting | paper | this run | min | max | generations | C episodes | C hours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "mean" not in r:
            lines.append(f"| {r['label']} | {r['paper']} | not evaluated yet | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['paper']} | **{r['mean']:.1f} ± {r['std']:.1f}** | {r['min']:.0f} | {r['max']:.0f} "
            f"| {r.get('generations', 0)} | {r.get('controller_episodes', 0):,d} | {_controller_hours(r):.2f} |"
        )
    return "\n".join(lines)
