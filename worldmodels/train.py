"""Training V and M: their data, losses and test sets, handed to the one fit loop.

:func:`train_vae` trains V on shuffled frames of the collected episodes, :func:`encode`
turns every episode into V's posterior parameters (``mu``, ``logvar``) once, and
:func:`train_mdrnn` trains M on sequences of ``z`` *sampled* from those posteriors,
a new sample for every batch, as in the authors' code. The loop itself (epochs,
checkpoints, exact resume, metrics, ``done.json``) is :func:`worldmodels.fit.fit`.

**Resume.** Every source of randomness is a function of ``(train_seed, step)``: the
order of the frames or sequences of an epoch comes from ``(train_seed, epoch)`` and the
noise of each step (V's reparameterisation, M's sampled ``z``) from a generator seeded
with ``(train_seed, step)``. So a resumed run rebuilds the epoch's batch order, skips
the batches already done and, on a CPU, ends with exactly the weights of an
uninterrupted run.

**Finished stages.** Once ``done.json`` exists, calling the function again loads and
returns the best model without training (load-or-train).

**Precision.** On CUDA, V's convolutions run under ``torch.autocast`` while its loss is
computed in float32; M, small and sensitive in its mixture densities, trains in float32.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from worldmodels.checkpoint import saved_step
from worldmodels.config import Config, resolve_device
from worldmodels.data import episode_path, load_or_skip, split_episodes
from worldmodels.datasets import FrameDataset, SequenceDataset, latent_path, save_latents
from worldmodels.fit import CHECKPOINT_SECONDS, LOG_EVERY, Precision, Stage, TrainingError, fit
from worldmodels.mdrnn import MDRNN, MDRNNLoss, mdrnn_loss
from worldmodels.prefetch import prefetch
from worldmodels.runs import (
    BEST_WEIGHTS,
    DONE_FILE,
    LAST_WEIGHTS,
    RunDir,
    as_run_dir,
    load_mdrnn,
    load_vae,
    load_weights,
    read_json,
    save_tensors,
    write_json,
)
from worldmodels.vae import VAE, VAELoss, frames_to_tensor, vae_loss

__all__ = ["TrainingError", "encode", "encoded_files", "stage_summary", "train_mdrnn", "train_vae"]

LATENT_CACHE_BYTES = 512 * 2**20
"""Memory for decoded latent episodes kept by M's loader (per split)."""

VAE_PARTS = VAELoss._fields
MDRNN_PARTS = MDRNNLoss._fields

# Streams of the per-step random generators (with train_seed and the step or batch index).
_V_TRAIN, _V_TEST, _M_TRAIN, _M_TEST, _M_ORDER = 1, 2, 3, 4, 5


def _generator(device: torch.device, *keys: int) -> torch.Generator:
    """A torch generator on `device` seeded from the integers `keys` (e.g. seed, stream, step)."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _episodes(cfg: Config, run: RunDir) -> list[Path]:
    """The config's episode files in ``run.data``, all of which must exist."""
    files = [episode_path(run.data, i) for i in range(cfg.data.episodes)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"{run.data} has {len(files) - len(missing)} of {cfg.data.episodes} episodes "
            f"(first missing: {missing[0].name}); run collect first (python -m worldmodels collect --run-dir {run.path})"
        )
    return files


