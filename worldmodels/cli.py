"""``python -m worldmodels COMMAND --scale S --run-dir DIR [--section.field VALUE ...]``.

Each command is a dataclass of its options (the common ones in :class:`Common`) and a
function that runs it. ``--scale`` picks the preset whose values are the defaults of
every ``--section.field`` option; ``--help`` on a command lists them all with their
meaning. Commands are added to :data:`COMMANDS`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Annotated, Callable

import tyro

from worldmodels.config import SCALES, Config, ConfigError, preset, unchecked
from worldmodels.runs import (
    DREAM_RESULTS_FILE, HISTORY_FILE, RESULTS_FILE, SELECTION_FILE, RunDir, RunDirError, read_json,
)


@dataclasses.dataclass
class Common:
    run_dir: Path
    """Run directory: every stage reads and writes here, and resumes what it finds."""
    config: Annotated[Config, tyro.conf.arg(name="")]
    scale: str = "book"
    """Preset whose values are the defaults below: 'tiny', 'book' or 'paper'."""
    quiet: bool = False
    """No progress bars."""


@dataclasses.dataclass
class Collect(Common):
    """Collect the random-policy dataset into RUN_DIR/data (resumes an interrupted collection)."""

    workers: int | None = None
    """Worker processes (default: data.workers)."""


def run_collect(args: Collect) -> None:
    from worldmodels.data import collect

    files = collect(args.config, args.run_dir, quiet=args.quiet, workers=args.workers)
    print(f"{len(files)} episodes in {RunDir(args.run_dir).data}")


def _run_config(args: Common) -> Config:
    """The run's recorded config when it has one (a finished run is evaluated as trained), else the CLI's."""
    run = RunDir(args.run_dir)
    return run.load_config() or run.bind(args.config)


def _agent_run(args: Common) -> tuple[RunDir, Config]:
    """The run directory of the run's agent and its config: the final stage's when the run has one
    (:func:`worldmodels.final.agent_run`, an error while it is unfinished), else the run's (:func:`_run_config`)."""
    from worldmodels.final import agent_run, final_run

    if final_run(args.run_dir) is not None:
        return agent_run(args.run_dir)
    return RunDir(args.run_dir), _run_config(args)


@dataclasses.dataclass
class Evaluate(Common):
    """Evaluate the run's agent (or --controller) on full episodes over unseen tracks; writes the results
    into its run directory's eval/results.json (RUN_DIR/final/eval/ for the final stage's agent)."""

    episodes: int | None = None
    """Episodes, one track each (default: eval.episodes)."""
    seed: int | None = None
    """First track's seed; episode i uses seed + i (default: eval.seed)."""
    json: bool = False
    """Print one JSON object (returns, mean, std, min, max) instead of a readable line."""
    controller: str = "main"
    """'main' (the run's agent: the final stage's controller, RUN_DIR/final/controller/best.safetensors
    driving with its iteration's M, when the run has a final stage (an unfinished one is an error),
    else 'first'), 'first' (the first controller,
    RUN_DIR/controller/best.safetensors, evolved on the first M), 'final' (the final stage's), 'dream' (the controller trained in
    M's dream: the iteration's whose dream controller did best on the validation tracks,
    RUN_DIR/iterations/NN/controller/dream_tau{TAU}_best.safetensors, driving
    with that iteration's M, else RUN_DIR/controller/dream_tau{TAU}_best.safetensors; results in that folder's
    eval/dream_results.json), or a controller file."""
    tau: float | None = None
    """With --controller dream: the dream's temperature (default: dream.temperature of the run's config)."""
    workers: int | None = None
    """Worker processes (default: cma.workers; 0: one per core)."""
    max_steps: int | None = None
    """Steps per episode (default: eval.max_steps, CarRacing-v3's full 1,000; fewer only for quick checks)."""
    pretrained: str = ""
    """Evaluate a run shipped in the package ('book'): its checksums are checked and it is
    copied into RUN_DIR (default without --run-dir: runs/pretrained-NAME)."""


