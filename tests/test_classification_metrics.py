"""Classification metrics equal scikit-learn's on the same predictions: binary, multi-class,
multi-label, a class never predicted, a class absent from the labels, tied scores, labels not
known (NaN); calibration error and thresholds chosen for F1 by hand."""

from __future__ import annotations

import pytest
import torch
from sklearn import metrics as sk

from mmkit.errors import MMKitError
from mmkit.metrics.classification import (auroc, beside_chance, best_thresholds, calibration_error, chance_scores,
                                          confusion_matrix, multi_label_beside_chance, multi_label_metrics, roc_curve,
                                          single_label_metrics)

NAN = float("nan")


def probabilities(n: int, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=generator).mul(2).softmax(dim=1).double()


def sklearn_single(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    y, predicted = labels.numpy(), scores.argmax(1).numpy()
    expected = {"accuracy": sk.accuracy_score(y, predicted)}
    for average in ("macro", "micro"):
        expected[f"precision_{average}"] = sk.precision_score(y, predicted, average=average, zero_division=0)
        expected[f"recall_{average}"] = sk.recall_score(y, predicted, average=average, zero_division=0)
        expected[f"f1_{average}"] = sk.f1_score(y, predicted, average=average, zero_division=0)
    return expected


def sklearn_auroc_over_present_classes(scores: torch.Tensor, labels: torch.Tensor) -> float:
    present = [c for c in range(scores.shape[1]) if 0 < (labels == c).sum() < len(labels)]
    return sum(sk.roc_auc_score(labels.numpy() == c, scores[:, c].numpy()) for c in present) / len(present)


@pytest.mark.parametrize("classes", [2, 4, 7])
def test_single_label_metrics_equal_sklearn(classes):
    scores = probabilities(60, classes, seed=classes)
    labels = torch.randint(0, classes, (60,), generator=torch.Generator().manual_seed(1))
    labels[:classes] = torch.arange(classes)  # every class present
    metrics = single_label_metrics(scores, labels)
    for name, value in sklearn_single(scores, labels).items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    multi_class = "ovr" if classes > 2 else "raise"
    expected_auroc = sk.roc_auc_score(labels.numpy(), scores.numpy() if classes > 2 else scores[:, 1].numpy(),
                                      multi_class=multi_class)
    if classes == 2:  # sklearn's binary AUROC is the positive class's; mmkit averages both columns' one-vs-rest
        expected_auroc = (expected_auroc + sk.roc_auc_score(labels.numpy() == 0, scores[:, 0].numpy())) / 2
    assert metrics["auroc_macro"] == pytest.approx(expected_auroc, abs=1e-12)
    if classes > 5:
        expected = sk.top_k_accuracy_score(labels.numpy(), scores.numpy(), k=5, labels=list(range(classes)))
        assert metrics["top5_accuracy"] == pytest.approx(expected, abs=1e-12)
    else:
        assert "top5_accuracy" not in metrics


def test_a_class_never_predicted_and_a_class_absent_from_the_labels():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])  # class 3 never appears
    predicted = torch.tensor([0, 1, 1, 1, 0, 0, 3, 1])  # class 2 never predicted, class 3 predicted once
    scores = torch.nn.functional.one_hot(predicted, 4).double() * 0.7 + 0.075
    metrics = single_label_metrics(scores, labels)
    for name, value in sklearn_single(scores, labels).items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    assert metrics["precision_macro"] == pytest.approx((1 / 3 + 3 / 4 + 0 + 0) / 4)  # by hand: 4 classes seen
    assert metrics["auroc_macro"] == pytest.approx(sklearn_auroc_over_present_classes(scores, labels), abs=1e-12)


def test_confusion_matrix_rows_are_true_classes():
    labels, predicted = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2])
    counts = confusion_matrix(predicted, labels, 4)
    assert counts.tolist() == sk.confusion_matrix(labels.numpy(), predicted.numpy(), labels=[0, 1, 2, 3]).tolist()
    assert counts[0].tolist() == [1, 1, 0, 0]  # true class 0: once right, once called 1


