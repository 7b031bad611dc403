"""``python -m worldmodels COMMAND --scale S --run-dir DIR [--section.field VALUE ...]``.

Each command is a dataclass of its options (the common ones in :class:`Common`) and a
function that runs it. ``--scale`` picks the preset whose values are the defaults of
every ``--section.field`` option; ``--help`` on a command lists them all with their
meaning. Commands are added to :data:`COMMANDS`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Callable

import tyro

from worldmodels.config import SCALES, Config, ConfigError, preset
from worldmodels.runs import RunDirError


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
    print(f"{len(files)} episodes in {args.run_dir / 'data'}")


COMMANDS: dict[str, tuple[type[Common], Callable]] = {
    "collect": (Collect, run_collect),
}
"""Command name -> (its options dataclass, the function that runs it)."""


def _scale_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--scale" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--scale="):
            return arg.split("=", 1)[1]
    return Common.scale


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    scale = _scale_from_argv(argv)
    if scale not in SCALES:
        sys.exit(f"error: --scale {scale!r} is not a preset: choose one of {', '.join(SCALES)}")
    cfg = preset(scale)
    defaults = {name: cls(run_dir=tyro.MISSING, config=cfg, scale=scale) for name, (cls, _) in COMMANDS.items()}
    try:
        args = tyro.cli(
            tyro.extras.subcommand_type_from_defaults(defaults),
            args=argv,
            prog="python -m worldmodels",
            description="World Models on CarRacing-v3: collect, train V, M and C, evaluate.",
        )
    except ConfigError as e:
        sys.exit(f"error: {e}")
    name = next(n for n, (cls, _) in COMMANDS.items() if type(args) is cls)
    try:
        COMMANDS[name][1](args)
    except (ConfigError, RunDirError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
