"""The classification task: its losses by hand, its metrics and chance levels on fixed
outputs, thresholds per label, clear errors, and a recipe that learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_mmkit
from mmkit import build
from mmkit.errors import MMKitError
from mmkit.samples import DatasetInfo

SINGLE = DatasetInfo(keys=("id", "image", "label"), class_names=("cat", "dog", "fox"), label_kind="single")
MULTI = DatasetInfo(keys=("id", "image", "label"), class_names=("cat", "dog", "fox"), label_kind="multi")


def tiny_task(data: DatasetInfo = SINGLE, **params):
    encoder = build("image_encoders", "timm", model_name="test_resnet", image_size=32)
    return build("tasks", "classification", encoders={"image": encoder}, data=data, **params).eval()


def batch(labels: torch.Tensor) -> dict:
    return {"image": torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(0)), "label": labels}


def test_single_label_loss_is_weighted_cross_entropy_by_hand():
    task = tiny_task(class_weights=[1.0, 2.0, 0.5])
    labels = torch.tensor([0, 1, 1, 2])
    logits = task.logits(batch(labels))
    log_p = logits.log_softmax(dim=1)[torch.arange(4), labels]
    weights = torch.tensor([1.0, 2.0, 2.0, 0.5])
    expected = -(weights * log_p).sum() / weights.sum()  # a weighted mean: the weights normalise it
    assert task.training_step(batch(labels))["loss/classification"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_label_smoothing_spreads_a_share_of_the_target_over_all_classes():
    task = tiny_task(label_smoothing=0.3)
    labels = torch.tensor([0, 2])
    log_p = task.logits(batch(labels)).log_softmax(dim=1)
    target = torch.full((2, 3), 0.3 / 3)
    target[torch.arange(2), labels] += 0.7
    expected = -(target * log_p).sum(dim=1).mean()
    assert task.training_step(batch(labels))["loss/classification"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_multi_label_loss_is_binary_cross_entropy_with_positive_weights_by_hand():
    task = tiny_task(MULTI, class_weights=[3.0, 1.0, 1.0])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    p = task.logits(batch(labels)).sigmoid()
    terms = -(torch.tensor([3.0, 1.0, 1.0]) * labels * p.log() + (1 - labels) * (1 - p).log())
    assert task.training_step(batch(labels))["loss/classification"].item() == pytest.approx(terms.mean().item(), rel=1e-5)


def test_evaluate_gives_each_metric_beside_the_majority_class_level():
    task = tiny_task()
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1, 2, 0])  # the third item is wrong: class 1 called 0
    metrics = task.evaluate({"scores": scores, "labels": labels})
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    assert metrics["recall_macro"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    assert metrics["chance/accuracy"] == pytest.approx(2 / 5)  # always "cat" (first of the two most frequent)
    assert metrics["chance/auroc_macro"] == pytest.approx(0.5)
    assert "top5_accuracy" not in metrics  # 3 classes
    assert task.evaluate({"scores": torch.empty(0, 3), "labels": torch.empty(0, dtype=torch.long)}) == {}


def test_multi_label_thresholds_are_per_label():
    scores = torch.tensor([[0.55, 0.55, 0.1], [0.2, 0.9, 0.65]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    everywhere_half = tiny_task(MULTI).evaluate({"scores": scores, "labels": labels})
    per_label = tiny_task(MULTI, thresholds=[0.5, 0.6, 0.6]).evaluate({"scores": scores, "labels": labels})
    assert everywhere_half["accuracy"] == pytest.approx(1 / 2)  # item 0 also gets "dog" at 0.55
    assert per_label["accuracy"] == pytest.approx(1.0)  # "dog" needs 0.6
    assert per_label["auroc/fox"] == pytest.approx(1.0) and "auroc/cat" in per_label


def test_unknown_labels_are_left_out_of_the_loss_and_the_training_accuracy():
    task = tiny_task(MULTI)
    labels = torch.tensor([[1.0, float("nan"), 1.0], [float("nan"), 0.0, 1.0]])
    logits = task.logits(batch(labels))
    known = ~labels.isnan()
    expected = F.binary_cross_entropy_with_logits(logits[known], labels[known])  # the mean over the 4 known
    step = task.training_step(batch(labels))
    assert step["loss/classification"].item() == pytest.approx(expected.item(), rel=1e-5)
    right = ((logits.sigmoid() >= 0.5) == (labels == 1)) | ~known
    assert step["accuracy"].item() == pytest.approx(right.all(dim=1).float().mean().item())


def test_thresholds_chosen_on_the_validation_split_are_kept_with_the_weights():
    from mmkit.metrics.classification import best_thresholds

    scores = torch.tensor([[0.9, 0.2, 0.3], [0.4, 0.8, 0.35], [0.3, 0.1, 0.6], [0.2, 0.7, 0.1]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    task = tiny_task(MULTI, thresholds="val")
    before = task.evaluate({"scores": scores, "labels": labels})
    task.calibrate({"scores": scores, "labels": labels})
    chosen = best_thresholds(scores, labels, torch.full((3,), 0.5))
    assert task.thresholds.tolist() == pytest.approx(chosen.tolist()) and chosen.tolist() == pytest.approx([0.4, 0.7, 0.35])
    after = task.evaluate({"scores": scores, "labels": labels})
    assert before["f1/cat"] == pytest.approx(2 / 3) and after["f1/cat"] == 1.0 and after["threshold/fox"] == pytest.approx(0.35)
    assert "thresholds" in task.state_dict() and "thresholds" not in tiny_task(MULTI).state_dict()
    other = tiny_task(MULTI, thresholds="val")
    other.load_state_dict(task.state_dict())
    assert other.evaluate({"scores": scores, "labels": labels}) == after  # another split is judged with them


@pytest.mark.parametrize("params, data, message", [
    ({"thresholds": "val"}, SINGLE, 'thresholds = "val" chooses multi-label thresholds'),
    ({}, DatasetInfo(keys=("id", "image")), "classification needs labelled data"),
    ({"modality": "text"}, SINGLE, "set task.modality to one of the recipe's encoders (image), not 'text'"),
    ({"thresholds": [0.5, 0.5]}, MULTI, "thresholds has 2 values for 3 classes"),
    ({"label_smoothing": 0.1}, MULTI, "label_smoothing applies to single-label data"),
])
def test_bad_settings_fail_in_one_line(params, data, message):
    with pytest.raises(MMKitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_task(data, **params)


def test_image_classifier_recipe_learns_shapes_from_an_image_folder(tmp_path):
    """The shipped recipe, shortened (a tiny ResNet, 60 steps), far above the majority class."""
    done = run_mmkit("run", ROOT / "recipes" / "image_classifier.toml", "model.image.model_name=resnet10t",
                     "data.example.train=640", "data.example.val=200", "train.max_steps=60", "train.warmup=10",
                     "eval.every=30", "train.checkpoint_every=0", f"run.output_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "image_classifier"
    summary = json.loads((folder / "summary.json").read_text())
    metrics, chance = summary["metrics"], summary["chance"]
    assert metrics["accuracy"] > 0.8 and metrics["accuracy"] > 2 * chance["accuracy"], (metrics, chance)
    assert metrics["auroc_macro"] > 0.9 and chance["auroc_macro"] == 0.5
    assert not math.isnan(metrics["f1_macro"])
    for figure in ("training_curves", "roc_curves", "confusion_matrix"):
        assert (folder / f"{figure}.png").exists(), figure
    assert 'src="confusion_matrix.png"' in (folder / "report.html").read_text()


def test_a_diverged_model_is_not_scored_at_chance():
    labels = torch.tensor([0, 1, 1, 2, 0])
    metrics = tiny_task().evaluate({"scores": torch.full((5, 3), float("nan")), "labels": labels})
    assert all(math.isnan(metrics[key]) for key in ("accuracy", "f1_macro", "auroc_macro"))
    assert metrics["chance/accuracy"] == pytest.approx(2 / 5)  # the level to compare with stays


@pytest.mark.parametrize("data, labels, message", [
    (MULTI, torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, float("nan")]]), "multi-label targets must be 0, 1 or NaN"),
    (SINGLE, torch.tensor([0, 3]), r"class indices 0 to 2 \(3 classes\); found 3"),
])
def test_evaluate_refuses_labels_it_cannot_score(data, labels, message):
    with pytest.raises(MMKitError, match=message):
        tiny_task(data).evaluate({"scores": torch.full((2, 3), 0.5), "labels": labels})
