"""Configuration: one dataclass per stage, grouped in :class:`~worldmodels.config.pipeline.Config`, and three presets.

* ``tiny``: CI and tests, every stage in seconds on two CPU cores.
* ``book``: a reader's laptop (two CPU cores, about three hours for the whole pipeline, most of it the controller).
* ``paper``: the hyperparameters of Ha & Schmidhuber (2018) and the authors' code.

Every field carries its own docstring (the CLI's ``--help`` shows it) and, where it has
one, an allowed range that is checked when the config is built, whether from Python,
from the CLI or from JSON. An invalid value raises :class:`~worldmodels.config.sections.ConfigError` naming the field
(``data.episodes``) and the allowed range.

Where a ``book`` or ``tiny`` value departs from the paper, the preset says why.

The package's modules: :mod:`~worldmodels.config.sections` (each stage's dataclass),
:mod:`~worldmodels.config.pipeline` (:class:`~worldmodels.config.pipeline.Config`, JSON and
the comparison of two configs) and :mod:`~worldmodels.config.presets`; every public name is
imported from ``worldmodels.config``.
"""

from worldmodels.config.pipeline import Config
from worldmodels.config.presets import book, paper, preset, tiny
from worldmodels.config.sections import (
    CARRACING_MAX_STEPS,
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
    Scale,
    VAEConfig,
    resolve_device,
    unchecked,
)

__all__ = [
    "CARRACING_MAX_STEPS", "CMA_VALIDATION_OFFSET", "ITERATION_SEED_STRIDE", "SCALES", "CMAConfig", "Config",
    "ConfigError", "ControllerConfig", "DataConfig", "DreamConfig", "EnvConfig", "EvalConfig", "IterateConfig",
    "MDRNNConfig", "Scale", "VAEConfig", "book", "paper", "preset", "resolve_device", "tiny", "unchecked",
]
