"""The final stage: C evolved in CarRacing on an iteration's M from its dream controller, the run's agent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from worldmodels import pretrained
from worldmodels.ablations import FINAL_ROW, MAIN_ROW, cpu_hour_curves, histories, table
from worldmodels.cli import main
from worldmodels.config import ConfigError, preset
from worldmodels.controller import ControllerShape, load_controller, save_controller
from worldmodels.evaluation import evaluate_run
from worldmodels.evolution import read_history
from worldmodels.final import FinalRun, agent_run, controller_seconds, final_config, is_final_finished, train_final
from worldmodels.mdrnn import MDRNN
from worldmodels.rollout import Agent
from worldmodels.runs import (
    BEST_WEIGHTS, DONE_FILE, RECORD_FILE, RunDirError, file_sha256, iteration_folder, load_tensors, read_json,
    save_tensors, write_json,
)

CFG = preset("tiny", **{"cma.workers": 1, "cma.generations": 2})
FINAL_CMA = {"cma.population": 6, "cma.sigma0": 0.05, "cma.workers": 1, "cma.generations": 2}


def fake_iteration(run, index, cfg, score, seed):
    """A finished iteration `index` whose M and dream controller are random stand-ins."""
    folder = iteration_folder(run, index)
    torch.manual_seed(100 + seed)
    save_tensors(folder / "mdrnn" / BEST_WEIGHTS["mdrnn"], MDRNN.from_config(cfg).state_dict())
    write_json(folder / "mdrnn" / DONE_FILE, {"stage": "mdrnn"})
    shape = ControllerShape.from_config(cfg)
    params = np.random.default_rng(100 + seed).normal(0, 0.1, shape.n_params)
    save_controller(folder / "controller" / BEST_WEIGHTS["controller"], params, shape)
    write_json(folder / RECORD_FILE, {"controller": {"mode": "dream", "seconds": 36.0 * index}, "score": {"new": {"mean": score}}})
    write_json(folder / DONE_FILE, {"iteration": index})
    return params


@pytest.fixture()
def iterated(fake_run):
    """A finished tiny run (random stand-ins) with two finished iterations; the second's dream controller scored best."""
    run = fake_run(CFG, controller=True)
    (run.controller / "history.csv").write_text("generation,val_mean,seconds\n0,1.0,72\n1,2.0,108\n")  # the first controller's
    params = [fake_iteration(run, k, CFG, score, k) for k, score in ((1, 10.0), (2, 30.0))]
    return run, params


