import json
import subprocess
import sys

import pytest

from worldmodels.cli import main


def run_cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "worldmodels", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_collect_end_to_end_at_tiny(tmp_path):
    out = run_cli("collect", "--scale", "tiny", "--run-dir", str(tmp_path), "--data.episodes", "2", "--quiet")
    assert "2 episodes" in out.stdout
    assert len(list((tmp_path / "data").glob("episode_*.npz"))) == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["scale"] == "tiny" and config["data"]["episodes"] == 2
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["episodes"] == 2


def test_help_lists_every_field_with_its_meaning():
    out = run_cli("collect", "--help")
    assert "--data.episodes" in out.stdout and "Number of episodes to collect" in out.stdout
    assert "--vae.kl-tolerance" in out.stdout and "Free bits" in out.stdout
    assert "--run-dir" in out.stdout


def test_scale_sets_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["collect", "--scale", "paper", "--help"])
    assert "10000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["collect", "--scale", "tiny", "--help"])
    assert "(default: 4)" in capsys.readouterr().out


def test_bad_values_fail_with_the_field_named(tmp_path):
    out = run_cli("collect", "--scale", "tiny", "--run-dir", str(tmp_path), "--data.episodes", "-3", check=False)
    assert out.returncode != 0 and out.stderr == "error: --data.episodes = -3 is out of range: allowed [1, inf]\n"
    out = run_cli("collect", "--scale", "huge", "--run-dir", str(tmp_path), check=False)
    assert out.returncode != 0 and "huge" in out.stderr
    run_cli("collect", "--scale", "tiny", "--run-dir", str(tmp_path), "--data.episodes", "1", "--quiet")
    out = run_cli("collect", "--scale", "tiny", "--run-dir", str(tmp_path), "--data.episodes", "2", check=False)
    assert out.returncode != 0 and "refusing to mix" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--data.episode-steps", "0"], "--data.episode-steps = 0 is out of range: allowed [2, 1000]"),
        (["--mdrnn.seq-len", "60"], "--mdrnn.seq-len = 60 must be below --data.episode-steps = 60: allowed [1, 59]"),
        (["--eval.seed", "2"], "--eval.seed: the evaluation tracks [2, 4) overlap the tracks of --data.seed [0, 4); "
                               "evaluation must use unseen tracks: move --eval.seed or --data.seed"),
        (["--device", "tpu"], "--device = 'tpu' is not allowed: 'auto', 'cpu', 'mps' or 'cuda[:N]'"),
    ],
)
def test_a_bad_value_is_named_by_its_flag(flags, expected):
    """Checked once tyro has parsed the flags, so the message names the flag, never tyro's internal fields."""
    with pytest.raises(SystemExit) as exit_:
        main(["train-vae", "--scale", "tiny", "--run-dir", "never-made", *flags])
    assert exit_.value.code == f"error: {expected}"


def test_ablations_names_a_bad_ablation(tmp_path):
    out = run_cli("ablations", "--scale", "tiny", "--run-dir", str(tmp_path), "--name", "w", check=False)
    assert out.returncode != 0 and "'w'" in out.stderr and "untrained_m" in out.stderr and "Traceback" not in out.stderr


def test_ablations_with_two_seeds_trains_the_seed_runs_after_the_ablations(tmp_path, monkeypatch):
    import worldmodels.ablations as ablations

    trained = []
    monkeypatch.setattr(ablations, "run_ablation", lambda cfg, run, name, **kw: trained.append(name))
    monkeypatch.setattr(ablations, "table", lambda run: [])
    main(["ablations", "--scale", "tiny", "--run-dir", str(tmp_path), "--seeds", "2", "--quiet"])
    assert trained == ["z", "z_hidden", "untrained_m", "seed2_zh", "seed2_z_hidden"]
    trained.clear()
    main(["ablations", "--scale", "tiny", "--run-dir", str(tmp_path), "--name", "seed3_zh", "--quiet"])
    assert trained == ["seed3_zh"]
    with pytest.raises(SystemExit, match="--seeds 0 is out of range"):
        main(["ablations", "--scale", "tiny", "--run-dir", str(tmp_path), "--seeds", "0"])


def test_pipeline_on_finished_v_and_m_collects_nothing(fake_run):
    from worldmodels.config import preset

    cfg = preset("tiny")
    run = fake_run(cfg)
    run_cli("pipeline", "--scale", "tiny", "--run-dir", str(run.path), "--quiet")
    assert not any((run.path / "data").glob("*")) and not any((run.path / "latents").glob("*"))
    results = json.loads((run.path / "eval" / "results.json").read_text())
    assert results["episodes"] == cfg.eval.episodes and results["max_steps"] == cfg.eval.max_steps
