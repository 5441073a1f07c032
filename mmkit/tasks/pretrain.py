"""pretrain: self-supervised training by a fusion head's own loss terms (mlm_ae), no labels."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from mmkit.encoders.base import Encoded, Encoder
from mmkit.errors import MMKitError
from mmkit.fusion.base import FusionHead
from mmkit.tasks.base import Task

HELD_OUT_SEED = 0  # held-out batches are masked alike at every evaluation


class Pretrain(Task):
    """Self-supervised pretraining: the recipe's encoders and a fusion head that learns by
    itself (``mlm_ae``: L_MLM + λ·L_AE, λ = ``train.loss_weights.ae``); the data needs no labels.
    Held-out batches are masked with a fixed seed, so evaluations compare: the head's measures
    (masked-token accuracy, reconstruction error) beside their chance levels. Figures: the
    head's (inputs and reconstructions) and where each word attends in the other modality.
    ``init_from`` this run's folder starts a fine-tune from its encoders and head.
    """

    def __init__(self, encoders: dict[str, Encoder], fusion: FusionHead | None = None):
        super().__init__()
        if fusion is None:
            raise MMKitError('pretrain learns from a fusion head\'s own loss terms: add [model.fusion] with name = "mlm_ae"')
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        return self.fusion.prepare(batch, generator)

    def item_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.fusion.item_counts(batch)

    def encode(self, batch: dict[str, Any]) -> dict[str, Encoded]:
        return {m: encoder(batch[m]) for m, encoder in self.encoders.items()}

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        fused = self.fusion(self.encode(batch), batch)
        if not fused.losses:
            raise MMKitError(f"pretrain: the fusion head {type(self.fusion).__name__} gave no loss terms of its own; "
                             'pretrain needs a head that learns by itself, such as "mlm_ae"')
        return fused.values()

    @torch.no_grad()
    def predict(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """The head's statistics of each held-out batch (a row each), masked with a fixed seed."""
        from mmkit.engine.evaluation import join

        rows = []
        generator = torch.Generator(self.device).manual_seed(HELD_OUT_SEED)
        for batch in batches:
            prepared = self.prepare(batch, generator)
            rows.append(self.fusion.statistics(self.encode(prepared), prepared))
        return join(rows) if rows else {}

    def evaluate(self, outputs: dict[str, Any]) -> dict[str, float]:
        return self.fusion.measures(outputs) if outputs else {}

    def headline(self) -> list[str]:
        return self.fusion.headline()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        from mmkit.tasks.shown import attention_figure, in_eval_mode, shown_batch

        if dataset is None or not len(dataset):
            return {}
        with in_eval_mode(self):
            batch = self.prepare(shown_batch(dataset, dict(self.encoders), self.device),
                                 torch.Generator(self.device).manual_seed(HELD_OUT_SEED))
            encoded = self.encode(batch)
            fused = self.fusion(encoded, batch)
            return {**self.fusion.figures(encoded, batch), **attention_figure(dict(self.encoders), encoded, batch, fused)}
