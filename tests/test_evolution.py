"""CMA-ES core: convergence, seeds, checkpoints and exact resume; the controller end to end."""

from __future__ import annotations

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
        train_controller(longer.replace(**{"cma.population": 6}), run, quiet=True)


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
