"""CMA-ES core: convergence, seeds, checkpoints and exact resume; the controller end to end."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from worldmodels.config import CMAConfig, ConfigError, preset
from worldmodels.evolution import (
    SPHERE_SHIFT,
    evolve,
    load_checkpoint,
    read_history,
    resized_es,
    sphere_task,
    training_seeds,
    validation_seeds,
)
from worldmodels.parallel import InlineExecutor, make_executor
from worldmodels.tasks import Task, make_tasks

ROOT = Path(__file__).resolve().parents[1]


def sphere_cfg(**kw) -> CMAConfig:
    base = dict(
        population=8, episodes_per_candidate=1, sigma0=0.3, generations=4, eval_every=2, eval_episodes=1,
        envs_per_worker=4, weight_decay=0.0, task_timeout=60.0,
    )
    return CMAConfig(**{**base, **kw})


def _fail_task(state, task):
    raise AssertionError("a finished run must not evaluate anything")


def test_sphere_converges_through_local_executor():
    cfg = sphere_cfg(generations=60, eval_every=20)
    with make_executor(2, init=np.asarray, init_args=(SPHERE_SHIFT,)) as ex:
        result = evolve(sphere_task, 5, cfg, ex, quiet=True)
    np.testing.assert_allclose(result.best_params, SPHERE_SHIFT, atol=0.01)
    assert result.best_score > -1e-3
    assert result.history[0]["fitness_mean"] < result.history[-1]["fitness_mean"] - 0.1
    assert result.finished and result.generation == 60


def test_tasks_share_tracks_and_name_their_work():
    cfg = sphere_cfg(episodes_per_candidate=3, population=4)
    params = np.arange(4 * 2, dtype=float).reshape(4, 2)
    tasks = make_tasks("train", params, training_seeds(cfg, 5), 5, 100, early_stop_steps=10, generation=5)
    assert [len(t) for t in tasks] == [4, 4, 4]  # 12 episodes in tasks of at most 5
    cands = np.concatenate([t.candidates for t in tasks])
    seeds = np.concatenate([t.seeds for t in tasks])
    for k in range(4):  # common random numbers: every candidate on the generation's same tracks
        np.testing.assert_array_equal(seeds[cands == k], cfg.seed + 15 + np.arange(3))
        np.testing.assert_array_equal(np.concatenate([t.params for t in tasks])[cands == k], params[[k] * 3])
    assert not set(training_seeds(cfg, 6)) & set(training_seeds(cfg, 5))
    assert set(validation_seeds(cfg)).isdisjoint(range(cfg.seed, cfg.seed + cfg.generations * 3))
    assert repr(tasks[0]) == (
        "Task(train, generation=5, candidates=[0-1], seeds=[1000015-1000017], episodes=4, max_steps=100)"
    )
    with pytest.raises(ConfigError, match="validation seeds"):
        evolve(sphere_task, 5, sphere_cfg(generations=400_000, episodes_per_candidate=2), InlineExecutor(), quiet=True)
    collection = make_tasks("collect", None, np.arange(10, 17), 3, 50)  # the random policy: no params
    assert [list(t.seeds) for t in collection] == [[10, 11, 12], [13, 14], [15, 16]]
    assert repr(collection[1]) == "Task(collect, seeds=[13-14], episodes=2, max_steps=50)"
    with pytest.raises(ValueError, match="3 seeds got 2 rows"):
        Task("evaluate", np.arange(3), params[:2])
    with pytest.raises(ValueError, match="task kind"):
        Task("dream", np.arange(3))


def test_weight_decay_enters_the_fitness():
    ex = InlineExecutor(init=lambda: np.zeros(5))
    plain = evolve(sphere_task, 5, sphere_cfg(generations=1), ex, quiet=True)
    decayed = evolve(sphere_task, 5, sphere_cfg(generations=1, weight_decay=10.0), ex, quiet=True)
    # Same candidates (same seed); the penalty 10 * mean(theta^2) = 2 |theta|^2 lowers every fitness.
    assert decayed.history[0]["fitness_mean"] == pytest.approx(3 * plain.history[0]["fitness_mean"])


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    cfg = sphere_cfg(generations=4)
    ex = InlineExecutor()
    full = evolve(sphere_task, 5, cfg, ex, quiet=True)

    first = evolve(sphere_task, 5, cfg, ex, quiet=True, checkpoint_dir=tmp_path, max_generations=2)
    assert first.generation == 2 and not first.finished
    assert not (tmp_path / "done.json").exists()
    assert load_checkpoint(tmp_path / "es.pkl").generation == 2
    resumed = evolve(sphere_task, 5, cfg, ex, quiet=True, checkpoint_dir=tmp_path)

    assert resumed.generation == 4 and resumed.finished
    assert resumed.es.sigma == full.es.sigma
    np.testing.assert_array_equal(resumed.es.sm.C, full.es.sm.C)
    np.testing.assert_array_equal(resumed.mean, full.mean)
    np.testing.assert_array_equal(resumed.best_params, full.best_params)
    assert resumed.es.countiter == full.es.countiter == 4
    # A resumed run that had reset sigma would differ: the test can fail.
    assert full.es.sigma != cfg.sigma0

    hist = read_history(tmp_path / "history.csv")
    assert [int(r["generation"]) for r in hist] == [0, 1, 2, 3]
    assert [r["val_mean"] is not None for r in hist] == [False, True, False, True]
    assert hist[-1]["sigma"] == pytest.approx(full.es.sigma)
    assert (tmp_path / "done.json").exists() and (tmp_path / "best.safetensors").exists()

    again = evolve(_fail_task, 5, cfg, ex, quiet=True, checkpoint_dir=tmp_path)  # finished: load only
    np.testing.assert_array_equal(again.best_params, full.best_params)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from worldmodels.config import CMAConfig
    from worldmodels.evolution import evolve, sphere_task
    from worldmodels.parallel import make_executor

    def slow_sphere(shift, task):
        time.sleep(0.15)
        return sphere_task(shift, task)

    cfg = CMAConfig(**eval(sys.argv[2]))
    with make_executor(1) as ex:
        evolve(slow_sphere, 5, cfg, ex, checkpoint_dir=sys.argv[1], quiet=True)
    """
)


