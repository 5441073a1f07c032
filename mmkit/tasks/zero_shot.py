"""zero_shot: classify images (or audio) with a contrastive model, from class names in words."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmkit.encoders.base import Encoder
from mmkit.errors import MMKitError
from mmkit.metrics.classification import (beside_chance, best_thresholds, confusion_matrix, multi_label_beside_chance,
                                          single_label_metrics)
from mmkit.samples import DatasetInfo
from mmkit.tasks.classification import curves, in_force, was_chosen
from mmkit.tasks.clip_retrieval import ClipRetrieval, clamped_scale, full_precision_similarity

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEFAULT_NEGATIVE_TEMPLATES = ("no {}.",)


class ZeroShot(ClipRetrieval):
    """Zero-shot classification: each class name is put through the prompt templates (or a
    class has prompts of its own), the prompts are embedded by the text tower and averaged
    into one unit vector per class (as open_clip's zero-shot classifier), and an image (or
    clip) takes the class whose vector is most similar. It trains as clip_retrieval does (same parameters), so a clip_retrieval run's
    weights load into it: ``mmkit eval runs/clip_retrieval 'task={name="zero_shot", embed_dim=128}'``.

    Multi-label data (findings) is judged label by label, as CheXzero does: an item's
    probability of a finding is the softmax, at the model's temperature, over its similarity
    to the finding's negative prompts ("no {}") and to its positive ones ("{}").

    Held-out: top-1 and top-5 accuracy (over 5 classes), macro precision / recall / F1, AUROC
    and each class's accuracy, beside what always answering the majority class scores; for
    multi-label, each finding's AUROC, F1 (at the threshold chosen for it on the validation
    split in a training run, else 0.5) and calibration error, beside the prevalence's.

    Args:
        modalities: the classified modality, then "text"; default: the recipe's two.
        embed_dim: width of the shared embedding space (the contrastive run's).
        temperature: initial softmax temperature.
        learn_temperature: train the temperature (as CLIP does), clamped at 1/100.
        project: as clip_retrieval's (false: the towers' pooled features are the embeddings).
        templates: prompts with "{}" where the class name goes, averaged per class.
        negative_templates: multi-label: the prompts saying a finding is absent.
        prompts: a class's own prompts, in place of the templates for it: the words the
            training text uses ({nodule = ["Impression: pulmonary nodule."]}).
        negative_prompts: multi-label: a finding's own absent prompts ({cardiomegaly =
            ["Heart size is normal."]}), in place of the negative templates for it.
    """

    def __init__(self, encoders: dict[str, Encoder], data: DatasetInfo | None = None,
                 modalities: list[str] | None = None, embed_dim: int = 256, temperature: float = 0.07,
                 learn_temperature: bool = True, templates: list[str] = list(DEFAULT_TEMPLATES),
                 negative_templates: list[str] = list(DEFAULT_NEGATIVE_TEMPLATES), project: bool = True,
                 prompts: dict[str, list[str]] | None = None, negative_prompts: dict[str, list[str]] | None = None):
        modalities = list(modalities or sorted(encoders, key=lambda m: m == "text"))
        super().__init__(encoders, modalities, embed_dim, temperature, learn_temperature, project)
        if self.modalities[1] != "text":
            raise MMKitError(f"zero_shot classifies with class names in words: task.modalities must end with "
                             f"\"text\", got {self.modalities}")
        if data is None or data.label_kind == "none":
            raise MMKitError("zero_shot needs labelled data with named classes (see `mmkit info datasets <name>`)")
        if bad := [t for t in [*templates, *negative_templates] if t.count("{}") != 1]:
            raise MMKitError(f"each zero_shot template needs one {{}} for the class name: {bad}")
        self.info, self.multi_label = data, data.label_kind == "multi"
        if negative_prompts and not self.multi_label:
            raise MMKitError("zero_shot negative_prompts say a finding is absent, for multi-label data; "
                             "single-label classes take prompts only")
        self.class_prompts = per_class_prompts(data.class_names, templates, prompts or {}, "prompts")
        self.negative_class_prompts = per_class_prompts(data.class_names, negative_templates, negative_prompts or {},
                                                        "negative_prompts") if self.multi_label else []
        # NaN until chosen on a training run's validation split; not saved, so the weights stay a clip_retrieval run's
        self.register_buffer("thresholds", torch.full((data.num_classes,), float("nan")), persistent=False)

    def class_embeddings(self, prompts: list[list[str]] | None = None) -> torch.Tensor:
        """[classes, embed_dim]: each class's prompts (by default the task's) embedded,
        normalised, averaged, normalised."""
        text, prompts = self.encoders["text"], self.class_prompts if prompts is None else prompts
        flat = [prompt for own in prompts for prompt in own]
        embedded = self.embed({"text": text.inputs(flat, self.logit_scale.device)}, "text")
        per_class = torch.stack([own.mean(dim=0) for own in embedded.split([len(own) for own in prompts])])
        return F.normalize(per_class, dim=-1)

    @torch.no_grad()
    def predict(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Each held-out item's similarity to every class (cosine, [N, classes]), or for
        multi-label each finding's probability, and its label."""
        prompts, scores, labels = self.prompts(), [], []
        for batch in batches:
            scores.append(self.scores(batch, prompts).cpu())
            labels.append(batch["label"].cpu())
        count = len(self.info.class_names)
        empty_labels = torch.empty(0, count) if self.multi_label else torch.empty(0, dtype=torch.long)
        return {"scores": torch.cat(scores) if scores else torch.empty(0, count),
                "labels": torch.cat(labels) if labels else empty_labels}

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The class vectors, and for multi-label the vectors of the negative prompts."""
        return self.class_embeddings(), self.class_embeddings(self.negative_class_prompts) if self.multi_label else None

    def scores(self, batch: dict[str, Any], prompts: tuple[torch.Tensor, torch.Tensor | None] | None = None,
               ) -> torch.Tensor:
        """[B, classes]: each item's cosine similarity to every class, or for multi-label each
        finding's probability (softmax over absent / present = sigmoid of the scaled difference)."""
        present, absent = prompts or self.prompts()
        embedded = self.embed(batch, self.modalities[0])
        similarity = full_precision_similarity(embedded, present)
        if absent is None:
            return similarity
        scale = clamped_scale(self.logit_scale).float()
        return (scale * (similarity - full_precision_similarity(embedded, absent))).sigmoid()

    @property
    def reads(self) -> list[str]:
        """The modality ``scores`` reads from a batch (the prompts are the task's own)."""
        return self.modalities[:1]

    def calibrate(self, outputs: dict[str, Any]) -> None:
        """Multi-label: each finding's threshold for the best F1 on the validation split."""
        if self.multi_label and len(outputs["labels"]):
            self.thresholds.copy_(best_thresholds(outputs["scores"], outputs["labels"], in_force(self.thresholds).cpu()))

    def evaluate(self, outputs: dict[str, Any]) -> dict[str, float]:
        scores, labels = outputs["scores"].double(), outputs["labels"]
        if not len(labels):
            return {}
        names = self.info.class_names
        if self.multi_label:
            return multi_label_beside_chance(scores, labels, in_force(self.thresholds).cpu().double(), names,
                                             was_chosen(self.thresholds))
        return (beside_chance(lambda s: single_label_metrics(s, labels), scores, labels, len(names), multi_label=False)
                | per_class_accuracy(scores, labels, names))

    def headline(self) -> list[str]:
        return ["auroc_macro", "f1_macro"] if self.multi_label else ["accuracy", "top5_accuracy", "f1_macro"]

    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        from mmkit.report import class_accuracy_bars, confusion_heatmap, roc_curves

        scores, labels = outputs["scores"], outputs["labels"]
        if not len(labels):
            return {}
        names = self.info.class_names
        if self.multi_label:
            return {"roc_curves": roc_curves(curves(scores.double(), labels.double(), names))}
        accuracy = per_class_accuracy(scores, labels, names)
        return {"per_class_accuracy": class_accuracy_bars({n: accuracy[f"accuracy/{n}"] for n in names
                                                            if f"accuracy/{n}" in accuracy}),
                "confusion_matrix": confusion_heatmap(confusion_matrix(scores.argmax(1), labels, len(names)), names)}


