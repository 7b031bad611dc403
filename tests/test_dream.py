"""The dream: M as a batched environment, and CMA-ES inside it."""

from __future__ import annotations

import json

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

    cfg, run = _tiny_dream_run(fake_run, **{"dream.temperature": 1.15})

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


# --------------------------------------------------------------------------------------
# The fused step, the loop's device discipline, the paper's population
# --------------------------------------------------------------------------------------
def _reference_step(m: MDRNN, z, actions, state, tau, gen):
    """One dream step written with MDRNN.step and webmodels.sample_from_noise, drawing u, eps
    and the end's coin from `gen` in DreamEnv's order."""
    from worldmodels.webmodels import sample_from_noise

    out, state = m.step(z, actions, state)
    u = torch.rand(z.shape, generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    coin = torch.rand(len(z), generator=gen)
    z_next = sample_from_noise(out.logpi, out.mu, out.logsigma, torch.tensor(tau), u, eps)
    return z_next, out.reward, coin < torch.sigmoid(out.done_logit), state


def test_a_dream_step_is_m_step_and_the_inverse_cdf_draw():
    m = _mdrnn(seed=3)
    with torch.no_grad():
        m.done_head.bias.fill_(-2.0)  # some dreams end within the steps below
    env = DreamEnv(m, temperature=1.3, max_steps=100)
    z0 = torch.randn(6, Z, generator=torch.Generator().manual_seed(1))
    z, h = env.reset(z0, torch.Generator().manual_seed(5))
    gen, state, alive = torch.Generator().manual_seed(5), None, torch.ones(6, dtype=torch.bool)
    z_ref, ended = z0, 0
    for t in range(12):
        actions = torch.tanh(torch.randn(6, 3, generator=torch.Generator().manual_seed(t)))
        z, reward, done, h = env.step(actions)
        with torch.no_grad():
            z_ref, reward_ref, ends, state = _reference_step(m, z_ref, actions, state, 1.3, gen)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, state[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reward, torch.where(alive, reward_ref, 0.0), rtol=1e-5, atol=1e-5)
        alive &= ~ends
        assert torch.equal(done, ~alive)
        ended = int(done.sum())
    assert 0 < ended < 6  # the comparison covered dreams that ended and dreams that went on


def test_how_often_the_loop_checks_for_the_end_does_not_change_the_returns():
    m = _mdrnn(seed=1)
    with torch.no_grad():
        m.done_head.bias.fill_(-3.0)
    ctrl = Controller("zh", Z, H).set_flat(np.random.default_rng(0).normal(0, 0.3, (16, ControllerShape("zh", Z, H).n_params)))
    z0 = torch.randn(16, Z, generator=torch.Generator().manual_seed(0))
    runs = [dream_rollout(DreamEnv(m, 1.15, 200), ctrl, z0, torch.Generator().manual_seed(9), check_every=n)
            for n in (1, 7, 50, 1000)]
    for returns, steps in runs[1:]:
        np.testing.assert_array_equal(returns, runs[0][0])
        np.testing.assert_array_equal(steps, runs[0][1])
    assert runs[0][1].min() < 200 and runs[0][1].max() > 7  # dreams ended at various steps
    assert runs[0][0].dtype == np.float64 and runs[0][1].dtype == np.int64


def test_the_step_loop_never_waits_for_the_device():
    """On the meta device a tensor has no values: reading one on the host (.item(), bool(),
    .cpu()) raises, and mixing in a CPU tensor raises. The loop runs there untouched as long as
    it never checks for the end, and every tensor it makes is on M's device."""
    from worldmodels.dream import dream_steps
    from torch.utils._python_dispatch import TorchDispatchMode

    m = _mdrnn().to("meta")
    ctrl = Controller("zh", Z, H, params=np.zeros((4, ControllerShape("zh", Z, H).n_params)), device="meta")

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.add((t.device.type, t.dtype))
            return out

    z0 = torch.zeros(4, Z)  # on the CPU, as the start latents come: reset moves them once
    with Devices() as mode:
        returns, steps = dream_steps(DreamEnv(m, 1.15, 20), ctrl, z0, check_every=21)
    assert returns.device.type == steps.device.type == "meta"
    assert {d for d, _ in mode.seen} == {"meta"}
    assert {dt for _, dt in mode.seen} <= {torch.float32, torch.float64, torch.int64, torch.bool}
    with pytest.raises((RuntimeError, NotImplementedError)):  # checking for the end reads the device
        dream_steps(DreamEnv(m, 1.15, 20), ctrl, torch.zeros(4, Z), check_every=10)


def test_the_loop_reads_the_device_once_per_check():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Reads.reads += 1
            return func(*args, **(kwargs or {}))

    m = _mdrnn(done_head=False)
    ctrl = Controller("zh", Z, H, params=np.zeros((4, ControllerShape("zh", Z, H).n_params)))
    with Reads():
        dream_rollout(DreamEnv(m, 1.15, 45), ctrl, torch.zeros(4, Z), check_every=10)
    assert Reads.reads == 4  # at steps 10, 20, 30, 40; the returns are copied once, after the loop


def test_the_dream_runs_on_the_configured_device(tmp_path, fake_run):
    cfg = preset("tiny", device="cuda")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the error below is for machines without it")
    run = fake_run(preset("tiny"))
    with pytest.raises(ConfigError, match=r"^device: 'cuda' was asked for but CUDA is not available"):
        train_controller_in_dream(cfg, run, quiet=True)
    with pytest.raises(ValueError, match="generator is on cpu, M on meta"):
        DreamEnv(_mdrnn().to("meta")).reset(torch.zeros(2, Z), torch.Generator())


def test_the_dream_uses_its_own_population_and_the_real_evolution_keeps_cmas():
    from worldmodels.dream import dream_cma

    book = preset("book")
    assert (book.dream.population, book.dream.episodes_per_candidate) == (64, 16)
    assert (book.cma.population, book.cma.episodes_per_candidate) == (16, 4)
    cma = dream_cma(book)
    assert (cma.population, cma.episodes_per_candidate, cma.generations, cma.early_stop_steps) == (64, 16, 120, 0)
    assert (cma.sigma0, cma.eval_every, cma.select_top) == (book.cma.sigma0, book.cma.eval_every, book.cma.select_top)
    with pytest.raises(ConfigError, match=r"dream.population = 1 is out of range: allowed \[2, 100000\]"):
        preset("book", **{"dream.population": 1})


def test_the_shipped_dream_run_still_loads_unchanged(tmp_path, monkeypatch):
    """The shipped book config has no dream.population (it was trained at cma's 16 x 4): it loads,
    and its finished dream controller is loaded, never trained again."""
    import worldmodels.dream as dream_module
    from worldmodels import pretrained
    from worldmodels.config import Config
    from worldmodels.controller import load_controller

    recorded = Config.load(pretrained.ROOT / "book" / "config.json")
    assert recorded.dream.population == 64
    assert not [d for d in recorded.differences(preset("book")) if not d.startswith("iterate.")]  # a run binds iterate
    run = pretrained.install("book", tmp_path / "run")
    monkeypatch.setattr(dream_module, "evolve", lambda *a, **k: pytest.fail("trained again"))
    res = train_controller_in_dream(preset("book"), run, quiet=True)
    saved = load_controller(run.controller / "dream_tau1.15_best.safetensors")
    np.testing.assert_array_equal(res.params, saved.params)
    assert res.dream_return == pytest.approx(52.82838936866028) and res.real["real_mean"] == pytest.approx(-42.55844973579693)


# --------------------------------------------------------------------------------------
# The temperature table; dream return against real return
# --------------------------------------------------------------------------------------
def _tiny_dream_run(fake_run, **overrides):
    cfg = preset(
        "tiny",
        **{"cma.generations": 3, "cma.eval_episodes": 2, "cma.workers": 1, "dream.max_steps": 15,
           "dream.generations": 2, "dream.population": 4, "dream.episodes_per_candidate": 2, "eval.episodes": 1,
           **overrides},
    )
    run = fake_run(cfg)
    for i in range(3):
        save_npz(
            run.latents / f"ep{i:05d}.npz",
            mu=np.random.default_rng(i).normal(size=(61, cfg.vae.z_size)).astype(np.float16),
            logvar=np.full((61, cfg.vae.z_size), -2, np.float16),
        )
    return cfg, run


def test_correlations_exact_values():
    from worldmodels.dream import correlations

    assert correlations([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx((0.6, 0.6), abs=1e-12)
    pearson, spearman = correlations([1, 2, 3, 10], [1, 2, 3, 4])
    assert pearson == pytest.approx(14 / np.sqrt(250), abs=1e-12) and spearman == pytest.approx(1.0, abs=1e-12)
    assert correlations([1, 1, 2], [1, 2, 3])[1] == pytest.approx(1.5 / np.sqrt(3), abs=1e-12)  # ties: mean rank
    assert np.isnan(correlations([1, 1, 1], [1, 2, 3])).all()
    with pytest.raises(ValueError, match="same length"):
        correlations([1, 2], [1, 2, 3])


def test_dream_real_correlation_with_an_m_whose_reward_is_known(fake_run):
    """M built by hand: every dream ends after one step whose reward is tanh(tanh(gas)), gas the
    controller's (a bias-only controller: gas = (tanh(b) + 1) / 2)."""
    from worldmodels.dream import correlations, dream_real_correlation, real_returns, real_validation_seeds
    from worldmodels.runs import BEST_WEIGHTS

    cfg, run = _tiny_dream_run(fake_run)
    z, h = cfg.vae.z_size, cfg.mdrnn.hidden_size
    m = MDRNN.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        w = m.lstm.weight_ih_l0  # rows i, f, g, o; the last column is the bias
        w[:h, -1], w[h : 2 * h, -1], w[3 * h :, -1] = 30.0, -30.0, 30.0  # i = 1, f = 0, o = 1
        w[2 * h, z + 1] = 1.0  # g of unit 0 = tanh(gas): c = tanh(gas), h_0 = tanh(c)
        m.reward_head.weight[0, 0] = 1.0
        m.done_head.bias.fill_(50.0)
    save_tensors(run.mdrnn / BEST_WEIGHTS["mdrnn"], m.state_dict())

    n = ControllerShape.from_config(cfg).n_params
    biases = np.array([-2.0, 0.0, 0.7, 2.0])
    params = np.zeros((4, n))
    params[:, n - 2] = biases  # gas's bias
    params[:, n - 1] = -1.0  # no brake
    seeds = real_validation_seeds(cfg, 2)
    out = dream_real_correlation(cfg, run, params, seeds, real_max_steps=25, workers=1)
    expected = np.tanh(np.tanh((np.tanh(biases) + 1) / 2))
    np.testing.assert_allclose(out["dream_episodes"], np.repeat(expected[:, None], 2, 1), rtol=1e-6)
    np.testing.assert_allclose(out["dream"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["real_episodes"], real_returns(cfg, run, params, seeds, 25, workers=1))
    assert (out["pearson"], out["spearman"]) == correlations(out["dream"], out["real"])
    assert out["seeds"] == [cfg.cma.seed + 500_000, cfg.cma.seed + 500_001]
    with pytest.raises(ValueError, match="would reach the evaluation tracks"):
        real_validation_seeds(cfg.replace(**{"eval.seed": cfg.cma.seed + 500_003}), 10)


def test_temperature_table_trains_each_tau_and_scores_it_on_validation_tracks(fake_run, monkeypatch):
    import worldmodels.dream as dream_module
    from worldmodels.dream import candidates_from_checkpoint, markdown_table, temperature_table
    from worldmodels.runs import read_json

    cfg, run = _tiny_dream_run(fake_run)
    rows = temperature_table(cfg, run, (0.5, 1.15), real_episodes=2, real_max_steps=10, workers=1, quiet=True)
    assert [r["temperature"] for r in rows] == [0.5, 1.15] and all(r["finished"] for r in rows)
    summary = read_json(run.controller / "dream.json")
    for r in rows:
        entry = summary[f"{r['temperature']:g}"]
        assert entry["validation"] == {"first_seed": cfg.cma.seed + 500_000, "episodes": 2, "max_steps": 10,
                                       "mean": r["real_mean"], "std": r["real_std"]}
        assert "real_mean" not in entry  # the evaluation tracks are not used to choose tau
        assert r["generations"] == 2 and r["dream_return"] == entry["dream_return"]

    monkeypatch.setattr(dream_module, "real_returns", lambda *a, **k: pytest.fail("evaluated again"))
    assert temperature_table(cfg, run, (0.5, 1.15), real_episodes=2, real_max_steps=10, quiet=True) == rows
    best = max(rows, key=lambda r: r["real_mean"])
    table = markdown_table(rows).splitlines()
    assert table[0] == "| tau | generations | dream return | real return (2 validation tracks) |"
    assert table[2 + rows.index(best)].endswith(f"| **{best['real_mean']:.1f} ± {best['real_std']:.1f}** |")

    k, drawn_from = candidates_from_checkpoint(run, 1.15, 5, seed=1)
    assert drawn_from == "checkpoint" and k.shape == (5, ControllerShape.from_config(cfg).n_params) and len(np.unique(k[:, 0])) == 5
    np.testing.assert_array_equal(k, candidates_from_checkpoint(run, 1.15, 5, seed=1)[0])  # the checkpoint is untouched
    (run.controller / "dream_tau1.15_es.pkl").unlink()  # a shipped run: around the best, at the last sigma
    from worldmodels.controller import load_controller
    from worldmodels.evolution import read_history

    best_params = load_controller(run.controller / "dream_tau1.15_best.safetensors").params
    sigma = read_history(run.controller / "dream_tau1.15_history.csv")[-1]["sigma"]
    around_best, drawn_from = candidates_from_checkpoint(run, 1.15, 3, seed=2)
    assert drawn_from == "best"
    np.testing.assert_allclose(around_best,
                               best_params + sigma * np.random.default_rng(2).standard_normal((3, len(best_params))))


def test_threads_follow_the_batch_and_do_not_change_the_returns():
    from worldmodels.dream import THREADED_BATCH, dream_threads
    from worldmodels.parallel import cpu_count

    assert dream_threads(0, THREADED_BATCH) == cpu_count()
    assert (dream_threads(0, THREADED_BATCH - 1), dream_threads(3, 1)) == (1, 3)
    m = _mdrnn(seed=2)
    ctrl = Controller("zh", Z, H, params=np.random.default_rng(1).normal(0, 0.3, (300, ControllerShape("zh", Z, H).n_params)))
    z0 = torch.randn(300, Z, generator=torch.Generator().manual_seed(3))
    one, two, three = (dream_rollout(DreamEnv(m, 1.15, 30), ctrl, z0, torch.Generator().manual_seed(4), threads=t)
                       for t in (1, 2, 3))
    for other in (two, three):
        np.testing.assert_array_equal(one[0], other[0])
        np.testing.assert_array_equal(one[1], other[1])
    env = DreamEnv(m, 1.15, 30)
    env.reset(z0, threads=3)
    assert [(s.start, s.stop) for s in env._slices] == [(0, 100), (100, 200), (200, 300)]
    env.close()


def test_recorded_correlation_is_measured_once_then_read(fake_run, monkeypatch):
    """Recorded in dream.json under the temperature; read back (even without the CMA-ES state a
    shipped run lacks) while the settings match, measured again when they change."""
    import worldmodels.dream as dream
    from worldmodels.runs import DREAM_SUMMARY, RunDirError, read_json, write_json

    cfg, run = _tiny_dream_run(fake_run, **{"eval.max_steps": 20})
    with pytest.raises(RunDirError, match=r"dream\.json: no finished dream run at tau 1\.3"):
        dream.recorded_correlation(cfg, run, candidates=3, real_episodes=2, tau=1.3)
    train_controller_in_dream(cfg.replace(**{"dream.temperature": 1.3}), run, quiet=True, evaluate_real=False)
    params, _ = dream.candidates_from_checkpoint(run, 1.3, 3)
    expected = dream.dream_real_correlation(cfg, run, params, dream.real_validation_seeds(cfg, 2), tau=1.3, workers=1)

    measure = dream.dream_real_correlation

    def measure_while_another_process_writes(*args, **kwargs):
        summary = read_json(run.controller / DREAM_SUMMARY)
        write_json(run.controller / DREAM_SUMMARY, {**summary, "0.5": {"written": "meanwhile"}})
        return measure(*args, **kwargs)

    monkeypatch.setattr(dream, "dream_real_correlation", measure_while_another_process_writes)
    out = dream.recorded_correlation(cfg, run, candidates=3, real_episodes=2, tau=1.3, workers=1)
    assert read_json(run.controller / DREAM_SUMMARY)["0.5"] == {"written": "meanwhile"}  # not lost
    assert out["seeds"] == [cfg.cma.seed + 500_000, cfg.cma.seed + 500_001] and out["candidates"] == 3
    assert out["drawn_from"] == "checkpoint" and out["max_steps"] == 20
    np.testing.assert_array_equal(out["dream"], expected["dream"])
    np.testing.assert_array_equal(out["real"], expected["real"])
    assert (out["pearson"], out["spearman"]) == pytest.approx((expected["pearson"], expected["spearman"]), nan_ok=True)
    assert json.dumps(read_json(run.controller / DREAM_SUMMARY)["1.3"]["correlation"], sort_keys=True) == json.dumps(out, sort_keys=True)

    (run.controller / "dream_tau1.3_es.pkl").unlink()  # as shipped: nothing left to draw the candidates from

    def measured(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(dream, "dream_real_correlation", measured)
    assert json.dumps(dream.recorded_correlation(cfg, run, candidates=3, real_episodes=2, tau=1.3), sort_keys=True) == json.dumps(out, sort_keys=True)
    with pytest.raises(AssertionError, match="measured again"):
        dream.recorded_correlation(cfg, run, candidates=3, real_episodes=1, tau=1.3)
    with pytest.raises(AssertionError, match="measured again"):  # longer real episodes: another measurement
        dream.recorded_correlation(cfg.replace(**{"eval.max_steps": 25}), run, candidates=3, real_episodes=2, tau=1.3)
    with pytest.raises(ValueError, match="candidates must be >= 2"):
        dream.recorded_correlation(cfg, run, candidates=1, tau=1.3)


def test_the_table_and_the_dream_run_keep_what_other_processes_wrote_meanwhile(fake_run, monkeypatch):
    """The real evaluations are long; the dream record is read again just before each write, and
    only the call's own fields are written."""
    import worldmodels.dream as dream
    from worldmodels.runs import DREAM_SUMMARY, read_json, write_json

    cfg, run = _tiny_dream_run(fake_run, **{"eval.max_steps": 10})
    path = run.controller / DREAM_SUMMARY

    def meanwhile(original, key):
        def wrapped(*args, **kwargs):
            summary = read_json(path) if path.exists() else {}
            summary.setdefault("1.3", {})[key] = "written meanwhile"
            write_json(path, summary)
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(dream, "_evaluate_real", meanwhile(dream._evaluate_real, "correlation"))
    train_controller_in_dream(cfg.replace(**{"dream.temperature": 1.3}), run, quiet=True, real_max_steps=10)
    entry = read_json(path)["1.3"]
    assert entry["correlation"] == "written meanwhile" and "real_mean" in entry

    monkeypatch.setattr(dream, "real_returns", meanwhile(dream.real_returns, "other"))
    rows = dream.temperature_table(cfg, run, (1.3,), real_episodes=1, workers=1, quiet=True)
    entry = read_json(path)["1.3"]
    assert entry["other"] == entry["correlation"] == "written meanwhile"
    assert entry["validation"]["mean"] == rows[0]["real_mean"] and "real_mean" in entry
