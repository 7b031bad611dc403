"""The final stage: C evolved in the real CarRacing on the iterated M, starting from the dream.

After the iterations (:mod:`worldmodels.iterate`), M has learned from the agent's own driving
and a controller has learned to drive in its dream. The final stage takes iteration ``k``'s M
as the agent's memory and evolves C once more in CarRacing, with CMA-ES's mean starting at
that iteration's dream controller (``cma.x0``) and with CMA-ES settings of its own (a larger
population and more episodes per candidate than the first controller's, say). This is the
run's agent: ``python -m worldmodels evaluate`` and :func:`worldmodels.pretrained.load`
take it once it is finished.

It lives in ``RUN/final``, a :class:`FinalRun`: a run directory whose ``config.json``,
``controller/`` and ``eval/`` are its own, while V is the run's and M is iteration ``k``'s
(``iterate.final_iteration`` in its config), read where they are, never copied. Every stage
runs on it unchanged: ``train_controller`` resumes it from ``final/controller/es.pkl``,
``evaluate_run`` writes ``final/eval/results.json``.

>>> import worldmodels as wm
>>> wm.final.train_final(cfg, "runs/book", iteration=3)   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worldmodels.config import Config, ConfigError
from worldmodels.runs import (
    BEST_WEIGHTS, FINAL_FOLDER, RunDir, RunDirError, as_run_dir, iteration_folder,
)


class FinalRun(RunDir):
    """``RUN/final`` as a run directory: its config, controller and evaluation are its own, V is
    the run's and M is that of the iteration its config names (``iterate.final_iteration``)."""

    def __init__(self, run: str | Path | RunDir):
        run = as_run_dir(run)
        super().__init__(run.path / FINAL_FOLDER)
        self.run = run

    def __repr__(self) -> str:
        return f"FinalRun({str(self.run.path)!r})"

    def stage(self, name: str) -> Path:
        if name == "vae":
            return self.run.stage("vae")
        if name == "mdrnn":
            cfg = self.load_config()
            if cfg is None or not cfg.iterate.final_iteration:
                raise RunDirError(f"{self.config_path}: no final stage recorded here (python -m worldmodels final)")
            return iteration_folder(self.run, cfg.iterate.final_iteration) / "mdrnn"
        return super().stage(name)


def start_controller(run: RunDir, iteration: int) -> Path:
    """Iteration `iteration`'s controller, the one it evolved in its M's dream: CMA-ES's first mean."""
    return iteration_folder(run, iteration) / "controller" / BEST_WEIGHTS["controller"]


def final_config(cfg: Config, run: str | Path | RunDir, iteration: int) -> Config:
    """The final stage's config: the run's recorded one with `cfg`'s ``cma`` section (its own
    CMA-ES settings), `cfg`'s runtime fields (device, workers) and ``iterate.final_iteration`` = `iteration`. Its ``cma.x0`` is empty: the
    stage sets it to the iteration's dream controller when it runs (:func:`start_controller`;
    ``controller/done.json`` records the file and its hash), so no path of one machine is recorded.

    Its ``mdrnn`` section is the run's: it gives M's architecture, which the iterations keep;
    how iteration `iteration` fine-tuned M is in that iteration's ``record.json``.

    `iteration` must be a finished iteration of the run that evolved its controller; a run
    without a recorded config, or an iteration it does not hold, raises an error naming them,
    and so does a ``cma.x0`` in `cfg` (the stage always starts at the iteration's dream controller).
    """
    from worldmodels.iterate import finished_iterations

    run = as_run_dir(run)
    if cfg.cma.x0:
        raise ConfigError(
            f"cma.x0 = {cfg.cma.x0!r}: the final stage starts at iteration {iteration}'s dream controller; leave it empty"
        )
    recorded = run.load_config()
    if recorded is None:
        raise RunDirError(f"{run.config_path}: no run here to finish (train it and iterate it first)")
    held = finished_iterations(run)
    if not 1 <= iteration <= held:
        raise ConfigError(
            f"iterate.final_iteration = {iteration} is out of range: {run.path} holds {held} finished "
            f"iterations (allowed [1, {held}]; python -m worldmodels iterate makes them)"
        )
    start = start_controller(run, iteration)
    if not start.exists():
        raise RunDirError(f"{start}: iteration {iteration} has no controller to start the final stage from")
    final = recorded.replace(cma={**cfg.to_dict()["cma"], "x0": ""}, **{"iterate.final_iteration": iteration})
    return final.replace(**cfg.runtime_fields())  # and how fast it runs: the caller's device and workers


def final_run(run: str | Path | RunDir) -> FinalRun | None:
    """The run's final stage when it has one (started or finished), else None."""
    view = FinalRun(run)
    return view if view.config_path.exists() else None


def is_final_finished(run: str | Path | RunDir) -> bool:
    """Whether the run has a finished final stage: its controller evolved for all its generations."""
    from worldmodels.evolution import is_finished

    view = final_run(run)
    return view is not None and is_finished(view.controller, view.load_config().cma)


