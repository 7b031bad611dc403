"""Steps/s of gymnasium's CarRacing-v3 vs worldmodels/CarRacing-v3, one process and one per core.

    python benchmarks/bench_render.py [--steps 200] [--rounds 10] [--procs N]

Both arms run in each process, alternating blocks of ``--steps`` steps (the order flips every
round), so that load from elsewhere on a shared host hits them alike; with several processes,
all of them start each block together (a barrier). Both arms step the same seeded episodes
with the same actions, so they render the same frames. The first 20 steps (imports, compiled
code loaded from numba's cache) are not timed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os

import gymnasium

import worldmodels  # noqa: F401  (registers worldmodels/CarRacing-v3)
from stepping import random_actions, step_block

ENVS = {"upstream": "CarRacing-v3", "fast": "worldmodels/CarRacing-v3"}
WARMUP = 20


def alternating_steps_per_second(steps: int, rounds: int, seed: int = 0, barrier=None) -> dict[str, float]:
    """Steps/s of each arm over ``rounds`` alternating blocks of ``steps`` steps in this process."""
    envs = {name: gymnasium.make(env_id) for name, env_id in ENVS.items()}
    warmup = random_actions(WARMUP, seed)
    for env in envs.values():
        env.reset(seed=seed)
        step_block(env, warmup)
    seconds = dict.fromkeys(envs, 0.0)
    for r in range(rounds):
        actions = random_actions(steps, seed * 1000 + r + 1)
        for name in list(envs)[:: 1 if r % 2 == 0 else -1]:
            if barrier is not None:
                barrier.wait()
            seconds[name] += step_block(envs[name], actions)
    for env in envs.values():
        env.close()
    return {name: rounds * steps / s for name, s in seconds.items()}


def _worker(steps: int, rounds: int, seed: int, barrier, results) -> None:
    results.put(alternating_steps_per_second(steps, rounds, seed, barrier))


def parallel_steps_per_second(steps: int, rounds: int, procs: int) -> dict[str, float]:
    """Summed steps/s of each arm over ``procs`` processes stepping at the same time."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(steps, rounds, seed, barrier, results)) for seed in range(procs)]
    for w in workers:
        w.start()
    rates = [results.get() for _ in workers]
    for w in workers:
        w.join()
    return {name: sum(r[name] for r in rates) for name in ENVS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per block")
    parser.add_argument("--rounds", type=int, default=10, help="blocks per arm")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    rows = [
        ("1 process", alternating_steps_per_second(args.steps, args.rounds)),
        (f"{args.procs} processes", parallel_steps_per_second(args.steps, args.rounds, args.procs)),
    ]
    print(f"{'setting':<14} {'upstream steps/s':>17} {'fast steps/s':>13} {'ratio':>6}")
    for label, rate in rows:
        print(f"{label:<14} {rate['upstream']:>17.0f} {rate['fast']:>13.0f} {rate['fast'] / rate['upstream']:>5.2f}x")


if __name__ == "__main__":
    main()