def _on(device: torch.device, batches: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """`batches` read ahead in a background thread (pinned on CUDA), then moved to `device`."""
    pinned = (_pin(b) for b in batches) if device.type == "cuda" else batches
    for batch in prefetch(pinned, depth):
        if isinstance(batch, dict):
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        else:
            yield batch.to(device, non_blocking=True)


def _pin(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: v.pin_memory() for k, v in batch.items()}
    return batch.pin_memory()


@torch.no_grad()
def _test_losses(model: nn.Module, batches: Iterable[Any], loss: Callable[[Any, int], NamedTuple],
                 weight: Callable[[Any], int]) -> dict[str, float] | None:
    """The loss parts over a test set, each batch weighted by `weight(batch)`; None when it is empty."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i, batch in enumerate(batches):
        count = weight(batch)
        for k, v in loss(batch, i)._asdict().items():
            sums[k] = sums.get(k, 0.0) + float(v) * count
        n += count
    model.train()
    return {k: v / n for k, v in sums.items()} if n else None  # None: every test episode was skipped


# --- V ---------------------------------------------------------------------------------------


def _vae_losses(model: VAE, x: Tensor, precision: Precision, generator: torch.Generator, kl_tolerance: float) -> VAELoss:
    """V's loss on frames `x` (N, 3, 64, 64): the convolutions under autocast, the loss in float32."""
    with precision.autocast():
        mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()
    z = VAE.reparameterize(mu, logvar, generator)
    with precision.autocast():
        x_hat = model.decode(z)
    return vae_loss(x_hat.float(), x, mu, logvar, kl_tolerance)


def _frame_datasets(cfg: Config, run: RunDir) -> tuple[FrameDataset, FrameDataset | None]:
    """V's training and test frames, split by episode."""
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
    return train_ds, test_ds


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

    Frames come from :class:`~worldmodels.datasets.FrameDataset` (``cfg.vae.frames_per_episode``
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
    device = resolve_device(cfg.device)
    if (run.vae / DONE_FILE).exists():
        return load_vae(run, device)
    stage = _vae_stage(cfg, run, device)
    if fit(stage, quiet=quiet, max_steps=max_steps, checkpoint_seconds=checkpoint_seconds, log_every=log_every):
        return load_vae(run, device)
    return stage.model.eval()


def _vae_stage(cfg: Config, run: RunDir, device: torch.device) -> Stage:
    """What V brings to the fit loop: frames, a fresh V with Adam, its loss and test losses."""
    v = cfg.vae
    train_ds, test_ds = _frame_datasets(cfg, run)
    steps_per_epoch = train_ds.num_frames() // v.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"V: {train_ds.num_frames()} training frames are fewer than one batch of {v.batch_size}")
    _seed_everything(cfg.train_seed)
    model = VAE.from_config(cfg).to(device)
    precision = Precision(device, enabled=True)

    def losses(frames: Tensor, stream: int, i: int) -> VAELoss:
        g = _generator(device, cfg.train_seed, stream, i)
        return _vae_losses(model, frames_to_tensor(frames), precision, g, v.kl_tolerance)

    def batches(epoch: int, done: int) -> Iterator[Tensor]:
        train_ds.set_epoch(epoch)
        return _on(device, itertools.islice(iter(train_ds), done, None), depth=8)

    def test() -> dict[str, float] | None:
        return _test_losses(model, _on(device, test_ds), lambda x, i: losses(x, _V_TEST, i), len) if test_ds else None

    return Stage(
        name="vae", label="V", folder=run.vae, parts=VAE_PARTS,
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=v.learning_rate), precision=precision,
        device=device, epochs=v.epochs, steps_per_epoch=steps_per_epoch,
        batches=batches, loss=lambda x, step: losses(x, _V_TRAIN, step), test=test,
    )


# --- encoding --------------------------------------------------------------------------------


def encode(cfg: Config, run: str | Path | RunDir, *, quiet: bool = False, batch_size: int = 250) -> list[Path]:
    """Encode every episode's T + 1 frames with the best V into ``run/latents`` and return the files.

    Each ``latents/episode_XXXXXX.npz`` holds V's posterior ``mu`` and ``logvar`` as
    float16 (T + 1, z_size) with the episode's actions, rewards and ends (see
    :func:`~worldmodels.datasets.save_latents`). Episodes already encoded are skipped, so an
    interrupted call resumes; ``latents/done.json`` marks the stage finished. V must be
    trained (``run/vae/done.json``).
    """
    run = as_run_dir(run)
    cfg = run.bind(cfg)
    files = _episodes(cfg, run)
    out = [latent_path(run.latents, f) for f in files]
    marker, vae_done = run.latents / DONE_FILE, run.vae / DONE_FILE
    if marker.exists():  # episodes skipped as corrupt (data.skip_corrupt) have no latents
        return [o for o in out if o.exists()]
    if not vae_done.exists():
        raise FileNotFoundError(
            f"{vae_done}: V has not finished training; "
            f"train it first (python -m worldmodels train-vae --run-dir {run.path})"
        )
    device = resolve_device(cfg.device)
    model = load_vae(run, device)
    todo = [(f, o) for f, o in zip(files, out) if not o.exists()]
    with torch.no_grad(), tqdm(total=len(out), initial=len(out) - len(todo), desc="encode", unit="ep", disable=quiet or None) as bar:
        for (_, path), ep in zip(todo, prefetch(load_or_skip(f, cfg.data.skip_corrupt) for f, _ in todo)):
            if ep is not None:  # None: skipped as corrupt
                save_latents(path, *_posterior(model, torch.from_numpy(ep.frames), batch_size, device), ep)
            bar.update(1)
    out = [o for o in out if o.exists()]  # episodes skipped as corrupt have no latents
    write_json(marker, {"episodes": len(out), "z_size": cfg.vae.z_size, "vae_step": read_json(vae_done).get("best_step")})
    return out


def _posterior(model: VAE, frames: Tensor, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """V's posterior ``mu`` and ``logvar`` (N, z_size) of uint8 `frames` (N, 64, 64, 3), `batch_size` at a time."""
    mus, logvars = [], []
    for k in range(0, len(frames), batch_size):
        mu, logvar = model.encode(frames_to_tensor(frames[k : k + batch_size].to(device)))
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


# --- M ---------------------------------------------------------------------------------------


def _mdrnn_losses(
    model: MDRNN, batch: dict[str, Tensor], generator: torch.Generator, overprediction: float = 1.0
) -> MDRNNLoss:
    """Sample z from V's posterior, predict z[t+1] from z[t] and a[t]; the loss over the unpadded steps."""
    mu, logvar = batch["mu"], batch["logvar"]
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    out, _ = model(z[:, :-1], batch["action"])
    return mdrnn_loss(out, z[:, 1:], batch["reward"], batch["done"], mask=batch["mask"], overprediction=overprediction)


def _sequence_datasets(
    cfg: Config, run: RunDir, quiet: bool, latent_folders: Sequence[Path] | None = None
) -> tuple[SequenceDataset, SequenceDataset | None]:
    """M's training and test sequences: the run's episodes (encoded first if needed), split as
    V's; or, with `latent_folders`, the encoded episodes of every folder, each split the same way."""
    if latent_folders is None:
        train_files, test_files = split_episodes(encode(cfg, run, quiet=quiet), cfg.data.test_fraction, cfg.train_seed)
    else:
        train_files, test_files = [], []
        for folder in latent_folders:
            train, test = split_episodes(encoded_files(folder), cfg.data.test_fraction, cfg.train_seed)
            train_files, test_files = train_files + train, test_files + test
    episode_bytes = (cfg.data.episode_steps + 1) * cfg.vae.z_size * 8 + cfg.data.episode_steps * 17
    cache = max(1, LATENT_CACHE_BYTES // episode_bytes)  # whole book-scale datasets fit; paper-scale ones stream
    seq = dict(cache_episodes=cache, skip_corrupt=cfg.data.skip_corrupt)
    train_ds = SequenceDataset(train_files, cfg.mdrnn.seq_len, "latent", **seq)
    test_ds = SequenceDataset(test_files, cfg.mdrnn.seq_len, "latent", **seq) if test_files else None
    return train_ds, test_ds


def encoded_files(latent_folder: str | Path) -> list[Path]:
    """The latent files of a finished encoding (its ``done.json`` present), sorted."""
    folder = Path(latent_folder)
    if not (folder / DONE_FILE).exists():
        raise FileNotFoundError(f"{folder / DONE_FILE}: these episodes are not encoded yet; run encode first")
    return sorted(folder.glob("episode_*.npz"))


def _sequence_batches(ds: SequenceDataset, order: Sequence[int], batch_size: int) -> Iterator[dict[str, Tensor]]:
    for k in range(0, len(order), batch_size):
        yield torch.utils.data.default_collate([ds[int(i)] for i in order[k : k + batch_size]])


def train_mdrnn(
    cfg: Config,
    run: str | Path | RunDir,
    *,
    quiet: bool = False,
    max_steps: int | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    log_every: int = LOG_EVERY,
    latent_folders: Sequence[str | Path] | None = None,
    initial: str | Path | None = None,
) -> MDRNN:
    """Train M on the encoded episodes (``run/latents``, encoded first if needed) and return it.

    Each epoch visits every window of ``cfg.mdrnn.seq_len`` transitions of the training
    episodes (:class:`~worldmodels.datasets.SequenceDataset`) in a new order, in batches of
    ``cfg.mdrnn.batch_size``. For every batch, ``z`` is sampled from V's stored posterior
    (``mu + sigma * eps``, ``eps`` from a generator seeded by the step), M reads
    ``z[:, :-1]`` with the actions and is scored on ``z[:, 1:]``, the rewards and the
    done flags by :func:`~worldmodels.mdrnn.mdrnn_loss` with the padding of short episodes
    masked out. Adam at ``cfg.mdrnn.learning_rate``, gradients clipped to norm
    ``cfg.mdrnn.grad_clip``, no learning-rate schedule. The held-out episodes are the same
    as V's; the best weights by test loss are kept in ``run/mdrnn/mdrnn.safetensors``.

    `latent_folders`: train on the encoded episodes of these folders instead (each
    finished by :func:`encode`, each split into train and test episodes by the same rule),
    as the iterations do with the run's latents and their own. `initial`: M's weights
    to start from (fine-tuning) instead of the random initialisation.

    Other arguments, return value and errors as for :func:`train_vae`.
    """
    run = as_run_dir(run)
    cfg = run.bind(cfg)
    device = resolve_device(cfg.device)
    if (run.mdrnn / DONE_FILE).exists():
        return load_mdrnn(run, device)
    if cfg.mdrnn.untrained:
        return _untrained_mdrnn(cfg, run, device)
    folders = None if latent_folders is None else [Path(f) for f in latent_folders]
    stage = _mdrnn_stage(cfg, run, device, quiet, folders, None if initial is None else Path(initial))
    if fit(stage, quiet=quiet, max_steps=max_steps, checkpoint_seconds=checkpoint_seconds, log_every=log_every):
        return load_mdrnn(run, device)
    return stage.model.eval()


def _mdrnn_stage(cfg: Config, run: RunDir, device: torch.device, quiet: bool,
                 latent_folders: list[Path] | None = None, initial: Path | None = None) -> Stage:
    """What M brings to the fit loop: latent sequences, a fresh M (or M's `initial` weights) with
    Adam, its masked loss and test losses."""
    m = cfg.mdrnn
    train_ds, test_ds = _sequence_datasets(cfg, run, quiet, latent_folders)
    _seed_everything(cfg.train_seed)
    model = MDRNN.from_config(cfg)
    if initial is not None:
        load_weights(model, initial)
    model = model.to(device)

    def losses(batch: dict[str, Tensor], stream: int, i: int) -> MDRNNLoss:
        return _mdrnn_losses(model, batch, _generator(device, cfg.train_seed, stream, i), m.reward_overprediction)

    def batches(epoch: int, done: int) -> Iterator[dict[str, Tensor]]:
        order = np.random.default_rng([cfg.train_seed, _M_ORDER, epoch]).permutation(len(train_ds))
        return _on(device, _sequence_batches(train_ds, order[done * m.batch_size :], m.batch_size))

    def test() -> dict[str, float] | None:
        if test_ds is None:
            return None
        test_batches = _on(device, _sequence_batches(test_ds, range(len(test_ds)), m.batch_size))
        return _test_losses(model, test_batches, lambda b, i: losses(b, _M_TEST, i), lambda b: int(b["mask"].sum()))

    return Stage(
        name="mdrnn", label="M", folder=run.mdrnn, parts=MDRNN_PARTS,
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=m.learning_rate),
        precision=Precision(device, enabled=False),  # the mixture densities stay in float32
        device=device, epochs=m.epochs, steps_per_epoch=math.ceil(len(train_ds) / m.batch_size),
        batches=batches, loss=lambda b, step: losses(b, _M_TRAIN, step), test=test, grad_clip=m.grad_clip,
    )


def _untrained_mdrnn(cfg: Config, run: RunDir, device: torch.device) -> MDRNN:
    """M at its random initialisation (seeded by ``cfg.train_seed``), saved as the stage's result."""
    _seed_everything(cfg.train_seed)
    model = MDRNN.from_config(cfg)
    save_tensors(run.mdrnn / BEST_WEIGHTS["mdrnn"], model.state_dict(), metadata={"step": "0", "stage": "mdrnn"})
    write_json(run.mdrnn / DONE_FILE, {
        "stage": "mdrnn", "steps": 0, "epochs": 0, "best_step": 0, "best_test": {}, "seconds": 0.0,
        "device": "cpu", "weights": BEST_WEIGHTS["mdrnn"], "untrained": True,
    })
    return load_mdrnn(run, device)


def stage_summary(run: str | Path | RunDir, stage: str) -> str:
    """One line on a training stage ('vae' or 'mdrnn'): finished with its best test loss, or where it stopped."""
    run = as_run_dir(run)
    folder = run.path / stage
    label = {"vae": "V", "mdrnn": "M"}[stage]
    if (folder / DONE_FILE).exists():
        done = read_json(folder / DONE_FILE)
        test = done.get("best_test") or {}
        order = VAE_PARTS if stage == "vae" else MDRNN_PARTS
        parts = ", ".join(f"{k} {test[k]:.4g}" for k in order[1:] if k in test)
        if done.get("untrained"):
            return f"{label}: untrained (random initialisation, cfg.train_seed) -> {folder / done['weights']}"
        loss = f"best test loss {test['loss']:.4g} ({parts})" if test else "no test split"
        return (f"{label}: trained {done['steps']} steps in {done['epochs']} epochs, {loss} at step "
                f"{done['best_step']}, {done['seconds']:.0f} s -> {folder / done['weights']}")
    weights = folder / LAST_WEIGHTS
    if weights.exists():
        return f"{label}: stopped at step {saved_step(weights)} (checkpoint {weights}); run again to resume"
    return f"{label}: not trained yet"
