"""The dream: M as a batched environment, and CMA-ES inside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodels.config import ConfigError, DreamConfig, preset
from worldmodels.controller import Controller, ControllerShape
from worldmodels.dream import (
    DreamEnv,
    DreamWorker,
    dream_rollout,
    dream_task,
    initial_latents,
    initial_z_for_seeds,
    train_controller_in_dream,
)
from worldmodels.tasks import Task
from worldmodels.mdrnn import MDRNN
from worldmodels.runs import RunDir, save_npz, save_tensors

Z, H = 8, 16


def _mdrnn(done_head: bool = True, seed: int = 0) -> MDRNN:
    torch.manual_seed(seed)
    return MDRNN(Z, 3, H, 3, reward_head=True, done_head=done_head)


def _dream(env: DreamEnv, seed: int, steps: int = 5):
    gen = torch.Generator().manual_seed(seed)
    z, h = env.reset(torch.zeros(4, Z), gen)
    zs = []
    for t in range(steps):
        actions = torch.full((4, 3), 0.5)
        z, reward, done, h = env.step(actions)
        zs.append((z.clone(), reward.clone(), done.clone(), h.clone()))
    return zs


def test_step_shapes_and_determinism():
    env = DreamEnv(_mdrnn(), temperature=1.15, max_steps=100)
    gen = torch.Generator().manual_seed(0)
    z, h = env.reset(torch.randn(4, Z), gen)
    assert z.shape == (4, Z) and h.shape == (4, H) and not h.any()
    z, reward, done, h = env.step(torch.zeros(4, 3))
    assert z.shape == (4, Z) and reward.shape == (4,) and done.shape == (4,) and done.dtype == torch.bool
    assert h.shape == (4, H) and h.abs().sum() > 0

    a, b, c = _dream(env, 1), _dream(env, 1), _dream(env, 2)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert not torch.equal(a[-1][0], c[-1][0])  # another seed, another dream


def test_temperature_validation_and_effect():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            DreamEnv(_mdrnn(), temperature=bad)
    with pytest.raises(ConfigError, match="dream.temperature"):
        DreamConfig(temperature=0.0)
    with pytest.raises(ValueError, match="reward head"):
        DreamEnv(MDRNN(Z, 3, H, 3))
    # Near tau = 0 a sample is the mean of the most likely component; at tau = 1 it is not.
    m = _mdrnn()
    z0 = torch.randn(4, Z)
    out, _ = m.step(z0, torch.zeros(4, 3))
    mode = out.mu.gather(-1, out.logpi.argmax(-1, keepdim=True)).squeeze(-1)
    cold = DreamEnv(m, temperature=1e-4)
    cold.reset(z0, torch.Generator().manual_seed(0))
    z_cold, *_ = cold.step(torch.zeros(4, 3))
    hot = DreamEnv(m, temperature=1.0)
    hot.reset(z0, torch.Generator().manual_seed(0))
    z_hot, *_ = hot.step(torch.zeros(4, 3))
    assert torch.allclose(z_cold, mode, atol=0.05)
    assert (z_hot - mode).abs().max() > 0.1


def test_dreams_end_and_stop_paying():
    env = DreamEnv(_mdrnn(done_head=False), temperature=1.0, max_steps=7)
    ctrl = Controller("zh", Z, H).set_flat(np.zeros((4, ControllerShape("zh", Z, H).n_params)))
    returns, steps = dream_rollout(env, ctrl, torch.zeros(4, Z), torch.Generator().manual_seed(0))
    assert returns.shape == (4,) and (steps == 7).all()  # no done head: max_steps ends them

    m = _mdrnn()
    with torch.no_grad():  # a done head that always fires: every dream ends after one step
        m.done_head.bias.fill_(50.0)
        m.reward_head.bias.fill_(3.0)
        m.reward_head.weight.zero_()
    returns, steps = dream_rollout(DreamEnv(m, 1.0, 100), ctrl, torch.zeros(4, Z))
    assert (steps == 1).all()
    np.testing.assert_allclose(returns, 3.0)


def test_initial_latents_and_dream_task(tmp_path):
    run = RunDir(tmp_path)
    rng = np.random.default_rng(0)
    for i, length in enumerate((61, 30)):
        mu = np.repeat(np.arange(length, dtype=np.float16)[:, None], Z, 1) + 1000 * i
        save_npz(run.latents / f"ep{i:05d}.npz", mu=mu, logvar=np.full((length, Z), -20, np.float16))
    mu, logvar = initial_latents(run)
    assert mu.shape == (2, Z)
    assert mu[0, 0] == 50 and mu[1, 0] == 1029  # frame 50, or the last of a short episode
    z = initial_z_for_seeds(mu, logvar, np.array([3, 3, 4]))
    assert torch.equal(z[0], z[1])  # same seed, same start
    assert set(np.round(z[:, 0].numpy())) <= {50.0, 1029.0}

    shape = ControllerShape("zh", Z, H)
    worker = DreamWorker(_mdrnn(), mu, logvar, shape, 1.15)
    params = rng.normal(0, 0.1, (3, shape.n_params))
    task = Task("train", np.array([7, 7, 7]), params, max_steps=20, generation=0)
    r1, r2 = dream_task(worker, task), dream_task(worker, task)
    assert r1.shape == (3,) and np.isfinite(r1).all()
    np.testing.assert_array_equal(r1, r2)
    later = Task("train", np.array([7, 7, 7]), params, max_steps=20, generation=5)
    assert not np.array_equal(dream_task(worker, later), r1)  # training dreams change every generation
    validate = [Task("validate", np.array([7, 7, 7]), params, max_steps=20, generation=g) for g in (0, 5)]
    np.testing.assert_array_equal(dream_task(worker, validate[0]), dream_task(worker, validate[1]))


def test_initial_latents_come_from_the_latents_a_starts_file_or_regenerated_episodes(tmp_path, fake_run):
    from worldmodels.data import collect
    from worldmodels.dream import STARTS_FILE, save_initial_latents
    from worldmodels.train import encode
    from worldmodels.vae import VAE

    cfg = preset("tiny", **{"data.workers": 1})
    encoded, bare = (fake_run(cfg, tmp_path / name, mdrnn=False) for name in ("encoded", "bare"))  # the same V
    collect(cfg, encoded, quiet=True)
    encode(cfg, encoded, quiet=True)
    mu, logvar = initial_latents(encoded)
    assert mu.shape == logvar.shape == (cfg.data.episodes, cfg.vae.z_size)

    regenerated = initial_latents(bare)  # no data, no latents: episodes driven again up to frame 50
    np.testing.assert_allclose(regenerated[0], mu, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(regenerated[1], logvar, rtol=2e-3, atol=2e-3)
    assert not list((bare.path / "data").glob("*.npz")) and not list(bare.latents.glob("*.npz"))

    path = save_initial_latents(bare)
    assert path == bare.path / STARTS_FILE
    save_tensors(bare.vae / "vae.safetensors", VAE(cfg.vae.z_size).state_dict())  # now only the file can give them
    for a, b in zip(initial_latents(bare), regenerated):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(initial_latents(bare, frame=10)[0], regenerated[0])  # another frame: computed


def test_train_controller_in_dream_tiny(tmp_path, monkeypatch, fake_run):
    from worldmodels.controller import load_controller
    from worldmodels.dream import dream_cma
    from worldmodels.evolution import read_history
    from worldmodels.runs import read_json

    cfg = preset(
        "tiny",
        **{
            "cma.population": 4, "cma.generations": 3, "cma.eval_episodes": 2, "cma.episodes_per_candidate": 2,
            "cma.workers": 1, "dream.max_steps": 15, "dream.temperature": 1.15, "dream.generations": 2,
            "eval.episodes": 1,
        },
    )
    run = fake_run(cfg)
    for i in range(3):
        save_npz(
            run.latents / f"ep{i:05d}.npz",
            mu=np.random.default_rng(i).normal(size=(61, cfg.vae.z_size)).astype(np.float16),
            logvar=np.full((61, cfg.vae.z_size), -2, np.float16),
        )

    res = train_controller_in_dream(cfg, run, quiet=True, real_max_steps=10)
    assert res.params.shape == (ControllerShape.from_config(cfg).n_params,)
    assert res.real is not None and np.isfinite(res.real["real_mean"])
    summary = read_json(run.controller / "dream.json")
    assert summary["1.15"]["dream_return"] == pytest.approx(res.dream_return)
    saved = load_controller(run.controller / "dream_tau1.15_best.safetensors")
    np.testing.assert_array_equal(saved.params, res.params)
    # dream.generations, not cma.generations (the real controller's), sets the dream's length.
    assert len(read_history(run.controller / "dream_tau1.15_history.csv")) == 2
    assert dream_cma(cfg).generations == 2 and dream_cma(cfg.replace(**{"dream.generations": 0})).generations == 3

    # Another temperature in the same run directory: its own files, the same JSON.
    cold = cfg.replace(**{"dream.temperature": 0.5})
    res2 = train_controller_in_dream(cold, run, quiet=True, evaluate_real=False)
    assert set(read_json(run.controller / "dream.json")) == {"1.15", "0.5"}
    assert (run.controller / "dream_tau0.5_best.safetensors").exists()
    assert res2.dream_return != res.dream_return  # another temperature, other dreams
    assert res2.real is None and "real_mean" not in read_json(run.controller / "dream.json")["0.5"]

    # Finished: only loads, even without the checkpoint (a shipped run has none).
    import worldmodels.dream as dream_module

    (run.controller / "dream_tau1.15_es.pkl").unlink()
    monkeypatch.setattr(dream_module, "evolve", lambda *a, **k: pytest.fail("trained again"))
    again = train_controller_in_dream(cfg, run, quiet=True, real_max_steps=10)
    np.testing.assert_array_equal(again.params, res.params)
    assert again.dream_return == res.dream_return and again.real == res.real
