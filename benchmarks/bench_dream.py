"""Steps/s of the real CarRacing-v3 vs M's dream, side by side on the same CPU; and the time of
one paper-sized dream generation.

    python benchmarks/bench_dream.py [--env-steps 500] [--batch 1024] [--dream-steps 50] [--threads 1]
    python benchmarks/bench_dream.py --generation [--threads 1 2] [--dream-steps 1000] [--device cpu]

Real: one process stepping ``make_env`` (the 64x64 observation transform included) with
random actions. Dream: the paper-sized M (z 32, LSTM 256, 5 components, reward and done
heads) and a batch of linear controllers (one ``Controller`` of K vectors), one ``DreamEnv`` of
``--batch`` dreams (64 candidates x 16 episodes by default: one CMA-ES generation),
at temperature 1.15. Both use ``--threads`` torch threads (default 1: one core each).

``--generation``: one whole CMA-ES generation as :func:`worldmodels.evolution.evolve` has
:func:`worldmodels.dream.dream_task` run it (64 candidates x 16 start latents = 1,024 dreams
of ``--dream-steps`` steps, one task), timed for each ``--threads``. M's done head is
biased so that no dream ends early: every generation is the worst case. The script uses only
what older versions of the package had too, so that ``PYTHONPATH=OLD_CHECKOUT`` times them
in the same session (the table names the package it timed).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from stepping import random_steps_per_second
import worldmodels
from worldmodels.config import EnvConfig
from worldmodels.controller import Controller, ControllerShape
from worldmodels.dream import DreamEnv, DreamWorker, dream_rollout, dream_task
from worldmodels.env import make_env
from worldmodels.mdrnn import MDRNN
from worldmodels.tasks import make_tasks


def real_steps_per_second(steps: int, fast_render: bool = True, seed: int = 0) -> float:
    return random_steps_per_second(make_env(EnvConfig(fast_render=fast_render)), steps, seed)


def paper_mdrnn(seed: int = 0) -> MDRNN:
    """The paper-sized M with reward and done heads; the done head never fires."""
    torch.manual_seed(seed)
    mdrnn = MDRNN(32, 3, 256, 5, reward_head=True, done_head=True)
    with torch.no_grad():
        mdrnn.done_head.bias.fill_(-20.0)  # no dream ends early: every step of the batch is counted
    return mdrnn.eval()


def dream_steps_per_second(batch: int, steps: int, seed: int = 0) -> float:
    mdrnn = paper_mdrnn(seed)
    shape = ControllerShape("zh", 32, 256)
    ctrl = Controller.from_shape(shape, np.random.default_rng(seed).normal(0, 0.1, (batch, shape.n_params)))
    env = DreamEnv(mdrnn, temperature=1.15, max_steps=steps)
    z0 = torch.randn(batch, 32)
    dream_rollout(DreamEnv(mdrnn, 1.15, 2), ctrl, z0)  # warm-up
    start = time.perf_counter()
    _, n = dream_rollout(env, ctrl, z0, torch.Generator().manual_seed(seed))
    elapsed = time.perf_counter() - start
    return int(n.sum()) / elapsed


def generation_seconds(steps: int, threads: int, population: int = 64, episodes: int = 16, device: str = "cpu",
                       seed: int = 0) -> tuple[float, float, float]:
    """One dream generation (`population` x `episodes` dreams of `steps`) on `threads`: its
    wall-clock seconds, the process's CPU seconds, and the mean return."""
    shape = ControllerShape("zh", 32, 256)
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(300, 32)).astype(np.float32)
    logvar = np.full((300, 32), -2.0, np.float32)
    worker = DreamWorker(paper_mdrnn(seed).to(device), mu, logvar, shape, 1.15)
    if hasattr(worker, "threads"):
        worker.threads = threads  # the dream's own threads
    torch.set_num_threads(threads)  # torch's (the only ones of versions before dream.threads)
    params = rng.normal(0, 0.1, (population, shape.n_params))
    seeds = 1_000_000 + np.arange(episodes)
    (task,) = make_tasks("train", params, seeds, population * episodes, steps, generation=0)
    warm = make_tasks("train", params, seeds, population * episodes, 2, generation=0)[0]
    dream_task(worker, warm)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    returns = dream_task(worker, task)
    return time.perf_counter() - start, time.process_time() - cpu, float(np.mean(returns))


def _package() -> str:
    """The package the script timed: its folder and git commit."""
    root = Path(worldmodels.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "?"
    return f"{root} @ {rev}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dream-steps", type=int, default=None, help="steps per dream (default: 50; --generation 1000)")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--upstream", action="store_true", help="gymnasium's renderer instead of the fast one")
    p.add_argument("--generation", action="store_true", help="time one paper-sized dream generation")
    p.add_argument("--device", default="cpu", help="--generation: the dreams' device")
    args = p.parse_args()

    if args.generation:
        steps = args.dream_steps or 1000
        print(f"package: {_package()}")
        print(f"| dream generation, 64 x 16 dreams of {steps} steps, {args.device} | seconds | CPU seconds | "
              "dream steps/s | mean return |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for threads in args.threads:
            seconds, cpu, mean = generation_seconds(steps, threads, device=args.device)
            print(f"| {threads} thread{'s' if threads > 1 else ''} | {seconds:.1f} | {cpu:.1f} | "
                  f"{64 * 16 * steps / seconds:,.0f} | {mean:.3f} |", flush=True)
        return

    torch.set_num_threads(args.threads[0])
    real = real_steps_per_second(args.env_steps, fast_render=not args.upstream)
    dream = dream_steps_per_second(args.batch, args.dream_steps or 50)
    print(f"| what | steps/s ({args.threads[0]} thread) |")
    print("| --- | ---: |")
    print(f"| real CarRacing-v3 ({'upstream' if args.upstream else 'fast'} renderer), 1 env, random actions | {real:,.0f} |")
    print(f"| dream, batch {args.batch}, paper-sized M + linear C, tau 1.15 | {dream:,.0f} |")
    print(f"| ratio dream / real | {dream / real:,.0f}x |")


if __name__ == "__main__":
    main()
