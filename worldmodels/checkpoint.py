"""A training stage's checkpoint: weights, optimiser, progress and random states, resumed exactly.

The checkpoint is two files in the stage's folder: ``last.safetensors`` (the weights; its
metadata holds the step) and ``state.pt`` (the optimiser, the gradient scaler, the
:class:`Progress` and the random-number generators' states, pickled, read only from the
run itself). ``state.pt`` is written first and the previous one kept as
``state.prev.pt``, so whenever the process dies one of the two matches the weights' step.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worldmodels.runs import (
    LAST_WEIGHTS,
    PREVIOUS_TRAIN_STATE,
    TRAIN_STATE,
    DamagedFileError,
    RunDirError,
    atomic_path,
    load_train_state,
    load_weights,
    reading,
    save_tensors,
    weights_metadata,
)


@dataclass
class Progress:
    """Where training stands; saved in ``state.pt`` with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches of `epoch` done."""
    seconds: float = 0.0
    """Training time up to this checkpoint, over all sessions."""
    rows: int = 0
    """Data rows of metrics.csv written up to this checkpoint."""
    best_loss: float | None = None
    best_step: int | None = None
    best_test: dict[str, float] = field(default_factory=dict)
    window: dict[str, float] = field(default_factory=dict)
    """Sums of the training loss parts since the last metrics row."""
    window_steps: int = 0

    def __post_init__(self) -> None:
        self._started = time.monotonic() - self.seconds

    def elapsed(self) -> float:
        """Training time so far, over all sessions, in seconds."""
        return time.monotonic() - self._started

    def improved(self, test: dict[str, float] | None) -> bool:
        """Record `test` as the best so far if its loss is lower; without a test set the last epoch is the best."""
        loss = test["loss"] if test else None
        best = loss is None or self.best_loss is None or loss < self.best_loss
        if best:
            self.best_loss, self.best_step, self.best_test = loss, self.step, dict(test or {})
        return best


class Checkpoint:
    """Saves and resumes the training of `model` with `optimizer` (and `scaler`) in `folder`."""

    def __init__(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        self.folder, self.model, self.optimizer, self.scaler = folder, model, optimizer, scaler
        self.weights_path, self.state_path = folder / LAST_WEIGHTS, folder / TRAIN_STATE
        self.saved_step: int | None = None
        self.last_save = time.monotonic()

    def resume(self, device: torch.device) -> Progress:
        """Load the last checkpoint, if there is one, and return where training stands."""
        if not self.weights_path.exists():
            return Progress()
        try:
            return self._resume(device)
        except DamagedFileError as e:
            raise DamagedFileError(f"{e}; delete {self.folder} to train from scratch") from e

    def _resume(self, device: torch.device) -> Progress:
        step = saved_step(self.weights_path)
        for path in (self.state_path, self.folder / PREVIOUS_TRAIN_STATE):
            if path.exists():
                state = load_train_state(path)
                with reading(path, "training state", also=(TypeError,)):  # a state without the progress saved
                    progress = Progress(**state["progress"])
                if progress.step == step:
                    break
        else:
            raise RunDirError(
                f"{self.weights_path} (step {step}) has no matching training state ({self.state_path.name}); "
                f"delete {self.folder} to train from scratch"
            )
        load_weights(self.model, self.weights_path, device=str(device))
        with reading(path, "training state", also=(TypeError, RuntimeError)):  # one that does not fit the model
            self._restore(state)
        self.saved_step = step
        return progress

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])

    def save(self, progress: Progress, best_path: Path | None, stage: str) -> None:
        """Checkpoint now, and write the weights to `best_path` too when given."""
        progress.seconds = progress.elapsed()
        state = {
            "progress": asdict(progress),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None,  # the learning rate is constant
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
        }
        weights = self.model.state_dict()
        meta = {"step": str(progress.step), "epoch": str(progress.epoch), "stage": stage}
        if best_path is not None:
            save_tensors(best_path, weights, metadata=meta)
        if self.state_path.exists():
            os.replace(self.state_path, self.folder / PREVIOUS_TRAIN_STATE)
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)
        save_tensors(self.weights_path, weights, metadata=meta)
        self.saved_step = progress.step
        self.last_save = time.monotonic()

    def kept(self) -> str:
        """A sentence saying which checkpoint survives an error."""
        if self.saved_step is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint (step {self.saved_step}) is kept in {self.weights_path}."


def saved_step(weights: Path) -> int:
    """The step at which the weights file `weights` was saved (from its metadata; -1 if it has none)."""
    with reading(weights, "weights file"):  # ValueError: a step that is not a number
        return int(weights_metadata(weights).get("step", -1))


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
