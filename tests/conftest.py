"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from worldmodels.config import Config
from worldmodels.controller import ControllerShape, save_controller
from worldmodels.mdrnn import MDRNN
from worldmodels.runs import BEST_WEIGHTS, DONE_FILE, RESULTS_FILE, RunDir, save_tensors, write_json
from worldmodels.vae import VAE


def _write_fake_run(
    path: Path, cfg: Config, *, mdrnn: bool = True, controller: bool = False, results: dict | None = None, seed: int = 0
) -> RunDir:
    run = RunDir(path)
    run.bind(cfg)
    torch.manual_seed(seed)
    stages = {"vae": VAE.from_config(cfg), **({"mdrnn": MDRNN.from_config(cfg)} if mdrnn else {})}
    for stage, model in stages.items():
        save_tensors(run.stage(stage) / BEST_WEIGHTS[stage], model.state_dict())
        write_json(run.stage(stage) / DONE_FILE, {"stage": stage, "weights": BEST_WEIGHTS[stage]})
    if controller:
        shape = ControllerShape.from_config(cfg)
        params = np.random.default_rng(seed).normal(0, 0.1, shape.n_params)
        save_controller(run.controller / BEST_WEIGHTS["controller"], params, shape, {"generation": "7"})
    if results is not None:
        write_json(run.eval / RESULTS_FILE, results)
    return run


@pytest.fixture()
def fake_run(tmp_path: Path) -> Callable[..., RunDir]:
    """A factory of finished runs whose weights are random stand-ins for trained ones, so that
    what reads a finished run is tested without training:
    ``fake_run(cfg, path=tmp_path / "run", *, mdrnn=True, controller=False, results=None, seed=0)``.

    It writes config.json, V's (and with `mdrnn`, M's) weights and ``done.json`` (seeded by
    `seed`), with `controller` a random best controller, with `results` ``eval/results.json``.
    """

    def make(cfg: Config, path: Path | None = None, **kwargs) -> RunDir:
        return _write_fake_run(tmp_path / "run" if path is None else Path(path), cfg, **kwargs)

    return make


@pytest.fixture(scope="module")
def module_fake_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., RunDir]:
    """:func:`fake_run` for module-scoped fixtures: ``module_fake_run(cfg, **kwargs)`` makes a new
    run in a fresh temporary folder each call."""

    def make(cfg: Config, **kwargs) -> RunDir:
        return _write_fake_run(tmp_path_factory.mktemp("run"), cfg, **kwargs)

    return make
