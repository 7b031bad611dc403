"""The configuration of each stage: one dataclass per stage, checked when it is built.

Every field carries its own docstring (the CLI's ``--help`` shows it) and, where it has
one, an allowed range; an invalid value raises :class:`ConfigError` naming the field
(``data.episodes``) and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal

if TYPE_CHECKING:
    import torch

CARRACING_MAX_STEPS = 1000
"""CarRacing-v3's time limit (gymnasium truncates an episode after 1,000 steps)."""

SCALES = ("tiny", "book", "paper")
CMA_VALIDATION_OFFSET = 500_000
"""CMA-ES's validation tracks use seeds cma.seed + CMA_VALIDATION_OFFSET + i."""
ITERATION_SEED_STRIDE = 100_000
"""Iteration k's episode i is driven on the track of seed iterate.seed + ITERATION_SEED_STRIDE * (k - 1) + i."""
Scale = Literal["tiny", "book", "paper"]


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the allowed range."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for ``cfg.device``: 'auto' is CUDA when available, else the CPU."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} was asked for but CUDA is not available (use 'auto' or 'cpu')")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r} was asked for but MPS is not available (use 'auto' or 'cpu')")
    return device


def _bounded(
    default: Any, lo: float | None = None, hi: float | None = None, *, runtime: bool = False, extendable: bool = False
) -> Any:
    """A dataclass field with an allowed closed range [lo, hi] (None: unbounded).

    `runtime`: the field changes how fast a stage runs, never what it computes.
    `extendable`: a run directory may be continued with a larger value (train for longer).
    """
    return field(default=default, metadata={"range": (lo, hi), "runtime": runtime, "extendable": extendable})


def _runtime(default: Any) -> Any:
    """A field that changes how fast a stage runs, never what it computes (not compared on resume)."""
    return field(default=default, metadata={"runtime": True})


def _initial(default: Any) -> Any:
    """A field read only when a stage starts (where CMA-ES's mean starts, say): once the stage has
    begun its checkpoint holds what it read, so the field is not compared on resume."""
    return field(default=default, metadata={"initial": True})


def _check_fields(obj: Any, section: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{section}.{f.name}" if section else f.name
        lo, hi = f.metadata.get("range", (None, None))
        if lo is None and hi is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and math.isnan(value)
        ):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{name} = {value!r} is out of range: allowed {allowed}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not allowed: choose one of {', '.join(map(repr, choices))}")


_CHECKING: ContextVar[bool] = ContextVar("worldmodels_config_checking", default=True)


@contextmanager
def unchecked() -> Iterator[None]:
    """Configs built inside the block skip their checks: the CLI parses the flags first, then
    checks the whole config once, so that an error names the flag at fault."""
    token = _CHECKING.set(False)
    try:
        yield
    finally:
        _CHECKING.reset(token)


class _Section:
    """Validation on construction for every stage's dataclass."""

    _section = ""
    _choices: dict[str, tuple] = {}

    def __post_init__(self) -> None:
        if not _CHECKING.get():
            return
        _check_fields(self, self._section)
        for name, choices in self._choices.items():
            _check_choice(f"{self._section}.{name}", getattr(self, name), choices)


@dataclass
class EnvConfig(_Section):
    """The CarRacing-v3 environment and the observation transform."""

    fast_render: bool = True
    """Use the package's bit-identical, faster renderer (`worldmodels/CarRacing-v3`)."""
    crop_indicator_bar: bool = True
    """Keep rows 0-83 of the 96x96 frame, dropping the indicator bar, as the authors' code did."""
    frame_size: int = _bounded(64, 64, 64)
    """Side of the square observation after resizing (64: V's architecture is built for it)."""

    _section = "env"


@dataclass
class DataConfig(_Section):
    """Collection of the random-policy dataset that V and M learn from."""

    episodes: int = _bounded(10_000, 1)
    """Number of episodes to collect."""
    episode_steps: int = _bounded(1000, 2, CARRACING_MAX_STEPS)
    """Steps per episode (at most CarRacing-v3's limit of 1,000); an episode may end earlier."""
    policy: str = "brownian"
    """Random policy: 'brownian' (temporally correlated actions) or 'uniform' (independent each step)."""
    brownian_dt: float = _bounded(1 / 50, 1e-6, 1.0)
    """Time step of the Brownian policy: a(t+1) = clip(a(t) + sqrt(dt) * N(0, 1))."""
    seed: int = _bounded(0, 0, 2**31 - 1)
    """Episode i is collected on the track of seed `seed + i` (training tracks)."""
    test_fraction: float = _bounded(0.1, 0.0, 0.9)
    """Fraction of episodes held out for the test losses of V and M (split by episode)."""
    workers: int = _bounded(0, 0, 1024, runtime=True)
    """Worker processes (0: one per CPU core)."""
    envs_per_worker: int = _bounded(4, 1, 256, runtime=True)
    """Environments stepped together in each worker."""
    task_timeout: float = _bounded(1800.0, 1.0, runtime=True)
    """Seconds before a stuck collection task (one vector of episodes) raises an error naming it."""
    skip_corrupt: bool = _runtime(False)
    """Skip corrupt or truncated episode files with a warning instead of stopping with an error."""

    _section = "data"
    _choices = {"policy": ("brownian", "uniform")}


