"""Steps/s of the real CarRacing-v3 vs M's dream, side by side on the same CPU.

    python benchmarks/bench_dream.py [--env-steps 500] [--batch 1024] [--dream-steps 50] [--threads 1]

Real: one process stepping ``make_env`` (the 64x64 observation transform included) with
random actions. Dream: the paper-sized M (z 32, LSTM 256, 5 components, reward and done
heads) and a batch of linear controllers (one ``Controller`` of K vectors), one ``DreamEnv`` of
``--batch`` dreams (64 candidates x 16 episodes by default: one CMA-ES generation),
at temperature 1.15. Both use ``--threads`` torch threads (default 1: one core each).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from stepping import random_steps_per_second
from worldmodels.config import EnvConfig
from worldmodels.controller import Controller, ControllerShape
from worldmodels.dream import DreamEnv, dream_rollout
from worldmodels.env import make_env
from worldmodels.mdrnn import MDRNN


def real_steps_per_second(steps: int, fast_render: bool = True, seed: int = 0) -> float:
    return random_steps_per_second(make_env(EnvConfig(fast_render=fast_render)), steps, seed)


def dream_steps_per_second(batch: int, steps: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    mdrnn = MDRNN(32, 3, 256, 5, reward_head=True, done_head=True)
    with torch.no_grad():
        mdrnn.done_head.bias.fill_(-20.0)  # no dream ends early: every step of the batch is counted
    shape = ControllerShape("zh", 32, 256)
    ctrl = Controller.from_shape(shape, np.random.default_rng(seed).normal(0, 0.1, (batch, shape.n_params)))
    env = DreamEnv(mdrnn, temperature=1.15, max_steps=steps)
    z0 = torch.randn(batch, 32)
    dream_rollout(DreamEnv(mdrnn, 1.15, 2), ctrl, z0)  # warm-up
    start = time.perf_counter()
    _, n = dream_rollout(env, ctrl, z0, torch.Generator().manual_seed(seed))
    elapsed = time.perf_counter() - start
    return int(n.sum()) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dream-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--upstream", action="store_true", help="gymnasium's renderer instead of the fast one")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    real = real_steps_per_second(args.env_steps, fast_render=not args.upstream)
    dream = dream_steps_per_second(args.batch, args.dream_steps)
    print(f"| what | steps/s ({args.threads} thread) |")
    print("| --- | ---: |")
    print(f"| real CarRacing-v3 ({'upstream' if args.upstream else 'fast'} renderer), 1 env, random actions | {real:,.0f} |")
    print(f"| dream, batch {args.batch}, paper-sized M + linear C, tau 1.15 | {dream:,.0f} |")
    print(f"| ratio dream / real | {dream / real:,.0f}x |")


if __name__ == "__main__":
    main()