def test_resume_after_kill_mid_generation(tmp_path):
    cfg = sphere_cfg(generations=8)
    fields = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), repr(fields)],
        cwd=ROOT, start_new_session=True, stderr=subprocess.PIPE,
    )
    ckpt = tmp_path / "es.pkl"
    try:
        deadline = time.monotonic() + 60
        while not ckpt.exists() or load_checkpoint(ckpt).generation < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the subprocess made no progress"
            time.sleep(0.05)
        time.sleep(0.2)  # into the next generation (2 tasks of 0.15 s each)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its worker, mid-generation
        proc.wait()
    done_at_kill = load_checkpoint(ckpt).generation
    assert 2 <= done_at_kill < 8

    resumed = evolve(sphere_task, 5, cfg, InlineExecutor(), checkpoint_dir=tmp_path, quiet=True)
    full = evolve(sphere_task, 5, cfg, InlineExecutor(), quiet=True)
    assert resumed.generation == 8
    assert [r["generation"] for r in resumed.history] == list(range(8))
    assert resumed.es.sigma == full.es.sigma
    np.testing.assert_array_equal(resumed.es.sm.C, full.es.sm.C)
    np.testing.assert_array_equal(resumed.mean, full.mean)


# ----------------------------------------------------------------------------- real environment
def _tiny_run(fake_run, path: Path):
    cfg = preset(
        "tiny",
        **{
            "cma.population": 4, "cma.generations": 2, "cma.max_steps": 20, "cma.eval_episodes": 2,
            "cma.workers": 2, "cma.envs_per_worker": 2, "cma.early_stop_steps": 10,
        },
    )
    return cfg, fake_run(cfg, path)


def test_train_controller_tiny_end_to_end(tmp_path, fake_run):
    from worldmodels.controller import load_controller, n_params
    from worldmodels.rollout import train_controller

    cfg, run = _tiny_run(fake_run, tmp_path / "run")
    first = train_controller(cfg, run, quiet=True, max_generations=1)
    assert first.shape == (n_params("zh", cfg.vae.z_size, cfg.mdrnn.hidden_size),)
    assert not (run.controller / "done.json").exists()
    best = train_controller(cfg, run, quiet=True)
    assert (run.controller / "done.json").exists()
    hist = read_history(run.controller / "history.csv")
    assert [int(r["generation"]) for r in hist] == [0, 1]
    assert all(r["val_mean"] is not None and np.isfinite(r["fitness_mean"]) for r in hist)
    saved = load_controller(run.controller / "best.safetensors")
    np.testing.assert_array_equal(saved.params, best)
    assert saved.metadata["kind"] == "zh" and "val_mean" in saved.metadata
    assert load_controller(run.controller / "last.safetensors").params.shape == best.shape
    # Finished: loads and returns without evaluating (an executor that fails would show it).
    np.testing.assert_array_equal(train_controller(cfg, run, quiet=True, executor=InlineExecutor(init=_boom)), best)


