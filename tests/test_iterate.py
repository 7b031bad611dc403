"""The iterative training stage: its config, its layout, its steps and their resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from worldmodels.config import ITERATION_SEED_STRIDE, Config, ConfigError, preset
from worldmodels.runs import CONFIG_FILE, RunDir, RunDirError, iteration_folder, read_json

PRETRAINED_CONFIG = Path(__file__).resolve().parents[1] / "worldmodels" / "pretrained" / "book" / CONFIG_FILE


# --- config ------------------------------------------------------------------------------


def test_iterate_section_round_trips_and_checks_its_noise():
    cfg = preset("tiny", **{"iterate.noise": (0.0, 0.3)})
    assert Config.from_json(cfg.to_json()).iterate.noise == (0.0, 0.3)
    assert Config.from_dict({"iterate": {"noise": [0, 0.5]}}).iterate.noise == (0.0, 0.5)  # JSON lists
    with pytest.raises(ConfigError, match=r"iterate.noise .*-0.1.* out of range: allowed \[0, inf\)"):
        preset("tiny", **{"iterate.noise": (0.0, -0.1)})
    with pytest.raises(ConfigError, match="iterate.noise must be a non-empty tuple"):
        preset("tiny", **{"iterate.noise": ()})
    with pytest.raises(ConfigError, match="iterate.controller = 'both' is not allowed"):
        preset("tiny", **{"iterate.controller": "both"})


@pytest.mark.parametrize(
    "override, other",
    [
        ({"eval.seed": 10_000_002}, "eval.seed"),
        ({"cma.seed": 9_600_000}, "cma.seed"),  # its validation tracks start at cma.seed + 500,000
        ({"data.seed": 10_000_003}, "data.seed"),
        ({"iterate.seed": 0}, "data.seed"),
        ({"iterate.iterations": 3, "iterate.seed": 2_000_000_000 - 2 * ITERATION_SEED_STRIDE - 4 + 1}, "eval.seed"),
    ],
)
def test_iteration_tracks_never_overlap_eval_cma_or_data_tracks(override, other):
    with pytest.raises(ConfigError, match=rf"iterate.seed: the iterations' tracks .* overlap the tracks of {other}"):
        preset("tiny", **override)


def test_iteration_tracks_are_checked_only_when_the_run_iterates():
    assert preset("tiny", **{"iterate.iterations": 0, "iterate.seed": 0}).iterate.seed == 0
    lo, hi = preset("tiny", **{"iterate.iterations": 3}).iterate_seed_range()
    assert (lo, hi) == (10_000_000, 10_000_000 + 2 * ITERATION_SEED_STRIDE + 4)


def test_a_config_written_before_the_iterate_section_loads_and_takes_the_requested_one(tmp_path):
    assert "iterate" not in json.loads(PRETRAINED_CONFIG.read_text())
    recorded = Config.load(PRETRAINED_CONFIG)
    assert recorded.iterate == Config().iterate  # a missing section takes the defaults
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    shutil.copy(PRETRAINED_CONFIG, run.config_path)
    book = preset("book")
    assert recorded.differences(book) != []  # book's iterate values are not the defaults...
    assert run.bind(book) == book  # ...but the run predates the section: it adopts the book's
    assert run.load_config().iterate == book.iterate
    with pytest.raises(RunDirError, match="iterate.episodes: 200 != 7"):
        run.bind(book.replace(**{"iterate.episodes": 7}))  # now recorded, it is checked


def test_iterations_may_grow_in_a_run_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = preset("tiny")
    run.bind(cfg)
    run.bind(cfg.replace(**{"iterate.iterations": 2}))
    assert run.load_config().iterate.iterations == 2
    assert iteration_folder(run, 2) == run.path / "iterations" / "02"
