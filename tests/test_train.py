import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from worldmodels import cli, fit, train
from worldmodels.config import ConfigError, preset, resolve_device
from worldmodels.data import collect, episode_files, load_episode
from worldmodels.datasets import load_latents
from worldmodels.data import EpisodeError
from worldmodels.mdrnn import MDRNN
from worldmodels.runs import RunDir, RunDirError, load_mdrnn, load_tensors, load_vae, read_json
from worldmodels.vae import VAE, frames_to_tensor


def tiny(**overrides):
    return preset("tiny", **{"data.workers": 1, **overrides})


# A V of 3 steps per epoch on 4-frame batches, and M with 3 steps per epoch: seconds on a CPU.
SMALL_V = {"vae.batch_size": 4, "vae.frames_per_episode": 4}
SMALL_V_ARGS = ["--vae.batch-size", "4", "--vae.frames-per-episode", "4"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """The tiny dataset (4 episodes of 60 steps), collected once."""
    run = tmp_path_factory.mktemp("data")
    collect(tiny(), run, quiet=True)
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_run):
    """A tiny run with V trained and the episodes encoded (M not trained)."""
    run = tmp_path_factory.mktemp("trained")
    shutil.copytree(data_run, run, dirs_exist_ok=True)
    train.train_vae(tiny(), run, quiet=True)
    train.encode(tiny(), run, quiet=True)
    return run


def fresh(tmp_path, source, name="run", stages=("data",)):
    """A new run directory holding copies of `stages` of `source` (config.json not copied)."""
    run = tmp_path / name
    for stage in stages:
        shutil.copytree(source / stage, run / stage)
    return run