def run_evaluate(args: Evaluate) -> None:
    import json

    from worldmodels.evaluation import evaluate_run

    if args.pretrained:
        from worldmodels import pretrained

        pretrained.install(args.pretrained, args.run_dir)
    results_file = RESULTS_FILE
    controller = None if args.controller in ("main", "first", "final") else Path(args.controller)
    if args.controller == "final":
        from worldmodels.final import FinalRun, final_run

        if final_run(args.run_dir) is None:
            raise RunDirError(f"{FinalRun(args.run_dir).path}: no final stage (python -m worldmodels final)")
    if args.controller in ("main", "final"):  # the final stage's agent, driving with its iteration's M
        run, cfg = _agent_run(args)
    else:
        run, cfg = args.run_dir, _run_config(args)
    if args.controller == "dream":  # the last iteration's dream controller with its M, else the run's
        from worldmodels.iterate import dream_controller

        run, controller = dream_controller(cfg, args.run_dir, args.tau)
        cfg, results_file = run.load_config(), DREAM_RESULTS_FILE
    results = evaluate_run(
        run, cfg, episodes=args.episodes, seed=args.seed, workers=args.workers,
        controller=controller, max_steps=args.max_steps, results_file=results_file,
    )
    if args.json:
        print(json.dumps({k: results[k] for k in ("returns", "seeds", "episodes", "mean", "std", "min", "max")}))
    else:
        print(f"{results['episodes']} episodes: {results['mean']:.1f} +- {results['std']:.1f} "
              f"(min {results['min']:.1f}, max {results['max']:.1f})")


@dataclasses.dataclass
class Record(Common):
    """Record one episode of the run's agent (the final stage's once there is one): real frame, V's
    reconstruction, M's prediction."""

    out: Path = Path("episode.mp4")
    """Video file; .mp4 or .gif."""
    seed: int | None = None
    """Track seed (default: eval.seed)."""
    controller: Path | None = None
    """Controller file, driving with the run's first M (default: the run's agent: RUN_DIR/final's
    controller and its iteration's M once there is a final stage, else RUN_DIR/controller/best.safetensors)."""
    max_steps: int = 1000
    """Steps to record at most."""
    tau: float | None = None
    """M's prediction: the most likely component's mean (default), or a sample at this temperature."""


def run_record(args: Record) -> None:
    from worldmodels.evaluation import load_agent_and_controller, record

    run, cfg = _agent_run(args) if args.controller is None else (RunDir(args.run_dir), _run_config(args))
    agent, params, _ = load_agent_and_controller(run, cfg, args.controller)
    seed = args.seed if args.seed is not None else cfg.eval.seed
    result = record(agent, params, seed, args.out, cfg.env, args.max_steps, tau=args.tau)
    print(f"{args.out}: {int(result.steps[0])} steps, return {result.returns[0]:.1f}")


@dataclasses.dataclass
class TrainVAE(Common):
    """Train V on RUN_DIR/data into RUN_DIR/vae (resumes; loads when already finished)."""

    max_steps: int | None = None
    """Stop after this many steps in total (with a checkpoint); run again to resume."""


def run_train_vae(args: TrainVAE) -> None:
    from worldmodels.train import stage_summary, train_vae

    train_vae(args.config, args.run_dir, quiet=args.quiet, max_steps=args.max_steps)
    print(stage_summary(args.run_dir, "vae"))


@dataclasses.dataclass
class Encode(Common):
    """Encode every episode with the trained V into RUN_DIR/latents (mu, logvar; resumes)."""

    batch_size: int = 250
    """Frames encoded at once."""


def run_encode(args: Encode) -> None:
    from worldmodels.train import encode

    files = encode(args.config, args.run_dir, quiet=args.quiet, batch_size=args.batch_size)
    print(f"{len(files)} episodes encoded in {RunDir(args.run_dir).latents}")


@dataclasses.dataclass
class TrainMDRNN(Common):
    """Train M on RUN_DIR/latents into RUN_DIR/mdrnn (encodes first if needed; resumes)."""

    max_steps: int | None = None
    """Stop after this many steps in total (with a checkpoint); run again to resume."""


def run_train_mdrnn(args: TrainMDRNN) -> None:
    from worldmodels.train import stage_summary, train_mdrnn

    train_mdrnn(args.config, args.run_dir, quiet=args.quiet, max_steps=args.max_steps)
    print(stage_summary(args.run_dir, "mdrnn"))


@dataclasses.dataclass
class TrainController(Common):
    """Evolve the controller with CMA-ES in the real environment into RUN_DIR/controller (resumes; loads when finished)."""

    scheduler: str | None = None
    """Dask scheduler address, tcp://host:8786 (default: cma.scheduler; empty: local processes)."""
    workers: int | None = None
    """Local worker processes (default: cma.workers; 0: one per core)."""
    max_generations: int | None = None
    """Stop after this many generations in total (with a checkpoint); run again to resume."""


def _controller_config(args: Common, scheduler: str | None, workers: int | None) -> Config:
    cfg = args.config
    if scheduler is not None:
        cfg = cfg.replace(**{"cma.scheduler": scheduler})
    if workers is not None:
        cfg = cfg.replace(**{"cma.workers": workers})
    return cfg


