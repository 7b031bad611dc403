"""The fit loop that trains V and M: epochs of steps, test losses, checkpoints, metrics.

A training stage hands :func:`fit` what is its own (a :class:`Stage`: model, optimiser,
batches, loss, test) and the loop does the rest, in the stage's folder of the run::

    last.safetensors, state.pt  the checkpoint (see :mod:`worldmodels.checkpoint`)
    vae.safetensors             the best weights so far, by test loss (mdrnn.safetensors for M)
    metrics.csv                 step, epoch, train and test loss parts, learning rate, seconds
    tensorboard/                the same scalars, when ``tensorboard`` is installed
    done.json                   written when the stage has finished, with its final metrics

A checkpoint is taken every epoch, every ``checkpoint_seconds`` and where training
stops (``max_steps``). A stage whose batches and loss noise depend only on
``(epoch, batch)`` and ``step`` then resumes exactly: on a CPU a resumed run ends with
the weights of an uninterrupted one.

**Precision.** :class:`Precision` runs a stage's forward pass under ``torch.autocast`` on
CUDA when the stage asks for it (bfloat16 where supported, else float16 with a gradient
scaler); on the CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from worldmodels.checkpoint import Checkpoint, Progress
from worldmodels.runs import BEST_WEIGHTS, DONE_FILE, METRICS_FILE, atomic_path, reading, write_json


CHECKPOINT_SECONDS = 600.0
"""Default time between checkpoints within an epoch (one is also taken at every epoch's end)."""
LOG_EVERY = 10
"""Default number of steps averaged into each training row of metrics.csv."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example a loss became NaN); the message says where and why."""


class Precision:
    """Autocast and gradient scaling on CUDA only; plain float32 elsewhere."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else contextlib.nullcontext()


@dataclass
class Stage:
    """What a training stage brings to :func:`fit`; everything else is the same for V and M."""

    name: str
    """The stage's folder in the run directory, as in ``done.json``: 'vae' or 'mdrnn'."""
    label: str
    """The stage in messages: 'V' or 'M'."""
    folder: Path
    parts: tuple[str, ...]
    """Names of the loss parts, the total (``loss``) first."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    device: torch.device
    epochs: int
    steps_per_epoch: int
    batches: Callable[[int, int], Iterable[Any]]
    """``batches(epoch, done)``: the epoch's batches after the first `done`, on the device."""
    loss: Callable[[Any, int], NamedTuple]
    """``loss(batch, step)``: the loss parts, the total first (named ``loss``)."""
    test: Callable[[], dict[str, float] | None]
    """The loss parts on the test set, ``None`` without one."""
    grad_clip: float = 0.0
    """Clip the gradient to this norm (0: no clipping)."""


def fit(stage: Stage, *, quiet: bool = False, max_steps: int | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS, log_every: int = LOG_EVERY) -> bool:
    """Train `stage` from its last checkpoint until its epochs are done or `max_steps` steps.

    Returns True when the stage has finished (``done.json`` written). Raises
    :class:`TrainingError` when a loss part, the gradient norm or the weights stop being
    finite; the last good checkpoint is kept.
    """
    checkpoint = Checkpoint(stage.folder, stage.model, stage.optimizer, stage.precision.scaler)
    progress = checkpoint.resume(stage.device)
    log = _Metrics(stage, progress, quiet)
    try:
        while progress.epoch < stage.epochs and not _reached(progress, max_steps):
            for batch in stage.batches(progress.epoch, progress.batch):
                if _reached(progress, max_steps):
                    break
                losses = stage.loss(batch, progress.step)
                values = _check_losses(stage, progress, checkpoint, losses)
                _backward_step(stage, progress, checkpoint, losses.loss)
                progress.step, progress.batch = progress.step + 1, progress.batch + 1
                log.step(values, log_every)
                if time.monotonic() - checkpoint.last_save >= checkpoint_seconds:
                    _save(stage, progress, checkpoint)
            else:  # the epoch is complete
                test = stage.test()
                log.row(test)
                best = progress.improved(test)
                progress.epoch, progress.batch = progress.epoch + 1, 0
                _save(stage, progress, checkpoint, best)
        if checkpoint.saved_step != progress.step:
            _save(stage, progress, checkpoint)
    finally:
        log.close()
    if progress.epoch < stage.epochs:
        return False
    write_json(stage.folder / DONE_FILE, {
        "stage": stage.name, "steps": progress.step, "epochs": progress.epoch,
        "best_step": progress.best_step, "best_test": progress.best_test, "seconds": round(progress.elapsed(), 3),
        "device": str(stage.device), "weights": BEST_WEIGHTS[stage.name],
    })
    return True


def _reached(progress: Progress, max_steps: int | None) -> bool:
    return max_steps is not None and progress.step >= max_steps


def _check_losses(stage: Stage, progress: Progress, checkpoint: Checkpoint, losses: NamedTuple) -> dict[str, float]:
    """The loss parts as floats; a NaN or infinite one stops training."""
    values = {k: float(v.detach()) for k, v in losses._asdict().items()}
    for part in sorted(values, key=lambda k: k == "loss"):  # name a specific part before the total
        if not math.isfinite(values[part]):
            raise _stopped(stage, checkpoint, f"the {part} loss is {values[part]}", progress.step + 1, progress.epoch)
    return values


def _backward_step(stage: Stage, progress: Progress, checkpoint: Checkpoint, loss: Tensor) -> None:
    stage.optimizer.zero_grad(set_to_none=True)
    scaler = stage.precision.scaler
    scaler.scale(loss).backward()
    if stage.grad_clip > 0:
        scaler.unscale_(stage.optimizer)
        norm = nn.utils.clip_grad_norm_(stage.model.parameters(), stage.grad_clip)
        if not scaler.is_enabled() and not torch.isfinite(norm):
            raise _stopped(stage, checkpoint, f"the gradient norm is {float(norm)}", progress.step + 1, progress.epoch)
    scaler.step(stage.optimizer)
    scaler.update()


def _save(stage: Stage, progress: Progress, checkpoint: Checkpoint, best: bool = False) -> None:
    """Checkpoint (and keep the best weights when `best`); refuses non-finite weights."""
    for name, tensor in stage.model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise _stopped(stage, checkpoint, f"weights {name!r} are not finite", progress.step, progress.epoch)
    checkpoint.save(progress, stage.folder / BEST_WEIGHTS[stage.name] if best else None, stage.name)


def _stopped(stage: Stage, checkpoint: Checkpoint, what: str, step: int, epoch: int) -> TrainingError:
    return TrainingError(f"{stage.label}: {what} at step {step} (epoch {epoch}); training stopped. {checkpoint.kept()}")


class _Metrics:
    """The training record a person reads: metrics.csv, TensorBoard and the progress bar.

    A training row averages the loss parts over the steps since the previous row; the
    row at an epoch's end also holds the test losses. On resume, rows written after the
    checkpoint are dropped, so that no row is written twice.
    """

    def __init__(self, stage: Stage, progress: Progress, quiet: bool):
        self.name, self.optimizer, self.progress = stage.name, stage.optimizer, progress
        self.csv = _MetricsCSV(stage.folder / METRICS_FILE, stage.parts, keep_rows=progress.rows)
        self.tb = _tensorboard(stage.folder, progress.step)
        total = stage.steps_per_epoch * stage.epochs
        self.bar = tqdm(total=total, initial=progress.step, desc=stage.label, unit="step", disable=quiet or None)

    def step(self, values: dict[str, float], log_every: int) -> None:
        """Count a finished step; write a row every `log_every` steps."""
        p = self.progress
        for k, v in values.items():
            p.window[k] = p.window.get(k, 0.0) + v
        p.window_steps += 1
        self.bar.update(1)
        if p.step % log_every == 0:
            self.row()

    def row(self, test: dict[str, float] | None = None) -> None:
        p = self.progress
        train = {k: v / p.window_steps for k, v in p.window.items()} if p.window_steps else {}
        row = {"step": p.step, "epoch": p.epoch, "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(p.elapsed(), 3)}
        row.update({f"train_{k}": v for k, v in train.items()})
        row.update({f"test_{k}": v for k, v in (test or {}).items()})
        p.rows = self.csv.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if k.startswith(("train_", "test_")):
                    self.tb.add_scalar(f"{self.name}/{k}", v, p.step)
            self.tb.flush()
        if train:
            self.bar.set_postfix(loss=f"{train['loss']:.4g}", refresh=False)
        p.window, p.window_steps = {}, 0

    def close(self) -> None:
        for thing in (self.bar, self.tb, self.csv):
            if thing is not None:
                thing.close()


def _tensorboard(folder: Path, step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder / "tensorboard"), purge_step=step or None)


class _MetricsCSV:
    """metrics.csv, appended row by row (flushed); rows after the first `keep_rows` are dropped."""

    def __init__(self, path: Path, parts: Sequence[str], keep_rows: int):
        self.columns = ["step", "epoch"] + [f"train_{k}" for k in parts] + [f"test_{k}" for k in parts] + ["lr", "seconds"]
        with reading(path, "metrics file"):
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = lines[1 : 1 + keep_rows]
        with atomic_path(path) as tmp:
            tmp.write_text(",".join(self.columns) + "\n" + "".join(kept))
        self.rows = len(kept)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.columns)

    def write(self, row: dict[str, Any]) -> int:
        """Append `row`; returns the number of rows now in the file."""
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and k != "seconds" else v) for k, v in row.items()})
        self.file.flush()
        self.rows += 1
        return self.rows

    def close(self) -> None:
        self.file.close()
