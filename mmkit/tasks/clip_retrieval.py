"""clip_retrieval: contrastive alignment of two modalities, evaluated by cross-modal retrieval."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmkit.encoders.base import Encoder, token_ids
from mmkit.errors import MMKitError
from mmkit.metrics.retrieval import chance_retrieval_metrics, retrieval_metrics
from mmkit.tasks.base import Task


class ClipRetrieval(Task):
    """CLIP-style training: symmetric InfoNCE between two modalities with a learnable temperature.

    Evaluation ranks every held-out item of one modality against all items of the other, in
    both directions, and reports recall@1/5/10 and mean rank. Items that share a side are
    the same pair, so any of them counts as a correct match: identical caption text
    (``raw_text``, kept by mmkit's loaders; else identical tokens) cannot be told apart, and
    items read from the same files (a manifest's ``files``: COCO's image with a caption per row)
    show the same image.

    Args:
        modalities: the two modalities to align, e.g. ["image", "text"]; default: the recipe's two.
        embed_dim: width of the shared embedding space.
        temperature: initial softmax temperature.
        learn_temperature: train the temperature (as CLIP does), clamped at 1/100.
        project: map each modality into the shared space with a linear layer of its own; false
            compares the towers' pooled features as they are (open_clip's towers already
            project into one space of their embed width), and embed_dim is not used.
    """

    def __init__(self, encoders: dict[str, Encoder], modalities: list[str] | None = None,
                 embed_dim: int = 256, temperature: float = 0.07, learn_temperature: bool = True,
                 project: bool = True):
        super().__init__()
        modalities = list(modalities or encoders)
        if len(modalities) != 2 or not set(modalities) <= set(encoders):
            raise MMKitError(f"clip_retrieval aligns two modalities; set task.modalities to two of "
                             f"the recipe's encoders ({', '.join(encoders)}), not {modalities}")
        self.modalities = modalities
        self.encoders = nn.ModuleDict({m: encoders[m] for m in modalities})
        self.embed_dim = embed_dim if project else shared_width(encoders, modalities)
        self.projections = nn.ModuleDict(
            {m: nn.Linear(encoders[m].dim, embed_dim, bias=False) if project else nn.Identity() for m in modalities}
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)),
                                        requires_grad=learn_temperature)

    def embed(self, batch: dict[str, Any], modality: str) -> torch.Tensor:
        """Unit-length embeddings of one modality of a batch."""
        encoded = self.encoders[modality](batch[modality])
        return F.normalize(self.projections[modality](encoded.pooled).float(), dim=-1)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        a, b = (self.embed(batch, m) for m in self.modalities)
        scale = clamped_scale(self.logit_scale)
        return {"loss/contrastive": contrastive_loss(a, b, scale), "temperature": (1 / scale).detach()}

    @torch.no_grad()
    def predict(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Each held-out item's embeddings, caption (raw text where the loader kept it, else its
        tokens) and files (where the dataset names them), which decide which items are the same."""
        embeddings: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        captions: list[Any] = []
        files: list[str] = []
        for batch in batches:
            for m in self.modalities:
                embeddings[m].append(self.embed(batch, m).cpu())
            if "text" in self.modalities:
                captions += batch.get("raw_text") or caption_tokens(batch["text"], self.encoders["text"])
            files += batch.get("files", [])
        empty = {m: torch.empty(0, self.embed_dim) for m in self.modalities}
        return {**{m: torch.cat(e) if e else empty[m] for m, e in embeddings.items()}, "captions": captions,
                "files": files}

    def evaluate(self, outputs: dict[str, Any]) -> dict[str, float]:
        return both_directions(outputs, same_pair(outputs), *self.modalities)

    def headline(self) -> list[str]:
        a, b = self.modalities
        return [f"{direction}/R@{k}" for direction in (f"{a}_to_{b}", f"{b}_to_{a}") for k in (1, 5, 10)]

    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        from mmkit.report import retrieval_grid, similarity_heatmap

        query, gallery = ("text", next(m for m in self.modalities if m != "text")) \
            if "text" in self.modalities else tuple(self.modalities)
        similarity = full_precision_similarity(outputs[query], outputs[gallery])
        figures = {"similarity": similarity_heatmap(similarity[:32, :32], query, gallery)}
        if dataset is not None:
            figures["retrieval_examples"] = retrieval_grid(dataset, similarity, same_pair(outputs), query, gallery)
        return figures


