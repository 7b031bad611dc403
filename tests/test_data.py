import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from worldmodels.config import preset
from worldmodels.data import (
    Episode,
    EpisodeError,
    RandomPolicy,
    collect,
    collect_task,
    dataset_episodes,
    episode_files,
    episode_index,
    episode_path,
    held_out_episodes,
    load_episode,
    needs_dataset,
    policy_actions,
    policy_rngs,
    read_manifest,
    save_episode,
    split_episodes,
    split_indices,
)
from worldmodels.datasets import FrameDataset, SequenceDataset
from worldmodels.env import make_env
from worldmodels.runs import RunDirError, write_json


def tiny(**overrides):
    return preset("tiny", **{"data.workers": 1, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    collect(tiny(), run, quiet=True)
    return run


def synthetic_episode(T, seed=0, terminated=False):
    """Frame t filled with the value t, action t = (t, t, t): alignment is readable."""
    obs = np.stack([np.full((64, 64, 3), t, np.uint8) for t in range(T)])
    term = np.zeros(T, bool)
    term[-1] = terminated
    return Episode(
        obs=obs,
        action=np.repeat(np.arange(T, dtype=np.float32)[:, None], 3, 1),
        reward=np.arange(T, dtype=np.float32),
        terminated=term,
        truncated=~term & (np.arange(T) == T - 1),
        final_obs=np.full((64, 64, 3), T, np.uint8),
        seed=seed,
    )


# --- policies ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "brownian"])
def test_random_policies_stay_within_the_action_bounds(kind):
    policy = RandomPolicy(kind, policy_rngs(range(8)))
    actions = np.stack([policy() for _ in range(500)])
    assert actions.shape == (500, 8, 3) and actions.dtype == np.float32
    assert actions[..., 0].min() >= -1 and actions[..., 0].max() <= 1
    assert actions[..., 1:].min() >= 0 and actions[..., 1:].max() <= 1


def test_brownian_actions_are_temporally_correlated_and_uniform_ones_are_not():
    def lag1(kind):
        a = np.stack([p() for p in [RandomPolicy(kind, policy_rngs(range(64)))] for _ in range(300)])
        steer = a[:, :, 0]
        return np.mean([np.corrcoef(steer[:-1, i], steer[1:, i])[0, 1] for i in range(64)])

    assert lag1("brownian") > 0.9
    assert abs(lag1("uniform")) < 0.1


def test_policy_reset_only_touches_masked_environments():
    policy = RandomPolicy("brownian", policy_rngs(range(4)))
    before = policy().copy()
    policy.reset(np.array([True, False, False, False]))
    assert not np.array_equal(policy.action[0], before[0])
    np.testing.assert_array_equal(policy.action[1:], before[1:])
    with pytest.raises(ValueError, match="policy"):
        RandomPolicy("greedy", policy_rngs([0]))


# --- the episode file ------------------------------------------------------------------------


def test_episode_round_trip(tmp_path):
    ep = synthetic_episode(7, seed=42, terminated=True)
    save_episode(tmp_path / "e.npz", ep)
    back = load_episode(tmp_path / "e.npz")
    for key in ("obs", "action", "reward", "terminated", "truncated", "final_obs"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ep, key))
        assert getattr(back, key).dtype == getattr(ep, key).dtype
    assert back.seed == 42 and len(back) == 7 and back.frames.shape == (8, 64, 64, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "e.npz").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = tmp_path / "episode_000000.npz"
    save_episode(path, synthetic_episode(5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EpisodeError, match="episode_000000.npz.*corrupt or truncated"):
        load_episode(path)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(EpisodeError, match="episode_000000.npz"):
        load_episode(path)
    with pytest.raises(EpisodeError, match="no such episode file"):
        load_episode(tmp_path / "missing.npz")
    np.savez(path, obs=np.zeros((3, 64, 64, 3), np.uint8))
    with pytest.raises(EpisodeError, match="missing arrays"):
        load_episode(path)


# --- collection ------------------------------------------------------------------------------


def test_collect_writes_the_episode_format_and_manifest(tiny_run):
    cfg = tiny()
    files = sorted((tiny_run / "data").glob("episode_*.npz"))
    assert len(files) == cfg.data.episodes
    ep = load_episode(files[0])
    T = cfg.data.episode_steps
    assert ep.obs.shape == (T, 64, 64, 3) and ep.obs.dtype == np.uint8
    assert ep.action.shape == (T, 3) and ep.action.dtype == np.float32
    assert ep.reward.shape == (T,) and ep.reward.dtype == np.float32
    assert ep.terminated.dtype == bool and ep.truncated[-1] and not ep.terminated.any()
    manifest = read_manifest(tiny_run)
    assert manifest["episodes"] == cfg.data.episodes
    assert manifest["steps"] == cfg.data.episodes * T
    assert manifest["seeds"] == [cfg.data.seed + i for i in range(cfg.data.episodes)]
    assert manifest["versions"]["gymnasium"].startswith("1.4")
    assert manifest["data"]["policy"] == "brownian"


def test_recorded_actions_replay_to_the_recorded_frames(tiny_run):
    """The action at step t pairs with the frame that follows it (obs[t + 1], final_obs last)."""
    ep = load_episode(tiny_run / "data" / "episode_000001.npz")
    env = make_env(tiny().env)
    obs, _ = env.reset(seed=ep.seed)
    np.testing.assert_array_equal(obs, ep.obs[0])
    for t, a in enumerate(ep.action):
        obs, r, *_ = env.step(a)
        np.testing.assert_array_equal(obs, ep.frames[t + 1])
        assert np.float32(r) == ep.reward[t]


def test_collect_resumes_and_refuses_another_config(tmp_path, tiny_run):
    cfg = tiny()
    run = tmp_path / "run"
    collect(cfg, run, quiet=True)
    os.remove(episode_path(run / "data", 2))
    (run / "data" / ".episode_000002.npz.abc.tmp").write_bytes(b"half")
    mtime = os.path.getmtime(episode_path(run / "data", 0))
    collect(cfg, run, quiet=True)
    assert os.path.getmtime(episode_path(run / "data", 0)) == mtime  # not collected again
    assert not list((run / "data").glob(".*.tmp"))
    for i in range(cfg.data.episodes):  # same seeds, same episodes as another run
        a, b = load_episode(episode_path(run / "data", i)), load_episode(episode_path(tiny_run / "data", i))
        np.testing.assert_array_equal(a.obs, b.obs)
    with pytest.raises(RunDirError, match="data.episode_steps"):
        collect(tiny(**{"data.episode_steps": 30}), run, quiet=True)
    collect(tiny(**{"data.workers": 2}), run, quiet=True)  # speed-only fields may change


def test_killed_collection_leaves_no_partial_episode_and_resumes(tmp_path):
    run = tmp_path / "run"
    code = (
        "from worldmodels.config import preset; from worldmodels.data import collect; "
        f"collect(preset('tiny', **{{'data.episodes': 8, 'data.episode_steps': 200, 'data.workers': 1, "
        f"'data.envs_per_worker': 1}}), {str(run)!r}, quiet=True)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run / "data").glob("episode_*.npz"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted((run / "data").glob("episode_*.npz"))
    assert 2 <= len(done) < 8
    for path in done:
        load_episode(path)  # every finished file is complete
    cfg = preset("tiny", **{"data.episodes": 8, "data.episode_steps": 200, "data.workers": 1, "data.envs_per_worker": 1})
    collect(cfg, run, quiet=True)
    assert len(list((run / "data").glob("episode_*.npz"))) == 8
    assert read_manifest(run)["episodes"] == 8


def test_uniform_policy_collection(tmp_path):
    cfg = tiny(**{"data.policy": "uniform", "data.episodes": 2})
    collect(cfg, tmp_path, quiet=True)
    ep = load_episode(episode_path(tmp_path / "data", 0))
    steer = ep.action[:, 0]
    assert abs(np.corrcoef(steer[:-1], steer[1:])[0, 1]) < 0.4


def _dies_once(collector, task):
    """Collection whose worker dies, as on an OOM kill, the first time it drives episode 1."""
    marker = os.path.join(os.path.dirname(collector.data_dir), "died")
    if collector.data_cfg.seed + 1 in task.seeds and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return collect_task(collector, task)


def _stuck_on_episode_1(collector, task):
    if collector.data_cfg.seed + 1 in task.seeds:
        time.sleep(60)
    return collect_task(collector, task)


def test_collection_in_workers_reruns_the_episodes_of_a_worker_that_died(tmp_path, tiny_run, monkeypatch):
    import worldmodels.data as data_module

    monkeypatch.setattr(data_module, "collect_task", _dies_once)
    collect(tiny(**{"data.workers": 2, "data.envs_per_worker": 1}), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "died").exists()  # a worker really died
    for i in range(tiny().data.episodes):  # and every episode is the one collected in one process
        again = _npz_arrays(episode_path(tmp_path / "run" / "data", i))
        for key, value in _npz_arrays(episode_path(tiny_run / "data", i)).items():
            np.testing.assert_array_equal(again[key], value, err_msg=f"episode {i}, {key}")


def test_a_stuck_collection_task_times_out_naming_it(tmp_path, monkeypatch):
    import worldmodels.data as data_module
    from worldmodels.parallel import TaskTimeoutError

    monkeypatch.setattr(data_module, "collect_task", _stuck_on_episode_1)
    # 10 s: well above a healthy one-episode task even on a loaded machine (2 s let task #0 time out first)
    cfg = tiny(**{"data.workers": 2, "data.envs_per_worker": 1, "data.task_timeout": 10.0})
    seed = cfg.data.seed + 1
    with pytest.raises(TaskTimeoutError, match=rf"task #1: Task\(collect, seeds=\[{seed}\]"):
        collect(cfg, tmp_path, quiet=True)


# --- episodes without the dataset on disk -----------------------------------------------------


def _npz_arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_regenerated_episodes_are_bit_identical_to_the_collected_files(tmp_path, tiny_run):
    cfg = tiny()
    order = [3, 0, 2, 1]  # other vectors of environments than collect's [0, 1], [2, 3]
    regenerated = dataset_episodes(cfg, tmp_path / "no-data", order)
    assert not (tmp_path / "no-data").exists()  # nothing written
    for i, ep in zip(order, regenerated):
        save_episode(tmp_path / f"episode_{i:06d}.npz", ep)
        collected = _npz_arrays(episode_path(tiny_run / "data", i))
        again = _npz_arrays(tmp_path / f"episode_{i:06d}.npz")
        assert again.keys() == collected.keys()
        for key, value in collected.items():
            assert again[key].dtype == value.dtype and again[key].shape == value.shape, key
            np.testing.assert_array_equal(again[key], value, err_msg=f"episode {i}, {key}")


def test_dataset_episodes_read_the_files_when_they_are_there(tiny_run, monkeypatch):
    import worldmodels.data as data_module

    def no_driving(*args, **kwargs):
        raise AssertionError("regenerated although the file is on disk")

    monkeypatch.setattr(data_module, "_drive_group", no_driving)
    (ep,) = dataset_episodes(tiny(), tiny_run, [2])
    np.testing.assert_array_equal(ep.obs, load_episode(episode_path(tiny_run / "data", 2)).obs)
    with pytest.raises(IndexError, match="episode 4"):
        dataset_episodes(tiny(), tiny_run, [4])
    with pytest.raises(RunDirError, match="data.episode_steps"):
        dataset_episodes(tiny(**{"data.episode_steps": 30}), tiny_run, [0])


def test_the_first_steps_of_an_episode_are_the_same_cut_from_the_file_or_regenerated(tmp_path, tiny_run):
    cfg = tiny()
    (cut,) = dataset_episodes(cfg, tiny_run, [1], steps=20)
    (short,) = dataset_episodes(cfg, tmp_path, [1], steps=20)
    full = load_episode(episode_path(tiny_run / "data", 1))
    assert len(cut) == len(short) == 20 and cut.truncated[-1] and not cut.truncated[:-1].any()
    for key in ("obs", "action", "reward", "terminated", "truncated", "final_obs"):
        np.testing.assert_array_equal(getattr(cut, key), getattr(short, key), err_msg=key)
    np.testing.assert_array_equal(short.final_obs, full.obs[20])
    assert full.head(1000) is full


def test_held_out_episodes_are_the_test_split_of_v_and_m(tmp_path, tiny_run):
    cfg = tiny(**{"data.episodes": 10, "data.test_fraction": 0.2})
    train, test = split_indices(cfg)
    train_files, test_files = split_episodes([episode_path(tmp_path, i) for i in range(10)], 0.2, cfg.train_seed)
    assert test == [episode_index(f) for f in test_files] and train == [episode_index(f) for f in train_files]
    assert sorted(train + test) == list(range(10)) and len(test) == 2
    (first,) = held_out_episodes(cfg, tmp_path, 1, steps=3)
    assert first.seed == cfg.data.seed + test[0] and len(first) == 3
    test_file = split_episodes(episode_files(tiny_run / "data"), 0.1, 0)[1][0]
    (ep,) = held_out_episodes(tiny(), tiny_run, 1)
    assert ep.seed == load_episode(test_file).seed


def test_policy_actions_are_the_recorded_ones_without_driving(tiny_run):
    cfg = tiny()
    manifest = read_manifest(tiny_run)
    steps = [r["steps"] for r in manifest["per_episode"]]
    actions = policy_actions(cfg.data, range(cfg.data.episodes), steps)
    for i, a in enumerate(actions):
        recorded = load_episode(episode_path(tiny_run / "data", i)).action
        assert a.dtype == recorded.dtype
        np.testing.assert_array_equal(a, recorded)
    assert [len(a) for a in policy_actions(cfg.data, [2, 0], [5, 7])] == [5, 7]
    np.testing.assert_array_equal(policy_actions(cfg.data, [2], [5])[0], actions[2][:5])
    assert [r["bytes"] for r in manifest["per_episode"]] == [f.stat().st_size for f in episode_files(tiny_run / "data")]


def test_the_dataset_is_needed_until_v_and_m_are_trained(tmp_path):
    assert needs_dataset(tmp_path)
    write_json(tmp_path / "vae" / "done.json", {})
    assert needs_dataset(tmp_path)
    write_json(tmp_path / "mdrnn" / "done.json", {})
    assert not needs_dataset(tmp_path)


# --- readers ---------------------------------------------------------------------------------


def test_split_is_by_episode_reproducible_and_disjoint(tmp_path):
    files = [tmp_path / f"episode_{i:06d}.npz" for i in range(20)]
    train, test = split_episodes(files, 0.1, seed=3)
    assert len(test) == 2 and len(train) == 18 and not set(train) & set(test)
    assert split_episodes(files, 0.1, seed=3) == (train, test)
    assert split_episodes(files, 0.1, seed=4) != (train, test)
    assert len(split_episodes(files[:2], 0.1)[1]) == 1  # at least one test episode


def test_frame_dataset_visits_every_frame_once_per_epoch(tmp_path):
    files = []
    for i, T in enumerate([5, 9, 4]):
        files.append(tmp_path / f"episode_{i:06d}.npz")
        ep = synthetic_episode(T, seed=i)
        ep.obs[:, 0, 0, 0], ep.final_obs[0, 0, 0] = 100 + i, 100 + i  # which episode
        save_episode(files[-1], ep)
    ds = FrameDataset(files, batch_size=4, shuffle_episodes=2, drop_last=False)
    batches = list(ds)
    frames = np.concatenate([b.numpy() for b in batches])
    assert frames.shape == (6 + 10 + 5, 64, 64, 3) and batches[0].dtype.is_floating_point is False
    seen = sorted(zip(frames[:, 0, 0, 0], frames[:, 1, 1, 0]))
    expected = sorted((100 + i, t) for i, T in enumerate([5, 9, 4]) for t in range(T + 1))
    assert seen == expected
    ds.set_epoch(1)
    assert not np.array_equal(np.concatenate([b.numpy() for b in ds]), frames)  # a new order
    assert ds.num_frames() == 21
    sub = FrameDataset(files, batch_size=3, frames_per_episode=2)
    assert sum(len(b) for b in sub) == 6


def test_sequence_dataset_aligns_each_action_with_the_frame_that_follows(tmp_path):
    files = [tmp_path / "episode_000000.npz", tmp_path / "episode_000001.npz"]
    save_episode(files[0], synthetic_episode(10))
    save_episode(files[1], synthetic_episode(3, terminated=True))
    ds = SequenceDataset(files, seq_len=4, source="obs")
    # episode 0: windows at 0, 4 and a last one ending on its final transition (6); episode 1: padded
    assert [s for _, s in ds.index] == [0, 4, 6, 0]
    for item in ds:
        frames, action, mask = item["frames"][:, 0, 0, 0], item["action"][:, 0], item["mask"]
        assert frames.shape == (5,) and action.shape == (4,) and mask.shape == (4,)
        for t in range(int(mask.sum())):
            assert frames[t] == action[t] and frames[t + 1] == action[t] + 1
    last = ds[3]
    assert last["mask"].tolist() == [True, True, True, False]
    assert last["done"].tolist() == [0, 0, 1, 0]
    assert ds[2]["frames"][-1, 0, 0, 0] == 10  # the final frame of episode 0


def test_readers_raise_on_corrupt_files_or_skip_them_with_a_warning(tmp_path):
    good, bad = tmp_path / "episode_000000.npz", tmp_path / "episode_000001.npz"
    save_episode(good, synthetic_episode(6))
    bad.write_bytes(b"garbage")
    with pytest.raises(EpisodeError, match="episode_000001.npz"):
        list(FrameDataset([good, bad], batch_size=2))
    with pytest.warns(UserWarning, match="episode_000001.npz"):
        frames = list(FrameDataset([good, bad], batch_size=1, skip_corrupt=True))
    assert len(frames) == 7
    with pytest.raises(EpisodeError, match="episode_000001.npz"):
        SequenceDataset([good, bad], 3, source="obs")
    with pytest.warns(UserWarning, match="episode_000001.npz"):
        assert len(SequenceDataset([good, bad], 3, source="obs", skip_corrupt=True)) == 2


def test_an_episode_that_ends_early_stops_being_stepped_while_the_others_go_on(tmp_path, monkeypatch):
    """Cars leaving the field end their episode; the rest of the vector must carry on."""
    import gymnasium as gym

    import worldmodels.data as data_module

    lengths = iter([7, 60])

    def short_env(cfg):
        return gym.wrappers.TimeLimit(make_env(cfg), max_episode_steps=next(lengths))

    monkeypatch.setattr(data_module, "make_env", short_env)
    cfg = tiny(**{"data.episodes": 2, "data.envs_per_worker": 2})
    collect(cfg, tmp_path, quiet=True)
    first, second = (load_episode(episode_path(tmp_path / "data", i)) for i in range(2))
    assert len(first) == 7 and first.truncated[-1] and not first.truncated[:-1].any()
    assert len(second) == 60
    env = make_env(cfg.env)  # the short episode's final frame is the one after its last action
    env.reset(seed=first.seed)
    for a in first.action:
        obs, *_ = env.step(a)
    np.testing.assert_array_equal(obs, first.final_obs)