def test_multi_label_metrics_equal_sklearn():
    generator = torch.Generator().manual_seed(3)
    targets = (torch.rand(50, 5, generator=generator) < torch.tensor([0.5, 0.2, 0.7, 0.05, 0.0])).double()
    scores = (targets * 0.4 + torch.rand(50, 5, generator=generator) * 0.6).clamp(0, 1)
    thresholds = torch.tensor([0.5, 0.6, 0.4, 0.5, 0.5], dtype=torch.float64)
    names = ("a", "b", "c", "d", "e")
    metrics = multi_label_metrics(scores, targets, thresholds, names)
    y, predicted = targets.numpy(), (scores >= thresholds).numpy()
    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(y, predicted))  # exact match
    for average in ("macro", "micro"):
        assert metrics[f"precision_{average}"] == pytest.approx(sk.precision_score(y, predicted, average=average, zero_division=0))
        assert metrics[f"recall_{average}"] == pytest.approx(sk.recall_score(y, predicted, average=average, zero_division=0))
        assert metrics[f"f1_{average}"] == pytest.approx(sk.f1_score(y, predicted, average=average, zero_division=0))
    present = [c for c in range(5) if 0 < y[:, c].sum() < 50]
    assert 4 not in present  # label "e" has no positives: no AUROC, left out of the macro average
    for c in present:
        assert metrics[f"auroc/{names[c]}"] == pytest.approx(sk.roc_auc_score(y[:, c], scores[:, c].numpy()))
    assert "auroc/e" not in metrics
    assert metrics["auroc_macro"] == pytest.approx(sum(metrics[f"auroc/{names[c]}"] for c in present) / len(present))


def test_auroc_counts_ties_as_half():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    positives = torch.tensor([True, True, False, False, False])
    # pairs (positive, negative): 0.9 beats all three; 0.5 ties two (half each) and beats 0.1
    assert auroc(scores, positives) == pytest.approx((3 + 0.5 + 0.5 + 1) / 6)
    assert auroc(scores, positives) == pytest.approx(sk.roc_auc_score(positives.numpy(), scores.numpy()))
    assert auroc(-scores, positives) == pytest.approx(1 - 5 / 6)  # reversed scores: the mirror image


def test_roc_curve_equals_sklearns():
    generator = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 6, (40,), generator=generator).double() / 5  # many ties
    positives = torch.rand(40, generator=generator) < 0.4
    fpr, tpr = roc_curve(scores, positives)
    sk_fpr, sk_tpr, _ = sk.roc_curve(positives.numpy(), scores.numpy(), drop_intermediate=False)
    assert fpr.tolist() == pytest.approx(sk_fpr.tolist()) and tpr.tolist() == pytest.approx(sk_tpr.tolist())


def test_chance_is_what_always_predicting_the_majority_scores():
    labels = torch.tensor([2, 2, 2, 0, 1, 2, 0, 2])  # class 2 is 5 of 8
    frequencies = chance_scores(labels, 3, multi_label=False)
    assert frequencies.shape == (8, 3) and frequencies[0].tolist() == [2 / 8, 1 / 8, 5 / 8]  # each class's share
    chance = single_label_metrics(frequencies, labels)
    assert chance["accuracy"] == pytest.approx(5 / 8)
    assert chance["recall_macro"] == pytest.approx(1 / 3)  # all of class 2 found, none of 0 and 1
    assert chance["f1_macro"] == pytest.approx((2 * (5 / 8) / (1 + 5 / 8)) / 3)
    assert chance["auroc_macro"] == pytest.approx(0.5)
    targets = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 0]]).double()  # label 0 in 3 of 4, label 1 in 1 of 4
    scores = chance_scores(targets, 2, multi_label=True)
    assert scores[0].tolist() == [0.75, 0.25]
    multi = multi_label_metrics(scores, targets, torch.full((2,), 0.5, dtype=torch.float64), ("x", "y"))
    assert multi["accuracy"] == pytest.approx(2 / 4)  # predicts [1, 0] for everyone: rows 0 and 2 match


