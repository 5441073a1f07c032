"""The notebook API: train a recipe, load the finished run, classify and embed new inputs with
its weights and preprocessing (the run's own evaluation numbers again), compare runs in a table."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import ROOT
from mmkit import Trained, build, load_run, metrics_table, train
from mmkit.errors import MMKitError

TINY = ["train.max_steps=6", "train.batch_size=16", "train.warmup=2", "eval.batch_size=20", "eval.every=3",
        "train.checkpoint_every=6", "data.num_samples=96", "data.val.num_samples=40", "train.num_workers=0"]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A bf16 run: a loaded run computes under the run's autocast, as its evaluation did."""
    folder = tmp_path_factory.mktemp("runs")
    return train(ROOT / "recipes" / "diagnosis_fused.toml", *TINY, f"run.output_dir={folder}",
                 "model.text.layers=1", "model.fusion.layers=1", "run.precision=bf16")


def test_a_loaded_run_classifies_its_held_out_studies_as_its_own_evaluation_did(fused):
    again = load_run(fused.folder)
    samples = [again.val_set[i] for i in range(len(again.val_set))]
    scores = again.classify(images=[s["image"] for s in samples], texts=[s["text"] for s in samples], batch_size=7)
    labels = torch.stack([s["label"] for s in samples])
    assert scores.shape == (40, 5) and ((0 <= scores) & (scores <= 1)).all()
    metrics = again.task.evaluate({"scores": scores, "labels": labels})
    summary = json.loads((fused.folder / "summary.json").read_text())
    assert set(metrics) == set(summary["metrics"]) | {f"chance/{k}" for k in summary["chance"]}
    for key, value in summary["metrics"].items():  # thresholds chosen on the run's validation split included
        assert metrics[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert again.class_names == ("nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax")


def test_evaluate_judges_the_run_again_on_another_split(fused):
    again = fused.evaluate("data.val.num_samples=40")  # its own held-out set: its own numbers
    assert again["metrics"] == pytest.approx(fused.metrics, nan_ok=True) and again["evaluated"] == str(fused.folder)
    test = fused.evaluate("data.val.split=test")
    assert test["metrics"] != fused.metrics and "threshold/nodule" in test["metrics"]  # applied as chosen on val
    assert test["metrics"]["threshold/nodule"] == fused.metrics["threshold/nodule"]


def test_embed_gives_each_encoders_pooled_features_and_inputs_are_checked(fused):
    samples = [fused.val_set[i] for i in range(3)]
    embedded = fused.embed(images=[s["image"] for s in samples], texts=[s["text"] for s in samples])
    batch = fused.batch(images=[s["image"] for s in samples], texts=[s["text"] for s in samples])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the run's precision
        assert torch.allclose(embedded["image"], fused.parts.encoders["image"](batch["image"]).pooled.float(), atol=1e-6)
    assert embedded["text"].shape == (3, 128)
    with pytest.raises(MMKitError, match="the run's model reads image, text; give text too"):
        fused.classify(images=[samples[0]["image"]])
    with pytest.raises(MMKitError, match="the run has no audio encoder"):
        fused.embed(audio=[torch.zeros(10)])
    with pytest.raises(MMKitError, match="give the same number"):
        fused.classify(images=[samples[0]["image"]], texts=["a", "b"])


def test_attention_gives_each_words_weights_over_the_image_grid(fused):
    report = "Frontal chest radiograph. Moderate right pleural effusion. Impression: pleural effusion."
    words, maps = fused.attention(fused.val_set[0]["image"], report)
    assert words[8:12] == ["ple", "ural", "ef", "fusion"] and words.count("fusion") == 2 and words[-1] == "<end_of_text>"
    assert maps.shape == (len(words), 8, 8)  # 64 px in patches of 8
    assert (maps >= 0).all() and (maps.sum(dim=(1, 2)) <= 1 + 1e-5).all()  # softmax weights; the cls token has the rest


def test_metrics_table_puts_runs_side_by_side_with_the_chance_level(fused, tmp_path):
    table = metrics_table([fused], prefix="auroc/")
    assert list(table.index) == [f"auroc/{name}" for name in fused.class_names if f"auroc/{name}" in fused.metrics]
    assert list(table.columns) == [fused.name, "chance"] and (table["chance"] == 0.5).all()
    assert table.iloc[0, 0] == fused.metrics[table.index[0]]
    other = tmp_path / "copy" / fused.name
    other.mkdir(parents=True)
    (other / "summary.json").write_text((fused.folder / "summary.json").read_text())
    twice = metrics_table([fused, other], prefix="f1/")  # runs named alike: their folders tell them apart
    assert list(twice.columns) == [str(fused.folder), str(other), "chance"] and len(twice) == 5
    with pytest.raises(MMKitError, match="has no summary.json"):
        metrics_table([tmp_path])
    with pytest.raises(MMKitError, match="has no model.safetensors: load the folder of a finished run"):
        (tmp_path / "recipe.toml").write_text("")
        load_run(tmp_path)


def test_a_contrastive_run_embeds_into_its_shared_space(tmp_path):
    run = train(ROOT / "recipes" / "diagnosis_contrastive.toml", *TINY, f"run.output_dir={tmp_path}",
                "model.text.layers=1")
    with pytest.raises(MMKitError, match=r"its task \(clip_retrieval\) does not classify"):
        run.classify(images=[run.val_set[0]["image"]], texts=["x"])
    # the same weights judged by prompts, as `mmkit eval <run> 'task={name="zero_shot", ...}'`: only images are read
    zero_shot = Trained(run.folder, run.recipe, replace(run.parts, task=build_zero_shot(run)), run.summary, run.device)
    scores = zero_shot.classify(images=[run.val_set[i]["image"] for i in range(3)])
    assert scores.shape == (3, 5) and ((0 < scores) & (scores < 1)).all()
    with pytest.raises(MMKitError, match="no text -> image attention over an image grid"):
        run.attention(run.val_set[0]["image"], "No pneumothorax.")
    reports = ["Frontal chest radiograph. Impression: pleural effusion.", "No pneumothorax."]
    embedded = run.embed(texts=reports)
    assert set(embedded) == {"text"} and torch.allclose(embedded["text"].norm(dim=1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(embedded["text"], run.task.embed(run.batch(images=[run.val_set[0]["image"]] * 2,
                                                                          texts=reports), "text"), atol=1e-6)


def build_zero_shot(run):
    task = build("tasks", "zero_shot", encoders=run.parts.encoders, data=run.parts.val_set.info, embed_dim=128,
                 templates=["Impression: {}."], negative_templates=["No {}."])
    task.load_state_dict(run.task.state_dict())
    return task.eval()
