import copy
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from worldmodels.cli import main
from worldmodels.config import preset
from worldmodels.mdrnn import MDRNN
from worldmodels.controller import Controller
from worldmodels.evaluation import evaluate, record
from worldmodels.rollout import Agent, agent_config, rollout, rollout_worker
from worldmodels.runs import RunDir, save_tensors
from worldmodels.vae import VAE, frames_to_tensor

CFG = preset("tiny")  # z 32, M hidden 32
SEEDS = [11, 12, 13]


def make_agent(kind: str = "zh", seed: int = 0) -> Agent:
    torch.manual_seed(seed)
    vae = VAE(CFG.vae.z_size)
    mdrnn = MDRNN(CFG.vae.z_size, 3, CFG.mdrnn.hidden_size, CFG.mdrnn.n_gaussians, True, True)
    return Agent(vae, mdrnn if kind == "zh" else None, kind, CFG.vae.z_size, CFG.mdrnn.hidden_size, 40)


def random_params(agent: Agent, k: int, scale: float = 0.5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, (k, agent.n_params))


def standing_still(agent: Agent) -> np.ndarray:
    """A controller that brakes and never accelerates: bias (0, -10, 10), zero weights."""
    p = np.zeros(agent.n_params)
    p[-3:] = [0.0, -10.0, 10.0]
    return p


@pytest.mark.parametrize("kind", ["zh", "z_hidden"])
def test_batched_rollout_equals_sequential(kind):
    agent = make_agent(kind)
    params = random_params(agent, len(SEEDS))
    batched = rollout(agent, params, SEEDS, CFG.env, max_steps=40)
    assert batched.returns.dtype == np.float64 and batched.returns.shape == (3,)
    for i, seed in enumerate(SEEDS):
        single = rollout(agent, params[i : i + 1], [seed], CFG.env, max_steps=40)
        assert single.returns[0] == batched.returns[i]
        assert single.steps[0] == batched.steps[i] == 40