def same_pair(outputs: dict[str, Any]) -> torch.Tensor:
    """[N, N]: which held-out items count as the same pair: they share a caption or their
    files (each item only itself without either)."""
    count = len(next(v for v in outputs.values() if isinstance(v, torch.Tensor)))
    same = torch.eye(count, dtype=torch.bool)
    for keys in (outputs["captions"], outputs.get("files")):
        if keys:
            groups: dict[Any, int] = {}
            group = torch.tensor([groups.setdefault(key, len(groups)) for key in keys])
            same |= group.unsqueeze(0) == group.unsqueeze(1)
    return same


def caption_tokens(text: torch.Tensor | dict[str, torch.Tensor], encoder: Encoder) -> list[tuple[int, ...]]:
    """Each caption's real token ids (no padding, which depends on the batch's longest text)."""
    ids, real = (t.cpu() for t in token_ids(text))
    pad_id = getattr(encoder, "pad_id", None)
    if pad_id is not None:
        real = real & (ids != pad_id)  # not in place: real may be the batch's own mask
    return [tuple(row[keep].tolist()) for row, keep in zip(ids, real)]


MAX_SCALE = 100.0


def shared_width(encoders: dict[str, Encoder], modalities: list[str]) -> int:
    """The one width of the encoders' pooled features, compared without projections."""
    widths = {m: encoders[m].dim for m in modalities}
    if len(set(widths.values())) > 1:
        raise MMKitError(f"clip_retrieval with project = false compares the encoders' pooled features directly, "
                         f"so they need one width; got {', '.join(f'{m} {w}' for m, w in widths.items())}: "
                         "set task.project = true")
    return next(iter(widths.values()))


def clamped_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The softmax scale exp(logit_scale), clamped at 100 as CLIP does, so training stays stable."""
    return logit_scale.clamp(max=math.log(MAX_SCALE)).exp()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: each row of ``a`` must pick its pair among all of ``b`` and the
    other way round, averaged. Under several processes the rows are contrasted with the
    global batch, labels offset by this process's place in it, as open_clip's local loss."""
    (all_a, all_b), offset = gather_across_processes(a, b)
    labels = torch.arange(len(a), device=a.device) + offset
    return (F.cross_entropy(scale * a @ all_b.T, labels) + F.cross_entropy(scale * b @ all_a.T, labels)) / 2


def both_directions(embeddings: dict[str, torch.Tensor], relevant: torch.Tensor, a: str, b: str) -> dict[str, float]:
    """Recall@k and ranks of ``a`` -> ``b`` (queries from ``a``) and ``b`` -> ``a``, each with
    its chance level under ``chance/``; ``relevant`` is symmetric, [N, N]."""
    similarity = full_precision_similarity(embeddings[a], embeddings[b])
    metrics = {}
    for direction, sim in ((f"{a}_to_{b}", similarity), (f"{b}_to_{a}", similarity.T)):
        for name, value in retrieval_metrics(sim, relevant).items():
            metrics[f"{direction}/{name}"] = value
        for name, value in chance_retrieval_metrics(relevant).items():
            metrics[f"chance/{direction}/{name}"] = value
    return metrics


def gather_across_processes(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every process's embeddings (with gradients), so each process contrasts its batch with
    the whole global batch, as open_clip does; and where this process's rows start."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors), 0
    from torch.distributed.nn.functional import all_gather

    return [torch.cat(all_gather(t)) for t in tensors], dist.get_rank() * len(tensors[0])


def full_precision_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[Na, Nb] dot products in fp32 even under bf16 autocast, so ranks are not rounded."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T
