"""zero_shot: class vectors are the templates' embeddings averaged by hand, an item takes its
most similar class, per-class accuracy is each class's share right, and a clip_retrieval
run's weights evaluate as zero-shot with `mmkit eval`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from conftest import run_mmkit
from mmkit import build
from mmkit.errors import MMKitError
from mmkit.samples import DatasetInfo

COLOURS = DatasetInfo(keys=("id", "image", "text", "label"), class_names=("red", "blue", "green"), label_kind="single")
TEMPLATES = ["a large {} circle", "a small {} square in the top left"]


FINDINGS = DatasetInfo(keys=("id", "image", "text", "label"), class_names=("nodule", "effusion"), label_kind="multi")


def tiny_task(data=COLOURS, **params):
    encoders = {"image": build("image_encoders", "timm", model_name="test_vit", image_size=32),
                "text": build("text_encoders", "transformer", width=32, layers=1, heads=2, context_length=16)}
    return build("tasks", "zero_shot", encoders=encoders, data=data, embed_dim=16, **params).eval()


def test_class_vectors_average_each_classes_prompts():
    task = tiny_task(templates=TEMPLATES)
    text = task.encoders["text"]
    with torch.no_grad():
        vectors = task.class_embeddings()
        for c, name in enumerate(COLOURS.class_names):
            prompts = default_collate([text.preprocess(t.format(name)) for t in TEMPLATES])
            each = F.normalize(task.projections["text"](text(prompts).pooled), dim=-1)  # unit vectors, then mean
            assert torch.allclose(vectors[c], F.normalize(each.mean(dim=0), dim=-1), atol=1e-6)
    assert vectors.shape == (3, 16)


def test_an_item_takes_its_most_similar_class_and_classes_are_scored_one_by_one():
    task = tiny_task()
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.8], [0.3, 0.1, 0.2]])
    labels = torch.tensor([0, 1, 1, 2, 0])  # item 2 (blue) is called red
    metrics = task.evaluate({"scores": scores, "labels": labels})
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    assert (metrics["accuracy/red"], metrics["accuracy/blue"], metrics["accuracy/green"]) == (1.0, 0.5, 1.0)
    assert metrics["chance/accuracy"] == pytest.approx(2 / 5)


def test_a_finding_is_the_softmax_over_its_negative_and_positive_prompts():
    task = tiny_task(FINDINGS, templates=["{}.", "there is {}."], negative_templates=["no {}."], temperature=0.5,
                     learn_temperature=False)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 0.0]])
    outputs = task.predict([{"image": images, "label": labels}])
    with torch.no_grad():
        image = task.embed({"image": images}, "image")
        present, absent = task.class_embeddings(), task.class_embeddings([["no nodule."], ["no effusion."]])
        pair = torch.stack([image @ absent.T, image @ present.T], dim=-1) / 0.5  # [items, findings, (no, yes)]
        expected = pair.softmax(dim=-1)[..., 1]
    assert torch.allclose(outputs["scores"], expected, atol=1e-5)
    assert torch.equal(outputs["labels"].isnan(), labels.isnan())
    metrics = task.evaluate(outputs)
    assert "threshold/nodule" not in metrics and set(metrics) >= {"auroc_macro", "f1/nodule", "ece/effusion"}
    task.calibrate(outputs)  # a training run's validation split: the thresholds are chosen there
    assert task.evaluate(outputs)["threshold/effusion"] == pytest.approx(outputs["scores"][1, 1].item())


def test_a_class_with_prompts_of_its_own_uses_them_in_place_of_the_templates():
    own = {"effusion": ["Impression: pleural effusion.", "Blunted costophrenic angle."]}
    task = tiny_task(FINDINGS, templates=["Impression: {}."], negative_templates=["No {}."], prompts=own,
                     negative_prompts={"nodule": ["No focal nodule."]})
    assert task.class_prompts == [["Impression: nodule."], own["effusion"]]
    assert task.negative_class_prompts == [["No focal nodule."], ["No effusion."]]
    with torch.no_grad():
        present, absent = task.prompts()
        vectors = {t: task.class_embeddings([[t], [t]])[0] for t in {"Impression: nodule.", *own["effusion"], "No focal nodule."}}
    assert torch.allclose(present[1], F.normalize(vectors[own["effusion"][0]] + vectors[own["effusion"][1]], dim=0),
                          atol=1e-6)  # the unit vectors of its own two prompts, averaged
    assert torch.allclose(present[0], vectors["Impression: nodule."], atol=1e-6)
    assert torch.allclose(absent[0], vectors["No focal nodule."], atol=1e-6)


@pytest.mark.parametrize("params, message", [
    ({"prompts": {"nodules": ["a nodule"]}}, r"zero_shot prompts names classes the data does not have: \['nodules'\]; "
                                             r"its classes are nodule, effusion"),
    ({"negative_prompts": {"effusion": []}}, r"zero_shot negative_prompts: \['effusion'\] need a prompt each"),
    ({"templates": [], "prompts": {"nodule": ["a nodule"]}},
     r"zero_shot: \['effusion'\] have no prompt: give templates, or prompts for each of them")])
def test_prompts_of_its_own_must_name_a_class_and_hold_a_prompt(params, message):
    with pytest.raises(MMKitError, match=message):
        tiny_task(FINDINGS, **params)


def test_classes_with_prompts_of_their_own_need_no_templates_and_single_labels_no_negatives():
    task = tiny_task(templates=[], prompts={name: [f"a {name} circle"] for name in COLOURS.class_names})
    assert task.class_prompts == [["a red circle"], ["a blue circle"], ["a green circle"]]
    with pytest.raises(MMKitError, match="negative_prompts say a finding is absent, for multi-label data"):
        tiny_task(negative_prompts={"red": ["no red"]})


def test_templates_need_one_place_for_the_name_and_data_needs_classes():
    with pytest.raises(MMKitError, match=r"each zero_shot template needs one \{\} for the class name: \['a photo'\]"):
        tiny_task(templates=["a photo"])
    with pytest.raises(MMKitError, match="zero_shot needs labelled data with named classes"):
        build("tasks", "zero_shot", encoders=tiny_task().encoders, data=DatasetInfo(keys=("id", "image", "text")))


def test_a_clip_retrieval_run_evaluates_zero_shot_without_training(tiny_recipe, tmp_path):
    done = run_mmkit("run", tiny_recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    zero_shot = run_mmkit("eval", run, 'task={name="zero_shot", embed_dim=32, templates=["a large {} circle"]}',
                          "data.label_by=colour")
    assert zero_shot.returncode == 0, zero_shot.stderr[-3000:]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["task"] == "zero_shot" and 0 <= summary["metrics"]["accuracy"] <= 1
    assert set(summary["metrics"]) >= {"top5_accuracy", "f1_macro", "accuracy/red"}  # 6 colours: top-5 applies
    assert (run / "eval" / "per_class_accuracy.png").exists()


def test_a_class_with_a_nan_score_has_no_accuracy():
    from mmkit.tasks.zero_shot import per_class_accuracy

    scores = torch.tensor([[0.9, 0.1, 0.0], [float("nan"), 0.7, 0.1], [0.1, 0.2, 0.8]])
    accuracy = per_class_accuracy(scores, torch.tensor([0, 1, 2]), COLOURS.class_names)
    assert accuracy["accuracy/red"] == 1.0 and accuracy["accuracy/green"] == 1.0
    assert torch.tensor(accuracy["accuracy/blue"]).isnan()