def test_unknown_labels_count_nowhere_in_the_multi_label_metrics():
    generator = torch.Generator().manual_seed(5)
    targets = (torch.rand(60, 3, generator=generator) < 0.4).double()
    scores = (targets * 0.3 + torch.rand(60, 3, generator=generator) * 0.7).clamp(0, 1)
    unknown = torch.rand(60, 3, generator=generator) < 0.3
    with_unknown = targets.masked_fill(unknown, float("nan"))
    thresholds = torch.full((3,), 0.5, dtype=torch.float64)
    metrics = multi_label_metrics(scores, with_unknown, thresholds, ("a", "b", "c"))
    for c, name in enumerate("abc"):
        rows = ~unknown[:, c]
        y, s = targets[rows, c].numpy(), scores[rows, c].numpy()
        assert metrics[f"auroc/{name}"] == pytest.approx(sk.roc_auc_score(y, s))
        assert metrics[f"f1/{name}"] == pytest.approx(sk.f1_score(y, s >= 0.5))
    counted = (~unknown).sum().item()
    predicted, actual = (scores >= 0.5) & ~unknown, targets.bool() & ~unknown
    assert metrics["precision_micro"] == pytest.approx((predicted & actual).sum().item() / predicted.sum().item())
    right = (((scores >= 0.5) == targets.bool()) | unknown).all(dim=1)
    assert metrics["accuracy"] == pytest.approx(right.double().mean().item())
    assert counted < 180 and metrics["accuracy"] != multi_label_metrics(scores, targets, thresholds, ("a", "b", "c"))["accuracy"]


def test_calibration_error_by_hand():
    p = torch.tensor([0.05, 0.15, 0.12, 0.95, 0.9, 1.0, 0.55], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 1]).bool()
    # bins of width 0.1: [0.0,0.1): 0.05 / y 0; [0.1,0.2): 0.15, 0.12 / y 1, 0; [0.5,0.6): 0.55 / y 1;
    # [0.9,1.0]: 0.95, 0.9, 1.0 / y 1, 1, 0 (1.0 falls in the last bin)
    expected = (abs(0 - 0.05) + abs(1 - 0.27) + abs(1 - 0.55) + abs(2 - 2.85)) / 7
    assert calibration_error(p, y) == pytest.approx(expected)
    assert calibration_error(torch.full((8,), 0.25), torch.tensor([1, 0, 0, 0] * 2).bool()) == pytest.approx(0)
    assert calibration_error(torch.tensor([0.8, 0.8]), torch.tensor([False, False])) == pytest.approx(0.8)


def test_chosen_thresholds_give_the_best_f1_and_the_highest_on_a_tie():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.3], [0.2]], dtype=torch.float64)
    targets = torch.tensor([[1], [0], [1], [1], [0], [1]]).double()
    # >= 0.9: F1 2/5; >= 0.8: 2/6; >= 0.7: 4/7; >= 0.6: 6/8; >= 0.3: 6/9; >= 0.2: 8/10 (the best)
    assert best_thresholds(scores, targets, torch.tensor([0.5])).tolist() == [0.2]
    tie = torch.tensor([[1], [0], [0], [1]]).double()  # >= 0.9: 2/3 and >= 0.6: 4/6 tie; the higher wins
    assert best_thresholds(scores[:4], tie, torch.tensor([0.5])).tolist() == [0.9]
    none = torch.tensor([[0], [0], [float("nan")], [0]]).double()
    assert best_thresholds(scores[:4], none, torch.tensor([0.5])).tolist() == [0.5]  # no positive: kept
    generator = torch.Generator().manual_seed(6)
    many = torch.randint(0, 8, (80, 3), generator=generator).double() / 7
    labels = (torch.rand(80, 3, generator=generator) < many * 0.8).double()
    chosen = best_thresholds(many, labels, torch.full((3,), 0.5))
    for c in range(3):
        f1 = {t: sk.f1_score(labels[:, c].numpy(), (many[:, c] >= t).numpy()) for t in many[:, c].unique().tolist()}
        best = max(f1.values())
        assert chosen[c].item() == max(t for t, v in f1.items() if v == best)


