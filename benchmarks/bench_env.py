"""Environment steps per second (one process and one per core) and collection throughput.

    python benchmarks/bench_env.py [--steps 300] [--episodes 8]

Prints a table; the numbers go into benchmarks/README.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor


from stepping import random_steps_per_second
from worldmodels.config import EnvConfig, preset
from worldmodels.data import collect
from worldmodels.env import make_env, make_raw_env
from worldmodels.parallel import cpu_count, mp_context


def steps_per_second(kind: str, steps: int, seed: int = 0) -> float:
    """Step one environment with uniform random actions; the first reset is not timed."""
    env = {
        "upstream (96x96)": lambda: make_raw_env(fast_render=False),
        "make_env, upstream renderer": lambda: make_env(EnvConfig(fast_render=False)),
        "make_env, fast renderer": lambda: make_env(EnvConfig(fast_render=True)),
    }[kind]()
    return random_steps_per_second(env, steps, seed)


def parallel_steps_per_second(kind: str, steps: int, processes: int) -> float:
    with ProcessPoolExecutor(processes, mp_context=mp_context()) as pool:
        start = time.perf_counter()
        list(pool.map(steps_per_second, [kind] * processes, [steps] * processes, range(processes)))
        return processes * steps / (time.perf_counter() - start)


def collection_throughput(episodes: int, steps: int, fast: bool) -> float:
    run = tempfile.mkdtemp()
    cfg = preset(
        "tiny",
        **{"data.episodes": episodes, "data.episode_steps": steps, "data.workers": 0, "env.fast_render": fast},
    )
    try:
        start = time.perf_counter()
        collect(cfg, run, quiet=True)
        return episodes * steps / (time.perf_counter() - start)
    finally:
        shutil.rmtree(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per process")
    parser.add_argument("--episodes", type=int, default=8, help="episodes in the collection benchmark")
    parser.add_argument("--episode-steps", type=int, default=250)
    args = parser.parse_args()
    cores = cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, python {platform.python_version()}")
    print(f"{'what':42s} {'1 process':>12s} {f'{cores} processes':>14s}")
    kinds = ["upstream (96x96)", "make_env, upstream renderer", "make_env, fast renderer"]
    for kind in kinds:
        one = steps_per_second(kind, args.steps)
        many = parallel_steps_per_second(kind, args.steps, cores)
        print(f"{kind + ' (steps/s)':42s} {one:12.0f} {many:14.0f}")
    for fast in (False, True):
        rate = collection_throughput(args.episodes, args.episode_steps, fast)
        label = f"collect, {'fast' if fast else 'upstream'} renderer (steps/s)"
        print(f"{label:42s} {'':12s} {rate:14.0f}")


if __name__ == "__main__":
    main()
