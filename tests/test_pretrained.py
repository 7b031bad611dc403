import json

import numpy as np
import pytest
import torch

from worldmodels import pretrained
from worldmodels.config import preset
from worldmodels.controller import ControllerShape, load_controller, save_controller
from worldmodels.evaluation import evaluate_run
from worldmodels.rollout import Agent
from worldmodels.runs import load_tensors, save_tensors, write_json

CFG = preset("tiny")


@pytest.fixture()
def finished_run(fake_run):
    """A run with (random) V, M and controller weights and an evaluation, as if finished."""
    run = fake_run(CFG, controller=True, results={"returns": [1.0, 3.0], "mean": 2.0, "std": 1.0})
    return run, load_controller(run.controller / "best.safetensors").params


def test_export_load_round_trip_in_float16(tmp_path, finished_run):
    run, params = finished_run
    root = tmp_path / "shipped"
    pretrained.export(run, "tiny", root=root)
    assert pretrained.available(root) == ["tiny"]
    weights = load_tensors(root / "tiny" / "vae" / "vae.safetensors")
    assert all(v.dtype == torch.float16 for k, v in weights.items() if k.startswith(("decoder.", "fc_decode.")))
    assert all(v.dtype == torch.float32 for k, v in weights.items() if k.startswith(("encoder.", "fc_mu.", "fc_logvar.")))
    assert all(v.dtype == torch.float32 for v in load_tensors(root / "tiny" / "mdrnn" / "mdrnn.safetensors").values())
    loaded = pretrained.load("tiny", root=root)
    np.testing.assert_array_equal(loaded.params, params)  # the controller stays float64
    assert loaded.results["mean"] == 2.0 and loaded.config == run.load_config()
    original = Agent.from_run(run)
    frames = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    assert torch.equal(loaded.agent.encode(frames), original.encode(frames))  # the driving path is exact
    z = torch.zeros(1, CFG.vae.z_size)
    pictures16, pictures32 = loaded.agent.vae.decode(z), original.vae.decode(z)
    assert torch.allclose(pictures16, pictures32, atol=1e-2) and not torch.equal(pictures16, pictures32)


def test_export_ships_what_the_chapters_need_without_the_dataset(tmp_path, finished_run):
    from worldmodels.dream import STARTS_FILE, initial_latents

    run, params = finished_run
    manifest = {"episodes": CFG.data.episodes, "per_episode": [{"index": 0, "steps": 60, "return": -3.5}]}
    write_json(run.data / "manifest.json", manifest)
    shape = ControllerShape.from_config(CFG)
    save_controller(run.controller / "dream_tau1.15_best.safetensors", params, shape, {"temperature": "1.15"})
    write_json(run.controller / "dream_tau1.15_done.json", {"generations": 2, "best_score": 5.0, "best_generation": 1})
    (run.controller / "dream_tau1.15_history.csv").write_text("generation,fitness_mean\n0,1.0\n")
    (run.controller / "dream_tau1.15_es.pkl").write_bytes(b"a run-local pickle")
    write_json(run.controller / "dream.json", {"1.15": {"dream_return": 5.0, "real_mean": 1.0}})

    folder = pretrained.export(run, "tiny", root=tmp_path / "shipped")
    shipped = set(json.loads((folder / pretrained.MANIFEST).read_text())["sha256"])
    assert {
        "data/manifest.json", "controller/dream.json", "controller/dream_tau1.15_best.safetensors",
        "controller/dream_tau1.15_done.json", "controller/dream_tau1.15_history.csv", STARTS_FILE,
    } <= shipped
    assert not [f for f in folder.rglob("*") if f.suffix == ".pkl"] and "controller/dream_tau1.15_es.pkl" not in shipped
    assert json.loads((folder / "data" / "manifest.json").read_text()) == manifest

    # The run has neither data nor latents: the dreams' starts were regenerated from the seeds.
    target = pretrained.install("tiny", tmp_path / "copy", root=tmp_path / "shipped")
    starts = initial_latents(target)
    assert starts[0].shape == (CFG.data.episodes, CFG.vae.z_size) and not list(target.latents.glob("*.npz"))
    for a, b in zip(starts, initial_latents(run)):
        np.testing.assert_array_equal(a, b)


def test_a_changed_or_missing_file_fails_the_checksum_naming_it(tmp_path, finished_run):
    run, _ = finished_run
    root = tmp_path / "shipped"
    folder = pretrained.export(run, "tiny", root=root)
    (folder / "eval" / "results.json").write_text(json.dumps({"mean": 999.0}))
    with pytest.raises(pretrained.ChecksumError, match="eval/results.json"):
        pretrained.load("tiny", root=root)
    (folder / "eval" / "results.json").unlink()
    with pytest.raises(pretrained.ChecksumError, match="missing"):
        pretrained.verify("tiny", root=root)
    with pytest.raises(FileNotFoundError, match="no shipped run 'huge'"):
        pretrained.load("huge", root=root)


