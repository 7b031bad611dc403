"""The run directory: where each stage writes, atomic saving and loading, config checks.

A run directory holds ``config.json`` and one folder per stage (``data/``, ``vae/``,
``latents/``, ``mdrnn/``, ``controller/``, ``eval/``). Every file is written to a
temporary name in the same folder and renamed into place, so an interrupted job never
leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from worldmodels.config import Config, resolve_device
from worldmodels.mdrnn import MDRNN
from worldmodels.vae import VAE

STAGES = ("data", "vae", "latents", "mdrnn", "controller", "eval")

# The run directory's layout, named here and nowhere else: ``run.path / STAGE / FILE``.
CONFIG_FILE = "config.json"
DONE_FILE = "done.json"  # in a stage's folder once the stage has finished, with its final metrics
METRICS_FILE = "metrics.csv"  # V's and M's training rows
LAST_WEIGHTS = "last.safetensors"  # the weights at the last checkpoint (V, M, C)
BEST_WEIGHTS = {"vae": "vae.safetensors", "mdrnn": "mdrnn.safetensors", "controller": "best.safetensors"}
TRAIN_STATE = "state.pt"  # V's and M's optimiser and RNG states (pickled, read only from the run itself)
PREVIOUS_TRAIN_STATE = "state.prev.pt"  # the TRAIN_STATE before the last checkpoint
MANIFEST_FILE = "manifest.json"  # data/: the episodes and their checksums
ES_CHECKPOINT = "es.pkl"  # controller/: the pickled CMA-ES (read only from the run itself)
HISTORY_FILE = "history.csv"  # controller/: one row per generation
SELECTION_FILE = "selection.json"  # controller/: the final selection among the best generations
DREAM_SUMMARY = "dream.json"  # controller/: the dream-trained controllers' record
DREAM_STARTS = "dream_starts.npz"  # controller/: the dreams' start latents, for a run without its latents
RESULTS_FILE = "results.json"  # eval/: the evaluation on the unseen tracks
DREAM_RESULTS_FILE = "dream_results.json"  # eval/: the dream-trained controller's evaluation on them
ABLATIONS_FOLDER = "ablations"  # one run directory per ablation: ablations/NAME/
ITERATIONS_FOLDER = "iterations"  # one folder per iteration: iterations/01/, iterations/02/, ...
FINAL_FOLDER = "final"  # the final stage: C evolved in CarRacing on an iteration's M (a run directory)
RECORD_FILE = "record.json"  # iterations/NN/: the iteration's record, step by step


def iteration_folder(run: str | Path | RunDir, index: int) -> Path:
    """``run/iterations/NN``: the folder of iteration `index` (1, 2, ...)."""
    if index < 1:
        raise ValueError(f"iterations are numbered from 1, got {index}")
    return as_run_dir(run).path / ITERATIONS_FOLDER / f"{index:02d}"


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (for example, made with another config)."""


class DamagedFileError(RunDirError):
    """A file that is there but cannot be read: truncated, corrupt or not what its name says (the message names it)."""


def _damaged_file_errors() -> tuple[type[Exception], ...]:
    from safetensors import SafetensorError

    return (
        OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError, SafetensorError,
    )


