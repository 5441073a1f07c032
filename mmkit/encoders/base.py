"""The encoder contract: every encoder returns ``Encoded`` and owns its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Encoded:
    """What an encoder returns: per-token features, a pooled vector and the token mask.

    ``mask`` is True where a token is real (not padding).
    """

    tokens: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor  # [B, D]
    mask: torch.Tensor  # [B, T] bool


class Encoder(nn.Module):
    """Base class for encoders.

    ``dim`` is the feature width. ``preprocess`` turns one raw sample value (image, text,
    waveform) into the tensor ``forward`` takes; it is a small picklable object, not a
    method, so DataLoader workers get the transform without a copy of the weights.
    """

    dim: int
    preprocess: Callable[[Any], torch.Tensor]

    def forward(self, inputs: torch.Tensor) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens only: [B, T, D] with a [B, T] mask -> [B, D]."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def freeze(module: nn.Module) -> None:
    """Stop training a module's parameters (for frozen pretrained backbones)."""
    for p in module.parameters():
        p.requires_grad_(False)