def test_the_final_stage_drives_with_the_iterations_M_and_starts_from_its_dream_controller(iterated, tmp_path):
    run, params = iterated
    cfg = CFG.replace(**FINAL_CMA)
    assert train_final(cfg, run, max_generations=1) is None  # unfinished: nothing evaluated yet
    final = FinalRun(run)
    recorded = final.load_config()
    assert recorded.iterate.final_iteration == 2  # 0 chose the iteration whose dream controller scored best
    assert recorded.cma.population == 6 and recorded.cma.x0 == ""  # its own CMA-ES; no machine's path recorded
    assert recorded.vae == run.load_config().vae and recorded.mdrnn == run.load_config().mdrnn
    assert final_config(cfg.replace(**{"data.workers": 3, "device": "cpu"}), run, 2).runtime_fields() == {
        **recorded.runtime_fields(), "data.workers": 3, "device": "cpu"}  # the caller's, however the run recorded them
    agent = Agent.from_run(final, recorded)
    iteration_m = load_tensors(iteration_folder(run, 2) / "mdrnn" / BEST_WEIGHTS["mdrnn"])
    assert all(torch.equal(agent.mdrnn.state_dict()[k], v) for k, v in iteration_m.items())
    run_m = load_tensors(run.mdrnn / BEST_WEIGHTS["mdrnn"])
    assert not all(torch.equal(agent.mdrnn.state_dict()[k], v) for k, v in run_m.items())
    assert not is_final_finished(run)
    with pytest.raises(RunDirError, match=r"final: the final stage is not finished \(python -m worldmodels final resumes it"):
        agent_run(run)  # never the first controller standing in for the agent the run is making
    fake_iteration(run, 3, CFG, 50.0, 3)  # a later iteration whose dream controller did better...
    assert train_final(cfg, run, max_generations=1) is None  # ...does not move the stage: 0 is the recorded iteration
    assert final.load_config().iterate.final_iteration == 2

    # Killed after one generation and resumed: the same evolution as an uninterrupted one.
    copy = tmp_path / "uninterrupted"
    shutil.copytree(run.path, copy)
    shutil.rmtree(copy / "final")
    results = train_final(cfg, run)
    uninterrupted = train_final(cfg, copy, 2)  # (with iteration 3 there now, 0 would choose it for a new stage)
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("seconds", "cumulative_seconds")} for row in h]
    assert strip(read_history(final.controller / "history.csv")) == strip(read_history(FinalRun(copy).controller / "history.csv"))
    assert results["returns"] == uninterrupted["returns"] and len(results["returns"]) == cfg.eval.episodes
    done = read_json(final.controller / DONE_FILE)
    dream = iteration_folder(run, 2) / "controller" / BEST_WEIGHTS["controller"]
    assert done["start"]["sha256"] == file_sha256(dream)  # CMA-ES's mean began at iteration 2's dream controller
    assert (final.eval / "results.json").exists() and not (run.eval / "results.json").exists()
    assert is_final_finished(run)
    view, agent_cfg = agent_run(run)
    assert view.path == final.path and agent_cfg.iterate.final_iteration == 2
    assert train_final(cfg, run) == results  # finished and evaluated: only loads


def test_the_final_stage_refuses_bad_iterations_naming_them(iterated, fake_run, tmp_path):
    run, _ = iterated
    cfg = CFG.replace(**FINAL_CMA)
    with pytest.raises(ConfigError, match=r"iterate.final_iteration = 3 is out of range: .* holds 2 finished iterations"):
        train_final(cfg, run, 3)
    with pytest.raises(ConfigError, match=r"iterate.final_iteration = -1 is out of range"):
        train_final(cfg, run, -1)
    with pytest.raises(ConfigError, match=r"cma.x0 = 'mine.safetensors': the final stage starts at iteration 1's dream controller"):
        train_final(cfg.replace(**{"cma.x0": "mine.safetensors"}), run, 1)
    with pytest.raises(RunDirError, match=r"final/config.json: no final stage recorded here"):
        FinalRun(run).stage("mdrnn")
    bare = fake_run(CFG, path=tmp_path / "bare", controller=True)
    with pytest.raises(RunDirError, match=r"bare: no finished iterations that evolved C in the dream"):
        train_final(cfg, bare)
    train_final(cfg, run, 1, max_generations=1)
    with pytest.raises(RunDirError, match=r"final/config.json: the final stage runs on iteration 1's M, not 2's"):
        train_final(cfg, run, 2)
    with pytest.raises(RunDirError, match=r"final/config.json was written by another config.*cma.sigma0: 0.05 != 0.2"):
        train_final(cfg.replace(**{"cma.sigma0": 0.2}), run, 1)


def test_the_cli_trains_the_final_stage_and_evaluates_it_as_the_runs_agent(iterated, capsys):
    run, _ = iterated
    with pytest.raises(SystemExit, match=r"error: .*final: no final stage \(python -m worldmodels final\)"):
        main(["evaluate", "--scale", "tiny", "--run-dir", str(run.path), "--controller", "final"])
    flags = ["--cma.population", "6", "--cma.sigma0", "0.05", "--cma.workers", "1", "--cma.generations", "2"]
    main(["final", "--scale", "tiny", "--run-dir", str(run.path), "--iteration", "1", "--quiet", "--max-generations", "1", *flags])
    with pytest.raises(SystemExit, match=r"error: .*final: the final stage is not finished \(python -m worldmodels final resumes it"):
        main(["evaluate", "--scale", "tiny", "--run-dir", str(run.path)])
    assert not (run.eval / "results.json").exists()  # the first controller was not evaluated in the agent's place
    main(["final", "--scale", "tiny", "--run-dir", str(run.path), "--iteration", "1", "--quiet", *flags])
    out = capsys.readouterr().out
    assert "2 generations in" in out and f"{CFG.eval.episodes} evaluation episodes:" in out
    final = read_json(FinalRun(run).eval / "results.json")
    main(["evaluate", "--scale", "tiny", "--run-dir", str(run.path), "--json"])  # the run's agent: the final one
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["returns"] == final["returns"]
    assert read_json(FinalRun(run).eval / "results.json")["controller"] == str(FinalRun(run).controller / "best.safetensors")
    assert not (run.eval / "results.json").exists()
    main(["evaluate", "--scale", "tiny", "--run-dir", str(run.path), "--controller", "first", "--json", "--workers", "1"])
    assert read_json(run.eval / "results.json")["controller"] == str(run.controller / "best.safetensors")


