"""The iterative training stage: its config, its layout, its steps and their resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from worldmodels import iterate as iterate_module
from worldmodels.cli import main
from worldmodels.config import ITERATION_SEED_STRIDE, Config, ConfigError, preset
from worldmodels.controller import ControllerShape, load_controller, save_controller
from worldmodels.data import collect, episode_files, load_episode
from worldmodels.dream import dream_prefix, initial_latents
from worldmodels.iterate import (
    IterationRun, dream_controller, episode_sigmas, iterate, iteration_summary, latent_folders, noisy_params,
    score_seeds,
)
from worldmodels.rollout import Agent, rollout
from worldmodels.runs import (
    BEST_WEIGHTS, CONFIG_FILE, DONE_FILE, DREAM_RESULTS_FILE, MANIFEST_FILE, RECORD_FILE, RunDir, RunDirError,
    file_sha256,
    iteration_folder, load_tensors, read_json,
)
from worldmodels.train import _sequence_datasets, encode

# One process, two environments a vector: collection runs as two groups of two episodes.
CFG = preset("tiny", **{"data.workers": 1, "data.envs_per_worker": 2, "cma.workers": 1})

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
    older = json.loads(PRETRAINED_CONFIG.read_text())
    del older["iterate"]  # the shipped book run's config as it was written, before the section existed
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config_path.write_text(json.dumps(older))
    recorded = Config.load(run.config_path)
    assert recorded.iterate == Config().iterate  # a missing section takes the defaults
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


# --- the iterations, at the tiny scale -----------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The tiny random dataset (4 episodes of 60 steps), collected once."""
    run = tmp_path_factory.mktemp("dataset")
    collect(CFG, run, quiet=True)
    return run / "data"


@pytest.fixture(scope="module")
def iterated(module_fake_run, dataset, tmp_path_factory):
    """A finished tiny run (random V, M and controller, its random episodes encoded) kept as it
    was before iterating, a copy of it after one uninterrupted iteration, and that iteration's records."""
    before = module_fake_run(CFG, controller=True)
    shutil.copytree(dataset, before.data)
    encode(CFG, before, quiet=True)
    after = RunDir(tmp_path_factory.mktemp("iterated") / "run")
    shutil.copytree(before.path, after.path)
    return before, after, iterate(CFG, after, quiet=True)


@pytest.fixture()
def base_run(iterated, tmp_path):
    """A copy of the finished tiny run, not yet iterated."""
    run = RunDir(tmp_path / "base")
    shutil.copytree(iterated[0].path, run.path)
    return run


@pytest.fixture()
def finished(iterated, base_run, tmp_path):
    """A copy of the run after one uninterrupted iteration, a copy of the run before it, the records."""
    run = RunDir(tmp_path / "iterated")
    shutil.copytree(iterated[1].path, run.path)
    return run, base_run, iterated[2]


def without_seconds(record):
    return {k: {f: v for f, v in e.items() if f != "seconds"} if isinstance(e, dict) else e for k, e in record.items()}


def mtimes(folder):
    """Modification times of the episodes, latents and weights in `folder`."""
    files = sorted(Path(folder).iterdir())
    return {p.name: p.stat().st_mtime_ns for p in files if p.suffix in (".npz", ".safetensors")}