def _boom():
    raise AssertionError("a finished run must not build workers")


def test_a_finished_run_continues_when_generations_grow(tmp_path, fake_run):
    from worldmodels.evolution import is_finished
    from worldmodels.rollout import train_controller
    from worldmodels.runs import RunDirError

    cfg, run = _tiny_run(fake_run, tmp_path / "run")
    train_controller(cfg, run, quiet=True)
    assert is_finished(run.controller, cfg.cma)
    longer = cfg.replace(**{"cma.generations": 3})
    assert not is_finished(run.controller, longer.cma)
    train_controller(longer, run, quiet=True)
    hist = read_history(run.controller / "history.csv")
    assert [int(r["generation"]) for r in hist] == [0, 1, 2]
    assert run.load_config().cma.generations == 3  # the run records what it now is
    assert is_finished(run.controller, longer.cma)
    # The same 3 generations in one go give the same search state (sigma, mean).
    _, fresh = _tiny_run(fake_run, tmp_path / "fresh")
    train_controller(longer, fresh, quiet=True)
    a = load_checkpoint(run.controller / "es.pkl")
    b = load_checkpoint(fresh.controller / "es.pkl")
    assert a.es.sigma == b.es.sigma
    np.testing.assert_array_equal(a.mean, b.mean)
    # Fewer generations than recorded, or any other change, is refused.
    with pytest.raises(RunDirError, match="cma.generations"):
        train_controller(cfg, run, quiet=True)
    with pytest.raises(RunDirError, match="cma.population"):
        train_controller(longer.replace(**{"cma.population": 2}), run, quiet=True)
    # A larger population and more episodes per candidate continue it too, and are recorded.
    larger = longer.replace(**{"cma.population": 6, "cma.episodes_per_candidate": 2, "cma.generations": 4})
    train_controller(larger, run, quiet=True)
    hist = read_history(run.controller / "history.csv")
    assert [(r["population"], r["episodes_per_candidate"]) for r in hist] == [(4, 1)] * 3 + [(6, 2)]
    recorded = run.load_config().cma
    assert (recorded.population, recorded.episodes_per_candidate, recorded.generations) == (6, 2, 4)


def _track_task(state, task):
    """A sphere whose value also depends on the track: seed-dependent offsets, so scores differ by track."""
    bumps = np.sin(task.seeds.astype(float))  # in [-1, 1], fixed per track
    return -np.sum((task.params - SPHERE_SHIFT) ** 2, axis=1) + bumps * (1 + task.params[:, 0])


def test_final_selection_rescores_the_best_validated_means(tmp_path):
    from worldmodels.evolution import is_finished, selection_seeds

    cfg = sphere_cfg(generations=6, eval_every=1, eval_episodes=2, select_top=3, select_episodes=5)
    assert set(selection_seeds(cfg)).isdisjoint(validation_seeds(cfg))
    ex = InlineExecutor(init=lambda: None)
    result = evolve(_track_task, 5, cfg, ex, checkpoint_dir=tmp_path, quiet=True)
    state = load_checkpoint(tmp_path / "es.pkl")
    assert [v["generation"] for v in state.validated] == list(range(6))
    sel = state.selection
    assert sel["generation"] == 6 and len(sel["candidates"]) == 3
    by_val = sorted(state.validated, key=lambda v: v["val_mean"], reverse=True)[:3]
    assert [c["generation"] for c in sel["candidates"]] == [v["generation"] for v in by_val]
    for c, v in zip(sel["candidates"], by_val):  # recompute each candidate's scores by hand
        r = _track_task(None, make_tasks("select", v["params"][None], selection_seeds(cfg), 99, 1, generation=6)[0])
        assert c["select_mean"] == pytest.approx(r.mean())
        assert c["combined_mean"] == pytest.approx((2 * v["val_mean"] + r.sum()) / 7)
    best = max(sel["candidates"], key=lambda c: c["combined_mean"])
    assert result.best_score == pytest.approx(best["combined_mean"]) and sel["chosen_generation"] == best["generation"]
    np.testing.assert_array_equal(result.best_params, next(v["params"] for v in by_val if v["generation"] == best["generation"]))
    assert is_finished(tmp_path, cfg) and (tmp_path / "selection.json").exists()
    # Finished and selected: called again, nothing is evaluated.
    again = evolve(_fail_task, 5, cfg, ex, checkpoint_dir=tmp_path, quiet=True)
    np.testing.assert_array_equal(again.best_params, result.best_params)
    # A run finished without a selection (done.json but no selection.json) is not finished under select_top.
    (tmp_path / "selection.json").unlink()
    assert not is_finished(tmp_path, cfg) and is_finished(tmp_path, sphere_cfg(generations=6, eval_every=1))


