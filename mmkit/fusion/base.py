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
    and tokens, and for text its vocabulary size and the ids of padding and of the mask token
    (for heads that predict tokens). Token grids come with each batch's ``Encoded``."""

    dim: int
    token_dim: int
    vocab_size: int | None = None
    pad_id: int | None = None
    mask_id: int | None = None

    @classmethod
    def of(cls, encoder: Encoder) -> Modality:
        return cls(encoder.dim, encoder.token_dim, *(getattr(encoder, key, None) for key in ("vocab_size", "pad_id", "mask_id")))


@dataclass
class Fused:
    """What a fusion head returns: ``pooled`` [B, dim] and ``tokens`` [B, T, dim] with their
    ``mask`` [B, T] (True where real); ``losses``, terms of the head's own (e.g. "mlm") that
    the engine adds to the task's, weighted by the recipe's ``train.loss_weights``; and
    ``attention``, weights by name [B, heads, queries, keys] where the head has them."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)


class FusionHead(nn.Module):
    """Base class for fusion heads: ``dim`` is the width of the fused features. A head's
    factory takes ``modalities`` (a Modality per recipe encoder, provided by mmkit) and its
    own recipe parameters; the task owns the encoders and hands their outputs to ``forward``."""

    dim: int

    def forward(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> Fused:  # pragma: no cover - abstract
        raise NotImplementedError