@dataclass
class VAEConfig(_Section):
    """V: the convolutional VAE and its training."""

    z_size: int = _bounded(32, 1, 1024)
    """Size of the latent vector z."""
    kl_tolerance: float = _bounded(0.5, 0.0, 100.0)
    """Free bits: the KL term is floored at kl_tolerance * z_size nats per image."""
    batch_size: int = _bounded(100, 1, 65536)
    """Frames per training batch."""
    epochs: int = _bounded(10, 1)
    """Passes over the training frames."""
    learning_rate: float = _bounded(1e-4, 0.0, 1.0)
    """Adam's learning rate."""
    frames_per_episode: int = _bounded(0, 0, CARRACING_MAX_STEPS)
    """Frames drawn from each episode per epoch (0: all of them)."""
    shuffle_episodes: int = _bounded(32, 1, 100_000, runtime=True)
    """Episodes held in memory at once by the shuffling loader (bounds memory use)."""

    _section = "vae"


@dataclass
class MDRNNConfig(_Section):
    """M: the MDN-RNN and its training."""

    hidden_size: int = _bounded(256, 1, 8192)
    """LSTM units."""
    n_gaussians: int = _bounded(5, 1, 64)
    """Mixture components per latent dimension."""
    reward_head: bool = True
    """Predict the reward (needed to train in the dream)."""
    done_head: bool = True
    """Predict the end of the episode (needed to train in the dream)."""
    seq_len: int = _bounded(999, 1, CARRACING_MAX_STEPS - 1)
    """Length of the training sequences (the paper: whole 999-step episodes)."""
    batch_size: int = _bounded(100, 1, 65536)
    """Sequences per training batch."""
    epochs: int = _bounded(20, 1)
    """Passes over the training episodes."""
    learning_rate: float = _bounded(1e-3, 0.0, 1.0)
    """Adam's learning rate."""
    grad_clip: float = _bounded(1.0, 0.0)
    """Gradient norm clipping (0: off)."""
    reward_overprediction: float = _bounded(1.0, 1.0, 100.0)
    """Weight of the reward head's squared error where it predicts more than the real reward (1: plain
    MSE); above 1, M errs low and a controller trained in its dream finds fewer rewards M invents."""
    untrained: bool = False
    """Keep M at its random initialisation (seeded by train_seed) instead of training it: the
    ablation in which only M's untrained recurrent features reach the controller."""

    _section = "mdrnn"


@dataclass
class ControllerConfig(_Section):
    """C: the controller."""

    kind: str = "zh"
    """'zh': a = W [z, h] + b (the full model); 'z': V only; 'z_hidden': V only with a tanh hidden layer."""
    hidden_units: int = _bounded(40, 1, 4096)
    """Units of the hidden layer of the 'z_hidden' controller."""

    _section = "controller"
    _choices = {"kind": ("zh", "z", "z_hidden")}


@dataclass
class CMAConfig(_Section):
    """CMA-ES training of the controller in the real environment."""

    population: int = _bounded(64, 2, 100_000, extendable=True)
    """Candidates per generation (a run continues with a larger one from its mean, step size and covariance)."""
    episodes_per_candidate: int = _bounded(16, 1, 10_000, extendable=True)
    """Episodes averaged into each candidate's fitness (a run continues with more from its next generation)."""
    sigma0: float = _bounded(0.1, 1e-8, 100.0)
    """Initial step size of CMA-ES."""
    x0: str = _initial("")
    """Controller file (safetensors) where CMA-ES's mean starts; empty: zeros. Read once, when the
    evolution starts: a run that has begun goes on from its checkpoint whatever this says."""
    generations: int = _bounded(2000, 1, extendable=True)
    """Generations to run (a finished run continues when this grows)."""
    weight_decay: float = _bounded(0.01, 0.0)
    """Fitness penalty weight_decay * mean(theta^2), as in the authors' code."""
    eval_every: int = _bounded(25, 1)
    """Evaluate the distribution's mean every this many generations."""
    eval_episodes: int = _bounded(1024, 1)
    """Validation episodes for each periodic evaluation (fixed seeds)."""
    select_top: int = _bounded(0, 0, 1000, extendable=True)
    """After the last generation, re-score the validated means with the best validation scores,
    this many of them, on `select_episodes` more validation tracks and keep the best (0: off);
    a finished run selects again when this grows."""
    select_episodes: int = _bounded(0, 0, 100_000, extendable=True)
    """Further validation tracks of that final selection (seeds after the periodic validation's);
    a finished run selects again when this grows."""
    max_steps: int = _bounded(1000, 1, CARRACING_MAX_STEPS)
    """Steps per training episode."""
    early_stop_steps: int = _bounded(0, 0, CARRACING_MAX_STEPS)
    """End a training episode after this many steps without a new tile (0: never)."""
    seed: int = _bounded(1_000_000, 0, 2**31 - 1)
    """Training tracks are drawn from seeds at and above this one; the validation tracks start at seed + 500,000."""
    workers: int = _bounded(0, 0, 4096, runtime=True)
    """Local worker processes (0: one per CPU core)."""
    envs_per_worker: int = _bounded(8, 1, 1024, runtime=True)
    """Environments stepped together in each worker."""
    scheduler: str = _runtime("")
    """Address of a Dask scheduler (tcp://host:8786); empty: local processes."""
    task_timeout: float = _bounded(1800.0, 1.0, runtime=True)
    """Seconds before a stuck evaluation task raises an error naming it."""

    _section = "cma"