def test_install_copies_into_a_run_directory_that_then_loads(tmp_path, finished_run):
    run, params = finished_run
    write_json(run.path / "data" / "manifest.json", {"episodes": 4})
    root = tmp_path / "shipped"
    pretrained.export(run, "tiny", root=root)
    target = pretrained.install("tiny", tmp_path / "copy", root=root)
    assert target.load_config() == run.load_config()
    assert not (target.path / pretrained.MANIFEST).exists()
    assert (target.path / "data" / "manifest.json").exists()  # a run's own manifest.json files are copied
    agent = Agent.from_run(target)
    assert agent.mdrnn is not None and agent.vae.fc_mu.weight.dtype == torch.float32


def test_cli_evaluates_a_shipped_run_without_a_run_dir(tmp_path, finished_run, monkeypatch, capsys):
    from worldmodels.cli import main

    run, _ = finished_run
    root = tmp_path / "shipped"
    pretrained.export(run, "tiny", root=root)
    monkeypatch.setattr(pretrained, "ROOT", root)
    monkeypatch.setattr(pretrained.install, "__defaults__", (root,))
    monkeypatch.chdir(tmp_path)
    main(["evaluate", "--pretrained", "tiny", "--episodes", "2", "--seed", "2000000005", "--json", "--max-steps", "20", "--workers", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["returns"]) == 2 and set(out) >= {"returns", "mean", "std"}
    assert (tmp_path / "runs" / "pretrained-tiny" / "eval" / "results.json").exists()


def test_export_ships_the_ablations_records_but_no_extra_weights(tmp_path, finished_run):
    run, _ = finished_run
    sub = tmp_path / "run" / "ablations" / "z"
    write_json(sub / "config.json", {"scale": "tiny"})
    write_json(sub / "eval" / "results.json", {"mean": 1.0})
    save_tensors(sub / "vae" / "vae.safetensors", {"w": torch.zeros(2)})  # a copy of the run's V: not shipped
    folder = pretrained.export(run, "tiny", root=tmp_path / "shipped")
    manifest = json.loads((folder / pretrained.MANIFEST).read_text())["sha256"]
    assert {"ablations/z/config.json", "ablations/z/eval/results.json"} <= set(manifest)
    assert not any(rel.startswith("ablations/z/vae") for rel in manifest)
    write_json(tmp_path / "run" / "ablations" / "z_hidden" / "config.json", {"scale": "tiny"})  # unfinished: not shipped
    folder = pretrained.export(run, "tiny", root=tmp_path / "shipped")
    assert not (folder / "ablations" / "z_hidden").exists() and (folder / "ablations" / "z" / "config.json").exists()
    assert pretrained.verify("tiny", root=tmp_path / "shipped") == folder


def test_export_with_evaluate_ships_the_evaluation_of_the_shipped_weights(tmp_path, finished_run, monkeypatch, capsys):
    from worldmodels.cli import main

    run, _ = finished_run
    cfg = run.load_config().replace(**{"eval.episodes": 2, "eval.max_steps": 20, "cma.workers": 1})
    (run.path / "config.json").write_text(cfg.to_json())
    root = tmp_path / "shipped"
    made_up = {"returns": [1.0, 3.0], "mean": 2.0, "seeds": [cfg.eval.seed, cfg.eval.seed + 1], "max_steps": 20}
    write_json(run.eval / "results.json", made_up)
    with pytest.raises(ValueError, match=r"shipped weights score .* where .*results\.json has 2\.0"):
        pretrained.export(run, "tiny", evaluate=True, root=root)  # the fixture's returns are made up
    assert pretrained.available(root) == []  # no manifest: not loadable
    mismatch = json.loads((root / "tiny" / "eval" / "results.json").read_text())
    assert mismatch["mean"] != 2.0 and mismatch["returns"] != made_up["returns"]  # the file the error names holds the shipped weights' evaluation (evaluate_run wrote it)
    own = evaluate_run(run)
    folder = pretrained.export(run, "tiny", evaluate=True, root=root)
    shipped = json.loads((folder / "eval" / "results.json").read_text())
    assert shipped["returns"] == own["returns"]  # V's float16 decoder does not drive
    assert shipped["episodes"] == 2 and shipped["max_steps"] == 20 and shipped["controller"] == "controller/best.safetensors"
    assert shipped["seconds"] == own["seconds"]  # reproduced: the run's own evaluation is shipped
    assert pretrained.verify("tiny", root=root) == folder
    # The command reproduces the shipped evaluation exactly.
    monkeypatch.setattr(pretrained, "ROOT", root)
    monkeypatch.setattr(pretrained.install, "__defaults__", (root,))
    monkeypatch.chdir(tmp_path)
    main(["evaluate", "--pretrained", "tiny", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["returns"] == shipped["returns"] and out["mean"] == shipped["mean"]


def test_export_again_keeps_every_file_byte_for_byte_and_rewrites_a_changed_weight(tmp_path, finished_run):
    run, _ = finished_run
    root = tmp_path / "shipped"
    folder = pretrained.export(run, "tiny", root=root)
    first = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    folder = pretrained.export(run, "tiny", root=root)
    assert {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == first
    best = run.path / "controller" / "best.safetensors"
    tensors = load_tensors(best)
    save_tensors(best, {k: v + 1 for k, v in tensors.items()})
    pretrained.export(run, "tiny", root=root)
    shipped = load_tensors(folder / "controller" / "best.safetensors")
    assert all(torch.equal(shipped[k], tensors[k] + 1) for k in tensors)
    pretrained.verify("tiny", root=root)
