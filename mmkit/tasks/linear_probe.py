"""linear_probe: how well a frozen encoder's features separate the classes, judged by a
logistic regression fitted on them (as CLIP and CLIP_benchmark judge representations)."""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmkit.encoders.base import Encoder
from mmkit.errors import MMKitError
from mmkit.metrics.classification import check_labels, macro_auroc, two_sided
from mmkit.parts import freeze
from mmkit.samples import DatasetInfo
from mmkit.tasks.classification import Classification

DEFAULT_L2 = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
SPLIT_SEED = 0


class LinearProbe(Classification):
    """A linear probe: the encoder is frozen, its pooled features of the training set are
    computed once, and a logistic regression (softmax, or a sigmoid per label for multi-label
    data) is fitted on them by L-BFGS, with no gradient steps on the model. Each L2 penalty of
    ``l2`` is fitted on the training features less a held-out share (``val_fraction``) and
    scored there (accuracy, or macro AUROC for multi-label); the best, the larger on a tie, is
    fitted again on every training feature. Held-out metrics as for classification.

    Args:
        modality: the encoder probed (by default the recipe's only one).
        l2: the penalties tried: the fit minimises mean loss + l2 / 2 * |W|^2 (bias not penalised).
        val_fraction: the share of the training features, a fixed random one, that scores each penalty.
        normalize: divide each feature vector by its length first (CLIP's own probe does not).
        thresholds: multi-label: the probability from which a label is predicted; "val": each
            label's, for its best F1 on the held-out share of the fit, then on the validation
            split at a training run's evaluation, as classification does.
        max_iter: L-BFGS iterations per fit.
    """

    fits = True

    def __init__(self, encoders: dict[str, Encoder], data: DatasetInfo | None = None, modality: str | None = None,
                 l2: list[float] = list(DEFAULT_L2), val_fraction: float = 0.2, normalize: bool = False,
                 thresholds: float | list[float] | Literal["val"] = 0.5, max_iter: int = 500):
        super().__init__(encoders, data, modality=modality, thresholds=thresholds)
        if not l2 or min(l2) < 0:
            raise MMKitError("linear_probe: l2 lists the penalties to try, each 0 or more")
        if not 0 < val_fraction < 1:
            raise MMKitError(f"linear_probe: val_fraction is a share of the training set, between 0 and 1, not {val_fraction}")
        freeze(self.encoders, True, "linear_probe")
        self.head.requires_grad_(False)
        self.l2, self.val_fraction, self.normalize, self.max_iter = sorted(l2, reverse=True), val_fraction, normalize, max_iter
        self.register_buffer("l2_scores", torch.full((len(l2),), float("nan")))  # saved, so the sweep can be drawn later

    @property
    def linear(self) -> torch.nn.Linear:
        return self.head[-1]

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pooled, losses = super().features(batch)
        return (F.normalize(pooled.float(), dim=-1) if self.normalize else pooled), losses

    @torch.no_grad()
    def predict(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Each item's features (what ``fit`` learns from), class probabilities and labels."""
        features, scores, labels = [], [], []
        for batch in batches:
            pooled = self.features(batch)[0].float()
            logits = self.linear(pooled).float()
            features.append(pooled.cpu())
            scores.append((logits.sigmoid() if self.multi_label else logits.softmax(dim=1)).cpu())
            labels.append(batch["label"].cpu())
        if not labels:
            return {**super().predict([]), "features": torch.empty(0, self.linear.in_features)}
        return {"features": torch.cat(features), "scores": torch.cat(scores), "labels": torch.cat(labels)}

    def fit(self, outputs: dict[str, Any]) -> dict[str, float]:
        """Choose the penalty on a held-out share of the training features, then fit the
        classifier on all of them; returns the sweep's scores and the choice."""
        features, labels = outputs["features"].double(), outputs["labels"]
        if len(labels) < 2:
            raise MMKitError(f"linear_probe: {len(labels)} training samples are too few to fit and choose a penalty")
        check_labels(labels, self.info.num_classes, self.multi_label)  # on the CPU here, unlike a training step's
        fit_part, val_part = holdout_split(len(labels), self.val_fraction, SPLIT_SEED)
        if self.multi_label and not two_sided(labels[val_part].double()).any():
            raise MMKitError(f"linear_probe: the held-out share ({len(val_part)} of {len(labels)} training samples) "
                             "has no label with both positives and negatives, so macro AUROC cannot choose the "
                             "penalty; use more training samples or a larger val_fraction")
        weights, scores, held_out = None, [], []
        for l2 in self.l2:  # strongest first, each fit starting from the last
            weights = fit_logistic(features[fit_part], labels[fit_part], self.info.num_classes, l2,
                                   self.multi_label, self.max_iter, weights)
            held_out.append(probabilities(features[val_part], weights, self.multi_label))
            scores.append(self.score(held_out[-1], labels[val_part]))
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if self.choose:  # thresholds from the held-out share; a training run's validation split then re-chooses
            self.choose_thresholds(held_out[best], labels[val_part])
        weight, bias = fit_logistic(features, labels, self.info.num_classes, self.l2[best], self.multi_label,
                                    self.max_iter, weights)
        with torch.no_grad():
            self.linear.weight.copy_(weight.T)
            self.linear.bias.copy_(bias)
            self.l2_scores.copy_(torch.tensor(scores))
        measure = "val_auroc_macro" if self.multi_label else "val_accuracy"
        return {"samples": len(labels), "l2": self.l2[best], measure: scores[best],
                **{f"{measure}/l2={l2:g}": score for l2, score in zip(self.l2, scores)}}

    def score(self, probabilities: torch.Tensor, labels: torch.Tensor) -> float:
        """What chooses the penalty: accuracy, or for multi-label the macro AUROC."""
        if self.multi_label:
            return macro_auroc(probabilities, labels.double())
        return (probabilities.argmax(dim=1) == labels).double().mean().item()

    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        from mmkit.report import penalty_sweep

        figures = super().figures(dataset, outputs)
        if not self.l2_scores.isnan().all():
            measure = "macro AUROC" if self.multi_label else "accuracy"
            figures["l2_sweep"] = penalty_sweep(self.l2, self.l2_scores.tolist(), f"validation {measure}")
        return figures


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a fixed random split of ``n`` items: (the rest, the held-out ``fraction``),
    each part at least one item."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(max(1, round(n * fraction)), n - 1)
    return order[held:].sort().values, order[:held].sort().values


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float, multi_label: bool,
                 max_iter: int, start: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [D, C], bias [C]) minimising the mean cross-entropy (softmax; or the summed
    binary cross-entropy of each label) + l2 / 2 * |weight|^2, by L-BFGS in float64: the
    optimum of scikit-learn's LogisticRegression with C = 1 / (n * l2)."""
    x = features.double()
    targets = labels.double() if multi_label else labels
    weight = (start[0].clone() if start else torch.zeros(x.shape[1], classes, dtype=torch.float64)).requires_grad_()
    bias = (start[1].clone() if start else torch.zeros(classes, dtype=torch.float64)).requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias
        if multi_label:
            known = ~targets.isnan()  # an unknown label (NaN) is left out
            loss = F.binary_cross_entropy_with_logits(logits, targets.nan_to_num(0), weight=known.double(),
                                                      reduction="sum") / len(x)
        else:
            loss = F.cross_entropy(logits, targets)
        loss = loss + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()


def probabilities(features: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], multi_label: bool) -> torch.Tensor:
    logits = features.double() @ weights[0] + weights[1]
    return logits.sigmoid() if multi_label else logits.softmax(dim=1)
