"""pretrain: self-supervised training by a fusion head's own loss terms (mlm_ae), no labels."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from mmkit.encoders.base import Encoded, Encoder
from mmkit.errors import MMKitError
from mmkit.fusion.base import Fused, FusionHead
from mmkit.tasks.base import Task

HELD_OUT_SEED = 0  # held-out batches are masked alike at every evaluation
SHOWN_ITEMS = 4  # held-out items in the report's figures
SHOWN_WORDS = 5


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
        rows: dict[str, list[Any]] = {}
        generator = None
        for batch in batches:
            generator = generator or torch.Generator(self.device).manual_seed(HELD_OUT_SEED)
            prepared = self.prepare(batch, generator)
            for key, value in self.fusion.statistics(self.encode(prepared), prepared).items():
                rows.setdefault(key, []).append(value)
        return {key: torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]
                for key, values in rows.items()}

    def evaluate(self, outputs: dict[str, Any]) -> dict[str, float]:
        return self.fusion.measures(outputs) if outputs else {}

    def headline(self) -> list[str]:
        return self.fusion.headline()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        if dataset is None or not len(dataset):
            return {}
        from mmkit.engine.loop import to_device

        samples = [dataset[i] for i in range(min(SHOWN_ITEMS, len(dataset)))]
        batch = {m: (encoder.collate or default_collate)([encoder.preprocess(s[m]) for s in samples])
                 for m, encoder in self.encoders.items()}
        was_training = self.training
        self.eval()
        batch = self.prepare(to_device(batch, self.device), torch.Generator(self.device).manual_seed(HELD_OUT_SEED))
        encoded = self.encode(batch)
        figures = {**self.fusion.figures(encoded, batch), **self.attention_figure(encoded, batch, self.fusion(encoded, batch))}
        self.train(was_training)
        return figures

    def attention_figure(self, encoded: dict[str, Encoded], batch: dict[str, Any], fused: Fused) -> dict[str, Any]:
        """Where the first words of each shown text attend in the other modality (the last
        layer of text -> other attention, averaged over heads), drawn over its input; a masked
        word is shown as written, in brackets."""
        from mmkit.fusion.mlm_ae import IGNORE, token_ids
        from mmkit.report import attention_maps

        names = sorted((name for name in fused.attention if name.startswith("text->")), key=lambda n: int(n.rsplit("/", 1)[1]))
        if not names or "text" not in self.encoders:
            return {}
        other = names[-1].split("->")[1].split("/")[0]
        grid, prefix = encoded[other].grid, encoded[other].prefix
        if grid is None or other == "text":
            return {}
        weights = fused.attention[names[-1]].float().mean(dim=1)[..., prefix:].cpu()  # [B, words, cells]
        ids, real = token_ids(batch["text"])
        masked = batch.get("mlm_targets", torch.full_like(ids, IGNORE)) != IGNORE
        ids = torch.where(masked, batch.get("mlm_targets", ids), ids)  # the words as written
        text = self.encoders["text"]
        hidden = {text.pad_id, text.mask_id, *text.special_ids}
        inputs, words, maps = [], [], []
        for i in range(len(weights)):
            shown = [t for t, (token, is_real) in enumerate(zip(ids[i].tolist(), real[i].tolist()))
                     if is_real and token not in hidden][:SHOWN_WORDS]
            if shown:
                _, height, width = self.encoders[other].cell or (0, *batch[other].shape[-2:])
                covered = batch.get("ae_target", batch[other])[i, :, : grid[0] * height, : grid[1] * width]
                inputs.append(covered.float().cpu())
                written = text.words([ids[i, t].item() for t in shown])
                words.append([f"[{w}]" if masked[i, t] else w for w, t in zip(written, shown)])
                maps.append(weights[i, shown].reshape(len(shown), *grid))
        return {"attention_maps": attention_maps(inputs, words, maps)} if inputs else {}
