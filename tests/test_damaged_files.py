"""A damaged file (truncated or corrupt) is reported by every command in one line that names it."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worldmodels import pretrained
from worldmodels.cli import main
from worldmodels.config import preset
from worldmodels.data import Episode, EpisodeError, episode_path, save_episode
from worldmodels.datasets import save_latents
from worldmodels.evolution import load_checkpoint
from worldmodels.parallel import TaskError
from worldmodels.runs import (
    BEST_WEIGHTS, DREAM_STARTS, ES_CHECKPOINT, LAST_WEIGHTS, MANIFEST_FILE, METRICS_FILE, RESULTS_FILE, TRAIN_STATE,
    DamagedFileError, RunDir, load_tensors, read_json, write_bytes, write_json,
)

CFG = preset("tiny", **{"data.episodes": 2, "cma.workers": 1, "data.workers": 1})
STEPS = 20  # actions per fake episode (M's windows are 16 long)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x93not what this file should hold" * 8)


DAMAGE = {"truncated": truncate, "corrupt": corrupt}


def fake_episodes(run: RunDir, latents: bool = False) -> list[Path]:
    """`CFG.data.episodes` random episodes of STEPS actions in ``run/data`` (with `latents`, their latents too)."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(CFG.data.episodes):
        ep = Episode(
            obs=rng.integers(0, 256, (STEPS, 64, 64, 3), dtype=np.uint8), action=rng.uniform(-1, 1, (STEPS, 3)),
            reward=rng.normal(size=STEPS), terminated=np.zeros(STEPS, bool),
            truncated=np.arange(STEPS) == STEPS - 1,
            final_obs=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), seed=i,
        )
        files.append(episode_path(run.data, i))
        save_episode(files[-1], ep)
        if latents:
            z = rng.normal(size=(STEPS + 1, CFG.vae.z_size))
            save_latents(run.latents / files[-1].name, z, np.full_like(z, -2.0), ep)
    if latents:
        write_json(run.latents / "done.json", {"episodes": len(files)})
    return files