def agent_run(run: str | Path | RunDir) -> tuple[RunDir, Config]:
    """Where the run's agent lives and its config: the final stage once it is finished, else
    the run itself (its ``controller/``, the first controller, trained on the first M).

    A final stage that is there but unfinished raises :class:`~worldmodels.runs.RunDirError` naming it, rather
    than standing the first controller in for the agent it will be."""
    run = as_run_dir(run)
    final = final_run(run)
    if final is not None:
        if not is_final_finished(run):
            raise RunDirError(
                f"{final.path}: the final stage is not finished (python -m worldmodels final resumes it; "
                "--controller first evaluates the first controller)"
            )
        return final, final.load_config()
    cfg = run.load_config()
    if cfg is None:
        raise RunDirError(f"{run.config_path}: no config recorded in this run directory")
    return run, cfg


def controller_seconds(run: str | Path | RunDir) -> dict[str, float]:
    """The wall seconds of CMA-ES behind the run's agent, by controller: ``first`` (the run's own
    controller stage, in CarRacing) and ``final`` (the final stage), each the sum of its recorded
    generations (a final selection's time is not recorded); and ``iteration K`` for each iteration
    the agent grew from (every finished iteration, or with a final stage those up to its
    ``iterate.final_iteration``), the wall seconds its record gives its controller step (in M's
    dream or in CarRacing; of the call that finished the step, when it was resumed)."""
    from worldmodels.evolution import history_seconds, read_history
    from worldmodels.iterate import finished_iterations
    from worldmodels.runs import HISTORY_FILE, RECORD_FILE, read_json

    run = as_run_dir(run)
    final = final_run(run)
    last = final.load_config().iterate.final_iteration if final is not None else finished_iterations(run)
    seconds: dict[str, float] = {}
    if (run.controller / HISTORY_FILE).exists():
        seconds["first"] = history_seconds(read_history(run.controller / HISTORY_FILE))
    for index in range(1, last + 1):
        record = read_json(iteration_folder(run, index) / RECORD_FILE)
        seconds[f"iteration {index}"] = float(record.get("controller", {}).get("seconds") or 0.0)
    if final is not None and (final.controller / HISTORY_FILE).exists():
        seconds["final"] = history_seconds(read_history(final.controller / HISTORY_FILE))
    return seconds


def train_final(
    cfg: Config,
    run: str | Path | RunDir,
    iteration: int = 0,
    *,
    quiet: bool = False,
    max_generations: int | None = None,
    evaluate: bool = True,
) -> dict[str, Any] | None:
    """Evolve the final controller in CarRacing on iteration `iteration`'s M (0: the one the final
    stage already runs on, or for a new one the iteration whose dream controller did best on the
    validation tracks, the one ``evaluate --controller dream`` drives), from that iteration's
    dream controller, with `cfg`'s CMA-ES settings; then
    evaluate it on ``eval``'s tracks into ``RUN/final/eval/results.json``.

    Resumes like every stage (an interrupted evolution from its checkpoint; a finished one
    only loads, or continues when ``cma.generations`` grows). Returns the evaluation, or None
    while the controller is unfinished (`max_generations`) or when `evaluate` is off.
    """
    from worldmodels.evaluation import current_results, evaluate_run
    from worldmodels.evolution import is_finished
    from worldmodels.iterate import best_dream_iteration
    from worldmodels.rollout import train_controller

    run = as_run_dir(run)
    if iteration < 0:
        raise ConfigError(f"iterate.final_iteration = {iteration} is out of range: an iteration is numbered from 1")
    final = FinalRun(run)
    recorded = final.load_config()
    if iteration == 0 and recorded is not None:
        iteration = recorded.iterate.final_iteration
    if iteration == 0:
        iteration = best_dream_iteration(run)
        if not iteration:
            raise RunDirError(
                f"{run.path}: no finished iterations that evolved C in the dream to start the final stage from "
                "(python -m worldmodels iterate)"
            )
    if recorded is not None and recorded.iterate.final_iteration != iteration:
        raise RunDirError(
            f"{final.config_path}: the final stage runs on iteration {recorded.iterate.final_iteration}'s M, "
            f"not {iteration}'s (one final stage per run)"
        )
    final_cfg = final.bind(final_config(cfg, run, iteration))
    final_cfg = final_cfg.replace(**{"cma.x0": str(start_controller(run, iteration))})  # read at generation 0 only
    train_controller(final_cfg, final, quiet=quiet, max_generations=max_generations)
    if not evaluate or not is_finished(final.controller, final_cfg.cma):
        return None
    results = current_results(final)
    return results if results is not None else evaluate_run(final, final_cfg)


__all__ = ["FinalRun", "agent_run", "controller_seconds", "final_config", "final_run", "is_final_finished", "start_controller", "train_final"]
