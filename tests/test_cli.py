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
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")  # a final stage: 'z_hidden_on' still runs only by name
    trained.clear()
    main(["ablations", "--scale", "tiny", "--run-dir", str(tmp_path), "--quiet"])
    assert trained == ["z", "z_hidden", "untrained_m"]


def test_a_seed_run_trained_in_a_long_run_folder_is_evaluated_where_it_lands(fake_run, tmp_path):
    # the route of longruns/README.md: make the folder, evolve it elsewhere by train-controller, copy it back
    import shutil

    from worldmodels.ablations import SEED_STRIDE
    from worldmodels.config import preset

    cfg = preset("tiny")
    run = fake_run(cfg)
    seed_run = run.path / "ablations" / "seed2_zh"
    run_cli("ablations", "--scale", "tiny", "--run-dir", str(run.path), "--name", "seed2_zh", "--max-generations", "0",
            "--quiet")
    assert not (seed_run / "controller").exists() and (seed_run / "mdrnn" / "done.json").exists()
    longrun = tmp_path / "longruns" / "seed2-zh"
    shutil.copytree(seed_run, longrun)
    run_cli("train-controller", "--scale", "tiny", "--run-dir", str(longrun),
            "--cma.seed", str(cfg.cma.seed + SEED_STRIDE), "--quiet")
    shutil.rmtree(seed_run)
    shutil.copytree(longrun, seed_run)
    history = (seed_run / "controller" / "history.csv").read_text()
    out = run_cli("ablations", "--scale", "tiny", "--run-dir", str(run.path), "--name", "seed2_zh", "--quiet")
    assert (seed_run / "controller" / "history.csv").read_text() == history  # evaluated, not evolved again
    results = json.loads((seed_run / "eval" / "results.json").read_text())
    assert results["episodes"] == cfg.eval.episodes
    assert f"{results['mean']:.0f} ± {results['std']:.0f}" in out.stdout.split("(training seed 2)")[1].splitlines()[0]