@contextmanager
def reading(
    path: str | Path, what: str, error: type[Exception] = DamagedFileError, also: tuple[type[Exception], ...] = ()
) -> Iterator[None]:
    """Inside the block, what reading a damaged `path` raises (numpy's, safetensors', zip's, JSON's,
    pickle's errors, and those in `also`) becomes `error` with a one-line message naming the file;
    a missing file stays a FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (*_damaged_file_errors(), *also) as e:
        raise error(damaged_message(path, what, e)) from e


@contextmanager
def open_npz(path: str | Path, what: str, error: type[Exception] = DamagedFileError) -> Iterator[Any]:
    """``np.load(path)`` of a .npz file, read inside :func:`reading`: a damaged file raises `error` naming it."""
    with reading(path, what, error):
        if Path(path).exists() and not zipfile.is_zipfile(path):  # else numpy takes it for a pickle
            raise zipfile.BadZipFile("not a .npz (zip) archive")
        with np.load(path) as f:
            yield f


def damaged_message(path: str | Path, what: str, cause: BaseException) -> str:
    """``PATH: corrupt or truncated WHAT (Cause: its message on one line)``."""
    detail = " ".join(str(cause).split())[:200]
    return f"{path}: corrupt or truncated {what} ({type(cause).__name__}: {detail})"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """The JSON object in `path`; a damaged file raises DamagedFileError naming it."""
    with reading(path, "JSON file"):
        return json.loads(Path(path).read_bytes())


def read_pickle(path: str | Path) -> Any:
    """The object pickled in `path`, a file the run wrote itself (never a shared one); a damaged
    file raises DamagedFileError naming it."""
    data = Path(path).read_bytes()
    try:
        return pickle.loads(data)
    except Exception as e:  # a damaged pickle can raise almost anything while it is rebuilt
        raise DamagedFileError(damaged_message(path, "checkpoint", e)) from e


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Compressed .npz written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Torch tensors to a safetensors file, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """Tensors from a safetensors file (no pickle involved); a damaged file raises DamagedFileError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    with reading(path, "weights file"):
        return load_file(str(path), device=device)


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (empty when it has none); a damaged file raises DamagedFileError naming it."""
    from safetensors import safe_open

    with reading(path, "weights file"), safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def load_train_state(path: str | Path) -> dict:
    """A training state saved with ``torch.save`` by the run itself (optimiser, RNG, progress;
    tensors only, no code); a damaged file raises DamagedFileError naming it."""
    with reading(path, "training state", also=(RuntimeError,)):  # RuntimeError: torch's reader of a damaged archive
        return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model: torch.nn.Module, path: str | Path, device: str = "cpu") -> None:
    """Load `path` into `model`; weights of another architecture raise DamagedFileError naming the file."""
    tensors = load_tensors(path, device=device)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors
        raise DamagedFileError(f"{path}: weights of another architecture than the run's config.json describes "
            f"({' '.join(str(e).split())[:200]})") from e


class RunDir:
    """Paths of one run and the check that it is only ever used with one config."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def stage(self, name: str) -> Path:
        """The folder of stage `name` (not created: whatever writes there creates it)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGES)}")
        return self.path / name

    data = property(lambda self: self.stage("data"))
    vae = property(lambda self: self.stage("vae"))
    latents = property(lambda self: self.stage("latents"))
    mdrnn = property(lambda self: self.stage("mdrnn"))
    controller = property(lambda self: self.stage("controller"))
    eval = property(lambda self: self.stage("eval"))

    def load_config(self) -> Config | None:
        return Config.load(self.config_path) if self.config_path.exists() else None

    def bind(self, cfg: Config) -> Config:
        """Record `cfg` in a new run directory, or check it against the recorded one.

        Fields that only change speed (workers, device, ...) may differ. An extendable
        field (``cma.generations``) may grow: the run continues for longer and the new
        value is recorded. A section that the recorded config predates (``iterate`` in a
        run made before it existed) is taken from `cfg` and recorded: the run never used
        it, so no results are mixed. Any other difference raises :class:`RunDirError` listing the
        fields, so that results of two configs are never mixed in one directory.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        recorded = self.load_config()
        if recorded is None:
            write_json(self.config_path, cfg.to_dict())
            return cfg
        written = read_json(self.config_path)
        new_sections = {k: v for k, v in cfg.to_dict().items() if isinstance(v, dict) and k not in written}
        recorded = recorded.replace(**new_sections) if new_sections else recorded
        diff = recorded.differences(cfg, allow_extensions=True)
        if not diff and (recorded.extensions(cfg) or new_sections):
            write_json(self.config_path, recorded.replace(**recorded.extensions(cfg)).to_dict())
        if diff:
            raise RunDirError(
                f"{self.config_path} was written by another config; refusing to mix results. "
                f"Differences (recorded != requested): {'; '.join(diff)}. "
                "Use a new --run-dir, or delete the directory to start over."
            )
        return cfg


def as_run_dir(run: str | Path | RunDir) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


# --- loading finished stages ---------------------------------------------------------------


def _recorded_config(run: RunDir) -> Config:
    cfg = run.load_config()
    if cfg is None:
        raise FileNotFoundError(f"{run.config_path}: no config; {run.path} is not a run directory")
    return cfg


def _load_model(run: str | Path | RunDir, stage: str, which: str, device: Any, build: Any) -> Any:
    run = as_run_dir(run)
    cfg, device = _recorded_config(run), resolve_device(device)
    path = run.stage(stage) / {"best": BEST_WEIGHTS[stage], "last": LAST_WEIGHTS}[which]
    if not path.exists():
        command = {"vae": "train-vae", "mdrnn": "train-mdrnn"}[stage]
        raise FileNotFoundError(
            f"{path}: no such weights file; train it first (python -m worldmodels {command} --run-dir {run.path})"
        )
    model = build(cfg)
    load_weights(model, path, device=str(device))
    return model.to(device).eval()


def load_vae(run: str | Path | RunDir, device: Any = "cpu", *, which: str = "best") -> VAE:
    """V's weights from ``run/vae/vae.safetensors`` (``which='best'``) or ``last.safetensors`` ('last').

    Reads safetensors only (no pickle); the architecture comes from the run's config.json.
    A missing file raises FileNotFoundError naming it.
    """
    return _load_model(run, "vae", which, device, VAE.from_config)


def load_mdrnn(run: str | Path | RunDir, device: Any = "cpu", *, which: str = "best") -> MDRNN:
    """M's weights from ``run/mdrnn/mdrnn.safetensors`` (``which='best'``) or ``last.safetensors`` ('last').

    Reads safetensors only (no pickle); the architecture comes from the run's config.json.
    A missing file raises FileNotFoundError naming it.
    """
    return _load_model(run, "mdrnn", which, device, MDRNN.from_config)