def test_one_iteration_writes_its_data_latents_m_controller_and_record(finished):
    run, _, records = finished
    folder = iteration_folder(run, 1)
    assert len(records) == 1 and records[0] == read_json(folder / RECORD_FILE)
    assert read_json(folder / DONE_FILE)["iteration"] == 1
    record = records[0]

    # data: 4 episodes on the iteration's tracks, with their noise, driven by the run's controller
    files = episode_files(folder / "data")
    assert [f.name for f in files] == [f"episode_{i:06d}.npz" for i in range(4)]
    manifest = read_json(folder / "data" / MANIFEST_FILE)
    assert manifest["seeds"] == [10_000_000 + i for i in range(4)]
    assert [r["sigma"] for r in manifest["per_episode"]] == [0.0, 0.05, 0.1, 0.2]
    controller = "controller/" + BEST_WEIGHTS["controller"]
    assert manifest["controller"] == controller
    assert manifest["controller_sha256"] == record["collect"]["controller_sha256"]
    episode = load_episode(files[3])
    assert episode.seed == 10_000_003 and len(episode) == CFG.data.episode_steps
    assert [r["steps"] for r in manifest["per_episode"]] == [CFG.data.episode_steps] * 4
    assert record["collect"]["by_sigma"]["0.2"]["episodes"] == 1 and record["collect"]["episodes"] == 4

    # latents: the 4 episodes encoded by the run's V
    assert sorted(p.name for p in (folder / "latents").glob("episode_*.npz")) == [f.name for f in files]
    assert record["encode"]["episodes"] == 4

    # M: fine-tuned from the run's M, on the run's latents and the iteration's (3 + 3 train, 1 + 1 test)
    assert record["mdrnn"]["latents"] == [
        {"folder": "latents", "train": 3, "test": 1}, {"folder": "iterations/01/latents", "train": 3, "test": 1},
    ]
    assert record["mdrnn"]["initial"] == "mdrnn/" + BEST_WEIGHTS["mdrnn"]
    assert (folder / "mdrnn" / "metrics.csv").exists() and record["mdrnn"]["epochs"] == CFG.iterate.mdrnn_epochs
    before = load_tensors(run.mdrnn / BEST_WEIGHTS["mdrnn"])
    after = load_tensors(folder / "mdrnn" / BEST_WEIGHTS["mdrnn"])
    assert before.keys() == after.keys() and not all(np.array_equal(before[k], after[k]) for k in before)
    assert set(record["mdrnn"]["best_test"]) >= {"loss"}

    # C: evolved again in the new M's dream, one generation (iterate.controller_generations)
    assert record["controller"]["mode"] == "dream" and record["controller"]["generations"] == 1
    saved = load_controller(folder / "controller" / BEST_WEIGHTS["controller"])
    dream_best = load_controller(folder / "controller" / "dream_tau1.15_best.safetensors")
    np.testing.assert_array_equal(saved.params, dream_best.params)

    # score: the new and the starting controller on CMA-ES's validation tracks, never eval's
    score = record["score"]
    assert score["seeds"] == [1_500_000, 1_500_001] and score["episodes"] == CFG.iterate.score_episodes
    assert len(score["new"]["returns"]) == 2 and score["new"]["mean"] == pytest.approx(np.mean(score["new"]["returns"]))
    assert score["start"]["controller"] == str(controller)
    assert not set(range(CFG.eval.seed, CFG.eval.seed + CFG.eval.episodes)) & set(score_seeds(CFG).tolist())
    assert all(record[s]["seconds"] >= 0 for s in iterate_module.STEPS)
    assert iteration_summary(record).startswith("iteration 1: 4 episodes")


def test_episodes_are_driven_by_the_noisy_controller(finished):
    run, _, _ = finished
    theta = load_controller(run.controller / BEST_WEIGHTS["controller"]).params
    assert read_json(iteration_folder(run, 1) / "data" / MANIFEST_FILE)["controller_sha256"] == file_sha256(
        run.controller / BEST_WEIGHTS["controller"]
    )
    seeds = 10_000_000 + np.arange(4)
    params = noisy_params(theta, seeds, episode_sigmas(CFG))
    np.testing.assert_array_equal(params[0], theta)  # sigma 0: the controller itself
    noise = np.random.default_rng(10_000_003).standard_normal(theta.shape)
    np.testing.assert_allclose(params[3], theta + 0.2 * noise)
    # the first actions of each episode are its own controller's, driven in the same vectors of two
    agent = Agent.from_run(run, CFG)
    first = [t for g in (slice(0, 2), slice(2, 4)) for t in rollout(
        agent, params[g], seeds[g], CFG.env, max_steps=5, trace=True).traces]
    for i, f in enumerate(episode_files(iteration_folder(run, 1) / "data")):
        np.testing.assert_array_equal(load_episode(f).action[:5], first[i].actions)


