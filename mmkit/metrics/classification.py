"""Classification metrics over a held-out set's scores, each with the level a constant
predictor reaches beside it, computed the way scikit-learn computes them."""

from __future__ import annotations

from typing import Callable

import torch

from mmkit.errors import MMKitError

MetricDict = dict[str, float]
ECE_BINS = 10


def single_label_metrics(scores: torch.Tensor, labels: torch.Tensor) -> MetricDict:
    """Accuracy, top-5 accuracy (more than 5 classes), macro and micro precision / recall / F1
    (macro over the classes in the labels or the predictions, as scikit-learn's default), macro
    one-vs-rest AUROC (over classes with positives and negatives). ``scores`` [N, C], ``labels`` [N].
    A NaN score makes every metric NaN: it predicts nothing, so a diverged model is not scored at chance."""
    classes = scores.shape[1]
    check_single_labels(labels, classes)
    predicted = scores.argmax(dim=1)
    metrics = {"accuracy": (predicted == labels).double().mean().item()}
    if classes > 5:
        top5 = scores.sort(dim=1, descending=True, stable=True).indices[:, :5]  # ties: the lower class first
        metrics["top5_accuracy"] = (top5 == labels.unsqueeze(1)).any(dim=1).double().mean().item()
    counts = confusion_matrix(predicted, labels, classes)
    seen = (counts.sum(0) + counts.sum(1)) > 0
    metrics |= precision_recall_f1(counts.diag()[seen], counts.sum(0)[seen], counts.sum(1)[seen])
    positives = torch.nn.functional.one_hot(labels, classes).bool()
    metrics["auroc_macro"] = macro_auroc(scores, positives)
    return dict.fromkeys(metrics, float("nan")) if scores.isnan().any() else metrics


def multi_label_metrics(scores: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
                        class_names: tuple[str, ...]) -> MetricDict:
    """Exact-match accuracy, macro and micro precision / recall / F1 over every label, macro
    AUROC and ECE (labels with positives and negatives), and each label's AUROC, F1 and ECE under
    ``auroc/<name>``, ``f1/<name>``, ``ece/<name>``. A label is predicted where its score (a
    probability) reaches its threshold. A NaN target is not known (an uncertain finding left
    out): that entry counts nowhere, and an item is exactly right when its known labels are.
    A NaN score of a known entry predicts nothing: its label's metrics, and those over every
    label, are NaN (a diverged model is not scored at chance)."""
    check_multi_label_targets(targets)
    known, actual = ~targets.isnan(), targets.nan_to_num(0).bool()
    unscored = (scores.isnan() & known).any(dim=0)
    predicted = scores >= thresholds
    metrics = {"accuracy": ((predicted == actual) | ~known).all(dim=1).double().mean().item()}
    true_positives, said, found = ((predicted & actual & known).sum(0), (predicted & known).sum(0),
                                   (actual & known).sum(0))
    metrics |= precision_recall_f1(true_positives, said, found)
    if unscored.any():
        metrics = dict.fromkeys(metrics, float("nan"))
    per_label = _ratio(2 * true_positives.double(), (said + found).double()).masked_fill(unscored, float("nan"))
    aurocs, errors, both = {}, {}, two_sided(targets)
    for index, (name, column, positives) in enumerate(zip(class_names, scores.T, actual.T)):
        rows = known[:, index]
        metrics[f"f1/{name}"] = per_label[index].item()
        if both[index]:
            aurocs[name] = auroc(column[rows], positives[rows])
            errors[name] = calibration_error(column[rows], positives[rows])
    metrics["auroc_macro"] = sum(aurocs.values()) / len(aurocs) if aurocs else float("nan")
    metrics["ece_macro"] = sum(errors.values()) / len(errors) if errors else float("nan")
    metrics |= {f"auroc/{name}": value for name, value in aurocs.items()}
    return metrics | {f"ece/{name}": value for name, value in errors.items()}


