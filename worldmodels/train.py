"""Training loops for V and M: epochs, test losses, checkpoints, exact resume, logging.

:func:`train_vae` trains V on shuffled frames of the collected episodes, :func:`encode`
turns every episode into V's posterior parameters (``mu``, ``logvar``) once, and
:func:`train_mdrnn` trains M on sequences of ``z`` *sampled* from those posteriors,
a new sample for every batch, as in the authors' code.

Each stage writes into its folder of the run directory::

    vae/vae.safetensors        the best weights so far, by test loss (``mdrnn/mdrnn.safetensors`` for M)
    vae/last.safetensors       the weights at the last checkpoint
    vae/state.pt               optimiser, step, epoch, position in the epoch, RNG states (run-local)
    vae/metrics.csv            step, epoch, train and test loss parts, learning rate, seconds
    vae/tensorboard/           the same scalars, when ``tensorboard`` is installed
    vae/done.json              written when the stage has finished, with its final metrics

**Resume.** Every source of randomness is a function of ``(train_seed, step)``: the
order of the frames or sequences of an epoch comes from ``(train_seed, epoch)`` and the
noise of each step (V's reparameterisation, M's sampled ``z``) from a generator seeded
with ``(train_seed, step)``. A checkpoint is taken at every step boundary where one is
due (every epoch, every ``checkpoint_seconds``, and when ``max_steps`` is reached)
and records the number of batches done in the current epoch; a resumed run rebuilds
the epoch's batch order and skips those batches, so on a CPU it ends with exactly the
weights of an uninterrupted run.

**Finished stages.** Once ``done.json`` exists, calling the function again loads and
returns the best model without training (load-or-train).

**Precision.** On CUDA, V's convolutions run under ``torch.autocast`` (bfloat16 where
supported, else float16 with a gradient scaler) while its loss is computed in float32;
M, small and sensitive in its mixture densities, trains in float32. On the CPU
everything is float32.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from worldmodels.config import Config, resolve_device
from worldmodels.data import (
    FrameDataset,
    SequenceDataset,
    episode_path,
    latent_path,
    load_or_skip,
    save_latents,
    split_episodes,
)
from worldmodels.mdrnn import MDNOutput, MDRNN, MDRNNLoss, mdn_loss
from worldmodels.runs import (
    RunDir, as_run_dir, atomic_path, load_mdrnn, load_tensors, load_train_state, load_vae, read_json, reading,
    save_tensors, weights_metadata, write_json,
)
from worldmodels.vae import VAE, VAELoss, frames_to_tensor, vae_loss

CHECKPOINT_SECONDS = 600.0
"""Default time between checkpoints within an epoch (one is also taken at every epoch's end)."""
LOG_EVERY = 10
"""Default number of steps averaged into each training row of metrics.csv."""

LATENT_CACHE_BYTES = 512 * 2**20
"""Memory for decoded latent episodes kept by M's loader (per split)."""

VAE_PARTS = ("loss", "reconstruction", "kl")
MDRNN_PARTS = ("loss", "gmm", "reward", "done")

# Streams of the per-step random generators (with train_seed and the step or batch index).
_V_TRAIN, _V_TEST, _M_TRAIN, _M_TEST, _M_ORDER = 1, 2, 3, 4, 5


class TrainingError(RuntimeError):
    """Training cannot go on (for example a loss became NaN); the message says where and why."""


# --- randomness ----------------------------------------------------------------------------


def _generator(device: torch.device, *keys: int) -> torch.Generator:
    """A torch generator on `device` seeded from the integers `keys` (e.g. seed, stream, step)."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# --- data ----------------------------------------------------------------------------------


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(iterable: Iterable, depth: int = 2) -> Iterator:
    """Iterate `iterable` in a background thread, keeping up to `depth` items ready.

    Reading and decompressing episode files then overlaps with the training step
    (zlib and NumPy release the GIL). Errors in the thread are raised in the consumer;
    stopping early (``break``) stops the thread after its current item.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))

    thread = threading.Thread(target=work, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()


def _episodes(cfg: Config, run: RunDir) -> list[Path]:
    """The config's episode files, all of which must exist."""
    files = [episode_path(run.path / "data", i) for i in range(cfg.data.episodes)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"{run.path / 'data'} has {len(files) - len(missing)} of {cfg.data.episodes} episodes "
            f"(first missing: {missing[0].name}); run collect first (python -m worldmodels collect --run-dir {run.path})"
        )
    return files


def _pin(batch: Any, device: torch.device) -> Any:
    if device.type != "cuda":
        return batch
    if isinstance(batch, dict):
        return {k: v.pin_memory() for k, v in batch.items()}
    return batch.pin_memory()


# --- bookkeeping shared by the two loops ---------------------------------------------------


@dataclass
class _Progress:
    """Where training stands; saved in state.pt with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches of `epoch` done."""
    seconds: float = 0.0
    rows: int = 0
    """Data rows of metrics.csv written up to this checkpoint."""
    best_loss: float | None = None
    best_step: int | None = None
    best_test: dict[str, float] = field(default_factory=dict)
    window: dict[str, float] = field(default_factory=dict)
    """Sums of the training loss parts since the last metrics row."""
    window_steps: int = 0


class _Precision:
    """Autocast and gradient scaling on CUDA only; plain float32 elsewhere."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else contextlib.nullcontext()


class _Stage:
    """Checkpoints, metrics (CSV, TensorBoard, progress bar) and NaN checks of one training stage.

    The checkpoint is ``last.safetensors`` (weights; its metadata holds the step) and
    ``state.pt`` (everything else). ``state.pt`` is written first and the previous one
    kept as ``state.prev.pt``, so whenever the process dies one of the two matches the
    weights' step.
    """

    def __init__(self, name: str, label: str, folder: Path, best_file: str, model: nn.Module,
                 optimizer: torch.optim.Optimizer, precision: _Precision, parts: tuple[str, ...]):
        self.name, self.label, self.folder, self.best_file = name, label, folder, best_file
        self.model, self.optimizer, self.precision, self.parts = model, optimizer, precision, parts
        self.weights_path, self.state_path = folder / "last.safetensors", folder / "state.pt"
        self.prev_path = folder / "state.prev.pt"
        self.progress = _Progress()
        self.saved_step: int | None = None
        self.csv = self.tb = self.bar = None

    # checkpoints
    def resume(self, device: torch.device) -> bool:
        """Load the last checkpoint if there is one; True when resumed."""
        if not self.weights_path.exists():
            return False
        step = int(weights_metadata(self.weights_path).get("step", -1))
        for path in (self.state_path, self.prev_path):
            if path.exists():
                state = load_train_state(path)
                if state["progress"]["step"] == step:
                    break
        else:
            raise TrainingError(
                f"{self.weights_path} (step {step}) has no matching training state ({self.state_path.name}); "
                f"delete {self.folder} to train {self.label} from scratch"
            )
        self.model.load_state_dict(load_tensors(self.weights_path, device=str(device)))
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.precision.scaler.is_enabled():
            self.precision.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.progress = _Progress(**state["progress"])
        self.saved_step = step
        return True

    def save(self, best: bool = False) -> None:
        """Checkpoint now (and the best weights when `best`); refuses non-finite weights."""
        p = self.progress
        p.seconds = self.seconds()
        for name, tensor in self.model.state_dict().items():
            if not torch.isfinite(tensor).all():
                raise TrainingError(
                    f"{self.label}: weights {name!r} are not finite at step {p.step} (epoch {p.epoch}); "
                    f"training stopped. {self._kept()}"
                )
        state = {
            "progress": asdict(p),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None,  # constant learning rate (see the module docstring of train.py)
            "scaler": self.precision.scaler.state_dict(),
            "rng": _rng_state(),
        }
        weights = self.model.state_dict()
        meta = {"step": str(p.step), "epoch": str(p.epoch), "stage": self.name}
        if best:
            save_tensors(self.folder / self.best_file, weights, metadata=meta)
        if self.state_path.exists():
            os.replace(self.state_path, self.prev_path)
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)
        save_tensors(self.weights_path, weights, metadata=meta)
        self.saved_step = p.step
        self.last_save = time.monotonic()

    def _kept(self) -> str:
        if self.saved_step is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint (step {self.saved_step}) is kept in {self.weights_path}."

    # metrics
    def start(self, total_steps: int, quiet: bool) -> None:
        p = self.progress
        self.t0 = time.monotonic() - p.seconds
        self.last_save = time.monotonic()
        columns = ["step", "epoch"] + [f"train_{k}" for k in self.parts] + [f"test_{k}" for k in self.parts]
        self.csv = _MetricsCSV(self.folder / "metrics.csv", columns + ["lr", "seconds"], keep_rows=p.rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.folder / "tensorboard"), purge_step=p.step or None)
        except ImportError:
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=p.step, desc=self.label, unit="step", disable=quiet or None)

    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def check(self, losses: dict[str, Tensor]) -> dict[str, float]:
        """The loss parts as floats; a NaN or infinite part stops training with a clear error."""
        values = {k: float(v.detach()) for k, v in losses.items()}
        for part in sorted(values, key=lambda k: k == "loss"):  # name a specific part before the total
            value = values[part]
            if not math.isfinite(value):
                p = self.progress
                raise TrainingError(
                    f"{self.label}: the {part} loss is {value} at step {p.step + 1} (epoch {p.epoch}); "
                    f"training stopped. {self._kept()}"
                )
        return values

    def stepped(self, values: dict[str, float], log_every: int) -> None:
        """Count a finished step; write a metrics row every `log_every` steps."""
        p = self.progress
        p.step += 1
        p.batch += 1
        for k, v in values.items():
            p.window[k] = p.window.get(k, 0.0) + v
        p.window_steps += 1
        self.bar.update(1)
        if p.step % log_every == 0:
            self.row()

    def row(self, test: dict[str, float] | None = None) -> None:
        p = self.progress
        train = {k: v / p.window_steps for k, v in p.window.items()} if p.window_steps else {}
        row = {"step": p.step, "epoch": p.epoch, "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(self.seconds(), 3)}
        row.update({f"train_{k}": v for k, v in train.items()})
        row.update({f"test_{k}": v for k, v in (test or {}).items()})
        self.csv.write(row)
        p.rows = self.csv.rows
        if self.tb is not None:
            for k, v in row.items():
                if k.startswith(("train_", "test_")):
                    self.tb.add_scalar(f"{self.name}/{k}", v, p.step)
            self.tb.flush()
        if train:
            self.bar.set_postfix(loss=f"{train['loss']:.4g}", refresh=False)
        p.window, p.window_steps = {}, 0

    def checkpoint_due(self, every_seconds: float) -> bool:
        return time.monotonic() - self.last_save >= every_seconds

    def end_epoch(self, test: dict[str, float] | None) -> None:
        """Log the epoch's test losses, keep the best weights, move to the next epoch, checkpoint."""
        p = self.progress
        self.row(test)
        loss = test["loss"] if test else None  # without a test split the last epoch is the best
        best = loss is None or p.best_loss is None or loss < p.best_loss
        if best:
            p.best_loss, p.best_step, p.best_test = loss, p.step, dict(test or {})
        p.epoch, p.batch = p.epoch + 1, 0
        self.save(best=best)

    def finish(self, device: torch.device) -> None:
        p = self.progress
        write_json(self.folder / "done.json", {
            "stage": self.name,
            "steps": p.step,
            "epochs": p.epoch,
            "best_step": p.best_step,
            "best_test": p.best_test,
            "seconds": round(self.seconds(), 3),
            "device": str(device),
            "weights": self.best_file,
        })

    def close(self) -> None:
        for thing in (self.bar, self.tb, self.csv):
            if thing is not None:
                thing.close()


class _MetricsCSV:
    """metrics.csv, appended row by row (flushed); on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_rows: int):
        self.path, self.columns = path, columns
        with reading(path, "metrics file"):
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = lines[1 : 1 + keep_rows]
        with atomic_path(path) as tmp:
            tmp.write_text(",".join(columns) + "\n" + "".join(kept))
        self.rows = len(kept)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, columns)

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and k != "seconds" else v) for k, v in row.items()})
        self.file.flush()
        self.rows += 1

    def close(self) -> None:
        self.file.close()


def _backward_step(loss: Tensor, optimizer: torch.optim.Optimizer, precision: _Precision,
                   model: nn.Module, clip: float, stage: _Stage) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler
    scaler.scale(loss).backward()
    if clip > 0:
        scaler.unscale_(optimizer)
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not scaler.is_enabled() and not torch.isfinite(norm):
            p = stage.progress
            raise TrainingError(
                f"{stage.label}: the gradient norm is {float(norm)} at step {p.step + 1} (epoch {p.epoch}); "
                f"training stopped. {stage._kept()}"
            )
    scaler.step(optimizer)
    scaler.update()


def _stopped(stage: _Stage, max_steps: int | None) -> bool:
    """True (after checkpointing) when `max_steps` steps are done."""
    if max_steps is None or stage.progress.step < max_steps:
        return False
    if stage.saved_step != stage.progress.step:
        stage.save()
    return True


# --- V ---------------------------------------------------------------------------------------


def _vae_losses(model: VAE, x: Tensor, precision: _Precision, generator: torch.Generator, kl_tolerance: float) -> VAELoss:
    """V's loss on frames `x` (N, 3, 64, 64): the convolutions under autocast, the loss in float32."""
    with precision.autocast():
        mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()
    z = VAE.reparameterize(mu, logvar, generator)
    with precision.autocast():
        x_hat = model.decode(z)
    return vae_loss(x_hat.float(), x, mu, logvar, kl_tolerance)


@torch.no_grad()
def _test_vae(model: VAE, ds: FrameDataset, device: torch.device, precision: _Precision, cfg: Config) -> dict[str, float] | None:
    model.eval()
    sums, n = dict.fromkeys(VAE_PARTS, 0.0), 0
    for i, batch in enumerate(prefetch(_pin(b, device) for b in ds)):
        x = frames_to_tensor(batch.to(device, non_blocking=True))
        losses = _vae_losses(model, x, precision, _generator(device, cfg.train_seed, _V_TEST, i), cfg.vae.kl_tolerance)
        for k in VAE_PARTS:
            sums[k] += float(getattr(losses, k)) * len(x)
        n += len(x)
    model.train()
    return {k: v / n for k, v in sums.items()} if n else None  # None: every test episode was skipped


def train_vae(
    cfg: Config,
    run: str | Path | RunDir,
    *,
    quiet: bool = False,
    max_steps: int | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    log_every: int = LOG_EVERY,
) -> VAE:
    """Train V on the run's episodes (``run/data``) and return it; resumes, or loads when finished.

    Frames come from :class:`~worldmodels.data.FrameDataset` (``cfg.vae.frames_per_episode``
    frames of each episode per epoch, at most ``cfg.vae.shuffle_episodes`` episodes in
    memory), split by episode into train and test sets (``cfg.data.test_fraction``, seed
    ``cfg.train_seed``). Adam at ``cfg.vae.learning_rate``, no learning-rate schedule,
    ``cfg.vae.epochs`` epochs of ``cfg.vae.batch_size`` frames; the loss is
    :func:`~worldmodels.vae.vae_loss` (squared error plus KL with free bits). After every
    epoch the test losses are computed and the best weights kept in ``run/vae/vae.safetensors``.

    Args:
        cfg: the run's config (checked against ``run/config.json``).
        run: the run directory.
        quiet: no progress bar.
        max_steps: stop (with a checkpoint) after this many steps in total; calling again
            resumes. Training is finished only once all epochs are done.
        checkpoint_seconds: time between checkpoints within an epoch.
        log_every: steps averaged into each training row of ``run/vae/metrics.csv``.

    Returns:
        The best V when training has finished, else the V of the last step, in eval mode.

    Raises:
        TrainingError: a loss part became NaN or infinite (the last good checkpoint is kept).
        FileNotFoundError: the dataset is incomplete.
    """
    run = as_run_dir(run)
    cfg = run.bind(cfg)
    folder, device = run.vae, resolve_device(cfg.device)
    if (folder / "done.json").exists():
        return load_vae(run, device)

    train_files, test_files = split_episodes(_episodes(cfg, run), cfg.data.test_fraction, cfg.train_seed)
    v = cfg.vae
    loader = dict(
        frames_per_episode=v.frames_per_episode,
        shuffle_episodes=v.shuffle_episodes,
        seed=cfg.train_seed,
        skip_corrupt=cfg.data.skip_corrupt,
    )
    train_ds = FrameDataset(train_files, v.batch_size, **loader)
    test_ds = FrameDataset(test_files, v.batch_size, drop_last=False, **loader) if test_files else None
    steps_per_epoch = train_ds.num_frames() // v.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"V: {train_ds.num_frames()} training frames are fewer than one batch of {v.batch_size}")

    _seed_everything(cfg.train_seed)
    model = VAE(v.z_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=v.learning_rate)
    precision = _Precision(device, enabled=True)
    stage = _Stage("vae", "V", folder, "vae.safetensors", model, optimizer, precision, VAE_PARTS)
    stage.resume(device)
    stage.start(steps_per_epoch * v.epochs, quiet)
    p = stage.progress
    try:
        while p.epoch < v.epochs and not _stopped(stage, max_steps):
            train_ds.set_epoch(p.epoch)
            batches = itertools.islice(iter(train_ds), p.batch, None)
            for batch in prefetch((_pin(b, device) for b in batches), depth=8):
                if _stopped(stage, max_steps):
                    break
                x = frames_to_tensor(batch.to(device, non_blocking=True))
                g = _generator(device, cfg.train_seed, _V_TRAIN, p.step)
                losses = _vae_losses(model, x, precision, g, v.kl_tolerance)
                values = stage.check(losses._asdict())
                _backward_step(losses.loss, optimizer, precision, model, 0.0, stage)
                stage.stepped(values, log_every)
                if stage.checkpoint_due(checkpoint_seconds):
                    stage.save()
            else:
                stage.end_epoch(_test_vae(model, test_ds, device, precision, cfg) if test_ds else None)
                continue
            break
        if p.epoch >= v.epochs:
            stage.finish(device)
            return load_vae(run, device)
        return model.eval()
    finally:
        stage.close()


# --- encoding --------------------------------------------------------------------------------


def encode(cfg: Config, run: str | Path | RunDir, *, quiet: bool = False, batch_size: int = 250) -> list[Path]:
    """Encode every episode's T + 1 frames with the best V into ``run/latents`` and return the files.

    Each ``latents/episode_XXXXXX.npz`` holds V's posterior ``mu`` and ``logvar`` as
    float16 (T + 1, z_size) with the episode's actions, rewards and ends (see
    :func:`~worldmodels.data.save_latents`). Episodes already encoded are skipped, so an
    interrupted call resumes; ``latents/done.json`` marks the stage finished. V must be
    trained (``run/vae/done.json``).
    """
    run = as_run_dir(run)
    cfg = run.bind(cfg)
    files = _episodes(cfg, run)
    out = [latent_path(run.latents, f) for f in files]
    marker = run.latents / "done.json"
    if marker.exists():  # episodes skipped as corrupt (data.skip_corrupt) have no latents
        return [o for o in out if o.exists()]
    if not (run.path / "vae" / "done.json").exists():
        raise FileNotFoundError(
            f"{run.path / 'vae' / 'done.json'}: V has not finished training; "
            f"train it first (python -m worldmodels train-vae --run-dir {run.path})"
        )
    device = resolve_device(cfg.device)
    model = load_vae(run, device)
    todo = [(f, o) for f, o in zip(files, out) if not o.exists()]
    with torch.no_grad(), tqdm(total=len(out), initial=len(out) - len(todo), desc="encode", unit="ep", disable=quiet or None) as bar:
        for (_, path), ep in zip(todo, prefetch(load_or_skip(f, cfg.data.skip_corrupt) for f, _ in todo)):
            if ep is None:
                bar.update(1)
                continue
            frames = torch.from_numpy(ep.frames)
            mus, logvars = [], []
            for k in range(0, len(frames), batch_size):
                mu, logvar = model.encode(frames_to_tensor(frames[k : k + batch_size].to(device)))
                mus.append(mu.float().cpu())
                logvars.append(logvar.float().cpu())
            save_latents(path, torch.cat(mus).numpy(), torch.cat(logvars).numpy(), ep)
            bar.update(1)
    vae_done = read_json(run.path / "vae" / "done.json")
    out = [o for o in out if o.exists()]  # episodes skipped as corrupt have no latents
    write_json(marker, {"episodes": len(out), "z_size": cfg.vae.z_size, "vae_step": vae_done.get("best_step")})
    return out


# --- M ---------------------------------------------------------------------------------------


def masked_mdrnn_loss(out: MDNOutput, z_next: Tensor, reward: Tensor, done: Tensor, mask: Tensor) -> MDRNNLoss:
    """M's loss averaged over the valid steps of padded sequences, in float32.

    Like :func:`~worldmodels.mdrnn.mdrnn_loss` (mixture NLL averaged over latent
    dimensions, plus reward MSE and done cross-entropy when M has those heads), with
    every term averaged over the (B, T) positions where `mask` is True only.
    """
    n = mask.sum().clamp_min(1)

    def masked_mean(x: Tensor) -> Tensor:
        return torch.where(mask, x, torch.zeros_like(x)).sum() / n

    gmm = masked_mean(mdn_loss(out, z_next, reduction="none").mean(-1))
    zero = gmm.new_zeros(())
    reward_loss = masked_mean((out.reward - reward).pow(2)) if out.reward is not None else zero
    done_loss = (
        masked_mean(F.binary_cross_entropy_with_logits(out.done_logit, done, reduction="none"))
        if out.done_logit is not None
        else zero
    )
    return MDRNNLoss(loss=gmm + reward_loss + done_loss, gmm=gmm, reward=reward_loss, done=done_loss)


def _mdrnn_losses(model: MDRNN, batch: dict[str, Tensor], generator: torch.Generator) -> MDRNNLoss:
    """Sample z from V's posterior, predict z[t+1] from z[t] and a[t], masked loss."""
    mu, logvar = batch["mu"], batch["logvar"]
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    out, _ = model(z[:, :-1], batch["action"])
    return masked_mdrnn_loss(out, z[:, 1:], batch["reward"], batch["done"], batch["mask"])


def _sequence_batches(ds: SequenceDataset, order: Sequence[int], batch_size: int, device: torch.device) -> Iterator[dict[str, Tensor]]:
    for k in range(0, len(order), batch_size):
        items = [ds[int(i)] for i in order[k : k + batch_size]]
        yield _pin(torch.utils.data.default_collate(items), device)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def _test_mdrnn(model: MDRNN, ds: SequenceDataset, device: torch.device, cfg: Config) -> dict[str, float]:
    model.eval()
    sums, n = dict.fromkeys(MDRNN_PARTS, 0.0), 0
    batches = _sequence_batches(ds, range(len(ds)), cfg.mdrnn.batch_size, device)
    for i, batch in enumerate(prefetch(batches)):
        batch = _to(batch, device)
        losses = _mdrnn_losses(model, batch, _generator(device, cfg.train_seed, _M_TEST, i))
        count = int(batch["mask"].sum())
        for k in MDRNN_PARTS:
            sums[k] += float(getattr(losses, k)) * count
        n += count
    model.train()
    return {k: v / max(n, 1) for k, v in sums.items()}


def train_mdrnn(
    cfg: Config,
    run: str | Path | RunDir,
    *,
    quiet: bool = False,
    max_steps: int | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    log_every: int = LOG_EVERY,
) -> MDRNN:
    """Train M on the encoded episodes (``run/latents``, encoded first if needed) and return it.

    Each epoch visits every window of ``cfg.mdrnn.seq_len`` transitions of the training
    episodes (:class:`~worldmodels.data.SequenceDataset`) in a new order, in batches of
    ``cfg.mdrnn.batch_size``. For every batch, ``z`` is sampled from V's stored posterior
    (``mu + sigma * eps``, ``eps`` from a generator seeded by the step), M reads
    ``z[:, :-1]`` with the actions and is scored on ``z[:, 1:]``, the rewards and the
    done flags by :func:`masked_mdrnn_loss` (padding of short episodes masked out). Adam at
    ``cfg.mdrnn.learning_rate``, gradients clipped to norm ``cfg.mdrnn.grad_clip``, no
    learning-rate schedule. The held-out episodes are the same as V's; the best weights by
    test loss are kept in ``run/mdrnn/mdrnn.safetensors``.

    Arguments, return value and errors as for :func:`train_vae`.
    """
    run = as_run_dir(run)
    cfg = run.bind(cfg)
    folder, device = run.mdrnn, resolve_device(cfg.device)
    if (folder / "done.json").exists():
        return load_mdrnn(run, device)
    if cfg.mdrnn.untrained:
        return _untrained_mdrnn(cfg, run, device)

    latent_files = encode(cfg, run, quiet=quiet)
    train_files, test_files = split_episodes(latent_files, cfg.data.test_fraction, cfg.train_seed)
    m = cfg.mdrnn
    episode_bytes = (cfg.data.episode_steps + 1) * cfg.vae.z_size * 8 + cfg.data.episode_steps * 17
    cache = max(1, LATENT_CACHE_BYTES // episode_bytes)  # whole book-scale datasets fit; paper-scale ones stream
    seq = dict(cache_episodes=cache, skip_corrupt=cfg.data.skip_corrupt)
    train_ds = SequenceDataset(train_files, m.seq_len, "latent", **seq)
    test_ds = SequenceDataset(test_files, m.seq_len, "latent", **seq) if test_files else None
    steps_per_epoch = math.ceil(len(train_ds) / m.batch_size)

    _seed_everything(cfg.train_seed)
    model = MDRNN.from_config(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=m.learning_rate)
    precision = _Precision(device, enabled=False)  # the mixture densities stay in float32
    stage = _Stage("mdrnn", "M", folder, "mdrnn.safetensors", model, optimizer, precision, MDRNN_PARTS)
    stage.resume(device)
    stage.start(steps_per_epoch * m.epochs, quiet)
    p = stage.progress
    try:
        while p.epoch < m.epochs and not _stopped(stage, max_steps):
            order = np.random.default_rng([cfg.train_seed, _M_ORDER, p.epoch]).permutation(len(train_ds))
            batches = _sequence_batches(train_ds, order[p.batch * m.batch_size :], m.batch_size, device)
            for batch in prefetch(batches):
                if _stopped(stage, max_steps):
                    break
                batch = _to(batch, device)
                losses = _mdrnn_losses(model, batch, _generator(device, cfg.train_seed, _M_TRAIN, p.step))
                values = stage.check(losses._asdict())
                _backward_step(losses.loss, optimizer, precision, model, m.grad_clip, stage)
                stage.stepped(values, log_every)
                if stage.checkpoint_due(checkpoint_seconds):
                    stage.save()
            else:
                stage.end_epoch(_test_mdrnn(model, test_ds, device, cfg) if test_ds else None)
                continue
            break
        if p.epoch >= m.epochs:
            stage.finish(device)
            return load_mdrnn(run, device)
        return model.eval()
    finally:
        stage.close()


def _untrained_mdrnn(cfg: Config, run: RunDir, device: torch.device) -> MDRNN:
    """M at its random initialisation (seeded by ``cfg.train_seed``), saved as the stage's result."""
    _seed_everything(cfg.train_seed)
    model = MDRNN.from_config(cfg)
    folder = run.mdrnn
    save_tensors(folder / "mdrnn.safetensors", model.state_dict(), metadata={"step": "0", "stage": "mdrnn"})
    write_json(folder / "done.json", {
        "stage": "mdrnn", "steps": 0, "epochs": 0, "best_step": 0, "best_test": {}, "seconds": 0.0,
        "device": "cpu", "weights": "mdrnn.safetensors", "untrained": True,
    })
    return load_mdrnn(run, device)


def stage_summary(run: str | Path | RunDir, stage: str) -> str:
    """One line on a training stage ('vae' or 'mdrnn'): finished with its best test loss, or where it stopped."""
    run = as_run_dir(run)
    folder = run.path / stage
    label = {"vae": "V", "mdrnn": "M"}[stage]
    if (folder / "done.json").exists():
        done = read_json(folder / "done.json")
        test = done.get("best_test") or {}
        order = VAE_PARTS if stage == "vae" else MDRNN_PARTS
        parts = ", ".join(f"{k} {test[k]:.4g}" for k in order[1:] if k in test)
        if done.get("untrained"):
            return f"{label}: untrained (random initialisation, cfg.train_seed) -> {folder / done['weights']}"
        loss = f"best test loss {test['loss']:.4g} ({parts})" if test else "no test split"
        return (f"{label}: trained {done['steps']} steps in {done['epochs']} epochs, {loss} at step "
                f"{done['best_step']}, {done['seconds']:.0f} s -> {folder / done['weights']}")
    weights = folder / "last.safetensors"
    if weights.exists():
        step = weights_metadata(weights).get("step", "?")
        return f"{label}: stopped at step {step} (checkpoint {weights}); run again to resume"
    return f"{label}: not trained yet"
