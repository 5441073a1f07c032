"""The fusion-head contract: built from each modality's widths, a head turns the encoders'
``Encoded`` features into one fused representation, with loss terms of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmkit.encoders.base import Encoded, Encoder


@dataclass(frozen=True)
class Modality:
    """What a fusion head knows of one modality's encoder: the widths of its pooled features
    and tokens; for text its vocabulary size and the ids of padding, of the mask token and of
    the other special tokens (for heads that predict tokens); for a grid encoder what one grid
    cell covers of its input (channels, rows, columns; for heads that reconstruct it). Token
    grids come with each batch's ``Encoded``."""

    dim: int
    token_dim: int
    vocab_size: int | None = None
    pad_id: int | None = None
    mask_id: int | None = None
    special_ids: tuple[int, ...] = ()
    cell: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, encoder: Encoder) -> Modality:
        return cls(encoder.dim, encoder.token_dim, *(getattr(encoder, key, None) for key in ("vocab_size", "pad_id", "mask_id")),
                   special_ids=tuple(encoder.special_ids), cell=encoder.cell)


@dataclass
class Fused:
    """What a fusion head returns: ``pooled`` [B, dim] and ``tokens`` [B, T, dim] with their
    ``mask`` [B, T] (True where real); ``losses``, terms of the head's own (e.g. "mlm") that
    the engine adds to the task's as ``loss/<name>``, weighted by the recipe's
    ``train.loss_weights``; ``logged``, values only logged (masked-token accuracy); and
    ``attention``, weights by name [B, heads, queries, keys] where the head has them."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logged: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)

    def values(self) -> dict[str, torch.Tensor]:
        """The head's losses (as ``loss/<name>``) and logged values, as a task returns them."""
        return {**{f"loss/{name}": value for name, value in self.losses.items()}, **self.logged}


class FusionHead(nn.Module):
    """Base class for fusion heads: ``dim`` is the width of the fused features. A head's
    factory takes ``modalities`` (a Modality per recipe encoder, provided by mmkit) and its
    own recipe parameters; the task owns the encoders and hands their outputs to ``forward``."""

    dim: int

    def forward(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> Fused:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """The batch the encoders see: a head that learns by undoing a corruption (masked
        tokens) applies it here, before encoding; the batch itself by default."""
        return batch

    def item_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Items of the values that ``forward`` sums rather than averages (``loss/mlm`` over masked
        tokens), by the key a task returns them under; the engine normalises by the step's count."""
        return {}

    # A head that learns by itself (its own loss terms) also measures held-out data:

    def statistics(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> dict[str, Any]:
        """Sums over one prepared held-out batch: tensors of one row [1, ...] (mmkit joins the
        rows of every batch and process), or one-item lists."""
        return {}

    def measures(self, statistics: dict[str, Any]) -> dict[str, float]:
        """Held-out metrics from the joined statistics, each with ``chance/<name>`` beside it."""
        return {}

    def headline(self) -> list[str]:
        """The measures whose values over training the report plots."""
        return []

    def figures(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> dict[str, Any]:
        """Figures of a few prepared held-out items (e.g. inputs and their reconstructions)."""
        return {}