def calibration_error(probabilities: torch.Tensor, positives: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of one label's probabilities: items binned by probability
    into ``bins`` equal-width bins (the last one closed at 1), then the item-weighted mean over
    bins of |share of positives - mean probability|."""
    p = probabilities.double()
    index = (p * bins).long().clamp(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, positives.double() - p)
    return (gap.abs().sum() / len(p)).item()


def best_thresholds(scores: torch.Tensor, targets: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per label, the threshold (one of its scores) at which predicting ``score >= threshold``
    gives the highest F1 over the known entries; the highest such threshold on a tie. A label
    without a known positive keeps its ``fallback``."""
    chosen = fallback.clone().double()
    for index, (column, target) in enumerate(zip(scores.double().T, targets.T)):
        rows = ~target.isnan()
        ordered, order = column[rows].sort(descending=True, stable=True)
        hits = target[rows][order].double()
        if not hits.sum():
            continue
        last_of_tie = torch.cat([ordered[1:] != ordered[:-1], torch.tensor([True])])
        true_positives, predicted = hits.cumsum(0)[last_of_tie], torch.arange(1, len(hits) + 1)[last_of_tie]
        f1 = 2 * true_positives / (predicted + hits.sum())
        chosen[index] = ordered[last_of_tie][f1.argmax()]  # argmax takes the first: the highest threshold
    return chosen


def precision_recall_f1(true_positives: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> MetricDict:
    """Macro (mean of each class's) and micro (from the summed counts) precision, recall and
    F1 from per-class counts; a ratio with nothing to count is 0, as scikit-learn's default."""
    tp, predicted, actual = true_positives.double(), predicted.double(), actual.double()
    precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
    f1 = _ratio(2 * tp, predicted + actual)
    micro_p, micro_r = _ratio(tp.sum(), predicted.sum()), _ratio(tp.sum(), actual.sum())
    return {"precision_macro": _mean(precision), "recall_macro": _mean(recall), "f1_macro": _mean(f1),
            "precision_micro": micro_p.item(), "recall_micro": micro_r.item(),
            "f1_micro": _ratio(2 * tp.sum(), predicted.sum() + actual.sum()).item()}


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """[C, C] counts: row = true class, column = predicted class (scikit-learn's layout)."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).view(classes, classes)


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative, ties counting half (Mann-Whitney U from average ranks); NaN if a score is NaN,
    which has no rank (sorting would put it above every other)."""
    if scores.isnan().any():
        return float("nan")
    ranks = average_ranks(scores.double())
    n_pos = positives.sum().item()
    n_neg = len(positives) - n_pos
    u = ranks[positives].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def macro_auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean one-vs-rest AUROC over the columns that have both positives and negatives (NaN if
    none); ``targets`` are booleans, or floats whose NaN entries are not known and left out."""
    targets, values = targets.double(), []  # booleans have no entry unknown
    for column, target, both in zip(scores.T, targets.T, two_sided(targets)):
        if both:
            rows = ~target.isnan()
            values.append(auroc(column[rows], target[rows].bool()))
    return sum(values) / len(values) if values else float("nan")


def roc_curve(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = scores.double().argsort(descending=True)
    ordered, hits = scores.double()[order], positives[order].double()
    last_of_tie = torch.cat([ordered[1:] != ordered[:-1], torch.tensor([True])])
    tp, fp = hits.cumsum(0)[last_of_tie], (1 - hits).cumsum(0)[last_of_tie]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fp / max(fp[-1].item(), 1)]), torch.cat([zero, tp / max(tp[-1].item(), 1)])


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with tied values given the mean of their ranks (scipy's rankdata)."""
    ordered, order = values.sort()
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    tie_ranks = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = tie_ranks[inverse]
    return ranks


def chance_scores(labels: torch.Tensor, classes: int, multi_label: bool) -> torch.Tensor:
    """What a constant predictor gives every item: the held-out set's class frequencies
    (its argmax is the majority class; for multi-label, each label's prevalence among the
    known entries)."""
    check_labels(labels, classes, multi_label)
    if multi_label:
        frequency = labels.double().nanmean(0).nan_to_num(0)
    else:
        frequency = torch.bincount(labels, minlength=classes).double() / len(labels)
    return frequency.expand(len(labels), classes)


def beside_chance(measure: Callable[[torch.Tensor], MetricDict], scores: torch.Tensor, labels: torch.Tensor,
                  classes: int, multi_label: bool) -> MetricDict:
    """``measure``'s metrics of ``scores``, and under ``chance/`` the same metrics of the
    constant predictor (chance_scores) on the same labels."""
    chance = measure(chance_scores(labels, classes, multi_label))
    return {**measure(scores), **{f"chance/{name}": value for name, value in chance.items()}}


def multi_label_beside_chance(scores: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
                              class_names: tuple[str, ...], chosen: bool) -> MetricDict:
    """multi_label_metrics at ``thresholds`` and, under ``chance/``, the constant predictor's
    (each label's prevalence, a label predicted where it reaches 0.5). When the thresholds were
    ``chosen`` for F1 on held-out data (reported under ``threshold/<name>``), the chance F1s are
    the constant predictor's at thresholds chosen for it the same way: every label predicted
    present, F1 = 2p / (1 + p)."""
    chance = chance_scores(targets, len(class_names), multi_label=True)
    half = torch.full_like(thresholds, 0.5)
    metrics = multi_label_metrics(scores, targets, thresholds, class_names)
    levels = multi_label_metrics(chance, targets, half, class_names)
    if chosen:
        metrics |= {f"threshold/{name}": value for name, value in zip(class_names, thresholds.tolist())}
        best = multi_label_metrics(chance, targets, best_thresholds(chance, targets, half), class_names)
        levels |= {key: value for key, value in best.items() if key.startswith("f1")}
    return metrics | {f"chance/{name}": value for name, value in levels.items()}


def check_labels(labels: torch.Tensor, classes: int, multi_label: bool) -> None:
    """Refuse labels no metric can score: ``check_multi_label_targets`` or ``check_single_labels``."""
    if multi_label:
        check_multi_label_targets(labels)
    else:
        check_single_labels(labels, classes)


def check_single_labels(labels: torch.Tensor, classes: int) -> None:
    """Refuse labels that are not class indices, before they fail deep in torch."""
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise MMKitError(f"single-label labels must be class indices 0 to {classes - 1} ({classes} classes); found "
                         f"{_listed(bad)}: fix the dataset's labels or its class list")


def check_multi_label_targets(targets: torch.Tensor) -> None:
    """Refuse multi-label targets other than 0, 1 and NaN (not known), which the metrics would
    count as positives (a raw CheXpert -1, uncertain)."""
    bad = targets[~((targets == 0) | (targets == 1) | targets.isnan())]
    if len(bad):
        raise MMKitError(f"multi-label targets must be 0, 1 or NaN (not known); found {_listed(bad)}: map other "
                         "codes (e.g. CheXpert's -1, uncertain) to one of these in the dataset")


def two_sided(targets: torch.Tensor) -> torch.Tensor:
    """[C]: whether each label has known positives and negatives, so that its AUROC is defined."""
    known = ~targets.isnan()
    positives = (targets.nan_to_num(0).bool() & known).sum(0)
    return (positives > 0) & (positives < known.sum(0))


def _listed(values: torch.Tensor, shown: int = 5) -> str:
    distinct = values.unique().tolist()
    return ", ".join(f"{v:g}" for v in distinct[:shown]) + (", ..." if len(distinct) > shown else "")


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if len(values) else 0.0
