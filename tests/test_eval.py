"""`mmkit eval RUN`: a finished run's weights evaluated again give its own metrics exactly, on
other held-out data they give new ones, and weights that do not fit are refused in one line."""

from __future__ import annotations

import json

from conftest import run_mmkit
from mmkit.engine.run import Run
from mmkit.recipe import load_recipe


def test_eval_reproduces_the_runs_metrics_and_evaluates_other_held_out_data(tiny_recipe, tmp_path):
    trained = Run(load_recipe(tiny_recipe)).fit()
    run = tmp_path / "runs" / "tiny"

    done = run_mmkit("eval", run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"eval folder: {run / 'eval'}" in done.stdout
    again = json.loads((run / "eval" / "summary.json").read_text())
    assert again["metrics"] == trained["metrics"] and again["chance"] == trained["chance"]  # exactly
    assert again["evaluated"] == str(run) and again["skipped_samples"]["val"]["samples"] == 0
    for name in ("recipe.toml", "report.html", "similarity.png", "retrieval_examples.png"):
        assert (run / "eval" / name).exists(), name
    assert (run / "summary.json").read_text() == json.dumps(trained, indent=2) + "\n"  # the run is untouched

    other = run_mmkit("eval", run, "data.val.num_samples=48", "data.val.seed=7")
    assert other.returncode == 0, other.stderr[-3000:]
    changed = json.loads((run / "eval-2" / "summary.json").read_text())  # a second eval never overwrites the first
    assert changed["metrics"] != trained["metrics"]
    assert changed["chance"]["image_to_text/R@1"] < trained["chance"]["image_to_text/R@1"]  # 48 items, not 32


def test_eval_refuses_weights_that_do_not_fit_and_folders_that_are_not_runs(tiny_recipe, tmp_path):
    Run(load_recipe(tiny_recipe)).fit()
    run = tmp_path / "runs" / "tiny"
    wider = run_mmkit("eval", run, "task.embed_dim=64")
    assert wider.returncode == 2
    assert wider.stderr.startswith(f"mmkit: error: {run / 'model.safetensors'} does not fit the model this recipe "
                                   "builds (projections.image.weight is [32, ")
    assert wider.stderr.count("\n") == 1 and "only data and evaluation settings may change" in wider.stderr
    assert not (run / "eval").exists()
    nowhere = run_mmkit("eval", tmp_path)
    assert nowhere.returncode == 2 and "has no recipe.toml: give the folder of a finished run" in nowhere.stderr
