"""mlm_ae: the source documents' joint pretraining loss over text and one other modality,
L = L_MLM(text) + λ·L_AE(image or audio), with the text attending to the other modality."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.encoders.base import Encoded, token_ids, with_ids
from mmkit.errors import MMKitError
from mmkit.fusion.base import Fused, Modality
from mmkit.fusion.cross_attention import CrossAttention

IGNORE = -100  # a token that is not predicted


class MlmAe(CrossAttention):
    """Joint masked-language-model + autoencoder pretraining. ``prepare`` (before encoding)
    masks ``mask_ratio`` of each text's word tokens as BERT does (80% become the mask token,
    10% a random token, 10% stay) and, with ``ae_mask_ratio``, blanks that share of the other
    modality's grid cells (set to the item's mean value), as SimMIM does. The text tokens attend to
    the other modality's (the cross_attention head's layers) and predict each masked token:
    L_MLM is the mean negative log-likelihood over the masked tokens of the optimizer step. A
    small decoder maps each of the other encoder's grid tokens back to the input cell it covers:
    L_AE is the mean squared error over the blanked cells (every cell without blanking). The
    engine adds L_MLM + λ·L_AE, λ being ``train.loss_weights.ae``; masked-token accuracy is logged.

    Args:
        context: the modality attended to and reconstructed (default the recipe's other one).
        dim: width of the fused tokens.
        heads: attention heads.
        layers: cross-attention layers.
        ffn: feed-forward width as a multiple of dim.
        dropout: dropout in the cross-attention layers.
        mask_ratio: the share of word tokens masked for L_MLM.
        ae_mask_ratio: the share of grid cells blanked for L_AE (0: reconstruct every cell, unblanked).
        decoder_layers: linear layers of the decoder (GELU between them).
    """

    def __init__(self, modalities: dict[str, Modality], context: str | None = None, dim: int = 256, heads: int = 4,
                 layers: int = 1, ffn: int = 4, dropout: float = 0.0, mask_ratio: float = 0.15,
                 ae_mask_ratio: float = 0.0, decoder_layers: int = 2):
        if "text" not in modalities:
            raise MMKitError(f"mlm_ae pairs a text encoder with an image or audio one; the recipe has "
                             f"{', '.join(modalities)}: add [model.text]")
        # One way only: attention back to the text would reach neither loss (and leave DDP unused parameters).
        super().__init__(modalities, "text", context, dim, heads, layers, ffn, dropout, both=False)
        text, other = modalities["text"], modalities[self.context]
        if self.context == "text":
            raise MMKitError("mlm_ae pairs the text with another modality; the recipe has only text")
        if text.vocab_size is None or text.mask_id is None or text.pad_id is None:
            raise MMKitError("mlm_ae: the text encoder gives no vocab_size, pad_id and mask_id, which masking needs")
        if other.cell is None:
            raise MMKitError(f"mlm_ae: the {self.context} encoder does not say what part of its input each token "
                             "covers (its `cell`), which the autoencoder needs to reconstruct it")
        if not 0 < mask_ratio <= 1 or not 0 <= ae_mask_ratio < 1:
            raise MMKitError(f"mlm_ae: mask_ratio must be in (0, 1] and ae_mask_ratio in [0, 1), "
                             f"got {mask_ratio} and {ae_mask_ratio}")
        self.mask_ratio, self.ae_mask_ratio, self.cell = mask_ratio, ae_mask_ratio, other.cell
        self.vocab_size, self.mask_id = text.vocab_size, text.mask_id
        self.register_buffer("unmaskable", torch.tensor(sorted({text.pad_id, text.mask_id, *text.special_ids})),
                             persistent=False)
        self.mlm = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, text.vocab_size))
        self.decoder = decoder(other.token_dim, dim, decoder_layers, math.prod(other.cell))

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """The batch with its text masked (targets under ``mlm_targets``) and, with ae_mask_ratio,
        the other modality's cells blanked (the original under ``ae_target``, the blanked cells
        under ``ae_cells``); a batch already prepared is left as it is."""
        if "mlm_targets" in batch:
            return batch
        ids, real = token_ids(batch["text"])
        maskable = real & ~torch.isin(ids, self.unmaskable.to(ids.device))
        masked, targets = mask_tokens(ids, maskable, self.mask_ratio, self.mask_id, self.vocab_size,
                                      self.unmaskable.to(ids.device), generator)
        source = batch[self.context]
        cells = self.grid(source)
        shape = (len(source), *cells)
        if self.ae_mask_ratio:
            blanked = torch.rand(shape, generator=generator, device=source.device) < self.ae_mask_ratio
            fill = source.mean(dim=tuple(range(1, source.dim())), keepdim=True)  # the item's mean value
            shown = torch.where(self.pixels(blanked, source.shape[-2:]), fill, source)
        else:
            blanked, shown = torch.ones(shape, dtype=torch.bool, device=source.device), source
        return {**batch, "text": with_ids(batch["text"], masked), "mlm_targets": targets, self.context: shown,
                "ae_target": source, "ae_cells": blanked}

    def item_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        masked = (batch["mlm_targets"] != IGNORE).sum()
        return {"loss/mlm": masked, "mlm_accuracy": masked, "loss/ae": batch["ae_cells"].sum() * math.prod(self.cell)}

    def forward(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> Fused:
        fused = super().forward(encoded, batch)
        if "mlm_targets" not in batch:  # a batch not prepared (nothing masked): the fused features only
            return fused
        words = fused.tokens[:, : encoded["text"].tokens.shape[1]]
        targets = batch["mlm_targets"]
        chosen = targets != IGNORE
        logits = self.mlm(words[chosen]).float()
        fused.losses["mlm"] = F.cross_entropy(logits, targets[chosen], reduction="sum")
        fused.logged["mlm_accuracy"] = (logits.argmax(dim=-1) == targets[chosen]).sum().float()
        fused.losses["ae"] = self.squared_errors(encoded[self.context], batch).sum()
        return fused

    @torch.no_grad()
    def statistics(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's summed MLM and AE terms with their counts, its masked targets, and the
        per-value sums that give the mean-input baseline."""
        fused = self(encoded, batch)
        targets = batch["mlm_targets"]
        chosen = targets != IGNORE
        target, counted = self.covered(encoded[self.context], batch)
        counted = counted.float()
        row = lambda value: value.detach().float().reshape(1, *value.shape).cpu()  # noqa: E731
        return {"mlm_nll": row(fused.losses["mlm"]), "mlm_correct": row(fused.logged["mlm_accuracy"]),
                "mlm_count": row(chosen.sum()), "mlm_targets": [targets[chosen].tolist()],
                "ae_sse": row(fused.losses["ae"]), "ae_count": row(counted.sum() * target.shape[1]),
                "items": row(torch.tensor(len(target))), "input_sum": row(target.sum(0)),
                "counted_sum": row((target * counted).sum(0)), "counted_square": row((target.square() * counted).sum(0)),
                "counted": row(counted.sum(0))}

    def measures(self, statistics: dict[str, Any]) -> dict[str, float]:
        """Masked-token accuracy and loss beside predicting the held-out targets' most frequent
        token (and their frequencies); reconstruction error beside predicting the mean input."""
        total = {key: value.sum(0).double() for key, value in statistics.items() if isinstance(value, torch.Tensor)}
        if not total or total["mlm_count"] == 0:
            return {}
        targets = torch.tensor([t for batch in statistics["mlm_targets"] for t in batch])
        frequency = torch.bincount(targets).double() / len(targets)
        frequency = frequency[frequency > 0]
        mean = total["input_sum"] / total["items"]
        baseline = total["counted_square"] - 2 * mean * total["counted_sum"] + mean.square() * total["counted"]
        return {"mlm_accuracy": (total["mlm_correct"] / total["mlm_count"]).item(),
                "mlm_loss": (total["mlm_nll"] / total["mlm_count"]).item(),
                "ae_mse": (total["ae_sse"] / total["ae_count"]).item(),
                "chance/mlm_accuracy": frequency.max().item(),
                "chance/mlm_loss": -(frequency * frequency.log()).sum().item(),
                "chance/ae_mse": (baseline.sum() / total["ae_count"]).item()}

    def headline(self) -> list[str]:
        return ["mlm_accuracy", "ae_mse"]

    @torch.no_grad()
    def figures(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> dict[str, Any]:
        from mmkit.report import reconstructions

        reconstruction = self.reconstruct(encoded[self.context]).float().cpu()
        size = reconstruction.shape[-2:]
        crop = lambda x: x[..., : size[0], : size[1]].float().cpu()  # noqa: E731
        return {"reconstructions": reconstructions(crop(batch[self.context]), reconstruction, crop(batch["ae_target"]))}

    def reconstruct(self, encoded: Encoded) -> torch.Tensor:
        """The input [B, C, rows x cell rows, columns x cell columns] decoded from the grid tokens."""
        if encoded.grid is None:
            raise MMKitError(f"mlm_ae: the {self.context} encoder's tokens lie on no grid, so they cannot be decoded")
        rows, columns = encoded.grid
        channels, height, width = self.cell
        patches = self.decoder(encoded.tokens[:, encoded.prefix:])  # [B, rows x columns, C x h x w]
        patches = patches.reshape(len(patches), rows, columns, channels, height, width)
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(len(patches), channels, rows * height, columns * width)

    def squared_errors(self, encoded: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        """[B, C, H', W']: each reconstructed value's squared error where its cell counts (else 0)."""
        reconstruction = self.reconstruct(encoded).float()
        target, counted = self.covered(encoded, batch)
        return (reconstruction - target).square() * counted

    def covered(self, encoded: Encoded, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The original input [B, C, H', W'] where the grid's whole cells cover it, and where its
        values count [B, 1, H', W'] (the blanked cells, or all)."""
        cells = batch["ae_cells"]
        _, height, width = self.cell
        if encoded.grid != tuple(cells.shape[1:]):
            raise MMKitError(f"mlm_ae: the {self.context} encoder gives a {encoded.grid} grid where its "
                             f"{tuple(batch['ae_target'].shape[-2:])} input holds {tuple(cells.shape[1:])} cells of "
                             f"{height}x{width}; use an input size that is a multiple of the cell")
        size = (encoded.grid[0] * height, encoded.grid[1] * width)
        return batch["ae_target"][..., : size[0], : size[1]].float(), self.pixels(cells, size)

    def grid(self, source: torch.Tensor) -> tuple[int, int]:
        """How many whole cells the input [B, C, H, W] holds down and across."""
        _, height, width = self.cell
        return source.shape[-2] // height, source.shape[-1] // width

    def pixels(self, cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A [B, rows, columns] cell mask as a [B, 1, H, W] value mask (beyond the last whole cell: False)."""
        _, height, width = self.cell
        mask = cells.repeat_interleave(height, dim=1).repeat_interleave(width, dim=2)
        full = torch.zeros(len(cells), *size, dtype=torch.bool, device=cells.device)
        full[:, : mask.shape[1], : mask.shape[2]] = mask[:, : size[0], : size[1]]
        return full.unsqueeze(1)


def decoder(width_in: int, dim: int, layers: int, values: int) -> nn.Sequential:
    """Tokens -> each cell's values: ``layers`` linear layers with GELU between them."""
    if layers < 1:
        raise MMKitError(f"mlm_ae: decoder_layers must be at least 1, got {layers}")
    widths = [width_in] + [dim] * (layers - 1) + [values]
    steps: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        steps += ([nn.GELU()] if i else []) + [nn.Linear(a, b)]
    return nn.Sequential(*steps)


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, ratio: float, mask_id: int, vocab_size: int,
                unusable: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each maskable token is chosen with probability ``ratio``; a chosen one
    becomes the mask token (80%), a random token (10%; kept when the draw is a special token)
    or stays (10%). Returns the ids the encoder sees and the targets (IGNORE where not chosen)."""
    draw = lambda: torch.rand(ids.shape, generator=generator, device=ids.device)  # noqa: E731
    chosen = maskable & (draw() < ratio)
    how = draw()
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device)
    masked = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    swap = chosen & (how >= 0.8) & (how < 0.9) & ~torch.isin(random_ids, unusable)
    masked = torch.where(swap, random_ids, masked)
    return masked, torch.where(chosen, ids, torch.full_like(ids, IGNORE))
