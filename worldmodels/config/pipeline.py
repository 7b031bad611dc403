"""The whole pipeline's configuration: the stages' sections together, from and to JSON, and
the comparison that keeps one run directory to one config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tyro

from worldmodels.config.sections import (
    _CHECKING,
    CMA_VALIDATION_OFFSET,
    ITERATION_SEED_STRIDE,
    SCALES,
    CMAConfig,
    ConfigError,
    ControllerConfig,
    DataConfig,
    DreamConfig,
    EnvConfig,
    EvalConfig,
    IterateConfig,
    MDRNNConfig,
    VAEConfig,
    _bounded,
    _runtime,
    _Section,
)


@dataclass
class Config(_Section):
    """The whole pipeline's configuration."""

    scale: tyro.conf.Suppress[str] = "paper"
    """The preset this config started from ('tiny', 'book' or 'paper')."""
    train_seed: int = _bounded(0, 0, 2**31 - 1)
    """Seed of the training runs of V and M (weights, shuffling, sampled z)."""
    device: str = _runtime("auto")
    """Torch device for V and M: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."""
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    mdrnn: MDRNNConfig = field(default_factory=MDRNNConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    cma: CMAConfig = field(default_factory=CMAConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)

    _choices = {"scale": SCALES}

    def __post_init__(self) -> None:
        if not _CHECKING.get():
            return
        super().__post_init__()
        if self.mdrnn.seq_len >= self.data.episode_steps:
            raise ConfigError(
                f"mdrnn.seq_len = {self.mdrnn.seq_len} must be below data.episode_steps = "
                f"{self.data.episode_steps}: allowed [1, {self.data.episode_steps - 1}]"
            )
        self._check_eval_seeds_unseen()
        self._check_iterate_seeds_unused()
        if not (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")):
            raise ConfigError(f"device = {self.device!r} is not allowed: 'auto', 'cpu', 'mps' or 'cuda[:N]'")

    def _check_eval_seeds_unseen(self) -> None:
        """The evaluation tracks must never be used for training or model selection."""
        eval_range = (self.eval.seed, self.eval.seed + self.eval.episodes)
        used = {
            "data.seed": (self.data.seed, self.data.seed + self.data.episodes),
            "cma.seed": self._cma_seed_range(),
        }
        for name, (lo, hi) in used.items():
            if lo < eval_range[1] and eval_range[0] < hi:
                raise ConfigError(
                    f"eval.seed: the evaluation tracks [{eval_range[0]}, {eval_range[1]}) overlap the tracks of "
                    f"{name} [{lo}, {hi}); evaluation must use unseen tracks: move eval.seed or {name}"
                )

    def _cma_seed_range(self) -> tuple[int, int]:
        """The tracks CMA-ES trains, validates and selects on (and iterations are scored on)."""
        validation = max(self.cma.eval_episodes + self.cma.select_episodes, self.iterate.score_episodes)
        return self.cma.seed, self.cma.seed + CMA_VALIDATION_OFFSET + validation

    def iterate_seed_range(self) -> tuple[int, int]:
        """The tracks of every iteration's collection, [first, last + 1)."""
        it = self.iterate
        return it.seed, it.seed + ITERATION_SEED_STRIDE * max(it.iterations - 1, 0) + it.episodes

    def _check_iterate_seeds_unused(self) -> None:
        """The iterations collect on tracks of their own: not eval's, not CMA-ES's, not the dataset's."""
        if self.iterate.iterations == 0:
            return
        lo, hi = self.iterate_seed_range()
        used = {
            "eval.seed": (self.eval.seed, self.eval.seed + self.eval.episodes),
            "cma.seed": self._cma_seed_range(),
            "data.seed": (self.data.seed, self.data.seed + self.data.episodes),
        }
        for name, (a, b) in used.items():
            if a < hi and lo < b:
                raise ConfigError(
                    f"iterate.seed: the iterations' tracks [{lo}, {hi}) overlap the tracks of {name} [{a}, {b}); "
                    f"move iterate.seed or {name}"
                )

    # --- conversion -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a config from a (possibly partial) dict; missing fields take the paper's values."""
        return _from_dict(cls, data, "")

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """The config in a JSON file; a damaged file or an invalid value raises ConfigError naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes())
        except ValueError as e:  # not JSON, or not text at all
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def replace(self, **overrides: Any) -> Config:
        """A copy with fields replaced; nested fields by dotted name or by section dict.

        >>> preset("tiny").replace(**{"data.episodes": 3, "vae": {"epochs": 2}}).data.episodes
        3
        """
        data = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if name:
                _require_key(data, section, "")
                _require_key(data[section], name, section)
                data[section][name] = value
            elif isinstance(value, dict):
                _require_key(data, key, "")
                for name, v in value.items():
                    _require_key(data[key], name, key)
                    data[key][name] = v
            else:
                _require_key(data, key, "")
                data[key] = value
        return Config.from_dict(data)

    def differences(self, other: Config, include_runtime: bool = False, allow_extensions: bool = False) -> list[str]:
        """The fields whose values differ, as ``"name: self != other"``.

        Runtime-only fields are skipped unless `include_runtime`, and so are fields read only
        when a stage starts (``cma.x0``); with `allow_extensions`, so are extendable fields
        whose value grows in `other` (see :meth:`extensions`).
        """
        out = []
        for name, a, b, meta in _leaves(self, other, ""):
            if a == b or ((meta.get("runtime") or meta.get("initial")) and not include_runtime):
                continue
            if allow_extensions and meta.get("extendable") and b > a:
                continue
            out.append(f"{name}: {a!r} != {b!r}")
        return out

    def runtime_fields(self) -> dict[str, Any]:
        """The runtime-only fields (workers, device, ...), which change how fast a stage runs and
        never what it computes: dotted name -> value, for :meth:`replace`."""
        return {name: a for name, a, _, meta in _leaves(self, self, "") if meta.get("runtime")}

    def extensions(self, other: Config) -> dict[str, Any]:
        """Extendable fields (``cma.generations``, ``cma.population``, ...) whose value is larger in
        `other`: dotted name -> new value."""
        return {name: b for name, a, b, meta in _leaves(self, other, "") if meta.get("extendable") and b > a}


def _require_key(data: dict, key: str, section: str) -> None:
    if key not in data:
        where = f"section {section!r}" if section else "the config"
        allowed = ", ".join(sorted(data))
        raise ConfigError(f"unknown field {key!r} in {where}: allowed fields are {allowed}")


def _from_dict(cls: type, data: dict[str, Any], section: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{section or 'config'} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        _require_key(fields, key, section)
        name = f"{section}.{key}" if section else key
        sub = _SECTIONS.get(key) if not section else None
        if sub is not None:
            kwargs[key] = _from_dict(sub, value, key)
        else:
            expected = type(getattr(cls(), key))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if expected is tuple and isinstance(value, list):  # JSON has no tuples
                value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"{name} must be {expected.__name__}, got {value!r}")
            kwargs[key] = value
    return cls(**kwargs)


def _leaves(a: Any, b: Any, prefix: str):
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(va):
            yield from _leaves(va, vb, name)
        else:
            yield name, va, vb, f.metadata


_SECTIONS = {
    "env": EnvConfig,
    "data": DataConfig,
    "vae": VAEConfig,
    "mdrnn": MDRNNConfig,
    "controller": ControllerConfig,
    "cma": CMAConfig,
    "dream": DreamConfig,
    "eval": EvalConfig,
    "iterate": IterateConfig,
}