def run_train_controller(args: TrainController) -> None:
    from worldmodels.rollout import train_controller

    cfg = _controller_config(args, args.scheduler, args.workers)
    train_controller(cfg, args.run_dir, quiet=args.quiet, max_generations=args.max_generations)
    _print_evolution(RunDir(args.run_dir).controller)


def _print_evolution(out: Path) -> None:
    """One line on the CMA-ES run in `out`: generations, best validation mean, the final selection."""
    from worldmodels.evolution import read_history

    history = read_history(out / HISTORY_FILE) if (out / HISTORY_FILE).exists() else []  # --max-generations 0
    validated = [r for r in history if r["val_mean"] is not None]
    line = f"{len(history)} generations in {out}"
    if validated:
        best = max(validated, key=lambda r: r["val_mean"])
        line += f"; best validation {best['val_mean']:.1f} +- {best['val_std']:.1f} at generation {int(best['generation'])}"
    if (out / SELECTION_FILE).exists():
        selection = read_json(out / SELECTION_FILE)
        chosen = next(c for c in selection["candidates"] if c["generation"] == selection["chosen_generation"])
        line += (f"; selected generation {chosen['generation']} ({chosen['combined_mean']:.1f} over "
                 f"{selection['validation_episodes'] + selection['selection_episodes']} validation tracks)")
    print(line)


@dataclasses.dataclass
class Dream(Common):
    """Evolve the controller inside M's dream (--dream.temperature), then score it in the real environment;
    with --taus, one controller per temperature and the table of their dream and real returns."""

    max_generations: int | None = None
    """Stop after this many generations in total (with a checkpoint); run again to resume."""
    real_eval: bool = True
    """Evaluate the dream's best controller in the real environment (eval.episodes tracks)."""
    taus: tuple[float, ...] = ()
    """Temperatures of the table (e.g. 0.5 1.0 1.15 1.3): each trained (or continued) in the dream and
    scored on real validation tracks, never the evaluation tracks; prints the table (empty: --dream.temperature)."""
    real_episodes: int | None = None
    """With --taus or --correlation: real validation tracks (default: cma.eval_episodes + cma.select_episodes)."""
    iteration: int = 0
    """With --taus or --correlation: the M and dreams of iteration N of `iterate` (RUN_DIR/iterations/NN),
    with that iteration's config (other config flags than --dream.temperature do not apply); 0: the run's own."""
    correlation: int = 0
    """Instead of training: this many candidates around the dream run at --dream.temperature (from its
    CMA-ES state, or around its best controller when it has none) scored in the dream and on the real validation tracks; prints one JSON object with both
    mean returns and their Pearson and Spearman correlation, recorded in controller/dream.json (read again
    by a second call with the same settings, and by a shipped run)."""


def run_dream(args: Dream) -> None:
    from worldmodels.dream import markdown_table, temperature_table, train_controller_in_dream

    if args.iteration and not (args.taus or args.correlation):
        raise ConfigError("--iteration: only with --taus or --correlation (iterate trains each iteration's controller)")
    if args.correlation:
        _print_correlation(args)
        return
    if args.taus:
        cfg, run = _dream_run(args)
        rows = temperature_table(
            cfg, run, args.taus, real_episodes=args.real_episodes, max_generations=args.max_generations, quiet=args.quiet,
        )
        print(markdown_table(rows))
        return
    res = train_controller_in_dream(
        args.config, args.run_dir, quiet=args.quiet, max_generations=args.max_generations,
        evaluate_real=args.real_eval,
    )
    line = f"tau {res.temperature:g}: dream return {res.dream_return:.1f}"
    if res.real is not None:
        line += f", real {res.real['real_mean']:.1f} +- {res.real['real_std']:.1f} over {res.real['real_episodes']} tracks"
    print(line)


def _dream_run(args: Dream) -> tuple[Config, RunDir]:
    """The config and run directory that --taus and --correlation work on: the CLI's config (--taus,
    which records it in a new run) or the run's recorded one (--correlation) and the run; with
    --iteration N, that iteration's config and folder."""
    if args.iteration < 0:
        raise ConfigError(f"--iteration {args.iteration}: an iteration is numbered from 1 (0: the run's own)")
    if not args.iteration:
        return (_run_config(args) if args.correlation else args.config), RunDir(args.run_dir)
    from worldmodels.iterate import IterationRun, finished_iterations

    held = finished_iterations(args.run_dir)
    if args.iteration > held:
        raise ConfigError(f"--iteration {args.iteration}: {args.run_dir} holds {held} finished iterations")
    recorded = RunDir(args.run_dir).load_config()
    view = IterationRun(args.run_dir, args.iteration, recorded)
    return view.cfg, view


