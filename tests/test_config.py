import json

import pytest

from worldmodels.config import CARRACING_MAX_STEPS, SCALES, Config, ConfigError, preset


@pytest.mark.parametrize("scale", SCALES)
def test_presets_round_trip_through_json(scale):
    cfg = preset(scale)
    assert cfg.scale == scale
    assert Config.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["data"]["episodes"] == cfg.data.episodes


def test_paper_preset_holds_the_papers_values():
    cfg = preset("paper")
    assert (cfg.data.episodes, cfg.data.episode_steps) == (10_000, 1000)
    assert (cfg.vae.z_size, cfg.vae.kl_tolerance) == (32, 0.5)
    assert (cfg.mdrnn.hidden_size, cfg.mdrnn.n_gaussians, cfg.mdrnn.seq_len) == (256, 5, 999)
    assert (cfg.mdrnn.learning_rate, cfg.mdrnn.grad_clip, cfg.mdrnn.batch_size) == (1e-3, 1.0, 100)
    assert (cfg.cma.population, cfg.cma.episodes_per_candidate, cfg.cma.sigma0) == (64, 16, 0.1)
    assert (cfg.cma.eval_every, cfg.cma.eval_episodes, cfg.cma.early_stop_steps) == (25, 1024, 0)
    assert cfg.eval.episodes == 100


def test_overrides_by_dotted_name_and_section():
    cfg = preset("tiny", **{"data.episodes": 7, "vae": {"epochs": 3}})
    assert cfg.data.episodes == 7 and cfg.vae.epochs == 3
    assert cfg.replace(**{"cma.population": 8}).cma.population == 8
    assert preset("tiny").data.episodes != 7  # presets are fresh objects


@pytest.mark.parametrize(
    "override, names",
    [
        ({"data.episodes": -1}, ["data.episodes", "[1, inf]"]),
        ({"vae.z_size": 0}, ["vae.z_size", "[1, 1024]"]),
        ({"data.episode_steps": CARRACING_MAX_STEPS + 1}, ["data.episode_steps", "[2, 1000]"]),
        ({"data.policy": "greedy"}, ["data.policy", "'brownian'"]),
        ({"controller.kind": "big"}, ["controller.kind", "'zh'"]),
        ({"cma.sigma0": 0.0}, ["cma.sigma0"]),
        ({"mdrnn.seq_len": 60}, ["mdrnn.seq_len", "data.episode_steps"]),
        ({"data.test_fraction": float("nan")}, ["data.test_fraction"]),
        ({"data.episodes": "ten"}, ["data.episodes", "int"]),
        ({"device": "tpu"}, ["device"]),
        ({"env.frame_size": 96}, ["env.frame_size", "[64, 64]"]),
        ({"eval.seed": 1_000_010}, ["eval.seed", "cma.seed", "unseen"]),
        ({"eval.seed": 2, "eval.episodes": 3}, ["eval.seed", "data.seed"]),
        ({"vae.nonsense": 1}, ["nonsense", "vae"]),
        ({"nonsense": 1}, ["nonsense"]),
    ],
)
def test_invalid_values_name_the_field_and_range(override, names):
    with pytest.raises(ConfigError) as err:
        preset("tiny", **override)
    for name in names:
        assert name in str(err.value)


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny, book, paper"):
        preset("huge")


def test_partial_json_takes_defaults_and_rejects_unknown_fields(tmp_path):
    assert Config.from_dict({"data": {"episodes": 5}}).data.episodes == 5
    with pytest.raises(ConfigError, match="unknown field 'typo' in section 'cma'"):
        Config.from_dict({"cma": {"typo": 1}})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        Config.load(bad)


def test_differences_skip_runtime_fields():
    a = preset("tiny")
    b = a.replace(**{"data.workers": 7, "device": "cpu", "cma.scheduler": "tcp://x:1"})
    assert a.differences(b) == []
    assert len(a.differences(b, include_runtime=True)) == 3
    assert a.differences(a.replace(**{"vae.epochs": 9})) == ["vae.epochs: 1 != 9"]


def test_runtime_fields_are_those_that_change_only_speed():
    cfg = preset("tiny", **{"cma.workers": 3, "device": "cpu"})
    fields = cfg.runtime_fields()
    assert fields["cma.workers"] == 3 and fields["device"] == "cpu" and "cma.population" not in fields
    other = preset("tiny").replace(**fields)
    assert other.differences(cfg, include_runtime=True) == [] and preset("tiny").differences(cfg) == []