def test_m_trains_on_the_union_of_the_runs_latents_and_the_iterations(finished):
    run, _, _ = finished
    view = IterationRun(run, 1, CFG)
    folders = latent_folders(run, 1)
    assert folders == [run.latents, iteration_folder(run, 1) / "latents"]
    union, union_test = _sequence_datasets(view.cfg, view, True, folders)
    parts = [_sequence_datasets(view.cfg, view, True, [f]) for f in folders]
    assert len(union) == sum(len(train) for train, _ in parts) > len(parts[0][0])
    assert len(union_test) == sum(len(test) for _, test in parts)
    assert {p.parent for p in union.files} == set(folders)


@pytest.mark.parametrize("step", iterate_module.STEPS)
def test_a_killed_iteration_resumes_without_redoing_finished_steps(finished, monkeypatch, step):
    reference, run, _ = finished
    steps = dict(iterate_module._STEP_FUNCTIONS)

    class Killed(Exception):
        pass

    def killed_after(it):  # the step's work is done, its record not yet written
        steps[step](it)
        raise Killed

    monkeypatch.setitem(iterate_module._STEP_FUNCTIONS, step, killed_after)
    with pytest.raises(Killed):
        iterate(CFG, run, quiet=True)
    folder = iteration_folder(run, 1)
    before = {s: mtimes(folder / s) for s in ("data", "latents", "mdrnn") if (folder / s).exists()}
    done = list(iterate_module.STEPS[: iterate_module.STEPS.index(step)])
    assert [s for s in iterate_module.STEPS if s in read_json(folder / RECORD_FILE)] == done
    for name in iterate_module.STEPS:
        if name in done:  # finished steps are never called again
            redone = lambda it, name=name: pytest.fail(f"{name} redone")  # noqa: E731
            monkeypatch.setitem(iterate_module._STEP_FUNCTIONS, name, redone)
        else:
            monkeypatch.setitem(iterate_module._STEP_FUNCTIONS, name, steps[name])
    if step not in ("collect", "encode"):
        monkeypatch.setattr(iterate_module, "save_episode", lambda *a: pytest.fail("an episode written again"))
    records = iterate(CFG, run, quiet=True)
    for s, times in before.items():
        assert mtimes(folder / s) == times
    assert without_seconds(records[0]) == without_seconds(read_json(iteration_folder(reference, 1) / RECORD_FILE))


def test_a_collection_killed_midway_keeps_its_episodes_and_gives_the_same_ones(finished, monkeypatch):
    reference, run, _ = finished
    written = []
    real_save = iterate_module.save_episode

    def save_then_die(path, ep):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_save(path, ep)
        written.append(Path(path).name)

    monkeypatch.setattr(iterate_module, "save_episode", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        iterate(CFG, run, quiet=True)
    data = iteration_folder(run, 1) / "data"
    kept = mtimes(data)
    assert sorted(kept) == written == [f"episode_{i:06d}.npz" for i in range(3)]
    monkeypatch.setattr(iterate_module, "save_episode", real_save)
    iterate(CFG, run, quiet=True)
    assert {k: v for k, v in mtimes(data).items() if k in kept} == kept
    for name in [f"episode_{i:06d}.npz" for i in range(4)]:
        a, b = load_episode(data / name), load_episode(iteration_folder(reference, 1) / "data" / name)
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.action, b.action)


def test_m_killed_midway_resumes_from_its_checkpoint_and_ends_as_uninterrupted(finished, monkeypatch):
    reference, run, _ = finished
    real_train = iterate_module.train_mdrnn

    def stopped_after_three_steps(*args, **kwargs):
        real_train(*args, **kwargs, max_steps=3)  # a checkpoint at step 3, as a kill after it leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(iterate_module, "train_mdrnn", stopped_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        iterate(CFG, run, quiet=True)
    mdrnn = iteration_folder(run, 1) / "mdrnn"
    assert not (mdrnn / DONE_FILE).exists() and (mdrnn / "last.safetensors").exists()
    monkeypatch.setattr(iterate_module, "train_mdrnn", real_train)
    record = iterate(CFG, run, quiet=True)[0]
    assert without_seconds(record) == without_seconds(read_json(iteration_folder(reference, 1) / RECORD_FILE))
    expected = load_tensors(iteration_folder(reference, 1) / "mdrnn" / BEST_WEIGHTS["mdrnn"])
    resumed = load_tensors(mdrnn / BEST_WEIGHTS["mdrnn"])
    assert all(np.array_equal(expected[k], resumed[k]) for k in expected)


