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

Each row is compared with the full model over the same evaluation tracks (:func:`paired`:
the mean per-track difference and its standard error). The full model and the V-only
hidden-layer controller can be trained again with other training seeds, ``seedK_zh`` and
``seedK_z_hidden`` (K = 2, 3, ...), whose CMA-ES draws other candidates on other training
and validation tracks (:data:`SEED_STRIDE`); the table gives the spread between seeds.

The run's agent, its final stage (:mod:`worldmodels.final`), evolved on with a budget of its
own. To compare it with an ablation at equal budget, a *continued* row (:data:`CONTINUED`,
``z_hidden_on``) evolves that ablation's finished controller on with the final stage's CMA-ES
settings, generations and tracks.

>>> import worldmodels as wm
>>> wm.ablations.run_ablation(cfg, "runs/book", "z")       # doctest: +SKIP
>>> wm.ablations.table("runs/book")                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from worldmodels.config import Config, ConfigError
from worldmodels.evaluation import current_results
from worldmodels.runs import (
    ABLATIONS_FOLDER, BEST_WEIGHTS, CONFIG_FILE, DONE_FILE, ES_CHECKPOINT, FINAL_FOLDER, HISTORY_FILE, METRICS_FILE, SELECTION_FILE,
    RunDir, RunDirError, as_run_dir, atomic_path, file_sha256, read_json,
)


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation table."""

    label: str
    overrides: dict[str, Any]
    """Changes to the main run's config (dotted names); a continued row's, to the final stage's."""
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
FINAL = FINAL_FOLDER
"""The name of the final stage's row (:mod:`worldmodels.final`), the run's agent once it is finished."""
FINAL_ROW = Ablation("World Model after iterative training, a = W [z, h] + b", {}, "906 ± 21 (no iterations)")


class Continued(NamedTuple):
    """A continued row: an ablation evolved on with the final stage's budget."""

    base: str
    """The ablation whose finished controller CMA-ES's mean starts at."""
    row: Ablation


CONTINUED: dict[str, Continued] = {
    "z_hidden_on": Continued(
        "z_hidden",
        Ablation("V only, 40 tanh hidden units, + the final stage's budget", {"controller.kind": "z_hidden"},
                 "788 ± 141 (not evolved on)"),
    ),
}
"""Rows that give an ablation the final stage's extra budget, so that the run's agent is compared
with it at equal budget. Such a row evolves on from the ablation's finished controller with the
final stage's config, its CMA-ES settings and tracks included (:func:`continued_config`); it
needs the run's final stage, and runs only when named (never in ``ablations --name all``)."""

SEEDED = {"zh": MAIN_ROW, "z_hidden": ABLATIONS["z_hidden"]}
"""The rows trained again with other training seeds, by the controller kind in their runs' names."""
SEED_STRIDE = 1_000_000
"""Training seed K of a row evolves with ``cma.seed + (K - 1) * SEED_STRIDE``: its training and
validation tracks (below ``cma.seed + 500,000 + validation episodes``) are disjoint from seed 1's."""
_SEED_RUN = re.compile(r"seed(\d+)_(zh|z_hidden)")

_SHARED_FILES = (DONE_FILE, METRICS_FILE)
"""Besides the weights, what an ablation copies of the main run's finished V and M."""


def seed_run_name(kind: str, seed: int) -> str:
    """The run of row `kind` ('zh': the full model, or 'z_hidden') trained with training seed `seed` (2, 3, ...)."""
    if kind not in SEEDED or seed < 2:
        raise ValueError(f"no seed run {kind!r} {seed}: the kind is one of {', '.join(SEEDED)}, the seed 2 or more")
    return f"seed{seed}_{kind}"


def seed_run_names(seeds: int) -> list[str]:
    """The runs that give `seeds` training seeds to each row of :data:`SEEDED` (the main run and
    the ablation are seed 1): ``seed2_zh, seed2_z_hidden, seed3_zh, ...``."""
    return [seed_run_name(kind, k) for k in range(2, seeds + 1) for kind in SEEDED]