def test_export_ships_the_final_stage_as_the_runs_agent(iterated, tmp_path):
    run, _ = iterated
    cfg = CFG.replace(**FINAL_CMA)
    own = train_final(cfg, run, 1)
    first = evaluate_run(run)  # the first controller's evaluation, shipped beside it
    rows = {r["name"]: r for r in table(run)}
    assert list(rows)[:2] == ["full", "final"] and rows["final"]["mean"] == own["mean"]
    difference = np.mean(np.subtract(own["returns"], first["returns"]))
    assert rows["final"]["vs_full"].difference == pytest.approx(difference) and rows["final"]["generations"] == 2
    assert histories(run)[FINAL_ROW.label] == FinalRun(run).controller / "history.csv"
    seconds = controller_seconds(run)
    assert list(seconds) == ["first", "iteration 1", "final"]  # not iteration 2: the final stage grew from iteration 1
    assert seconds["first"] == 180.0
    curves = cpu_hour_curves(run, 2)
    assert curves[FINAL_ROW.label][2] == pytest.approx(2 * (180.0 + 36.0) / 3600) and curves[MAIN_ROW.label][2] == 0.0
    final_history = read_history(FinalRun(run).controller / "history.csv")
    assert seconds["final"] == pytest.approx(sum(h["seconds"] for h in final_history)) and seconds["iteration 1"] == 36.0
    root = tmp_path / "shipped"
    folder = pretrained.export(run, "tiny", evaluate=True, root=root)
    manifest = json.loads((folder / pretrained.MANIFEST).read_text())["sha256"]
    expected = {f"final/{f}" for f in pretrained.FINAL_FILES if (run.path / "final" / f).exists()}
    assert len(expected) >= 5 and expected == {rel for rel in manifest if rel.startswith("final/")}
    assert not any(rel.startswith(("final/vae", "final/mdrnn", "final/controller/es")) for rel in manifest)
    shipped = read_json(folder / "final" / "eval" / "results.json")
    assert shipped["returns"] == own["returns"] and shipped["controller"] == "final/controller/best.safetensors"
    loaded = pretrained.load("tiny", root=root)
    best = load_controller(FinalRun(run).controller / BEST_WEIGHTS["controller"]).params
    assert np.array_equal(loaded.params, best) and loaded.results["returns"] == own["returns"]
    assert loaded.agent_path == folder / "final" and loaded.config.iterate.final_iteration == 1
    iteration_m = load_tensors(iteration_folder(run, 1) / "mdrnn" / BEST_WEIGHTS["mdrnn"])
    assert all(torch.equal(loaded.agent.mdrnn.state_dict()[k], v) for k, v in iteration_m.items())
    first_loaded = pretrained.load("tiny", root=root, controller="first")
    assert np.array_equal(first_loaded.params, load_controller(run.controller / BEST_WEIGHTS["controller"]).params)
    assert first_loaded.results["returns"] == first["returns"] and first_loaded.agent_path == folder
    installed = pretrained.install("tiny", tmp_path / "installed", root=root)
    assert is_final_finished(installed) and evaluate_run(FinalRun(installed))["returns"] == own["returns"]