def _print_correlation(args: Dream) -> None:
    import json

    from worldmodels.dream import recorded_correlation

    cfg, run = _dream_run(args)
    out = recorded_correlation(cfg, run, candidates=args.correlation, real_episodes=args.real_episodes,
                               tau=args.config.dream.temperature)
    print(json.dumps(out))


@dataclasses.dataclass
class Iterate(Common):
    """Iterative training: collect with the current controller (with parameter noise), fine-tune M on
    all the data, evolve C again, score it; --iterate.iterations times, in RUN_DIR/iterations/NN (resumes)."""


def run_iterate(args: Iterate) -> None:
    from worldmodels.iterate import iterate, iteration_summary

    records = iterate(args.config, args.run_dir, quiet=args.quiet)
    for record in records:
        print(iteration_summary(record))
    if not records:
        print("iterate.iterations is 0: no iterations to run (set --iterate.iterations N)")


@dataclasses.dataclass
class Final(Common):
    """The final stage: evolve C again in CarRacing on an iteration's M, starting from its dream
    controller, with these --cma.* settings, in RUN_DIR/final (resumes); then evaluate it. It becomes the run's agent."""

    iteration: int = 0
    """The iteration whose M and dream controller to start from (0: the one the stage already runs on,
    or for a new stage the one whose dream controller scored best on the validation tracks)."""
    scheduler: str | None = None
    """Dask scheduler address, tcp://host:8786 (default: cma.scheduler; empty: local processes)."""
    workers: int | None = None
    """Local worker processes (default: cma.workers; 0: one per core)."""
    max_generations: int | None = None
    """Stop after this many generations in total (with a checkpoint); run again to resume."""


def run_final(args: Final) -> None:
    from worldmodels.final import FinalRun, train_final

    cfg = _controller_config(args, args.scheduler, args.workers)
    results = train_final(cfg, args.run_dir, args.iteration, quiet=args.quiet, max_generations=args.max_generations)
    _print_evolution(FinalRun(args.run_dir).controller)
    if results is not None:
        print(f"{results['episodes']} evaluation episodes: {results['mean']:.1f} +- {results['std']:.1f} "
              f"(min {results['min']:.1f}, max {results['max']:.1f})")


@dataclasses.dataclass
class Ablations(Common):
    """The paper's ablations of the run in RUN_DIR at its CMA-ES budget (V only, V only with a
    hidden layer, an untrained M), each in RUN_DIR/ablations/NAME, evaluated like the run; prints the table.
    'z_hidden_on' evolves the finished 'z_hidden' on at the budget of the run's final stage instead."""

    name: str = "all"
    """Which ablation: 'z', 'z_hidden', 'untrained_m', a seed run ('seed2_zh', 'seed2_z_hidden', ...),
    or 'all' (those three and the seed runs, one after another); or 'z_hidden_on', only by name:
    'z_hidden' evolved on with the CMA-ES settings in RUN_DIR/final/config.json (the --cma options
    must then be the run's own)."""
    seeds: int = 1
    """Training seeds of the full model and of the hidden-layer V-only controller: with 'all', 2 or
    more also trains RUN_DIR/ablations/seedK_zh and seedK_z_hidden for K = 2..seeds."""
    workers: int | None = None
    """Local worker processes (default: cma.workers; 0: one per core)."""
    max_generations: int | None = None
    """Stop each controller after this many generations in total (with a checkpoint); run again to resume."""


def run_ablations(args: Ablations) -> None:
    from worldmodels.ablations import ABLATIONS, ablation_dir, format_table, run_ablation, seed_run_names, table

    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is out of range: allowed [1, inf]")
    names = [*ABLATIONS, *seed_run_names(args.seeds)] if args.name == "all" else [args.name]
    try:
        for name in names:
            ablation_dir(args.run_dir, name)
    except ValueError as e:
        raise ConfigError(f"--name: {e} or 'all'") from e
    cfg = _controller_config(args, None, args.workers)
    for name in names:
        if not args.quiet:
            print(f"== ablation {name}", flush=True)
        run_ablation(cfg, args.run_dir, name, quiet=args.quiet, max_generations=args.max_generations)
    print(format_table(table(args.run_dir)))


@dataclasses.dataclass
class Pipeline(Common):
    """Run every stage in order: collect, train-vae, encode, train-mdrnn, train-controller, evaluate.

    Each stage loads what is already finished and resumes what was interrupted; the
    episodes are collected and encoded only while V or M still needs them.
    """

    scheduler: str | None = None
    """Dask scheduler address for train-controller (default: cma.scheduler)."""