def _parse(name: str) -> tuple[Ablation, dict[str, Any], int]:
    """An ablation's, continued row's or seed run's row, its config changes (besides the seed) and training seed."""
    if name in ABLATIONS:
        return ABLATIONS[name], ABLATIONS[name].overrides, 1
    if name in CONTINUED:
        row = CONTINUED[name].row
        return row, row.overrides, 1
    match = _SEED_RUN.fullmatch(name)
    if match is None or int(match[1]) < 2:
        raise ValueError(
            f"unknown ablation {name!r}: choose one of {', '.join([*ABLATIONS, *CONTINUED])}, "
            "or seedK_zh / seedK_z_hidden (K >= 2)"
        )
    row = SEEDED[match[2]]
    return row, row.overrides, int(match[1])


def ablation_dir(run: str | Path | RunDir, name: str) -> RunDir:
    """``RUN/ablations/NAME``; an unknown name raises ValueError listing the known ones."""
    _parse(name)
    return RunDir(as_run_dir(run).path / ABLATIONS_FOLDER / name)


def ablation_config(cfg: Config, name: str) -> Config:
    """The main run's config `cfg` with ablation `name`'s change (a seed run: its ``cma.seed`` too).

    An ablation's CMA-ES starts at zeros whatever the main run's ``cma.x0``, whose controller
    is the full model's; a seed run of the full model starts where the main run did.
    """
    if name in CONTINUED:
        raise ValueError(f"{name!r} evolves with the final stage's config, not the main run's: see continued_config")
    row, overrides, seed = _parse(name)
    if seed > 1:
        overrides = {**overrides, "cma.seed": cfg.cma.seed + (seed - 1) * SEED_STRIDE}
    if row is not MAIN_ROW:
        overrides = {**overrides, "cma.x0": ""}
    return cfg.replace(**overrides)


def continued_config(run: str | Path | RunDir, name: str) -> Config:
    """Continued row `name`'s config (:data:`CONTINUED`): the run's final stage's recorded config
    (its CMA-ES settings and tracks, and its runtime fields, which a caller may replace) with the
    row's change, on no iteration's M, and ``cma.x0`` empty: :func:`run_ablation` starts the mean
    at the continued ablation's controller when it runs, and ``controller/done.json`` records that
    file and its hash.

    A run without a final stage raises :class:`~worldmodels.runs.RunDirError` naming it."""
    from worldmodels.final import final_run

    if name not in CONTINUED:
        raise ValueError(f"unknown continued row {name!r}: choose one of {', '.join(CONTINUED)}")
    main = as_run_dir(run)
    final = final_run(main)
    if final is None:
        raise RunDirError(
            f"{main.path / FINAL_FOLDER / CONFIG_FILE}: no final stage; {name!r} evolves with the final stage's CMA-ES settings "
            f"(python -m worldmodels final --run-dir {main.path} first)"
        )
    return final.load_config().replace(**CONTINUED[name].row.overrides, **{"cma.x0": "", "iterate.final_iteration": 0})


class Paired(NamedTuple):
    """A paired comparison of two controllers over the same tracks."""

    difference: float
    """Mean over the tracks of (a's return - b's return)."""
    se: float
    """Its standard error: the sample standard deviation of the per-track differences / sqrt(n)
    (NaN for a single track)."""
    n: int
    """Tracks."""