def per_class_prompts(names: tuple[str, ...], templates: list[str], own: dict[str, list[str]], key: str,
                      ) -> list[list[str]]:
    """Each class's prompts: its own where ``own`` names it, else the templates filled with its name."""
    if unknown := sorted(set(own) - set(names)):
        raise MMKitError(f"zero_shot {key} names classes the data does not have: {unknown}; its classes are "
                         f"{', '.join(names)}")
    if empty := [name for name, prompts in own.items() if not prompts]:
        raise MMKitError(f"zero_shot {key}: {empty} need a prompt each (or leave them out to use the templates)")
    chosen = [list(own[name]) if name in own else [template.format(name) for template in templates] for name in names]
    if bare := [name for name, prompts in zip(names, chosen) if not prompts]:
        raise MMKitError(f"zero_shot: {bare} have no prompt: give {key.replace('prompts', 'templates')}, or {key} "
                         "for each of them")
    return chosen


def per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """``accuracy/<class>``: the share of each class's held-out items given that class (classes
    with no held-out item are left out); NaN for a class with an item whose scores hold a NaN."""
    right = (scores.argmax(dim=1) == labels).double().masked_fill(scores.isnan().any(dim=1), float("nan"))
    return {f"accuracy/{name}": right[labels == c].mean().item()
            for c, name in enumerate(names) if (labels == c).any()}