# ----------------------------------------------------------------------------- x0, population, episodes
SEEN: list[tuple[int, np.ndarray, np.ndarray]] = []
"""(generation, candidates, seeds) of every training task that _recording_sphere ran in this process."""


def _recording_sphere(state, task):
    if task.kind == "train":
        SEEN.append((task.generation, task.candidates.copy(), task.seeds.copy()))
    return sphere_task(state, task)


def _save_x0(path: Path, params) -> None:
    from worldmodels.runs import save_tensors
    import torch

    save_tensors(path, {"params": torch.tensor(params, dtype=torch.float64)})


def test_x0_starts_the_mean_and_is_read_only_at_the_start(tmp_path):
    x0 = tmp_path / "x0.safetensors"
    _save_x0(x0, [0.5, -0.3, 0.2, 0.4, 0.0])
    cfg = sphere_cfg(generations=3)
    first = evolve(sphere_task, 5, cfg, InlineExecutor(), checkpoint_dir=tmp_path / "a", x0=x0, max_generations=0,
                   quiet=True)
    np.testing.assert_array_equal(first.mean, [0.5, -0.3, 0.2, 0.4, 0.0])  # no generation yet: the mean is x0
    full = evolve(sphere_task, 5, cfg, InlineExecutor(), checkpoint_dir=tmp_path / "b", x0=x0, quiet=True)
    zeros = evolve(sphere_task, 5, cfg, InlineExecutor(), quiet=True)
    assert full.history[0]["fitness_mean"] > zeros.history[0]["fitness_mean"] + 0.3  # nearer the optimum
    done = json.loads((tmp_path / "b" / "done.json").read_text())
    assert done["start"] == {"x0": str(x0), "sha256": hashlib.sha256(x0.read_bytes()).hexdigest()}
    assert load_checkpoint(tmp_path / "b" / "es.pkl").start == done["start"]
    # Interrupted after one generation, then x0 changes and vanishes: the checkpoint is the truth.
    evolve(sphere_task, 5, cfg, InlineExecutor(), checkpoint_dir=tmp_path / "c", x0=x0, max_generations=1, quiet=True)
    x0.unlink()
    resumed = evolve(sphere_task, 5, cfg, InlineExecutor(), checkpoint_dir=tmp_path / "c", x0=x0, quiet=True)
    np.testing.assert_array_equal(resumed.mean, full.mean)
    assert json.loads((tmp_path / "c" / "done.json").read_text())["start"] == done["start"]


def test_x0_errors_name_the_file_and_the_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cma.x0: .*missing.safetensors: no such file"):
        evolve(sphere_task, 5, sphere_cfg(), InlineExecutor(), x0=tmp_path / "missing.safetensors", quiet=True)
    _save_x0(tmp_path / "short.safetensors", [1.0, 2.0])
    with pytest.raises(ConfigError, match=r"cma.x0: .*short.safetensors holds 2 parameters, but this run evolves 5"):
        evolve(sphere_task, 5, sphere_cfg(), InlineExecutor(), x0=tmp_path / "short.safetensors", quiet=True)
    evolve(sphere_task, 5, sphere_cfg(generations=1), InlineExecutor(), checkpoint_dir=tmp_path / "z", quiet=True)
    assert json.loads((tmp_path / "z" / "done.json").read_text())["start"] == {"x0": "zeros"}


def test_a_larger_population_continues_from_the_same_distribution(tmp_path):
    small, large = sphere_cfg(population=4, generations=3), sphere_cfg(population=8, generations=5)
    ex = InlineExecutor()
    evolve(sphere_task, 5, small, ex, checkpoint_dir=tmp_path / "a", quiet=True)
    old = load_checkpoint(tmp_path / "a" / "es.pkl").es
    new = resized_es(old, 8)
    assert new.popsize == 8 and len(new.ask()) == 8
    np.testing.assert_array_equal(new.mean, old.mean)  # the mean at the switch is the old mean
    assert new.sigma == old.sigma
    assert old.popsize == 4
    old.sm.update_now(-1)  # the covariance the old strategy samples from (made symmetric)
    np.testing.assert_array_equal(new.sm.C, old.sm.C)
    np.testing.assert_array_equal(new.sm.B, old.sm.B)
    np.testing.assert_array_equal(new.sm.D, old.sm.D)

    SEEN.clear()
    continued = evolve(_recording_sphere, 5, large, ex, checkpoint_dir=tmp_path / "a", quiet=True)
    candidates = {g: sorted(np.concatenate([c for h, c, _ in SEEN if h == g])) for g, _, _ in SEEN}
    assert candidates == {3: list(range(8)), 4: list(range(8))}  # 8 candidates a generation, one episode each
    hist = read_history(tmp_path / "a" / "history.csv")
    assert [r["population"] for r in hist] == [4, 4, 4, 8, 8]
    assert continued.es.popsize == 8 and continued.generation == 5
    # Switched, stopped after one generation and resumed: the same run as switched and run on.
    evolve(sphere_task, 5, small, ex, checkpoint_dir=tmp_path / "b", quiet=True)
    evolve(sphere_task, 5, large, ex, checkpoint_dir=tmp_path / "b", max_generations=4, quiet=True)
    resumed = evolve(sphere_task, 5, large, ex, checkpoint_dir=tmp_path / "b", quiet=True)
    np.testing.assert_array_equal(resumed.mean, continued.mean)
    assert resumed.es.sigma == continued.es.sigma