def test_a_continued_row_evolves_its_ablation_on_at_the_final_stages_budget(iterated):
    from worldmodels.ablations import ABLATIONS, CONTINUED, ablation_config, ablation_dir, continued_config, run_ablation

    run, _ = iterated
    label = CONTINUED["z_hidden_on"].row.label
    with pytest.raises(RunDirError, match=r"final/config.json: no final stage; 'z_hidden_on' evolves with the final stage's"):
        run_ablation(CFG, run, "z_hidden_on", quiet=True)
    train_final(CFG.replace(**FINAL_CMA), run, 1, max_generations=1)
    assert run_ablation(CFG, run, "z_hidden", quiet=True, max_generations=1) is None  # started, not finished
    with pytest.raises(RunDirError, match=r"z_hidden/controller: ablation 'z_hidden' is not finished, and 'z_hidden_on' evolves on"):
        run_ablation(CFG, run, "z_hidden_on", quiet=True)
    with pytest.raises(ConfigError, match=r"'z_hidden_on' takes its CMA-ES settings from .*final/config.json.*recorded != requested: cma.population: 4 != 8"):
        run_ablation(CFG.replace(**{"cma.population": 8}), run, "z_hidden_on", quiet=True)  # the --cma flags of `final`
    assert run_ablation(CFG, run, "z_hidden", quiet=True, evaluate=False) is None
    assert "z_hidden_on" not in {r["name"] for r in table(run)}

    # Killed after one generation and resumed; the runtime fields are the caller's.
    assert run_ablation(CFG.replace(**{"cma.workers": 2}), run, "z_hidden_on", quiet=True, max_generations=1) is None
    sub = ablation_dir(run, "z_hidden_on")
    first = read_history(sub.controller / "history.csv")
    results = run_ablation(CFG.replace(**{"cma.workers": 2}), run, "z_hidden_on", quiet=True)
    recorded = sub.load_config()
    final_cfg = FinalRun(run).load_config()
    assert recorded.controller.kind == "z_hidden" and recorded.cma.x0 == "" and recorded.iterate.final_iteration == 0
    assert final_cfg.differences(recorded) == ["controller.kind: 'zh' != 'z_hidden'", "iterate.final_iteration: 1 != 0"]
    assert continued_config(run, "z_hidden_on").replace(**{"cma.workers": 2}) == recorded
    base_best = ablation_dir(run, "z_hidden").controller / BEST_WEIGHTS["controller"]
    assert read_json(sub.controller / DONE_FILE)["start"]["sha256"] == file_sha256(base_best)
    history = read_history(sub.controller / "history.csv")
    assert history[:1] == first and len(history) == FINAL_CMA["cma.generations"] and {h["population"] for h in history} == {6}
    assert results["seeds"] == [CFG.eval.seed + i for i in range(CFG.eval.episodes)]
    assert run_ablation(CFG, run, "z_hidden_on", quiet=True) == results  # finished: only loads

    rows = {r["name"]: r for r in table(run)}
    assert rows["z_hidden_on"]["label"] == label and rows["z_hidden_on"]["mean"] == results["mean"]
    assert histories(run)[label] == sub.controller / "history.csv"
    base_seconds = sum(h["seconds"] for h in read_history(ablation_dir(run, "z_hidden").controller / "history.csv"))
    assert cpu_hour_curves(run, 2)[label][2] == pytest.approx(2 * base_seconds / 3600)
    assert cpu_hour_curves(run, 2)[ABLATIONS["z_hidden"].label][2] == 0.0
    with pytest.raises(ValueError, match=r"'z_hidden_on' evolves with the final stage's config"):
        ablation_config(CFG, "z_hidden_on")

    save_controller(base_best, np.zeros(ControllerShape.from_config(recorded).n_params), ControllerShape.from_config(recorded))
    with pytest.raises(RunDirError, match=r"z_hidden_on/controller/done.json: 'z_hidden_on' started from another .*delete"):
        run_ablation(CFG, run, "z_hidden_on", quiet=True)  # the ablation it grew from changed since