def run_pipeline(args: Pipeline) -> None:
    from worldmodels.data import collect, needs_dataset
    from worldmodels.rollout import train_controller
    from worldmodels.train import encode, train_mdrnn, train_vae

    cfg, run, quiet = args.config, args.run_dir, args.quiet
    dataset = needs_dataset(run)  # finished V and M (a shipped run, say) need no episodes
    stages = [
        ("collect", lambda: collect(cfg, run, quiet=quiet) if dataset else None),
        ("train-vae", lambda: train_vae(cfg, run, quiet=quiet)),
        ("encode", lambda: encode(cfg, run, quiet=quiet) if dataset else None),
        ("train-mdrnn", lambda: train_mdrnn(cfg, run, quiet=quiet)),
        ("train-controller", lambda: train_controller(_controller_config(args, args.scheduler, None), run, quiet=quiet)),
        ("evaluate", lambda: run_evaluate(Evaluate(run_dir=run, config=cfg, scale=args.scale, quiet=quiet))),
    ]
    for name, stage in stages:
        if not quiet:
            print(f"== {name}", flush=True)
        try:
            stage()
        except _user_errors() as e:
            sys.exit(f"error in {name}: {_one_line(e)}")


COMMANDS: dict[str, tuple[type[Common], Callable]] = {
    "collect": (Collect, run_collect),
    "train-vae": (TrainVAE, run_train_vae),
    "encode": (Encode, run_encode),
    "train-mdrnn": (TrainMDRNN, run_train_mdrnn),
    "train-controller": (TrainController, run_train_controller),
    "dream": (Dream, run_dream),
    "iterate": (Iterate, run_iterate),
    "final": (Final, run_final),
    "evaluate": (Evaluate, run_evaluate),
    "record": (Record, run_record),
    "ablations": (Ablations, run_ablations),
    "pipeline": (Pipeline, run_pipeline),
}
"""Command name -> (its options dataclass, the function that runs it)."""


def _scale_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--scale" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--scale="):
            return arg.split("=", 1)[1]
    return Common.scale


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors the user can act on (a bad value, a missing or damaged file, a failed task), printed
    as one line without a traceback."""
    from worldmodels.data import EpisodeError
    from worldmodels.parallel import TaskError
    from worldmodels.pretrained import ChecksumError
    from worldmodels.train import TrainingError

    return ConfigError, RunDirError, TrainingError, EpisodeError, ChecksumError, TaskError, FileNotFoundError


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _config_fields() -> list[str]:
    """Names of the config's fields: ``data.episodes``, ... for the sections', ``device``, ... for its own."""
    cfg, names = Config(), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        is_section = dataclasses.is_dataclass(value)
        names += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)] if is_section else [f.name]
    return names


def _with_flags(message: str) -> str:
    """A config error's message with the fields it names written as the flags that set them:
    ``data.episode_steps = 0 ...`` -> ``--data.episode-steps = 0 ...``."""
    for name in sorted(_config_fields(), key=len, reverse=True):
        flag = "--" + name.replace("_", "-")
        if "." in name:
            message = re.sub(rf"(?<![\w.-]){re.escape(name)}\b", flag, message)
        elif re.match(rf"{re.escape(name)}\b", message):
            message = flag + message[len(name):]
    return message


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    scale = _scale_from_argv(argv)
    if argv[:1] == ["evaluate"] and "--run-dir" not in argv and not any(a.startswith("--run-dir=") for a in argv):
        name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--pretrained"), None)
        if name:
            argv += ["--run-dir", str(Path("runs") / f"pretrained-{name}")]
    if scale not in SCALES:
        sys.exit(f"error: --scale {scale!r} is not a preset: choose one of {', '.join(SCALES)}")
    cfg = preset(scale)
    defaults = {name: cls(run_dir=tyro.MISSING, config=cfg, scale=scale) for name, (cls, _) in COMMANDS.items()}
    with unchecked():  # checked below, so that an error names the flag rather than tyro's internal field
        args = tyro.cli(
            tyro.extras.subcommand_type_from_defaults(defaults),
            args=argv,
            prog="python -m worldmodels",
            description="World Models on CarRacing-v3: collect, train V, M and C, evaluate.",
        )
    try:
        args.config = Config.from_dict(args.config.to_dict())
    except ConfigError as e:
        sys.exit(f"error: {_with_flags(_one_line(e))}")
    name = next(n for n, (cls, _) in COMMANDS.items() if type(args) is cls)
    try:
        COMMANDS[name][1](args)
    except _user_errors() as e:
        sys.exit(f"error: {_one_line(e)}")


if __name__ == "__main__":
    main()
