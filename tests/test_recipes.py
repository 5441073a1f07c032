"""The shipped recipes run as shipped (shortened), and training really learns."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_mmkit
from mmkit.data.examples import write_example
from mmkit.engine.run import Run
from mmkit.plugins import get_registry
from mmkit.recipe import load_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
COMMON = ["train.max_steps=4", "train.batch_size=16", "eval.batch_size=32", "eval.every=2",
          "train.checkpoint_every=2", "train.log_every=1"]
GENERATED = ["data.num_samples=64", "data.val.num_samples=32"]
WRITTEN = ["data.example.train=64", "data.example.val=32"]  # file recipes: their example data, smaller


def writes_files(recipe) -> bool:
    return "example" in load_recipe(recipe).table("data")


def runs_it_starts_from(recipe) -> dict[str, str]:
    """The parts that take another shipped recipe's run (init_from "runs/<its name>"), by part."""
    model = load_recipe(recipe).table("model")
    return {part: str(table["init_from"]).removeprefix("runs/") for part, table in model.items()
            if str(table.get("init_from", "")).startswith("runs/")}


STANDALONE = [r for r in RECIPES if not runs_it_starts_from(r)]
FOLLOWING = [r for r in RECIPES if runs_it_starts_from(r)]


@pytest.mark.parametrize("recipe", STANDALONE, ids=lambda p: p.stem)
def test_each_recipe_runs_end_to_end(recipe, tmp_path, monkeypatch):
    """A file recipe runs from an empty folder and writes its example data there first."""
    short = COMMON + (WRITTEN if writes_files(recipe) else GENERATED)
    folder = tmp_path if writes_files(recipe) else ROOT  # the hf recipe's model folder is relative to the repo
    done = run_mmkit("run", recipe, *short, f"run.output_dir={tmp_path}", cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / recipe.stem
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["metrics"] and summary["chance"]
    assert f"run folder: {folder}" in done.stdout
    for name in ("recipe.toml", "metrics.jsonl", "model.safetensors", "report.html", "checkpoints/step_00000004"):
        assert (folder / name).exists(), name
    streamed = load_recipe(recipe).table("data")["name"] == "webdataset"  # no figure of held-out samples: said
    assert ("The held-out set is streamed, so the figures" in (folder / "report.html").read_text()) == streamed
    if writes_files(recipe):
        assert "writing [data.example]: synthetic_shapes, 64 train + 32 val samples" in done.stdout
        assert summary["skipped_samples"]["train"]["samples"] == 0
        monkeypatch.chdir(tmp_path)
        said: list[str] = []
        write_example(load_recipe(recipe, short), get_registry(), said.append)
        assert said == []  # written once: the files are there now, and nothing is ever overwritten


@pytest.mark.parametrize("recipe", FOLLOWING, ids=lambda p: p.stem)
def test_each_recipe_that_follows_another_runs_after_it(recipe, tmp_path):
    """A recipe that starts from another recipe's run (init_from "runs/<name>") runs as shipped
    once that run is there; here both shortened, into a scratch folder."""
    overrides = [f"run.output_dir={tmp_path}", *COMMON, *GENERATED]
    for name in set(runs_it_starts_from(recipe).values()):
        first = run_mmkit("run", ROOT / "recipes" / f"{name}.toml", *overrides, cwd=ROOT)
        assert first.returncode == 0, first.stderr[-3000:]
    overrides += [f"model.{part}.init_from={tmp_path / name}" for part, name in runs_it_starts_from(recipe).items()]
    done = run_mmkit("run", recipe, *overrides, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / recipe.stem / "summary.json").read_text())
    assert summary["metrics"] and summary["chance"]
    for part, name in runs_it_starts_from(recipe).items():
        assert f"model.{part}: init_from {tmp_path / name}: " in done.stdout, part


def test_training_beats_chance_by_far(tmp_path):
    """A short audio-text run (tiny encoders) must retrieve far better than a random ranking."""
    recipe = load_recipe(ROOT / "recipes" / "audio_text_retrieval.toml", [
        f"run.output_dir={tmp_path}", "train.max_steps=80", "train.warmup=10", "data.num_samples=1280",
        "data.val.num_samples=200", "model.audio.channels=8", "model.text.width=64", "model.text.layers=1",
        "task.embed_dim=64", "train.checkpoint_every=0", "eval.every=0", "train.num_workers=0",
    ])
    summary = Run(recipe).fit()
    for direction in ("audio_to_text", "text_to_audio"):
        achieved, chance = summary["metrics"][f"{direction}/R@5"], summary["chance"][f"{direction}/R@5"]
        assert achieved > 4 * chance and achieved > 0.5, (direction, achieved, chance)


def test_example_data_fills_only_missing_splits_and_spreads_over_every_shard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = load_recipe(ROOT / "recipes" / "clip_retrieval_shards.toml",
                         ["data.example.train=13", "data.example.val=3", "data.val.urls=v-{0..2}.tar"])
    said: list[str] = []
    write_example(shards, get_registry(), said.append)
    assert said == ["writing [data.example]: synthetic_shapes, 13 train + 3 val samples, to "
                    "data/shapes-shards/train-000000.tar, v-0.tar"]
    from mmkit.data.shards import WebDataset

    sizes = [sum(1 for _ in WebDataset(f"data/shapes-shards/train-{i:06d}.tar")) for i in range(8)]
    assert sorted(sizes) == [1, 1, 1, 2, 2, 2, 2, 2] and sum(sizes) == 13
    (tmp_path / "v-1.tar").unlink()
    before = (tmp_path / "data/shapes-shards/train-000000.tar").stat().st_mtime_ns
    write_example(shards, get_registry(), said.append)
    assert said[-1].startswith("writing [data.example]: synthetic_shapes, 3 val samples")
    assert (tmp_path / "data/shapes-shards/train-000000.tar").stat().st_mtime_ns == before  # train untouched