def weights_equal(a, b):
    a, b = load_tensors(a), load_tensors(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved_step(path):
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_v_and_m_losses_go_down_when_overfitting_a_fixed_batch(trained_run):
    torch.manual_seed(0)
    precision = fit.Precision(torch.device("cpu"), enabled=False)
    ep = load_episode(episode_files(trained_run / "data")[0])
    x = frames_to_tensor(ep.obs[::12][:4])
    vae = VAE(32)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for step in range(4):
        loss = train._vae_losses(vae, x, precision, train._generator(torch.device("cpu"), 0, 0), 0.5).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses

    lat = load_latents(sorted((trained_run / "latents").glob("episode_*.npz"))[0])
    L = 16
    batch = {
        "mu": torch.from_numpy(lat["mu"][: L + 1]).float()[None],
        "logvar": torch.from_numpy(lat["logvar"][: L + 1]).float()[None],
        "action": torch.from_numpy(lat["action"][:L])[None],
        "reward": torch.from_numpy(lat["reward"][:L])[None],
        "done": torch.from_numpy(lat["terminated"][:L]).float()[None],
        "mask": torch.ones(1, L, dtype=torch.bool),
    }
    m = MDRNN(32, 3, 32, 5, reward_head=True, done_head=True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        loss = train._mdrnn_losses(m, batch, train._generator(torch.device("cpu"), 0, 0)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_train_vae_writes_checkpoints_metrics_and_done(trained_run):
    folder = trained_run / "vae"
    for name in ("vae.safetensors", "last.safetensors", "state.pt", "metrics.csv", "done.json"):
        assert (folder / name).exists(), name
    rows = (folder / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:5] == ["step", "epoch", "train_loss", "train_reconstruction", "train_kl"]
    assert header[-2:] == ["lr", "seconds"] and "test_kl" in header
    done = read_json(folder / "done.json")
    assert done["steps"] == 3 and done["epochs"] == 1 and set(done["best_test"]) == {"loss", "reconstruction", "kl"}
    state = torch.load(folder / "state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "progress", "scaler"} <= set(state)
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and state["progress"]["epoch"] == 1


def test_v_resumes_exactly_after_stopping_midway(tmp_path, data_run):
    cfg = tiny(**SMALL_V, **{"vae.epochs": 2})
    full = fresh(tmp_path, data_run, "full")
    train.train_vae(cfg, full, quiet=True)
    parts = fresh(tmp_path, data_run, "parts")
    train.train_vae(cfg, parts, quiet=True, max_steps=2)  # mid epoch 0
    assert saved_step(parts / "vae" / "last.safetensors") == 2 and not (parts / "vae" / "done.json").exists()
    train.train_vae(cfg, parts, quiet=True, max_steps=4)  # across the epoch's end, into epoch 1
    assert saved_step(parts / "vae" / "last.safetensors") == 4 and not (parts / "vae" / "done.json").exists()
    train.train_vae(cfg, parts, quiet=True)
    for name in ("vae.safetensors", "last.safetensors"):
        assert weights_equal(full / "vae" / name, parts / "vae" / name), name
    assert read_json(full / "vae" / "done.json")["steps"] == read_json(parts / "vae" / "done.json")["steps"] == 6
    csv_full = [r.split(",")[:-1] for r in (full / "vae" / "metrics.csv").read_text().splitlines()]
    csv_parts = [r.split(",")[:-1] for r in (parts / "vae" / "metrics.csv").read_text().splitlines()]
    assert csv_full == csv_parts  # same rows (seconds aside), none duplicated


def test_m_resumes_exactly_after_being_killed(tmp_path, trained_run):
    stages = ("data", "vae", "latents")
    cfg = tiny(**{"mdrnn.epochs": 1000})
    reference = fresh(tmp_path, trained_run, "reference", stages)  # V and data as trained, M with more epochs
    killed = fresh(tmp_path, trained_run, "killed", stages)
    for run in (reference, killed):
        RunDir(run).bind(cfg)
    script = (
        "import sys; from worldmodels.config import preset; from worldmodels.train import train_mdrnn; "
        "train_mdrnn(preset('tiny', **{'data.workers': 1, 'mdrnn.epochs': 1000}), sys.argv[1], quiet=True, checkpoint_seconds=0)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], stderr=subprocess.PIPE)
    weights = killed / "mdrnn" / "last.safetensors"
    deadline = time.monotonic() + 60
    while not (weights.exists() and saved_step(weights) >= 8):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = saved_step(weights)
    target = stopped_at + 10
    train.train_mdrnn(cfg, killed, quiet=True, max_steps=target)
    train.train_mdrnn(cfg, reference, quiet=True, max_steps=target)
    assert saved_step(weights) == saved_step(reference / "mdrnn" / "last.safetensors") == target
    assert weights_equal(weights, reference / "mdrnn" / "last.safetensors")
    steps = [int(r.split(",")[0]) for r in (killed / "mdrnn" / "metrics.csv").read_text().splitlines()[1:]]
    ref_steps = [int(r.split(",")[0]) for r in (reference / "mdrnn" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ref_steps


def test_nan_loss_stops_v_and_keeps_the_last_good_checkpoint(tmp_path, data_run, monkeypatch):
    cfg = tiny(**SMALL_V)
    run = fresh(tmp_path, data_run)
    train.train_vae(cfg, run, quiet=True, max_steps=1)
    good = load_tensors(run / "vae" / "last.safetensors")
    real_loss = train.vae_loss

    def nan_reconstruction(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        return out._replace(reconstruction=out.reconstruction * float("nan"), loss=out.loss * float("nan"))

    monkeypatch.setattr(train, "vae_loss", nan_reconstruction)
    with pytest.raises(train.TrainingError, match=r"V: the reconstruction loss is nan at step 2 .*step 1\)"):
        train.train_vae(cfg, run, quiet=True)
    assert saved_step(run / "vae" / "last.safetensors") == 1
    kept = load_vae(run, which="last").state_dict()
    assert all(torch.equal(kept[k], good[k]) for k in good)
    monkeypatch.undo()
    train.train_vae(cfg, run, quiet=True, max_steps=2)  # and training goes on from there
    assert saved_step(run / "vae" / "last.safetensors") == 2


@pytest.mark.parametrize("damaged", ["state.pt", "last.safetensors"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, data_run, capsys, damaged):
    cfg = tiny(**SMALL_V)
    run = fresh(tmp_path, data_run)
    train.train_vae(cfg, run, quiet=True, max_steps=1)
    path = run / "vae" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    with pytest.raises(RunDirError, match=rf"^{re.escape(str(path))}: corrupt or truncated .*; delete "):
        train.train_vae(cfg, run, quiet=True)
    with pytest.raises(SystemExit) as exit:
        cli.main(["train-vae", "--scale", "tiny", "--run-dir", str(run), "--quiet", *SMALL_V_ARGS])
    message = str(exit.value.code)
    assert message.startswith(f"error: {path}: ") and "; delete " in message and "\n" not in message


def test_nan_in_data_stops_m_with_a_clear_error(tmp_path, trained_run):
    run = fresh(tmp_path, trained_run, stages=("data", "vae", "latents"))
    shutil.copy(trained_run / "config.json", run / "config.json")
    for path in sorted((run / "latents").glob("episode_*.npz")):
        lat = dict(np.load(path))
        lat["mu"][:] = np.nan
        np.savez_compressed(path, **lat)
    with pytest.raises(train.TrainingError, match=r"M: the gmm loss is nan at step 1 .*No checkpoint"):
        train.train_mdrnn(tiny(), run, quiet=True)
    assert not (run / "mdrnn" / "last.safetensors").exists()


def test_encode_writes_float16_latents_and_resumes(tmp_path, trained_run):
    files = sorted((trained_run / "latents").glob("episode_*.npz"))
    assert len(files) == 4 and (trained_run / "latents" / "done.json").exists()
    vae = load_vae(trained_run)
    for path in files:
        ep = load_episode(trained_run / "data" / path.name)
        with np.load(path) as f:
            assert f["mu"].dtype == f["logvar"].dtype == np.float16
            assert f["mu"].shape == f["logvar"].shape == (len(ep) + 1, 32)
            assert np.array_equal(f["action"], ep.action)
            stored = f["mu"].astype(np.float32)
    with torch.no_grad():
        mu, _ = vae.encode(frames_to_tensor(ep.frames))
    assert np.allclose(stored, mu.numpy(), atol=1e-2, rtol=1e-2)

    run = fresh(tmp_path, trained_run, stages=("data", "vae", "latents"))
    shutil.copy(trained_run / "config.json", run / "config.json")
    (run / "latents" / "done.json").unlink()
    (run / "latents" / files[1].name).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (run / "latents").glob("episode_*.npz")}
    out = train.encode(tiny(), run, quiet=True)
    assert [p.name for p in out] == [p.name for p in files]
    for p in out:
        if p.name in before:
            assert p.stat().st_mtime_ns == before[p.name]  # not encoded again
    with np.load(out[1]) as a, np.load(files[1]) as b:
        assert np.array_equal(a["mu"], b["mu"])


def test_encode_before_v_is_trained_names_the_missing_file(tmp_path, data_run):
    run = fresh(tmp_path, data_run)
    with pytest.raises(FileNotFoundError, match="done.json.*train-vae"):
        train.encode(tiny(), run, quiet=True)


def test_finished_stages_load_without_training(trained_run, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(fit, "_backward_step", fail)
    vae = train.train_vae(tiny(), trained_run, quiet=True)
    best = load_tensors(trained_run / "vae" / "vae.safetensors")
    assert all(torch.equal(vae.state_dict()[k], best[k]) for k in best)


def test_load_reports_the_missing_weights_file(tmp_path, data_run):
    run = fresh(tmp_path, data_run)
    RunDir(run).bind(tiny())
    with pytest.raises(FileNotFoundError, match=r"mdrnn\.safetensors.*train-mdrnn"):
        load_mdrnn(run)
    with pytest.raises(FileNotFoundError, match=r"vae\.safetensors.*train-vae"):
        load_vae(run)


def test_missing_episodes_are_a_clear_error(tmp_path, data_run):
    run = fresh(tmp_path, data_run)
    (run / "data" / "episode_000002.npz").unlink()
    with pytest.raises(FileNotFoundError, match="3 of 4 episodes.*episode_000002"):
        train.train_vae(tiny(), run, quiet=True)


def test_cli_end_to_end(tmp_path, data_run, capsys):
    run = fresh(tmp_path, data_run)
    common = ["--scale", "tiny", "--run-dir", str(run), "--quiet"]
    cli.main(["train-vae", *common, "--max-steps", "1"])
    assert "V: stopped at step 1" in capsys.readouterr().out
    cli.main(["train-vae", *common])
    assert "V: trained 3 steps in 1 epochs, best test loss" in capsys.readouterr().out
    cli.main(["encode", *common])
    assert "4 episodes encoded" in capsys.readouterr().out
    cli.main(["train-mdrnn", *common])
    out = capsys.readouterr().out
    assert "M: trained 3 steps in 1 epochs" in out and "gmm" in out
    mdrnn = load_mdrnn(run)
    assert mdrnn.hidden_size == 32 and (run / "mdrnn" / "mdrnn.safetensors").exists()
    assert train.train_mdrnn(tiny(), run, quiet=True) is not None  # finished: loads


def test_sequence_cache_gives_the_same_items(trained_run):
    from worldmodels.datasets import SequenceDataset

    files = sorted((trained_run / "latents").glob("episode_*.npz"))
    plain, cached = SequenceDataset(files, 16), SequenceDataset(files, 16, cache_episodes=2)
    for _ in range(2):
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert all(torch.equal(a[k], b[k]) for k in a)
            b["mu"].add_(1)  # items are copies: the cache is unchanged
    assert len(cached._cache) == 2


def test_corrupt_episode_stops_training_or_is_skipped_when_asked(tmp_path, data_run):
    run = fresh(tmp_path, data_run)
    (run / "data" / "episode_000002.npz").write_bytes(b"not an episode")
    with pytest.raises(EpisodeError, match="episode_000002.npz"):
        train.train_vae(tiny(**SMALL_V), run, quiet=True)
    skip = tiny(**SMALL_V, **{"data.skip_corrupt": True})  # a speed-only field: same run directory
    with pytest.warns(UserWarning, match="episode_000002.npz"):
        train.train_vae(skip, run, quiet=True)
        latents = train.encode(skip, run, quiet=True)
    assert [p.name for p in latents] == ["episode_000000.npz", "episode_000001.npz", "episode_000003.npz"]