def test_a_finished_run_continues_when_its_iterations_grow_and_refuses_fewer(finished, monkeypatch):
    run, _, records = finished
    monkeypatch.setitem(iterate_module._STEP_FUNCTIONS, "collect", lambda it: pytest.fail("iteration 1 redone"))
    assert iterate(CFG, run, quiet=True) == records  # finished: loads
    more = CFG.replace(**{"iterate.iterations": 2})
    monkeypatch.undo()
    two = iterate(more, run, quiet=True)
    assert [r["iteration"] for r in two] == [1, 2] and two[0] == records[0]
    second = read_json(iteration_folder(run, 2) / "data" / MANIFEST_FILE)
    assert second["seeds"] == [10_100_000 + i for i in range(4)]
    assert second["controller"] == "iterations/01/controller/" + BEST_WEIGHTS["controller"]
    assert two[1]["mdrnn"]["initial"] == "iterations/01/mdrnn/" + BEST_WEIGHTS["mdrnn"]
    folders = [f["folder"] for f in two[1]["mdrnn"]["latents"]]
    assert folders == ["latents", "iterations/01/latents", "iterations/02/latents"]
    with pytest.raises(ConfigError, match=r"iterate.iterations = 1 is below the 2 iterations that .*already"):
        iterate(CFG, run, quiet=True)


def test_the_controller_may_be_evolved_again_in_carracing(fake_run, dataset):
    cfg = CFG.replace(**{"iterate.controller": "real"})
    run = fake_run(cfg, controller=True)
    shutil.copytree(dataset, run.data)
    record = iterate(cfg, run, quiet=True)[0]
    controller = iteration_folder(run, 1) / "controller"
    assert record["controller"]["mode"] == "real" and record["controller"]["generations"] == 1
    assert read_json(controller / DONE_FILE)["generations"] == 1  # train-controller's files, one generation
    started = read_json(controller / DONE_FILE)["start"]["x0"]  # CMA-ES began at the controller it improves on
    assert started == str(run.controller / BEST_WEIGHTS["controller"])
    assert not list(controller.glob("dream_*"))
    new = load_controller(controller / BEST_WEIGHTS["controller"]).params
    assert not np.array_equal(new, load_controller(run.controller / BEST_WEIGHTS["controller"]).params)
    assert (run.latents / DONE_FILE).exists()  # the run's own episodes were encoded for M on the way


def test_a_missing_or_misshapen_starting_controller_names_the_file(base_run, tmp_path):
    best = base_run.controller / BEST_WEIGHTS["controller"]
    z_shape = ControllerShape.from_config(CFG.replace(**{"controller.kind": "z"}))
    save_controller(best, np.zeros(z_shape.n_params), z_shape)
    with pytest.raises(RunDirError, match=rf"{best} holds a controller .*'z'.* but the run's config needs .*'zh'"):
        iterate(CFG, base_run, quiet=True)
    best.unlink()
    with pytest.raises(RunDirError, match=rf"{best}: no trained controller .*python -m worldmodels train-controller"):
        iterate(CFG, base_run, quiet=True)
    assert not iteration_folder(base_run, 1).exists()  # nothing started


def test_a_run_without_its_episodes_fails_before_collecting(base_run):
    shutil.rmtree(base_run.latents)
    shutil.rmtree(base_run.data)
    with pytest.raises(FileNotFoundError, match=rf"{base_run.data} has 0 of 4 episodes .*worldmodels collect"):
        iterate(CFG, base_run, quiet=True)
    assert not iteration_folder(base_run, 1).exists()


# --- the command ------------------------------------------------------------------------------

CLI_TINY = ["--scale", "tiny", "--data.workers", "1", "--data.envs-per-worker", "2", "--cma.workers", "1", "--quiet"]