def test_the_constant_predictor_with_chosen_thresholds_predicts_every_label_present():
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 0]]).double()
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.2, 0.2], [0.1, 0.3]]).double()
    metrics = multi_label_beside_chance(scores, targets, torch.tensor([0.8, 0.7]).double(), ("x", "y"), chosen=True)
    assert metrics["f1/x"] == 1.0 and metrics["threshold/y"] == pytest.approx(0.7)
    assert metrics["chance/f1/x"] == pytest.approx(2 * 0.5 / 1.5)  # all called positive: 2p / (1 + p)
    assert metrics["chance/f1/y"] == pytest.approx(2 * 0.25 / 1.25)
    assert metrics["chance/auroc/x"] == 0.5 and metrics["chance/ece/x"] == pytest.approx(0)
    # the rest of the chance levels: the majority constant (x, at prevalence 0.5, said present; y not)
    assert metrics["chance/accuracy"] == pytest.approx(1 / 4) and metrics["chance/recall_macro"] == pytest.approx(0.5)
    fixed = multi_label_beside_chance(scores, targets, torch.tensor([0.8, 0.7]).double(), ("x", "y"), chosen=False)
    assert fixed["chance/f1/y"] == 0 and "threshold/x" not in fixed  # 0.25 < 0.7: never predicted


def test_nan_scores_are_not_scored_at_chance():
    labels = torch.tensor([0, 1, 2, 0])
    for scores in (torch.full((4, 3), NAN), probabilities(4, 3, seed=0).index_fill(0, torch.tensor([2]), NAN)):
        metrics = single_label_metrics(scores, labels)
        assert all(torch.tensor(list(metrics.values())).isnan()), metrics
    assert torch.tensor(auroc(torch.tensor([NAN, NAN, 0.1, 0.2]), torch.tensor([True, True, False, False]))).isnan()


def test_a_nan_score_makes_its_labels_multi_label_metrics_nan():
    scores = torch.tensor([[0.9, NAN, NAN], [0.1, 0.8, 0.2], [0.7, 0.2, 0.9], [0.2, 0.6, 0.1]]).double()
    targets = torch.tensor([[1, 1, NAN], [0, 1, 0], [1, 0, 1], [0, 0, 0]]).double()  # c's NaN score is not known
    metrics = multi_label_metrics(scores, targets, torch.full((3,), 0.5, dtype=torch.float64), ("a", "b", "c"))
    assert metrics["auroc/a"] == 1.0 and metrics["f1/a"] == 1.0 and metrics["auroc/c"] == 1.0 and metrics["f1/c"] == 1.0
    for key in ("auroc/b", "f1/b", "auroc_macro", "f1_macro", "f1_micro", "accuracy"):
        assert torch.tensor(metrics[key]).isnan(), key


@pytest.mark.parametrize("bad, shown", [(-1.0, "-1"), (2.0, "2"), (0.5, "0.5")])
def test_multi_label_targets_other_than_0_1_or_nan_are_refused(bad, shown):
    targets = torch.tensor([[1, 0], [bad, 1], [0, NAN]]).double()
    scores, half = torch.full((3, 2), 0.5, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    message = rf"multi-label targets must be 0, 1 or NaN \(not known\); found {shown}:"
    with pytest.raises(MMKitError, match=message):
        multi_label_metrics(scores, targets, half, ("x", "y"))
    with pytest.raises(MMKitError, match=message):
        multi_label_beside_chance(scores, targets, half, ("x", "y"), chosen=False)


@pytest.mark.parametrize("bad", [3, -1])
def test_single_labels_outside_the_classes_are_refused(bad):
    labels = torch.tensor([0, bad, 2, bad])
    message = rf"class indices 0 to 2 \(3 classes\); found {bad}:"
    with pytest.raises(MMKitError, match=message):
        single_label_metrics(probabilities(4, 3, seed=0), labels)
    with pytest.raises(MMKitError, match=message):
        beside_chance(lambda s: single_label_metrics(s, labels), probabilities(4, 3, seed=0), labels, 3, False)
