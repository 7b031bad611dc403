"""Steps/s of gymnasium's CarRacing-v3 vs worldmodels/CarRacing-v3, one process and one per core.

    python benchmarks/bench_render.py [--steps 1000] [--procs N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os

import gymnasium

import worldmodels  # noqa: F401  (registers worldmodels/CarRacing-v3)
from stepping import random_steps_per_second

ENVS = {"upstream": "CarRacing-v3", "fast": "worldmodels/CarRacing-v3"}


def steps_per_second(env_id: str, steps: int, seed: int = 0) -> float:
    """Step one env with uniform random actions (resetting on episode end); return steps/s."""
    return random_steps_per_second(gymnasium.make(env_id), steps, seed)


def _worker(args: tuple[str, int, int]) -> float:
    return steps_per_second(*args)


def parallel_steps_per_second(env_id: str, steps: int, procs: int) -> float:
    """Summed steps/s of ``procs`` processes, each stepping its own env at the same time."""
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_worker, [(env_id, 20, seed) for seed in range(procs)])  # warm-up imports
        return sum(pool.map(_worker, [(env_id, steps, seed) for seed in range(procs)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per process and measurement")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    rows = []
    single = {name: steps_per_second(env_id, args.steps) for name, env_id in ENVS.items()}
    rows.append(("1 process", single["upstream"], single["fast"]))
    multi = {name: parallel_steps_per_second(env_id, args.steps, args.procs) for name, env_id in ENVS.items()}
    rows.append((f"{args.procs} processes", multi["upstream"], multi["fast"]))

    print(f"{'setting':<14} {'upstream steps/s':>17} {'fast steps/s':>13} {'ratio':>6}")
    for label, up, fast in rows:
        print(f"{label:<14} {up:>17.0f} {fast:>13.0f} {fast / up:>5.2f}x")


if __name__ == "__main__":
    main()