def test_more_episodes_per_candidate_take_fresh_tracks(tmp_path):
    ex = InlineExecutor()
    SEEN.clear()
    evolve(_recording_sphere, 5, sphere_cfg(generations=2), ex, checkpoint_dir=tmp_path, quiet=True)
    more = sphere_cfg(generations=4, episodes_per_candidate=3)
    evolve(_recording_sphere, 5, more, ex, checkpoint_dir=tmp_path, quiet=True)
    seeds = {g: sorted(set(np.concatenate([s for h, _, s in SEEN if h == g]))) for g, _, _ in SEEN}
    base = more.seed
    assert seeds == {0: [base], 1: [base + 1], 2: [base + 6, base + 7, base + 8], 3: [base + 9, base + 10, base + 11]}
    hist = read_history(tmp_path / "history.csv")
    assert [r["episodes_per_candidate"] for r in hist] == [1, 1, 3, 3]


def test_history_records_cumulative_seconds_and_old_histories_load(tmp_path):
    evolve(sphere_task, 5, sphere_cfg(generations=3), InlineExecutor(), checkpoint_dir=tmp_path, quiet=True)
    hist = read_history(tmp_path / "history.csv")
    running = np.cumsum([r["seconds"] for r in hist])
    assert [r["cumulative_seconds"] for r in hist] == pytest.approx(running, abs=2e-3)
    old = tmp_path / "old.csv"
    old.write_text("generation,fitness_mean,val_mean,seconds\n0,1.0,,2.5\n1,2.0,7.0,1.25\n")
    rows = read_history(old)
    assert [r["cumulative_seconds"] for r in rows] == [2.5, 3.75]
    assert rows[1]["val_mean"] == 7.0 and rows[0]["population"] is None


def test_train_controller_refuses_an_x0_of_another_shape(tmp_path, fake_run):
    from worldmodels.controller import ControllerShape, save_controller
    from worldmodels.rollout import train_controller

    cfg, run = _tiny_run(fake_run, tmp_path / "run")
    other = ControllerShape("z", cfg.vae.z_size)
    x0 = tmp_path / "z.safetensors"
    save_controller(x0, np.zeros(other.n_params), other)
    message = r"cma.x0: .*z.safetensors holds a controller .*kind='z'.*this run's controller is .*kind='zh'"
    with pytest.raises(ConfigError, match=message):
        train_controller(cfg.replace(**{"cma.x0": str(x0)}), run, quiet=True, executor=InlineExecutor(init=_boom))


def _select_only(state, task):
    if task.kind == "train":
        raise AssertionError("a larger final selection alone must not train")
    return _track_task(state, task)


def test_a_larger_final_selection_selects_again_without_training(tmp_path):
    from worldmodels.evolution import is_finished

    cfg = sphere_cfg(generations=6, eval_every=1, eval_episodes=2, select_top=2, select_episodes=3)
    ex = InlineExecutor(init=lambda: None)
    evolve(_track_task, 5, cfg, ex, checkpoint_dir=tmp_path, quiet=True)
    larger = sphere_cfg(generations=6, eval_every=1, eval_episodes=2, select_top=4, select_episodes=5)
    assert is_finished(tmp_path, cfg) and not is_finished(tmp_path, larger)
    result = evolve(_select_only, 5, larger, ex, checkpoint_dir=tmp_path, quiet=True)
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["select_top"] == 4 and len(selection["candidates"]) == 4 and selection["selection_episodes"] == 5
    assert result.best_score == max(c["combined_mean"] for c in selection["candidates"])
    assert is_finished(tmp_path, larger)
    assert len(read_history(tmp_path / "history.csv")) == 6