def test_exact_driving_is_float32_driving_up_to_rounding():
    agent = make_agent()
    params = random_params(agent, 2)
    plain = rollout(agent, params, SEEDS[:2], CFG.env, max_steps=1, trace=True)
    exact = rollout(agent, params, SEEDS[:2], CFG.env, max_steps=1, trace=True, float64=True)
    for p, e in zip(plain.traces, exact.traces):
        assert e.actions.dtype == np.float32 and e.z.dtype == np.float32  # what the environment gets
        np.testing.assert_allclose(e.z, p.z, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(e.actions, p.actions, rtol=1e-4, atol=1e-5)


EXACT_SCRIPT = """
import json, sys
from worldmodels.config import Config
from worldmodels.rollout import Agent, rollout
from worldmodels.runs import load_tensors
folder = sys.argv[1]
cfg = Config.from_json(open(folder + "/cfg.json").read())
vae, mdrnn, params = (load_tensors(f"{folder}/{name}.safetensors") for name in ("vae", "mdrnn", "params"))
agent = Agent.from_weights(vae, mdrnn, cfg)
r = rollout(agent, params["p"].numpy(), [int(s) for s in sys.argv[2:]], cfg.env, max_steps=40, trace=True, float64=True)
print(json.dumps({"returns": r.returns.tolist(), "actions": [t.actions.tolist() for t in r.traces]}))
"""


def test_exact_driving_gives_the_same_actions_with_other_cpu_kernels(tmp_path):
    """Float64 driving under kernels limited to SSE4 (another CPU's rounding) and one by one."""
    agent = make_agent()
    vae_state, mdrnn_state, _ = agent.init_args()
    cfg = agent_config(agent, CFG)
    params = random_params(agent, len(SEEDS))
    save_tensors(tmp_path / "vae.safetensors", vae_state)
    save_tensors(tmp_path / "mdrnn.safetensors", mdrnn_state)
    save_tensors(tmp_path / "params.safetensors", {"p": torch.from_numpy(params)})
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    here = rollout(agent, params, SEEDS, CFG.env, max_steps=40, trace=True, float64=True)
    isa = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run(
        [sys.executable, "-c", EXACT_SCRIPT, str(tmp_path), *map(str, SEEDS)],
        env={**os.environ, **isa}, capture_output=True, text=True, check=True,
    )
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["returns"] == here.returns.tolist()
    assert there["actions"] == [t.actions.tolist() for t in here.traces]
    for i, seed in enumerate(SEEDS):  # one episode at a time: other batch sizes
        single = rollout(agent, params[i : i + 1], [seed], CFG.env, max_steps=40, trace=True, float64=True)
        np.testing.assert_array_equal(single.traces[0].actions, here.traces[i].actions)


@pytest.mark.parametrize("float64", [False, True])
def test_a_rollout_step_is_v_then_c_then_m(float64):
    """The rollout's z, actions and returns are V.encode, the controller and MDRNN.step called by hand."""
    agent = make_agent()
    params = random_params(agent, 2)
    steps = 6
    res = rollout(agent, params, SEEDS[:2], CFG.env, max_steps=steps, trace=True, float64=float64)
    dtype = torch.float64 if float64 else torch.float32
    vae, mdrnn = (copy.deepcopy(m).to(dtype) for m in (agent.vae, agent.mdrnn))
    controller = Controller(agent.kind, agent.z_size, agent.hidden_size, params=params, dtype=dtype)
    state = None
    with torch.no_grad():
        for t in range(steps):
            frames = np.stack([tr.frames[t] for tr in res.traces])
            x = torch.from_numpy(frames).movedim(-1, 1).contiguous().to(dtype) / 255  # NCHW, unlike the rollout's
            z, _ = vae.encode(x)  # V
            h = state[0] if state is not None else torch.zeros(2, agent.hidden_size, dtype=dtype)
            actions = controller(z, h).float()  # C
            _, state = mdrnn.step(z, actions.to(dtype), state)  # M
            for i, tr in enumerate(res.traces):
                if float64:  # exact driving: the same float32 actions however V and M are laid out in memory
                    np.testing.assert_array_equal(tr.actions[t], actions[i].numpy())
                    np.testing.assert_array_equal(tr.z[t], z[i].float().numpy())
                np.testing.assert_allclose(tr.z[t], z[i].float().numpy(), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(tr.actions[t], actions[i].numpy(), rtol=1e-4, atol=1e-5)


def test_bf16_encoding_stays_close_to_float32():
    agent = make_agent()
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        mu, _ = agent.vae.encode(frames_to_tensor(frames))
    torch.testing.assert_close(agent.encode(frames), mu, rtol=1e-5, atol=1e-6)
    agent.encode_bf16 = True
    bf16 = agent.encode(frames)
    torch.testing.assert_close(bf16, mu, rtol=0.05, atol=1e-3)
    assert not torch.equal(bf16, mu)


def test_early_termination_charges_the_remaining_steps():
    agent = make_agent("z")
    still = standing_still(agent)
    params = np.stack([still, still])
    full = rollout(agent, params, [5, 6], CFG.env, max_steps=60)
    early = rollout(agent, params, [5, 6], CFG.env, max_steps=60, early_stop_steps=10)
    assert (full.steps == 60).all() and not full.early_stopped.any()
    assert early.early_stopped.all() and (early.steps < 30).all()
    # the return equals what standing still until max_steps gives
    np.testing.assert_allclose(early.returns, full.returns, atol=1e-6)


def test_early_termination_not_at_the_last_step():
    agent = make_agent("z")
    res = rollout(agent, standing_still(agent)[None], [5], CFG.env, max_steps=30, early_stop_steps=29)
    assert res.steps[0] == 30 and not res.early_stopped[0]


def test_trace_shapes():
    agent = make_agent()
    threads = torch.get_num_threads()
    res = rollout(agent, random_params(agent, 2), [1, 2], CFG.env, max_steps=7, trace=True)
    assert torch.get_num_threads() == threads
    for tr, ret in zip(res.traces, res.returns):
        assert tr.frames.shape == (7, 64, 64, 3) and tr.frames.dtype == np.uint8
        assert tr.z.shape == (7, 32) and tr.actions.shape == (7, 3) and tr.rewards.shape == (7,)
        assert tr.rewards.sum() == pytest.approx(ret)


def test_evaluate_in_workers_matches_inline():
    agent = make_agent()
    params = random_params(agent, 1)[0]
    inline = evaluate(agent, params, [3, 4, 5], CFG.env, envs_per_batch=2, max_steps=15)
    assert len(inline.returns) == 3 and inline.std == pytest.approx(np.std(inline.returns))
    pooled = evaluate(agent, params, [3, 4, 5], CFG.env, envs_per_batch=2, max_steps=15, workers=2)
    assert pooled.returns == inline.returns
    rebuilt, env_cfg = rollout_worker(*agent.init_args(CFG))
    assert rebuilt.shape == agent.shape and env_cfg == CFG.env


@pytest.fixture()
def run_dir(fake_run):
    """A fake finished run: random V and M, and a random best controller."""
    return fake_run(CFG, controller=True)


def test_evaluate_cli_json(run_dir, capsys):
    main(["evaluate", "--run-dir", str(run_dir.path), "--episodes", "2", "--seed", "7",
          "--json", "--workers", "1", "--max-steps", "15"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert len(out["returns"]) == 2 and out["seeds"] == [7, 8]
    assert out["mean"] == pytest.approx(np.mean(out["returns"]))
    assert out["std"] == pytest.approx(np.std(out["returns"]))
    saved = json.loads((run_dir.path / "eval" / "results.json").read_text())
    assert saved["returns"] == out["returns"]
    # the same numbers from the Python API
    agent = Agent.from_run(run_dir.path)
    from worldmodels.controller import load_controller

    params = load_controller(run_dir.path / "controller" / "best.safetensors").params
    assert evaluate(agent, params, [7, 8], CFG.env, max_steps=15).returns == out["returns"]


def test_evaluate_cli_without_controller(tmp_path):
    run = RunDir(tmp_path)
    run.bind(CFG)
    with pytest.raises(SystemExit, match="no controller"):
        main(["evaluate", "--run-dir", str(tmp_path)])


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_record_video(tmp_path, suffix):
    agent = make_agent()
    path = tmp_path / f"ep{suffix}"
    res = record(agent, random_params(agent, 1)[0], 3, path, CFG.env, max_steps=12, scale=2)
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == res.steps[0] == 12
    assert frames.shape[1:3] == (128, 3 * 128)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_record_cli(run_dir, capsys):
    out = run_dir.path / "video.gif"
    main(["record", "--run-dir", str(run_dir.path), "--seed", "2", "--out", str(out), "--max-steps", "5"])
    assert iio.imread(out, index=None).shape[0] == 5
