"""Executors for the CPU-bound work: local worker processes by default."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """`workers`, or one per CPU core when 0."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return workers or cpu_count()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker; the processes are the parallelism


def mp_context() -> mp.context.BaseContext:
    """'fork' where the OS has it (fast start, works from scripts without a main guard and
    from notebooks, as torch's DataLoader does), 'spawn' elsewhere."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def local_executor(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes, each using one torch thread."""
    return ProcessPoolExecutor(max_workers=resolve_workers(workers), mp_context=mp_context(), initializer=_init_worker)
