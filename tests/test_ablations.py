"""The ablations: configs, shared and untrained models, training and evaluation at tiny, the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worldmodels.ablations import (
    ABLATIONS, MAIN, SEED_STRIDE, Paired, ablation_config, ablation_dir, format_table, markdown_table, paired,
    run_ablation, seed_run_names, table,
)
from worldmodels.config import ConfigError, preset
from worldmodels.mdrnn import MDRNN
from worldmodels.runs import RunDir, write_bytes, write_json
from worldmodels.runs import load_mdrnn, load_vae
from worldmodels.train import stage_summary, train_mdrnn

CFG = preset(
    "tiny",
    **{
        "cma.population": 4, "cma.generations": 1, "cma.max_steps": 15, "cma.eval_episodes": 1,
        "cma.workers": 1, "cma.envs_per_worker": 4, "eval.episodes": 2,
    },
)


@pytest.fixture()
def main_run(fake_run):
    """A main run whose V and M are finished (random weights stand in for trained ones)."""
    return fake_run(CFG)


def test_each_ablation_changes_one_thing():
    assert ablation_config(CFG, "z").controller.kind == "z"
    assert ablation_config(CFG, "z_hidden").controller.kind == "z_hidden"
    untrained = ablation_config(CFG, "untrained_m")
    assert untrained.mdrnn.untrained and untrained.controller.kind == "zh"
    for name in ABLATIONS:
        assert len(CFG.differences(ablation_config(CFG, name))) == 1, name
    with pytest.raises(ValueError, match="unknown ablation 'w'.*z, z_hidden, untrained_m"):
        ablation_config(CFG, "w")


def test_untrained_m_is_the_seeded_initialisation(tmp_path):
    cfg = CFG.replace(**{"mdrnn.untrained": True})
    run = RunDir(tmp_path / "r")
    model = train_mdrnn(cfg, run, quiet=True)  # no data, no latents: nothing to train on
    torch.manual_seed(cfg.train_seed)
    m = cfg.mdrnn
    fresh = MDRNN(cfg.vae.z_size, 3, m.hidden_size, m.n_gaussians, reward_head=True, done_head=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((run.mdrnn / "done.json").read_text())["untrained"] is True
    assert "untrained" in stage_summary(run, "mdrnn")
    other = train_mdrnn(cfg.replace(train_seed=1), RunDir(tmp_path / "s"), quiet=True)
    assert not torch.equal(other.lstm.weight_hh_l0, model.lstm.weight_hh_l0)


@pytest.mark.parametrize("name", ["z", "untrained_m"])
def test_ablation_trains_and_evaluates_at_tiny(main_run, name):
    results = run_ablation(CFG, main_run, name, quiet=True)
    sub = ablation_dir(main_run, name)
    assert results["episodes"] == CFG.eval.episodes and np.isfinite(results["mean"])
    assert results["seeds"] == [CFG.eval.seed + i for i in range(CFG.eval.episodes)]
    assert json.loads((sub.path / "eval" / "results.json").read_text())["mean"] == results["mean"]
    # V is the main run's; M is the main run's nowhere: absent for 'z', untrained for 'untrained_m'.
    assert torch.equal(load_vae(sub).fc_mu.weight, load_vae(main_run).fc_mu.weight)
    if name == "untrained_m":
        assert not torch.equal(load_mdrnn(sub).lstm.weight_hh_l0, load_mdrnn(main_run).lstm.weight_hh_l0)
    else:
        assert not (sub.path / "mdrnn" / "mdrnn.safetensors").exists()
    # Run again: finished, so it loads the results without training or evaluating.
    before = (sub.path / "eval" / "results.json").stat().st_mtime_ns
    assert run_ablation(CFG, main_run, name, quiet=True) == results
    assert (sub.path / "eval" / "results.json").stat().st_mtime_ns == before

    rows = table(main_run)
    assert [r["name"] for r in rows] == [MAIN, name]
    assert rows[1]["mean"] == results["mean"] and rows[1]["generations"] == CFG.cma.generations
    c = CFG.cma  # one generation of training, validated once, no final selection
    assert rows[1]["controller_episodes"] == c.population * c.episodes_per_candidate + c.eval_episodes
    assert "not evaluated" in format_table(rows)  # the main run has no evaluation here


def test_ablation_needs_the_main_runs_v(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="vae.*not finished"):
        run_ablation(CFG, run, "z", quiet=True)


def test_is_evaluated_follows_the_results_file(main_run):
    from worldmodels.ablations import is_evaluated

    assert not is_evaluated(main_run, "z")
    run_ablation(CFG, main_run, "z", quiet=True, evaluate=False)
    assert not is_evaluated(main_run, "z")  # trained, not evaluated
    run_ablation(CFG, main_run, "z", quiet=True)
    assert is_evaluated(main_run, "z")


def test_a_controller_evolved_for_longer_is_evaluated_again(main_run):
    from worldmodels.ablations import is_evaluated

    first = run_ablation(CFG, main_run, "z", quiet=True)
    assert first["controller_generations"] == 1 and first["controller_generation"] == 0
    longer = CFG.replace(**{"cma.generations": 3})
    # Continued and interrupted (history.csv has grown, done.json not yet), then finished unevaluated:
    # the results on disk are the one-generation controller's, stale, neither returned nor tabled.
    for stop, evaluate in ((2, True), (None, False)):
        assert run_ablation(longer, main_run, "z", quiet=True, max_generations=stop, evaluate=evaluate) is None
        assert json.loads((ablation_dir(main_run, "z").path / "eval" / "results.json").read_text()) == first
        assert not is_evaluated(main_run, "z")
        row = table(main_run)[1]
        assert row["generations"] == (stop or 3) and "mean" not in row
    second = run_ablation(longer, main_run, "z", quiet=True)
    assert second["controller_generations"] == 3 and second["seconds"] != first["seconds"]
    assert table(main_run)[1]["mean"] == second["mean"]


def test_table_counts_training_validation_and_selection_episodes(tmp_path):
    cfg = preset("book")
    run = RunDir(tmp_path / "run")
    run.bind(cfg)
    lines = ["generation,fitness_mean,val_mean,seconds"] + [
        f"{g},1.0,{'500.0' if g % 10 == 9 else ''},30.0" for g in range(20)
    ]
    write_bytes(run.controller / "history.csv", ("\n".join(lines) + "\n").encode())
    row = table(run)[0]
    assert row["generations"] == 20 and row["controller_seconds"] == 600.0
    assert row["controller_episodes"] == 20 * 16 * 4 + 2 * 16
    write_json(run.controller / "selection.json", {"candidates": [{}, {}, {}], "selection_episodes": 48})
    assert table(run)[0]["controller_episodes"] == 20 * 16 * 4 + 2 * 16 + 3 * 48
    assert "1,456" in format_table(table(run))


def test_markdown_table_bolds_scores_and_marks_rows_not_evaluated():
    rows = [
        {"label": "full", "paper": "906 ± 21", "mean": 805.24, "std": 145.17, "min": 261.6, "max": 918.2,
         "generations": 120, "controller_episodes": 8064, "controller_seconds": 6000.0, "eval_seconds": 480.0},
        {"label": "untrained", "paper": "870 ± 120"},
    ]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4 and all(line.count("|") == 11 for line in lines)
    assert lines[2] == "| full | 906 ± 21 | **805.2 ± 145.2** | 262 | 918 | 120 | 8,064 | 1.80 | | |"
    assert lines[3] == "| untrained | 870 ± 120 | not evaluated yet | | | | | | | |"


# ----------------------------------------------------------------------------- paired comparison, seeds
def _results(returns, seeds) -> dict:
    r = np.asarray(returns, dtype=float)
    return {"returns": list(map(float, r)), "seeds": list(seeds), "episodes": len(r), "mean": float(r.mean()),
            "std": float(r.std()), "min": float(r.min()), "max": float(r.max()), "seconds": 1.0}


def test_paired_difference_and_its_standard_error():
    a = _results([10, 20, 30, 40], [1, 2, 3, 4])
    b = _results([40, 8, 21, 25], [4, 1, 2, 3])  # the same tracks in another order
    d = paired(a, b)  # per track: 2, -1, 5, 0
    assert d == Paired(1.5, pytest.approx(np.sqrt(7) / 2), 4)  # sample std sqrt(21 / 3), over sqrt(4)
    assert paired(b, a).difference == -1.5
    assert np.isnan(paired(_results([1], [7]), _results([3], [7])).se)
    with pytest.raises(ValueError, match=r"a has seeds \[1-4\] \(4 tracks\), b has seeds \[1, 2, 3, 5\] \(4 tracks\)"):
        paired(a, _results([1, 2, 3, 4], [1, 2, 3, 5]))


def test_seed_runs_change_only_the_training_seed():
    assert seed_run_names(1) == []
    assert seed_run_names(3) == ["seed2_zh", "seed2_z_hidden", "seed3_zh", "seed3_z_hidden"]
    full2 = ablation_config(CFG, "seed2_zh")
    assert CFG.differences(full2) == [f"cma.seed: {CFG.cma.seed} != {CFG.cma.seed + SEED_STRIDE}"]
    hidden3 = ablation_config(CFG, "seed3_z_hidden")
    assert hidden3.controller.kind == "z_hidden" and hidden3.cma.seed == CFG.cma.seed + 2 * SEED_STRIDE
    started = CFG.replace(**{"cma.x0": "runs/x/controller/dream.safetensors"})  # the full model's controller
    assert ablation_config(started, "seed2_zh").cma.x0 == started.cma.x0
    assert [ablation_config(started, n).cma.x0 for n in ("seed2_z_hidden", *ABLATIONS)] == [""] * 4
    for bad in ("seed1_zh", "seed2_z", "seed2_untrained_m"):
        with pytest.raises(ValueError, match=f"unknown ablation '{bad}'.*seedK_zh"):
            ablation_dir("runs/x", bad)
    near = CFG.replace(**{"eval.seed": CFG.cma.seed + SEED_STRIDE + 10})  # seed 2's training tracks
    with pytest.raises(ConfigError, match="eval.seed.*overlap the tracks of cma.seed"):
        ablation_config(near, "seed2_zh")


def test_table_compares_rows_with_the_full_model_and_gives_the_spread_between_seeds(tmp_path):
    tracks = [CFG.eval.seed + i for i in range(4)]
    main = RunDir(tmp_path / "run")
    main.bind(CFG)
    scores = {MAIN: [10, 20, 30, 40], "z": [8, 21, 25, 40], "z_hidden": [12, 20, 30, 42],
              "seed2_zh": [11, 20, 33, 40], "seed2_z_hidden": [0, 20, 30, 40]}
    for name, returns in scores.items():
        run = main if name == MAIN else ablation_dir(main, name)
        run.bind(ablation_config(CFG, name) if name != MAIN else CFG)
        write_json(run.eval / "results.json", _results(returns, tracks))
    rows = table(main)
    assert [r["name"] for r in rows] == [MAIN, "z", "z_hidden", "seed2_zh", "seed2_z_hidden"]
    assert rows[2]["label"] == ABLATIONS["z_hidden"].label
    assert rows[4]["label"] == ABLATIONS["z_hidden"].label + " (training seed 2)"
    assert "vs_full" not in rows[0]
    assert rows[1]["vs_full"] == Paired(-1.5, pytest.approx(np.sqrt(7) / 2), 4)
    assert rows[2]["vs_full"].difference == 1.0 and rows[3]["vs_full"].difference == 1.0
    assert rows[0]["seed_means"] == [25.0, 26.0] and rows[0]["seed_spread"] == 1.0
    assert rows[2]["seed_means"] == [26.0, 22.5] and rows[2]["seed_spread"] == 3.5
    assert "seed_spread" not in rows[1]
    text = format_table(rows)
    assert "-1.5 ± 1.3" in text and "3.5 (2 seeds)" in text
    assert markdown_table(rows).splitlines()[4].endswith("| +1.0 ± 0.6 | 3.5 (2 seeds) |")  # z_hidden: 2, 0, 0, 2


def test_a_seed_run_trains_and_evaluates_at_tiny(main_run):
    results = run_ablation(CFG, main_run, "seed2_z_hidden", quiet=True)
    sub = ablation_dir(main_run, "seed2_z_hidden")
    assert sub.path == main_run.path / "ablations" / "seed2_z_hidden"
    cfg = sub.load_config()
    assert cfg.cma.seed == CFG.cma.seed + SEED_STRIDE and cfg.controller.kind == "z_hidden"
    assert torch.equal(load_vae(sub).fc_mu.weight, load_vae(main_run).fc_mu.weight)  # V is shared
    assert results["seeds"] == [CFG.eval.seed + i for i in range(CFG.eval.episodes)]  # the same evaluation tracks
    assert [r["name"] for r in table(main_run)] == [MAIN, "seed2_z_hidden"]


def test_results_of_a_controller_chosen_again_are_stale(tmp_path):
    from worldmodels.evaluation import current_results
    from worldmodels.controller import ControllerShape, save_controller

    run = RunDir(tmp_path / "run")
    run.bind(CFG)
    shape = ControllerShape.from_config(CFG)
    save_controller(run.controller / "best.safetensors", np.zeros(shape.n_params), shape, {"generation": "7"})
    write_json(run.controller / "done.json", {"generations": 10})
    results = {**_results([1.0, 2.0], [5, 6]), "controller_generations": 10, "controller_generation": 7}
    write_json(run.eval / "results.json", results)
    assert current_results(run) == results
    save_controller(run.controller / "best.safetensors", np.ones(shape.n_params), shape, {"generation": "5"})
    assert current_results(run) is None  # a larger final selection chose generation 5 instead


def test_histories_are_the_main_runs_then_each_ablations_that_has_one(tmp_path):
    from worldmodels.ablations import ABLATIONS, MAIN_ROW, ablation_dir, histories
    from worldmodels.runs import RunDir

    run = RunDir(tmp_path / "run")
    assert histories(run) == {}
    for folder in (run.controller, ablation_dir(run, "z").controller):
        folder.mkdir(parents=True)
        (folder / "history.csv").write_text("generation\n0\n")
    assert histories(run) == {
        MAIN_ROW.label: run.controller / "history.csv",
        ABLATIONS["z"].label: ablation_dir(run, "z").controller / "history.csv",
    }