def paired(a: Mapping[str, Any], b: Mapping[str, Any]) -> Paired:
    """Compare two evaluations (``results.json``: ``returns`` and ``seeds``) track by track.

    Both must have driven the same tracks (in any order); otherwise ValueError names both seed lists.
    """
    seeds_a, seeds_b = [int(x) for x in a["seeds"]], [int(x) for x in b["seeds"]]
    if sorted(seeds_a) != sorted(seeds_b) or len(set(seeds_a)) != len(seeds_a):
        raise ValueError(
            f"a paired comparison needs the same tracks once each: a has seeds {_seed_list(seeds_a)}, "
            f"b has seeds {_seed_list(seeds_b)}"
        )
    by_seed = dict(zip(seeds_b, b["returns"]))
    d = np.array([ra - by_seed[s] for s, ra in zip(seeds_a, a["returns"])], dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return Paired(float(d.mean()), se, len(d))


def _seed_list(seeds: list[int]) -> str:
    """Seeds as a short phrase: ``[5-9] (5 tracks)`` when consecutive, else the first ones."""
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"[{seeds[0]}-{seeds[-1]}] ({len(seeds)} tracks)"
    shown = ", ".join(map(str, seeds[:6])) + (", ..." if len(seeds) > 6 else "")
    return f"[{shown}] ({len(seeds)} tracks)"


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
    """Train and evaluate ablation, continued row or seed run `name` of the main run `run` (config `cfg`);
    resumes like every stage.

    V (and M where the ablation reads a trained one) are copied from the main run, which
    must have finished them; an untrained M is built from ``cfg.train_seed``. The
    controller is evolved with ``cfg.cma`` in ``RUN/ablations/NAME/controller`` and, once
    finished, evaluated on ``cfg.eval``'s tracks into ``RUN/ablations/NAME/eval/results.json``.
    Returns those results, or None while the controller is unfinished.

    A continued row (:data:`CONTINUED`) is the exception: its CMA-ES settings and evaluation tracks
    are the final stage's (:func:`continued_config`), of `cfg` only the runtime fields count
    (workers, device), and `cfg` must otherwise be the main run's recorded config. It starts from
    its ablation's finished controller; once started, it refuses to go on if that controller
    changed (the ablation evolved further), naming the file to delete to start over.
    """
    from worldmodels.evaluation import evaluate_run
    from worldmodels.evolution import is_finished
    from worldmodels.rollout import train_controller
    from worldmodels.train import train_mdrnn

    main = as_run_dir(run)
    sub = ablation_dir(main, name)
    if name in CONTINUED:
        continued, start = _continued_start(cfg, main, sub, name)
        sub_cfg = sub.bind(continued).replace(**{"cma.x0": str(start)})  # x0 is read at generation 0 only
    else:
        sub_cfg = sub.bind(ablation_config(main.bind(cfg), name))
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


def _continued_start(cfg: Config, main: RunDir, sub: RunDir, name: str) -> tuple[Config, Path]:
    """Continued row `name`'s config (with `cfg`'s runtime fields) and its ablation's controller,
    where CMA-ES's mean starts, after checking `cfg` against the main run, and the ablation:
    finished before the row starts, unchanged since."""
    from worldmodels.evolution import is_finished

    continued = continued_config(main, name)  # first: a run without a final stage is told so
    recorded = main.load_config()
    differences = recorded.differences(cfg) if recorded is not None else []
    if differences:
        raise ConfigError(
            f"{name!r} takes its CMA-ES settings from {main.path / FINAL_FOLDER / CONFIG_FILE}, and the rest of the "
            f"config must be the run's; recorded != requested: {'; '.join(differences)}"
        )
    base = ablation_dir(main, CONTINUED[name].base)
    start = base.controller / BEST_WEIGHTS["controller"]
    done = sub.controller / DONE_FILE
    if done.exists():
        started_from = read_json(done).get("start", {}).get("sha256")
        if started_from != (file_sha256(start) if start.exists() else None):
            raise RunDirError(
                f"{done}: {name!r} started from another {start} than the one there now (ablation "
                f"{CONTINUED[name].base!r} evolved further); delete {sub.path} to start it over"
            )
    elif not (sub.controller / ES_CHECKPOINT).exists():
        base_cfg = base.load_config()
        if base_cfg is None or not is_finished(base.controller, base_cfg.cma):
            raise RunDirError(
                f"{base.controller}: ablation {CONTINUED[name].base!r} is not finished, and {name!r} evolves on from its "
                f"controller (python -m worldmodels ablations --name {CONTINUED[name].base} --run-dir {main.path} first)"
            )
    return continued.replace(**cfg.runtime_fields()), start


def _row(name: str, ablation: Ablation, run: RunDir, seed: int = 1) -> dict[str, Any]:
    from worldmodels.evolution import history_seconds, read_history

    label = ablation.label if seed == 1 else f"{ablation.label} (training seed {seed})"
    row: dict[str, Any] = {"name": name, "label": label, "paper": ablation.paper}
    history_path = run.controller / HISTORY_FILE
    history = read_history(history_path) if history_path.exists() else None
    if history is not None:
        row["generations"] = len(history)
        row["controller_seconds"] = history_seconds(history)
    cfg = run.load_config()
    if cfg is not None:
        row["kind"] = cfg.controller.kind
        row["episodes_per_generation"] = cfg.cma.population * cfg.cma.episodes_per_candidate
    if cfg is not None and history is not None:  # training, validation of the mean, final selection
        validations = sum(h["val_mean"] is not None for h in history)
        c = cfg.cma  # population and episodes per candidate as each generation had them (older histories: the config's)
        row["controller_episodes"] = validations * c.eval_episodes + sum(
            int(h["population"] or c.population) * int(h["episodes_per_candidate"] or c.episodes_per_candidate)
            for h in history
        )
        selection_path = run.controller / SELECTION_FILE
        if selection_path.exists():
            selection = read_json(selection_path)
            row["controller_episodes"] += len(selection["candidates"]) * selection["selection_episodes"]
    results = current_results(run)
    if results is not None:
        row.update({k: results[k] for k in ("episodes", "mean", "std", "min", "max")})
        row["eval_seconds"] = results.get("seconds")
    return row


def _seed_runs(main: RunDir) -> list[tuple[str, int]]:
    """The seed runs that have a run directory: (name, seed), by seed, then in the order of :data:`SEEDED`."""
    folder = main.path / ABLATIONS_FOLDER
    found = [_SEED_RUN.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
    runs = [(m[0], int(m[1]), list(SEEDED).index(m[2])) for m in found if m and int(m[1]) >= 2]
    return [(name, seed) for name, seed, _ in sorted(runs, key=lambda r: (r[1], r[2]))
            if (folder / name / CONFIG_FILE).exists()]


def histories(run: str | Path | RunDir) -> dict[str, Path]:
    """The CMA-ES learning curves of a main run, of its final stage and of each of its ablations
    and continued rows that have one: the row's label (the main run's first) to its ``controller/history.csv``."""
    from worldmodels.final import FinalRun

    main = as_run_dir(run)
    paths = {MAIN_ROW.label: main.controller / HISTORY_FILE, FINAL_ROW.label: FinalRun(main).controller / HISTORY_FILE}
    paths.update({ablation.label: ablation_dir(main, name).controller / HISTORY_FILE for name, ablation in ABLATIONS.items()})
    paths.update({c.row.label: ablation_dir(main, name).controller / HISTORY_FILE for name, c in CONTINUED.items()})
    return {label: path for label, path in paths.items() if path.exists()}


def cpu_hour_curves(run: str | Path | RunDir, cores: int) -> dict[str, tuple[Path, int, float]]:
    """:func:`histories` as the curves of :func:`worldmodels.viz.plot_score_vs_cpu_hours`: each
    row's (history, `cores`, the CPU-hours it starts at). The final stage starts after the
    controllers it grew from (:func:`worldmodels.final.controller_seconds`: the first one and the
    iterations'), a continued row after its ablation's evolution, every other row at 0."""
    from worldmodels.evolution import history_seconds, read_history
    from worldmodels.final import controller_seconds

    seconds = controller_seconds(run)
    starts = {FINAL_ROW.label: sum(v for k, v in seconds.items() if k != "final")}
    paths = histories(run)
    for continued in CONTINUED.values():
        base_label = ABLATIONS[continued.base].label
        if continued.row.label in paths and base_label in paths:
            starts[continued.row.label] = history_seconds(read_history(paths[base_label]))
    return {label: (path, cores, starts.get(label, 0.0) / 3600 * cores) for label, path in paths.items()}


def table(run: str | Path | RunDir) -> list[dict[str, Any]]:
    """The ablation table of a main run: one dict per row (the main run first, then its final
    stage when it has one, each ablation and continued row that has a run directory, each seed
    run), with the paper's score, the evaluation
    (episodes, mean, std, min, max, seconds) and the controller's compute (generations, episodes
    per generation, episodes in all with validation and final selection, seconds).

    An evaluated row other than the main run has ``vs_full``, its :func:`paired` comparison with
    the evaluated main run (this row minus the full model); the main run's row and the
    ``z_hidden`` row have, once a seed run of theirs is evaluated, ``seed_means`` (seed 1's
    first) and ``seed_spread`` (the largest minus the smallest).
    """
    from worldmodels.final import final_run

    main = as_run_dir(run)
    rows = [_row(MAIN, MAIN_ROW, main)]
    results = {MAIN: current_results(main)}
    final = final_run(main)
    if final is not None:
        rows.append(_row(FINAL, FINAL_ROW, final))
        results[FINAL] = current_results(final)
    for name, ablation in [*ABLATIONS.items(), *((name, c.row) for name, c in CONTINUED.items())]:
        sub = ablation_dir(main, name)
        if sub.config_path.exists():
            rows.append(_row(name, ablation, sub))
            results[name] = current_results(sub)
    seed_rows = []
    for name, seed in _seed_runs(main):
        ablation, _, _ = _parse(name)
        sub = ablation_dir(main, name)
        seed_rows.append(_row(name, ablation, sub, seed))
        results[name] = current_results(sub)
    rows += seed_rows
    full = results[MAIN]
    for row in rows[1:]:
        mine = results[row["name"]]
        if full is not None and mine is not None and sorted(mine["seeds"]) == sorted(full["seeds"]):
            row["vs_full"] = paired(mine, full)
    for kind, first in ((k, MAIN if k == "zh" else k) for k in SEEDED):
        base = next((r for r in rows if r["name"] == first), None)
        others = [r for r in seed_rows if r["name"].endswith(f"_{kind}") and "mean" in r]
        if base is not None and "mean" in base and others:
            base["seed_means"] = [base["mean"]] + [r["mean"] for r in others]
            base["seed_spread"] = max(base["seed_means"]) - min(base["seed_means"])
    return rows


def _controller_hours(row: dict[str, Any]) -> float:
    """A row's "C hours": the wall time of the controller's evolution plus its evaluation."""
    return ((row.get("controller_seconds") or 0.0) + (row.get("eval_seconds") or 0.0)) / 3600


def _vs_full(row: dict[str, Any]) -> str:
    """A row's paired difference to the full model, ``-12.3 ± 4.5``; empty without one."""
    if row.get("vs_full") is None:
        return ""
    d = row["vs_full"]
    return f"{d.difference:+.1f} ± {d.se:.1f}"


def _seed_spread(row: dict[str, Any]) -> str:
    """A row's spread between training seeds, ``15.2 (2 seeds)``; empty without one."""
    return f"{row['seed_spread']:.1f} ({len(row['seed_means'])} seeds)" if "seed_spread" in row else ""


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`table` as a fixed-width text table; "C episodes" counts the controller's
    training, validation and selection episodes, "C hours" adds the evaluation's time to theirs;
    "vs full" is the paired difference to the full model ± its standard error, "seed spread"
    the largest minus the smallest score over training seeds."""
    lines = [
        f"{'setting':60s} {'paper':>26s} {'this run':>18s} {'min':>5s} {'max':>5s} "
        f"{'generations':>11s} {'C episodes':>10s} {'C hours':>8s} {'vs full':>16s} {'seed spread':>16s}"
    ]
    for r in rows:
        score = f"{r['mean']:.0f} ± {r['std']:.0f}" if "mean" in r else "not evaluated"
        low = f"{r['min']:.0f}" if "min" in r else ""
        high = f"{r['max']:.0f}" if "max" in r else ""
        lines.append(
            f"{r['label']:60s} {r['paper']:>26s} {score:>18s} {low:>5s} {high:>5s} "
            f"{r.get('generations', 0):>11d} {r.get('controller_episodes', 0):>10,d} {_controller_hours(r):>8.2f} "
            f"{_vs_full(r):>16s} {_seed_spread(r):>16s}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`table` as a Markdown table (the README's), scores in bold; a row not
    evaluated yet says so and leaves its other cells empty."""
    lines = [
        "| setting | paper | this run | min | max | generations | C episodes | C hours | vs full (± SE) | seed spread |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "mean" not in r:
            cells = [r["label"], r["paper"], "not evaluated yet"] + [""] * 7
        else:
            cells = [
                r["label"], r["paper"], f"**{r['mean']:.1f} ± {r['std']:.1f}**", f"{r['min']:.0f}", f"{r['max']:.0f}",
                str(r.get("generations", 0)), f"{r.get('controller_episodes', 0):,d}", f"{_controller_hours(r):.2f}",
                _vs_full(r), _seed_spread(r),
            ]
        lines.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    return "\n".join(lines)
