"""Agent rollouts (V + M + C, batched) against the bare environment, side by side.

P worker processes (default: one per core), each stepping a vector of K environments:

* ``bare``: ``make_env`` with random uniform actions, the environments stepped in a loop;
* ``replay``: the bare environments stepped with the agent's own actions (recorded once
  beforehand): the same trajectories and rendering work as the agent, without V, M or C;
* ``agent``: :func:`worldmodels.rollout.rollout` with the paper's model sizes (V z=32, M h=256,
  a 'zh' controller per environment drawn like CMA-ES's first generation, N(0, 0.1)).

The rendering cost depends on what the car does (random actions brake half the time; the
agent's drive), so ``agent / replay`` isolates the cost of the agent itself.

All arms run the same seeds and episode length and start together (a barrier); they
alternate in `--repeats` short rounds so that load from elsewhere hits them alike. The
table reports environment steps per second over all processes and the ratios.

    python benchmarks/bench_rollout.py --processes 2 --envs 8 --steps 100 --repeats 10
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import time

import numpy as np


ARMS = ("bare", "replay", "agent")


def _bare(env_cfg, seeds: list[int], steps, actions=None, rng=None) -> int:
    """Step the environments with random uniform actions, or replay `actions` (K, T, 3) for `steps` (K,)."""
    from worldmodels.rollout import _envs

    envs = _envs(env_cfg, len(seeds))  # the same cached environments as rollout uses
    for env, seed in zip(envs, seeds):
        env.reset(seed=seed)
    limits = np.broadcast_to(np.asarray(steps), (len(seeds),))
    alive = [i for i in range(len(envs)) if limits[i] > 0]
    low, high = np.array([-1.0, 0.0, 0.0], np.float32), np.ones(3, np.float32)
    total, t = 0, 0
    while alive:
        a = actions[:, t] if actions is not None else rng.uniform(low, high, (len(envs), 3)).astype(np.float32)
        still = []
        for i in alive:
            _, _, terminated, truncated, _ = envs[i].step(a[i])
            total += 1
            if not (terminated or truncated) and t + 1 < limits[i]:
                still.append(i)
        alive, t = still, t + 1
    return total


def _worker(rank: int, args, barrier, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from worldmodels.config import EnvConfig
    from worldmodels.mdrnn import MDRNN
    from worldmodels.rollout import Agent, rollout
    from worldmodels.vae import VAE

    torch.manual_seed(rank)
    agent = Agent(VAE(32), MDRNN(32, 3, 256, 5, True, True), "zh", 32, 256, 40, encode_bf16=args.bf16)
    env_cfg = EnvConfig()
    rng = np.random.default_rng(rank)
    params = rng.normal(0.0, 0.1, (args.envs, agent.n_params))
    seeds = [1000 * rank + i for i in range(args.envs)]
    # The agent's own actions, for the replay arm: same trajectories, no V, M or C.
    res = rollout(agent, params, seeds, env_cfg, max_steps=args.steps, trace=True)
    actions = np.zeros((args.envs, args.steps, 3), np.float32)
    for i, tr in enumerate(res.traces):
        actions[i, : len(tr.actions)] = tr.actions
    for rep in range(args.repeats):
        for arm in ARMS:
            barrier.wait()
            t = time.perf_counter()
            if arm == "bare":
                n = _bare(env_cfg, seeds, args.steps, rng=rng)
            elif arm == "replay":
                n = _bare(env_cfg, seeds, res.steps, actions=actions)
            else:
                n = int(rollout(agent, params, seeds, env_cfg, max_steps=args.steps, float64=args.float64).steps.sum())
            queue.put((rep, arm, rank, n, time.perf_counter() - t))


def main() -> None:
    from worldmodels.env import FAST_ID
    from worldmodels.parallel import cpu_count

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=cpu_count(), help="worker processes (default: cores)")
    p.add_argument("--envs", type=int, default=8, help="environments per process")
    p.add_argument("--steps", type=int, default=100, help="steps per episode")
    p.add_argument("--repeats", type=int, default=10, help="rounds, each running every arm once")
    p.add_argument("--bf16", action="store_true", help="encode frames under bfloat16 autocast (Agent.encode_bf16)")
    p.add_argument("--float64", action="store_true", help="exact driving in float64, as evaluation does")
    args = p.parse_args()

    import gymnasium as gym

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, queue = ctx.Barrier(args.processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, barrier, queue)) for r in range(args.processes)]
    for proc in procs:
        proc.start()
    rows = [queue.get() for _ in range(args.processes * args.repeats * len(ARMS))]
    for proc in procs:
        proc.join()

    # Per repeat: steps of all processes / the slowest process's time. The arms alternate
    # in short rounds, so load from elsewhere on the machine hits them alike; the table
    # sums over all rounds and gives the median of the per-round ratios.
    steps = {arm: 0 for arm in ARMS}
    seconds = {arm: 0.0 for arm in ARMS}
    ratios: dict[str, list[float]] = {"bare": [], "replay": []}
    for rep in range(args.repeats):
        rate = {}
        for arm in ARMS:
            got = [r for r in rows if r[0] == rep and r[1] == arm]
            steps[arm] += sum(r[3] for r in got)
            seconds[arm] += max(r[4] for r in got)
            rate[arm] = sum(r[3] for r in got) / max(r[4] for r in got)
        for base in ratios:
            ratios[base].append(rate["agent"] / rate[base])
        print(f"round {rep}: " + ", ".join(f"{arm} {rate[arm]:.1f}" for arm in ARMS) + " steps/s")
    total = {arm: steps[arm] / seconds[arm] for arm in ARMS}
    renderer = "fast (worldmodels/CarRacing-v3)" if FAST_ID in gym.registry else "upstream"
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {cpu_count()} cores; renderer: {renderer}")
    print(
        f"{args.processes} processes x {args.envs} envs, {args.steps}-step episodes, {args.repeats} rounds"
        + (", V under bf16 autocast" if args.bf16 else "")
        + (", exact driving (float64)" if args.float64 else "")
    )
    print()
    print("| arm | steps/s (all processes) | per process | agent / arm (all rounds) | agent / arm (median round) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for arm in ARMS:
        cells = ["", ""]
        if arm in ratios:
            cells = [f"{total['agent'] / total[arm]:.3f}", f"{float(np.median(ratios[arm])):.3f}"]
        print(f"| {arm} | {total[arm]:.1f} | {total[arm] / args.processes:.1f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