def test_iterate_help_lists_the_fields_with_their_meaning(capsys):
    with pytest.raises(SystemExit):
        main(["iterate", "--scale", "book", "--help"])
    out = capsys.readouterr().out
    for flag in ("iterations", "episodes", "noise", "seed", "mdrnn-epochs", "controller", "controller-generations",
                 "score-episodes"):
        assert f"--iterate.{flag}" in out
    assert "Parameter noise" in out and "(default: 200)" in out


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--iterate.noise", "0", "-0.5"], "--iterate.noise = (0.0, -0.5): -0.5 is out of range: allowed [0, inf)"),
        (["--iterate.controller", "both"],
         "--iterate.controller = 'both' is not allowed: choose one of 'dream', 'real'"),
        (["--iterate.seed", "0"], "--iterate.seed: the iterations' tracks [0, 4) overlap the tracks of --data.seed "
                                  "[0, 4); move --iterate.seed or --data.seed"),
    ],
)
def test_a_bad_iterate_value_is_one_line_naming_its_flag(flags, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["iterate", "--scale", "tiny", "--run-dir", "never-made", *flags])
    assert exit_.value.code == f"error: {expected}"


def test_iterate_command_prints_each_iteration_and_refuses_fewer(finished, capsys):
    run, _, records = finished
    main(["iterate", "--run-dir", str(run.path), *CLI_TINY])
    assert capsys.readouterr().out == iteration_summary(records[0]) + "\n"
    with pytest.raises(SystemExit) as exit_:
        main(["iterate", "--run-dir", str(run.path), *CLI_TINY, "--iterate.iterations", "0"])
    assert exit_.value.code == (
        f"error: iterate.iterations = 0 is below the 1 iterations that {run.path / 'iterations'} already holds: "
        "allowed [1, 99]"
    )


def test_an_iteration_trains_m_with_its_own_reward_weighting_and_epochs():
    from worldmodels.iterate import iteration_config

    cfg = preset("tiny", **{"iterate.reward_overprediction": 5.0, "iterate.mdrnn_epochs": 3, "iterate.iterations": 1})
    it = iteration_config(cfg, 1)
    assert it.mdrnn.reward_overprediction == 5.0 and it.mdrnn.epochs == 3 and it.iterate.iterations == 0
    assert iteration_config(preset("tiny"), 1).mdrnn.reward_overprediction == 1.0  # 0: the run's own
    with pytest.raises(ConfigError, match="reward_overprediction"):
        preset("tiny", **{"mdrnn.reward_overprediction": 0.5})


def test_evaluate_dream_drives_the_last_iterations_dream_controller_with_its_m(finished, capsys):
    run, base, _ = finished
    view, path = dream_controller(CFG, run)
    assert path == iteration_folder(run, 1) / "controller" / f"{dream_prefix(CFG.dream.temperature)}best.safetensors"
    assert view.mdrnn == iteration_folder(run, 1) / "mdrnn" and view.vae == run.vae
    with pytest.raises(RunDirError, match=r"dream_tau0.5_best.safetensors: no dream-trained controller at tau 0.5"):
        dream_controller(CFG, run, tau=0.5)
    main(["evaluate", "--scale", "tiny", "--run-dir", str(run.path), "--controller", "dream", "--episodes", "2",
          "--workers", "1", "--json"])
    printed = json.loads(capsys.readouterr().out)
    written = read_json(iteration_folder(run, 1) / "eval" / DREAM_RESULTS_FILE)
    assert printed["returns"] == written["returns"] and written["controller"] == str(path)
    agent = Agent.from_run(view, view.cfg)  # the same episodes, driven here with the iteration's M
    expected = rollout(agent, load_controller(path).params[None].repeat(2, 0), printed["seeds"], CFG.env,
                       max_steps=CFG.eval.max_steps, float64=True).returns
    assert printed["returns"] == pytest.approx(expected.tolist(), abs=1e-9)
    missing = base.controller / f"{dream_prefix(CFG.dream.temperature)}best.safetensors"
    with pytest.raises(RunDirError, match=rf"{missing}: no dream-trained controller"):
        dream_controller(CFG, base)  # no iteration: the run's own dream, which it has not trained