@dataclass
class DreamConfig(_Section):
    """Training the controller inside M's dream."""

    temperature: float = _bounded(1.15, 1e-3, 10.0)
    """Temperature tau of M's sampling: mixture logits / tau, sigma * sqrt(tau)."""
    max_steps: int = _bounded(1000, 1, CARRACING_MAX_STEPS)
    """Steps per dreamed episode."""
    generations: int = _bounded(0, 0, extendable=True)
    """CMA-ES generations in the dream (0: as many as ``cma.generations``)."""
    population: int = _bounded(64, 2, 100_000)
    """Candidates per generation in the dream (the paper's 64: a whole generation is one batch of dreams)."""
    episodes_per_candidate: int = _bounded(16, 1, 10_000)
    """Dreams averaged into each candidate's fitness (the paper's 16)."""
    threads: int = _bounded(0, 0, 1024, runtime=True)
    """Threads of a batch of dreams on the CPU, each on a slice of it (0: one per core for a batch of
    at least 256 dreams, else 1)."""

    _section = "dream"


@dataclass
class EvalConfig(_Section):
    """Final evaluation, the paper's protocol: mean and std over unseen tracks."""

    episodes: int = _bounded(100, 1)
    """Episodes, one track each."""
    seed: int = _bounded(2_000_000_000, 0, 2**31 - 1)
    """Evaluation tracks use seeds seed, seed+1, ...; never used in training or model selection."""
    max_steps: int = _bounded(CARRACING_MAX_STEPS, 1, CARRACING_MAX_STEPS)
    """Steps per evaluation episode (the protocol: CarRacing's full 1,000; fewer only in tiny)."""

    _section = "eval"


@dataclass
class IterateConfig(_Section):
    """The iterative training procedure: collect with the current controller, retrain M on all
    the data, evolve C again."""

    iterations: int = _bounded(0, 0, 99, extendable=True)
    """Iterations to run after the first controller (0: none; a finished run continues when this grows)."""
    episodes: int = _bounded(1000, 1, ITERATION_SEED_STRIDE)
    """Episodes collected with the current controller in each iteration."""
    noise: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    """Parameter noise: episode i drives theta + noise[i % len(noise)] * N(0, I) (the large ones
    spin out and leave the road)."""
    seed: int = _bounded(10_000_000, 0, 2**31 - 1)
    """Iteration k's episode i is driven on the track of seed + 100,000 * (k - 1) + i (and its noise drawn from it)."""
    mdrnn_epochs: int = _bounded(0, 0)
    """Epochs of fine-tuning M on all the data so far, from the previous iteration's M (0: mdrnn.epochs)."""
    controller: str = "dream"
    """How C is evolved again: 'dream' (in the new M's dream, as the dream command) or 'real'
    (in CarRacing, as train-controller)."""
    controller_generations: int = _bounded(0, 0)
    """Generations of that evolution (0: dream.generations or cma.generations, as the command would run)."""
    reward_overprediction: float = _bounded(0.0, 0.0, 100.0)
    """``mdrnn.reward_overprediction`` of the iterations' M (0: the run's own)."""
    score_episodes: int = _bounded(16, 1, 100_000)
    """Real episodes scoring each iteration's controller, on the CMA-ES validation tracks (never eval's)."""
    final_iteration: int = _bounded(0, 0, 99)
    """In the config of the final stage (``RUN/final``, see :mod:`worldmodels.final`): the iteration
    whose M the agent drives with and whose dream controller its CMA-ES starts from (0: a run's own config)."""

    _section = "iterate"
    _choices = {"controller": ("dream", "real")}

    def __post_init__(self) -> None:
        if not _CHECKING.get():
            return
        super().__post_init__()
        if not isinstance(self.noise, tuple) or not self.noise:
            raise ConfigError(f"iterate.noise must be a non-empty tuple of numbers >= 0, got {self.noise!r}")
        for sigma in self.noise:
            if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 <= sigma < math.inf):
                raise ConfigError(f"iterate.noise = {self.noise!r}: {sigma!r} is out of range: allowed [0, inf)")