def error_line(argv: list[str]) -> str:
    """What `python -m worldmodels ARGV` exits with: the one line it prints (it must fail)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error"), message
    assert "\n" not in message and "Traceback" not in message
    return message


def run_args(command: str, run: RunDir, *extra: str) -> list[str]:
    return [command, "--scale", "tiny", "--run-dir", str(run.path), "--data.episodes", str(CFG.data.episodes),
            "--quiet", *extra]  # fmt: skip


# --- episodes and latents ------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["collect", "train-vae", "encode"])
def test_a_damaged_episode_is_named_by_every_command_that_reads_episodes(fake_run, tmp_path, command, damage):
    run = fake_run(CFG, mdrnn=False) if command == "encode" else RunDir(tmp_path / "run")
    run.bind(CFG)
    files = fake_episodes(run)
    DAMAGE[damage](files[1])
    line = error_line(run_args(command, run))
    assert line.startswith(f"error: {files[1]}: corrupt or truncated episode file (BadZipFile: ")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latent_file_is_named_by_train_mdrnn_and_dream(fake_run, damage):
    run = fake_run(CFG, mdrnn=False)
    latent = run.latents / fake_episodes(run, latents=True)[0].name
    DAMAGE[damage](latent)
    expected = f"error: {latent}: corrupt or truncated latent file (BadZipFile: "
    assert error_line(run_args("train-mdrnn", run)).startswith(expected)
    assert error_line(run_args("dream", run, "--no-real-eval")).startswith(expected)


def test_damaged_dream_starts_are_named(fake_run):
    run = fake_run(CFG)
    write_bytes(run.controller / DREAM_STARTS, b"")
    corrupt(run.controller / DREAM_STARTS)
    line = error_line(run_args("dream", run, "--no-real-eval"))
    assert line.startswith(f"error: {run.controller / DREAM_STARTS}: corrupt or truncated start latents file")


# --- weights, checkpoints, records -------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("stage", ["vae", "mdrnn", "controller"])
def test_damaged_weights_are_named_by_evaluate_and_record(fake_run, tmp_path, stage, damage):
    run = fake_run(CFG, controller=True)
    weights = run.stage(stage) / BEST_WEIGHTS[stage]
    DAMAGE[damage](weights)
    expected = f"error: {weights}: corrupt or truncated weights file (SafetensorError: Error while deserializing"
    assert error_line(run_args("evaluate", run, "--episodes", "1", "--max-steps", "5")).startswith(expected)
    video = str(tmp_path / "x.gif")
    assert error_line(run_args("record", run, "--max-steps", "5", "--out", video)).startswith(expected)


def test_a_file_that_is_not_a_controller_is_named(fake_run):
    run = fake_run(CFG, controller=True)
    other = run.vae / BEST_WEIGHTS["vae"]
    line = error_line(run_args("evaluate", run, "--episodes", "1", "--controller", str(other)))
    assert line.startswith(f"error: {other}: not a controller file")


def test_weights_of_another_architecture_are_named(fake_run):
    run = fake_run(CFG, controller=True)
    recorded = read_json(run.config_path)
    write_json(run.config_path, recorded | {"mdrnn": recorded["mdrnn"] | {"n_gaussians": 3}})
    line = error_line(run_args("evaluate", run, "--episodes", "1", "--max-steps", "5"))
    assert line.startswith(f"error: {run.mdrnn / BEST_WEIGHTS['mdrnn']}: weights of another architecture")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_training_checkpoint_is_named_by_train_vae(tmp_path, damage):
    run = RunDir(tmp_path / "run")
    run.bind(CFG.replace(**{"vae.epochs": 3}))
    fake_episodes(run)
    three_epochs = run_args("train-vae", run, "--vae.epochs", "3")
    assert main([*three_epochs, "--max-steps", "1"]) is None  # one step, then a checkpoint
    for name, what in ((LAST_WEIGHTS, "weights file"), (TRAIN_STATE, "training state"), (METRICS_FILE, "metrics file")):
        path = run.vae / name
        kept = path.read_bytes()
        (corrupt if name == METRICS_FILE else DAMAGE[damage])(path)  # a truncated text file still reads
        assert error_line(three_epochs).startswith(f"error: {path}: corrupt or truncated {what}")
        path.write_bytes(kept)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cma_checkpoint_is_named_by_train_controller(fake_run, damage):
    run = fake_run(CFG)
    checkpoint = run.controller / ES_CHECKPOINT
    write_bytes(checkpoint, pickle.dumps({"version": 1, "state": list(range(1000))}))
    DAMAGE[damage](checkpoint)
    line = error_line(run_args("train-controller", run, "--max-generations", "1"))
    assert line.startswith(f"error: {checkpoint}: corrupt or truncated checkpoint")
    with pytest.raises(DamagedFileError, match="es.pkl"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_config_is_named(fake_run, damage):
    run = fake_run(CFG, controller=True)
    DAMAGE[damage](run.config_path)
    line = error_line(run_args("evaluate", run, "--episodes", "1"))
    assert line.startswith(f"error: {run.config_path}: not valid JSON")


def test_a_config_with_an_unknown_field_is_named(fake_run):
    run = fake_run(CFG, controller=True)
    write_json(run.config_path, read_json(run.config_path) | {"vea": {}})
    line = error_line(run_args("evaluate", run, "--episodes", "1"))
    assert line.startswith(f"error: {run.config_path}: unknown field 'vea'")


@pytest.mark.parametrize("name", [MANIFEST_FILE, RESULTS_FILE])
def test_damaged_records_are_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'{"episodes": 3, "per_epi')
    with pytest.raises(DamagedFileError, match=f"{path}: corrupt or truncated JSON file"):
        read_json(path)


def test_a_damaged_shipped_run_is_named(fake_run, tmp_path, monkeypatch):
    run = fake_run(CFG, controller=True, results={"returns": [1.0], "mean": 1.0, "std": 0.0})
    root = tmp_path / "shipped"
    pretrained.export(run, "tiny", root=root)
    monkeypatch.setattr(pretrained.install, "__defaults__", (root,))
    weights = root / "tiny" / "controller" / BEST_WEIGHTS["controller"]
    truncate(weights)
    line = error_line(["evaluate", "--pretrained", "tiny", "--run-dir", str(tmp_path / "copy")])
    assert line.startswith(f"error: {weights}: SHA-256 differs")
    corrupt(root / "tiny" / pretrained.MANIFEST)
    line = error_line(["evaluate", "--pretrained", "tiny", "--run-dir", str(tmp_path / "copy")])
    assert line.startswith(f"error: {root / 'tiny' / pretrained.MANIFEST}: corrupt or truncated JSON file")
    with pytest.raises(DamagedFileError, match="manifest.json"):
        load_tensors(root / "tiny" / pretrained.MANIFEST)


# --- what the CLI prints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        EpisodeError("runs/x/data/episode_000001.npz: corrupt or truncated episode file"),
        pretrained.ChecksumError("book/vae/vae.safetensors: SHA-256 differs"),
        TaskError("task #3: Task(kind='train',\n  generation=4): the workers died running it"),
        DamagedFileError("runs/x/controller/es.pkl: corrupt or truncated checkpoint"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_cli_prints_user_errors_in_one_line(fake_run, monkeypatch, error):
    import worldmodels.cli as cli

    def fail(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "evaluate", (cli.Evaluate, fail))
    run = fake_run(CFG)
    assert error_line(run_args("evaluate", run)) == "error: " + " ".join(str(error).split())


def test_train_vae_on_a_truncated_episode_exits_with_one_line(tmp_path):
    run = RunDir(tmp_path / "run")
    run.bind(CFG)
    truncate(fake_episodes(run)[0])
    out = subprocess.run(
        [sys.executable, "-m", "worldmodels", *run_args("train-vae", run)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {episode_path(run.data, 0)}: corrupt or truncated episode file (BadZipFile: not a .npz (zip) archive)"
    ]

