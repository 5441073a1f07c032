"""classification: one label (or several) per sample, from one modality's pooled features or
from several modalities fused by a fusion head."""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmkit.encoders.base import Encoder
from mmkit.errors import MMKitError
from mmkit.fusion.base import FusionHead
from mmkit.metrics.classification import (auroc, beside_chance, best_thresholds, confusion_matrix,
                                          multi_label_beside_chance, roc_curve, single_label_metrics)
from mmkit.samples import DatasetInfo
from mmkit.tasks.base import Task

MAX_ROC_CURVES = 10


class Classification(Task):
    """Classify samples from one encoder's pooled features, or, with a [model.fusion] head,
    from every encoder's features fused (the head's own loss terms are added to the task's):
    cross-entropy when a sample has one label, binary cross-entropy per label when it has
    several (the dataset says which; a NaN label is not known and left out of loss and metrics).

    Held-out: accuracy (exact match for multi-label), top-5 accuracy (over 5 classes), macro
    and micro precision / recall / F1, one-vs-rest AUROC and the confusion matrix; for
    multi-label, each label's AUROC, F1 and calibration error (ECE). Each metric beside what
    always predicting the held-out class frequencies scores (the majority class; AUROC 0.5).

    Args:
        modality: the encoder whose features are classified (without a fusion head; by
            default the recipe's only one).
        hidden: width of a hidden layer (GELU) before the classifier; 0 for a linear classifier.
        dropout: dropout on the features before the classifier.
        label_smoothing: single-label: the share of each target spread over all classes.
        class_weights: one weight per class: single-label, the cross-entropy's class weights;
            multi-label, each label's weight on its positives (BCE pos_weight).
        thresholds: multi-label: the probability from which a label is predicted, one for
            all labels or one per label; "val": each label's, chosen for the best F1 on the
            validation split at every evaluation of a training run, and kept with the weights.
    """

    def __init__(self, encoders: dict[str, Encoder], data: DatasetInfo | None = None, fusion: FusionHead | None = None,
                 modality: str | None = None, hidden: int = 0, dropout: float = 0.0, label_smoothing: float = 0.0,
                 class_weights: list[float] | None = None, thresholds: float | list[float] | Literal["val"] = 0.5):
        super().__init__()
        self.info = labelled(data)
        classes = self.info.num_classes
        if fusion is not None and modality is not None:
            raise MMKitError("classification: with a fusion head every encoder is classified together; "
                             "remove task.modality, or [model.fusion] to classify one modality")
        self.modalities = list(encoders) if fusion is not None else [chosen_modality(encoders, modality)]
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.fusion = fusion
        width = fusion.dim if fusion is not None else encoders[self.modalities[0]].dim
        self.head = classifier(width, classes, hidden, dropout)
        self.multi_label = self.info.label_kind == "multi"
        if label_smoothing and self.multi_label:
            raise MMKitError("classification: label_smoothing applies to single-label data; remove it")
        self.register_buffer("class_weights", per_class(class_weights, classes, "class_weights"), persistent=False)
        self.choose = thresholds == "val"
        if self.choose and not self.multi_label:
            raise MMKitError('classification: thresholds = "val" chooses multi-label thresholds; single-label '
                             "data takes the most likely class, remove it")
        # with "val", NaN until chosen (and kept so with the weights): 0.5 is applied meanwhile
        self.register_buffer("thresholds", per_class(float("nan") if self.choose else thresholds, classes,
                                                     "thresholds"), persistent=self.choose)
        self.label_smoothing = label_smoothing

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The features classified (one encoder's pooled, or the fused) and the fusion head's
        values (its loss terms as ``loss/<name>``, and what it logs)."""
        encoded = {m: encoder(batch[m]) for m, encoder in self.encoders.items()}
        if self.fusion is None:
            return encoded[self.modalities[0]].pooled, {}
        fused = self.fusion(encoded, batch)
        return fused.pooled, fused.values()

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        return batch if self.fusion is None else self.fusion.prepare(batch, generator)

    def item_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {} if self.fusion is None else self.fusion.item_counts(batch)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(self.features(batch)[0]).float()

    @property
    def reads(self) -> list[str]:
        """The modalities ``scores`` reads from a batch."""
        return self.modalities

    def scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, classes] probabilities: softmax, or a sigmoid per label for multi-label data."""
        logits = self.logits(batch)
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=1)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        features, fused = self.features(batch)
        logits, labels = self.head(features).float(), batch["label"]
        if self.multi_label:
            loss = masked_bce(logits, labels.float(), self.class_weights)
            right = ((logits.sigmoid() >= self.applied()) == (labels == 1)) | labels.isnan()
            right = right.all(dim=1)
        else:
            loss = F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing)
            right = logits.argmax(dim=1) == labels
        if {"loss/classification", "accuracy"} & set(fused):
            raise MMKitError("classification: the fusion head names a value 'classification' or 'accuracy', "
                             "the task's own; rename it")
        return {"loss/classification": loss, **fused, "accuracy": right.float().mean().detach()}

    @torch.no_grad()
    def predict(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Each held-out item's class probabilities (softmax, or sigmoid per label) and labels."""
        scores, labels = [], []
        for batch in batches:
            scores.append(self.scores(batch).cpu())
            labels.append(batch["label"].cpu())
        classes = self.info.num_classes
        empty_labels = torch.empty(0, classes) if self.multi_label else torch.empty(0, dtype=torch.long)
        return {"scores": torch.cat(scores) if scores else torch.empty(0, classes),
                "labels": torch.cat(labels) if labels else empty_labels}

    def applied(self) -> torch.Tensor:
        """The thresholds in force: as given, or as chosen on the validation split (0.5 before)."""
        return in_force(self.thresholds)

    def calibrate(self, outputs: dict[str, Any]) -> None:
        """With thresholds = "val": each label's threshold for the best F1 on these outputs."""
        if self.choose and len(outputs["labels"]):
            self.choose_thresholds(outputs["scores"], outputs["labels"])

    def choose_thresholds(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        chosen = best_thresholds(scores, labels, self.applied().cpu())
        self.thresholds.copy_(chosen.to(self.thresholds))

    def evaluate(self, outputs: dict[str, Any]) -> dict[str, float]:
        scores, labels = outputs["scores"].double(), outputs["labels"]
        if not len(labels):
            return {}
        if self.multi_label:
            return multi_label_beside_chance(scores, labels, self.applied().cpu().double(), self.info.class_names,
                                             self.choose and was_chosen(self.thresholds))
        return beside_chance(lambda s: single_label_metrics(s, labels), scores, labels, self.info.num_classes, False)

    def headline(self) -> list[str]:
        return ["accuracy", "f1_macro", "auroc_macro"]

    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        from mmkit.report import confusion_heatmap, roc_curves

        scores, labels = outputs["scores"].double(), outputs["labels"]
        if not len(labels):
            return {}
        names = self.info.class_names
        targets = labels.double() if self.multi_label else F.one_hot(labels, len(names)).double()
        figures = {"roc_curves": roc_curves(curves(scores, targets, names))}
        if not self.multi_label:
            figures["confusion_matrix"] = confusion_heatmap(confusion_matrix(scores.argmax(1), labels, len(names)), names)
        if self.fusion is not None and dataset is not None and len(dataset):
            figures |= self.attention(dataset)
        return figures

    @torch.no_grad()
    def attention(self, dataset: Dataset) -> dict[str, Any]:
        """Where the words of the first held-out texts attend, when the fusion head attends from text."""
        from mmkit.tasks.shown import attention_figure, in_eval_mode, shown_batch

        with in_eval_mode(self):
            batch = shown_batch(dataset, dict(self.encoders), self.head[-1].weight.device)
            encoded = {m: encoder(batch[m]) for m, encoder in self.encoders.items()}
            return attention_figure(dict(self.encoders), encoded, batch, self.fusion(encoded, batch))


def curves(scores: torch.Tensor, targets: torch.Tensor,
           names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """ROC curves of the classes (labels) with the most held-out positives, up to ten, each
    over the items whose label is known (not NaN)."""
    known = ~targets.isnan()
    positives, counts = targets.nan_to_num(0).bool(), targets.nan_to_num(0).sum(0)
    drawn = {}
    for c in counts.argsort(descending=True, stable=True).tolist():
        rows = known[:, c]
        if 0 < counts[c] < rows.sum() and len(drawn) < MAX_ROC_CURVES:
            column, hits = scores[rows, c], positives[rows, c]
            drawn[names[c]] = (*roc_curve(column, hits), auroc(column, hits))
    return drawn


UNCHOSEN = 0.5  # the threshold applied to a label before one is chosen on the validation split


def in_force(thresholds: torch.Tensor) -> torch.Tensor:
    """Thresholds to apply: NaN (not chosen yet) stands for UNCHOSEN."""
    return thresholds.nan_to_num(UNCHOSEN)


def was_chosen(thresholds: torch.Tensor) -> bool:
    """Whether thresholds that start NaN have been chosen on a validation split."""
    return not bool(thresholds.isnan().all())


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Binary cross-entropy per label, averaged over the known entries (a NaN target is not
    known: an uncertain finding left out); the plain mean when every entry is known."""
    known = ~targets.isnan()
    losses = F.binary_cross_entropy_with_logits(logits, targets.nan_to_num(0), pos_weight=pos_weight, reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def chosen_modality(encoders: dict[str, Encoder], modality: str | None) -> str:
    if modality is None and len(encoders) == 1:
        return next(iter(encoders))
    if modality not in encoders:
        raise MMKitError(f"classification classifies one modality's features; set task.modality to one of "
                         f"the recipe's encoders ({', '.join(encoders)})" + (f", not {modality!r}" if modality else ""))
    return modality


def labelled(data: DatasetInfo | None) -> DatasetInfo:
    if data is None or data.label_kind == "none":
        raise MMKitError("classification needs labelled data: the recipe's dataset declares no classes "
                         "(see `mmkit info datasets <name>`)")
    return data


def classifier(width: int, classes: int, hidden: int, dropout: float) -> nn.Module:
    """Features -> class logits: dropout, then a linear layer, or a GELU hidden layer first."""
    if hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, classes))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, classes))


def per_class(value: float | list[float] | None, classes: int, key: str) -> torch.Tensor | None:
    """A recipe value given once or per class, as a [classes] tensor (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return torch.full((classes,), float(value))
    if len(value) != classes:
        raise MMKitError(f"classification: {key} has {len(value)} values for {classes} classes; give one per class")
    return torch.tensor(value, dtype=torch.float32)
