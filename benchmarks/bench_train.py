"""Training throughput of V (frames/s) and M (sequence steps/s), data pipeline included.

    python benchmarks/bench_train.py [--rounds 2 --v-steps 12 --m-steps 15] [--memory-steps 200]

Real 1,000-step episodes are collected once (``--real`` of them, the fast renderer) and
hard-linked under ``--episodes`` names in a temporary run directory at the ``book``
preset (batch 100, 250 frames per episode, 32 episodes in memory). Blocks alternate
(A, B, A, B, ...) so that other load on the machine hits both alike:

* A, V pipeline: :func:`worldmodels.train.train_vae` itself, resumed for ``--v-steps``
  more steps each round (files read, decompressed, shuffled, converted on the fly);
  the rate comes from the per-step rows of metrics.csv, the first step of each call left out;
* B, V bare: forward, backward and Adam step of the same VAE on a batch already in memory.

M is measured the same way on synthetic latent files (the latent format, book's
seq_len 200, batch 32, 256 units). ``--memory-steps N`` also runs N steps of book-scale
V training in a child process and reports its peak resident memory.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from worldmodels import train
from worldmodels.config import preset
from worldmodels.data import Episode, collect, episode_path
from worldmodels.datasets import save_latents
from worldmodels.mdrnn import MDRNN
from worldmodels.runs import RunDir, write_json
from worldmodels.vae import VAE, vae_loss


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def make_v_run(root: Path, real: int, episodes: int):
    """A book-preset run whose data/ holds `episodes` hard links to `real` collected episodes."""
    src = root / "src"
    collect(preset("tiny", **{"data.episodes": real, "data.episode_steps": 1000, "mdrnn.seq_len": 200}), src, quiet=True)
    cfg = preset("book", **{"data.episodes": episodes})
    run = root / "v"
    RunDir(run).bind(cfg)
    (run / "data").mkdir()
    for i in range(episodes):
        os.link(episode_path(src / "data", i % real), episode_path(run / "data", i))
    return cfg, run


def make_m_run(root: Path, episodes: int):
    """A book-preset run with synthetic latent files (V marked done, latents marked encoded)."""
    cfg = preset("book", **{"data.episodes": episodes})
    run = root / "m"
    RunDir(run).bind(cfg)
    for stage in ("data", "latents"):
        (run / stage).mkdir()
    rng = np.random.default_rng(0)
    T = 1000
    for i in range(episodes):
        episode_path(run / "data", i).touch()  # the stage checks that every episode exists
        ep = Episode(
            obs=np.zeros((0, 64, 64, 3), np.uint8), action=rng.uniform(-1, 1, (T, 3)).astype(np.float32),
            reward=rng.normal(size=T).astype(np.float32), terminated=np.zeros(T, bool), truncated=np.zeros(T, bool),
            final_obs=np.zeros((64, 64, 3), np.uint8), seed=i,
        )
        save_latents(run / "latents" / f"episode_{i:06d}.npz", rng.normal(size=(T + 1, 32)), rng.normal(-2, 0.1, (T + 1, 32)), ep)
    write_json(run / "vae" / "done.json", {"synthetic": True})
    write_json(run / "latents" / "done.json", {"synthetic": True})
    return cfg, run


def pipeline_rate(metrics: Path, first_step: int) -> tuple[float, int]:
    """Steps per second between the rows of one call (rows after `first_step + 1`)."""
    rows = [r for r in csv.DictReader(open(metrics)) if r["train_loss"] and int(r["step"]) > first_step]
    steps = [int(r["step"]) for r in rows][1:]
    secs = [float(r["seconds"]) for r in rows]
    return (len(steps)) / (secs[-1] - secs[0]), len(steps)


def bare_v_rate(steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = VAE(32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        x_hat, mu, logvar = model(x, generator=g)
        loss = vae_loss(x_hat, x, mu, logvar).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return len(times[1:]) / sum(times[1:])


def bare_m_rate(steps: int, batch: int, seq_len: int) -> float:
    torch.manual_seed(0)
    model = MDRNN(32, 3, 256, 5, reward_head=True, done_head=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = {
        "mu": torch.randn(batch, seq_len + 1, 32), "logvar": torch.full((batch, seq_len + 1, 32), -2.0),
        "action": torch.rand(batch, seq_len, 3), "reward": torch.randn(batch, seq_len),
        "done": torch.zeros(batch, seq_len), "mask": torch.ones(batch, seq_len, dtype=torch.bool),
    }
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = train._mdrnn_losses(model, b, torch.Generator().manual_seed(i)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    return len(times[1:]) / sum(times[1:])


def memory_child(run: str, steps: int) -> None:
    cfg = RunDir(run).load_config()
    train.train_vae(cfg, run, quiet=True, max_steps=steps)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=int, default=4, help="real 1,000-step episodes to collect")
    ap.add_argument("--episodes", type=int, default=100, help="episode files (hard links to the real ones)")
    ap.add_argument("--m-episodes", type=int, default=300, help="synthetic latent files for M")
    ap.add_argument("--rounds", type=int, default=2, help="A,B rounds of each measurement")
    ap.add_argument("--v-steps", type=int, default=12, help="V steps per block")
    ap.add_argument("--m-steps", type=int, default=15, help="M steps per block")
    ap.add_argument("--memory-steps", type=int, default=0, help="also measure peak RSS of this many V steps (0: skip)")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        vcfg, vrun = make_v_run(root, args.real, args.episodes)
        mcfg, mrun = make_m_run(root, args.m_episodes)
        print(f"setup {time.perf_counter() - t:.0f} s; torch threads {torch.get_num_threads()}", flush=True)
        B, L, MB = vcfg.vae.batch_size, mcfg.mdrnn.seq_len, mcfg.mdrnn.batch_size
        res = {k: [] for k in ("v_pipe", "v_bare", "m_pipe", "m_bare")}
        v_done = m_done = 0
        for r in range(args.rounds):
            train.train_vae(vcfg, vrun, quiet=True, max_steps=v_done + args.v_steps, log_every=1)
            res["v_pipe"].append(pipeline_rate(vrun / "vae" / "metrics.csv", v_done)[0] * B)
            v_done += args.v_steps
            res["v_bare"].append(bare_v_rate(args.v_steps - 1, B) * B)
            train.train_mdrnn(mcfg, mrun, quiet=True, max_steps=m_done + args.m_steps, log_every=1)
            res["m_pipe"].append(pipeline_rate(mrun / "mdrnn" / "metrics.csv", m_done)[0] * MB * L)
            m_done += args.m_steps
            res["m_bare"].append(bare_m_rate(args.m_steps - 1, MB, L) * MB * L)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.items()), flush=True)

        rss = None
        if args.memory_steps:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(vrun), str(v_done + args.memory_steps)],
                capture_output=True, text=True, check=True,
            ).stdout
            rss = int(out.split()[-1]) / 1024

    def cell(v):
        return f"{statistics.median(v):,.0f} ({', '.join(f'{x:,.0f}' for x in v)})"

    print(f"\n{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.rounds} rounds A,B interleaved")
    print("| stage | pipeline (train_vae / train_mdrnn): median (rounds) | bare step, data in memory: median (rounds) | pipeline / bare: medians (rounds) |")
    print("| --- | --- | --- | --- |")
    def ratio(a, b):
        per_round = [x / y for x, y in zip(res[a], res[b])]
        return f"{statistics.median(res[a]) / statistics.median(res[b]):.0%} ({', '.join(f'{r:.0%}' for r in per_round)})"

    print(f"| V, frames/s (batch {B}) | {cell(res['v_pipe'])} | {cell(res['v_bare'])} | {ratio('v_pipe', 'v_bare')} |")
    print(f"| M, sequence steps/s (batch {MB} x {L}) | {cell(res['m_pipe'])} | {cell(res['m_bare'])} | {ratio('m_pipe', 'm_bare')} |")
    if rss is not None:
        print(f"\npeak RSS of {args.memory_steps} book-scale V steps (batch {B}, {vcfg.vae.shuffle_episodes} episodes "
              f"in memory, {args.episodes} episode files): {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