def test_a_continued_row_without_a_final_stage_is_a_one_line_error(fake_run):
    from worldmodels.config import preset

    run = fake_run(preset("tiny"))
    out = run_cli("ablations", "--scale", "tiny", "--run-dir", str(run.path), "--name", "z_hidden_on", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "final/config.json: no final stage; 'z_hidden_on' evolves with the final stage's CMA-ES settings" in (
        out.stderr.strip().splitlines()[-1])


def test_train_controller_with_no_generations_records_the_config_and_trains_nothing(fake_run):
    from worldmodels.config import preset

    run = fake_run(preset("tiny").replace(**{"cma.seed": 7}))
    out = run_cli("train-controller", "--scale", "tiny", "--run-dir", str(run.path), "--cma.seed", "7",
                  "--max-generations", "0", "--quiet")
    assert out.stdout.strip().splitlines()[-1] == f"0 generations in {run.controller}"
    assert json.loads(run.config_path.read_text())["cma"]["seed"] == 7
    assert not (run.controller / "history.csv").exists()


def test_pipeline_on_finished_v_and_m_collects_nothing(fake_run):
    from worldmodels.config import preset

    cfg = preset("tiny")
    run = fake_run(cfg)
    run_cli("pipeline", "--scale", "tiny", "--run-dir", str(run.path), "--quiet")
    assert not any((run.path / "data").glob("*")) and not any((run.path / "latents").glob("*"))
    results = json.loads((run.path / "eval" / "results.json").read_text())
    assert results["episodes"] == cfg.eval.episodes and results["max_steps"] == cfg.eval.max_steps


def test_evaluate_the_dream_controller(fake_run, capsys):
    """--controller dream evaluates controller/dream_tau{tau}_best.safetensors exactly as --controller FILE
    does, prints the same JSON, and keeps the main agent's results.json; without one it names the file."""
    import numpy as np

    from worldmodels.config import preset
    from worldmodels.controller import ControllerShape, save_controller

    cfg = preset("tiny")
    run = fake_run(cfg, controller=True)
    flags = ["--run-dir", str(run.path), "--episodes", "2", "--seed", "7", "--max-steps", "80", "--workers", "1", "--json"]
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--scale", "tiny", "--controller", "dream", *flags])
    dream_file = run.path / "controller" / "dream_tau1.15_best.safetensors"
    assert exit_.value.code == (
        f"error: {dream_file}: no dream-trained controller at tau 1.15; make it with "
        f"`python -m worldmodels dream --run-dir {run.path} --dream.temperature 1.15`"
    )

    shape = ControllerShape.from_config(cfg)
    save_controller(dream_file, np.random.default_rng(3).normal(0, 3.0, shape.n_params), shape)
    main(["evaluate", "--scale", "tiny", *flags])
    main_agent = json.loads(capsys.readouterr().out)
    main(["evaluate", "--scale", "tiny", "--controller", "dream", *flags])
    dream = json.loads(capsys.readouterr().out)
    main(["evaluate", "--scale", "tiny", "--controller", str(dream_file), *flags])
    by_file = json.loads(capsys.readouterr().out)
    assert set(dream) == set(main_agent) == {"returns", "seeds", "episodes", "mean", "std", "min", "max"}
    assert dream == by_file and dream["seeds"] == [7, 8] and dream["returns"] != main_agent["returns"]
    assert json.loads((run.eval / "dream_results.json").read_text())["controller"] == str(dream_file)
    with pytest.raises(SystemExit, match="dream_tau0.5_best.safetensors: no dream-trained controller at tau 0.5"):
        main(["evaluate", "--scale", "tiny", "--controller", "dream", "--tau", "0.5", *flags])


def test_evaluate_the_shipped_dream_controller(tmp_path, capsys):
    from worldmodels import pretrained

    run = tmp_path / "book"
    main(["evaluate", "--pretrained", "book", "--run-dir", str(run), "--controller", "dream", "--episodes", "1",
          "--seed", "2000000000", "--max-steps", "30", "--workers", "1", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["episodes"] == 1 and printed["seeds"] == [2000000000]
    from worldmodels.config import Config
    from worldmodels.iterate import dream_controller

    view, path = dream_controller(Config.load(run / "config.json"), run)
    assert view.index == 3  # the shipped iterations' dream controller best on validation tracks
    written = json.loads((view.eval / "dream_results.json").read_text())
    assert written["controller"] == str(run / "iterations" / "03" / "controller" / "dream_tau1.15_best.safetensors")
    assert written["returns"] == printed["returns"]
    shipped = pretrained.ROOT / "book" / "eval" / "results.json"
    assert (run / "eval" / "results.json").read_bytes() == shipped.read_bytes()  # the main agent's, untouched


def test_dream_prints_the_temperature_table_and_the_dream_real_correlation(fake_run, capsys):
    import numpy as np

    from worldmodels.config import preset
    from worldmodels.dream import correlations
    from worldmodels.runs import save_npz

    cfg = preset("tiny")
    run = fake_run(cfg)
    for i in range(2):
        mu = np.random.default_rng(i).normal(size=(61, cfg.vae.z_size)).astype(np.float16)
        save_npz(run.latents / f"ep{i:05d}.npz", mu=mu, logvar=np.full_like(mu, -2))
    main(["dream", "--scale", "tiny", "--run-dir", str(run.path), "--taus", "0.5", "1.3", "--real-episodes", "1",
          "--dream.generations", "1", "--cma.workers", "1", "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| tau | generations | dream return | real return (1 validation tracks) |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 0.5", "| 1.3"] and len(lines) == 4

    main(["dream", "--scale", "tiny", "--run-dir", str(run.path), "--dream.temperature", "1.3", "--correlation", "3",
          "--real-episodes", "2", "--cma.workers", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["temperature"] == 1.3 and out["seeds"] == [cfg.cma.seed + 500_000, cfg.cma.seed + 500_001]
    assert len(out["dream"]) == len(out["real"]) == 3
    expected = correlations(out["dream"], out["real"])  # NaN here: 30 real steps do not tell them apart
    assert [out["pearson"], out["spearman"]] == pytest.approx(list(expected), nan_ok=True)
