"""zero_shot: classify images (or audio) with a contrastive model, from class names in words."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from mmkit.encoders.base import Encoder
from mmkit.errors import MMKitError
from mmkit.metrics.classification import beside_chance, confusion_matrix, single_label_metrics
from mmkit.samples import DatasetInfo
from mmkit.tasks.clip_retrieval import ClipRetrieval, full_precision_similarity

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ZeroShot(ClipRetrieval):
    """Zero-shot classification: each class name is put through the prompt templates, the
    prompts are embedded by the text tower and averaged into one unit vector per class (as
    open_clip's zero-shot classifier), and an image (or clip) takes the class whose vector is
    most similar. It trains as clip_retrieval does (same parameters), so a clip_retrieval run's
    weights load into it: ``mmkit eval runs/clip_retrieval 'task={name="zero_shot", embed_dim=128}'``.

    Held-out: top-1 and top-5 accuracy (over 5 classes), macro precision / recall / F1, AUROC
    and each class's accuracy, beside what always answering the majority class scores.

    Args:
        modalities: the classified modality, then "text"; default: the recipe's two.
        embed_dim: width of the shared embedding space (the contrastive run's).
        temperature: initial softmax temperature.
        learn_temperature: train the temperature (as CLIP does), clamped at 1/100.
        templates: prompts with "{}" where the class name goes, averaged per class.
    """

    def __init__(self, encoders: dict[str, Encoder], data: DatasetInfo | None = None,
                 modalities: list[str] | None = None, embed_dim: int = 256, temperature: float = 0.07,
                 learn_temperature: bool = True, templates: list[str] = list(DEFAULT_TEMPLATES)):
        modalities = list(modalities or sorted(encoders, key=lambda m: m == "text"))
        super().__init__(encoders, modalities, embed_dim, temperature, learn_temperature)
        if self.modalities[1] != "text":
            raise MMKitError(f"zero_shot classifies with class names in words: task.modalities must end with "
                             f"\"text\", got {self.modalities}")
        if data is None or data.label_kind != "single":
            raise MMKitError("zero_shot needs data with one label per sample and named classes "
                             "(see `mmkit info datasets <name>`)")
        if bad := [t for t in templates if t.count("{}") != 1]:
            raise MMKitError(f"each zero_shot template needs one {{}} for the class name: {bad}")
        self.info, self.templates = data, list(templates)

    def class_embeddings(self) -> torch.Tensor:
        """[classes, embed_dim]: each class's prompts embedded, normalised, averaged, normalised."""
        from mmkit.engine.loop import to_device

        text = self.encoders["text"]
        prompts = [template.format(name) for name in self.info.class_names for template in self.templates]
        batch = (text.collate or default_collate)([text.preprocess(prompt) for prompt in prompts])
        embedded = self.embed({"text": to_device(batch, self.logit_scale.device)}, "text")
        per_class = embedded.view(len(self.info.class_names), len(self.templates), -1).mean(dim=1)
        return F.normalize(per_class, dim=-1)

    @torch.no_grad()
    def predict(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Each held-out item's similarity to every class (cosine, [N, classes]) and its label."""
        query = self.modalities[0]
        classes, scores, labels = self.class_embeddings(), [], []
        for batch in batches:
            scores.append(full_precision_similarity(self.embed(batch, query), classes).cpu())
            labels.append(batch["label"].cpu())
        count = len(self.info.class_names)
        return {"scores": torch.cat(scores) if scores else torch.empty(0, count),
                "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)}

    def evaluate(self, outputs: dict[str, Any]) -> dict[str, float]:
        scores, labels = outputs["scores"].double(), outputs["labels"]
        if not len(labels):
            return {}
        names = self.info.class_names
        return (beside_chance(lambda s: single_label_metrics(s, labels), scores, labels, len(names), multi_label=False)
                | per_class_accuracy(scores, labels, names))

    def headline(self) -> list[str]:
        return ["accuracy", "top5_accuracy", "f1_macro"]

    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        from mmkit.report import class_accuracy_bars, confusion_heatmap

        scores, labels = outputs["scores"], outputs["labels"]
        if not len(labels):
            return {}
        names = self.info.class_names
        accuracy = per_class_accuracy(scores, labels, names)
        return {"per_class_accuracy": class_accuracy_bars({n: accuracy[f"accuracy/{n}"] for n in names
                                                            if f"accuracy/{n}" in accuracy}),
                "confusion_matrix": confusion_heatmap(confusion_matrix(scores.argmax(1), labels, len(names)), names)}


def per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """``accuracy/<class>``: the share of each class's held-out items given that class (classes
    with no held-out item are left out)."""
    right = scores.argmax(dim=1) == labels
    return {f"accuracy/{name}": right[labels == c].double().mean().item()
            for c, name in enumerate(names) if (labels == c).any()}