def test_an_exported_run_ships_its_iterations_and_their_dream_controller_drives_the_same(finished, tmp_path):
    from worldmodels import pretrained
    from worldmodels.evaluation import evaluate_run

    run, _, _ = finished
    folder = pretrained.export(run, "tiny", root=tmp_path / "shipped", half=False)
    manifest = json.loads((folder / pretrained.MANIFEST).read_text())["sha256"]
    shipped_files = {
        "record.json", "done.json", "data/manifest.json", "mdrnn/mdrnn.safetensors", "controller/best.safetensors",
        f"controller/{dream_prefix(CFG.dream.temperature)}best.safetensors", "controller/dream_starts.npz",
    }
    assert {f"iterations/01/{f}" for f in shipped_files} <= set(manifest)
    assert not any("/latents/" in rel or rel.endswith((".pkl", ".pt")) for rel in manifest)
    copy = pretrained.install("tiny", tmp_path / "copy", root=tmp_path / "shipped")
    assert not (copy.path / "iterations" / "01" / "latents").exists()  # the dreams' starts come from the shipped file
    returns, starts = {}, {}
    for where in (run, copy):
        view, path = dream_controller(CFG, where)
        returns[where] = evaluate_run(view, view.cfg, episodes=2, workers=1, controller=path)["returns"]
        starts[where] = initial_latents(view)[0]
    assert returns[run] == returns[copy]
    np.testing.assert_array_equal(starts[run], starts[copy])


def test_the_dream_controller_is_the_iteration_best_on_validation_tracks(finished, tmp_path):
    run, _, _ = finished
    second = iteration_folder(run, 2)
    shutil.copytree(iteration_folder(run, 1), second)  # a second finished iteration, scored apart
    for index, mean in ((1, 50.0), (2, 20.0)):
        record = read_json(iteration_folder(run, index) / RECORD_FILE)
        record["score"]["new"]["mean"] = mean
        (iteration_folder(run, index) / RECORD_FILE).write_text(json.dumps(record))
    assert dream_controller(CFG, run)[0].index == 1  # the better validation score, not the last
    record = read_json(second / RECORD_FILE)
    record["score"]["new"]["mean"] = 50.0
    (second / RECORD_FILE).write_text(json.dumps(record))
    assert dream_controller(CFG, run)[0].index == 2  # equal scores: the later iteration


def test_dream_table_and_correlation_of_an_iteration_work_on_its_m_and_dreams(finished, capsys):
    """`dream --iteration N`: the table and the correlation of that iteration's dream run, recorded in
    its own dream.json; the run's own dream is left alone; a missing iteration names the count."""
    run, _, _ = finished
    folder = iteration_folder(run, 1) / "controller"
    main(["dream", "--run-dir", str(run.path), *CLI_TINY, "--iteration", "1", "--taus", str(CFG.dream.temperature),
          "--real-episodes", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| tau | generations | dream return | real return (1 validation tracks) |"
    assert read_json(folder / "dream.json")[f"{CFG.dream.temperature:g}"]["validation"]["episodes"] == 1
    main(["dream", "--run-dir", str(run.path), *CLI_TINY, "--iteration", "1", "--correlation", "2",
          "--real-episodes", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["candidates"] == 2 and len(out["real"]) == 2
    assert read_json(folder / "dream.json")[f"{CFG.dream.temperature:g}"]["correlation"]["candidates"] == 2
    assert not (run.controller / "dream.json").exists()
    for flags, expected in (
        (["--iteration", "2", "--correlation", "2"], f"error: --iteration 2: {run.path} holds 1 finished iterations"),
        (["--iteration", "1"], "error: --iteration: only with --taus or --correlation"),
        (["--iteration", "-1", "--taus", "1.0"], "error: --iteration -1: an iteration is numbered from 1"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["dream", "--run-dir", str(run.path), *CLI_TINY, *flags])
        assert str(exit_.value.code).startswith(expected)
