"""concat: the modalities' pooled features, each layer-normed, concatenated and mixed by an MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkit.encoders.base import Encoded
from mmkit.errors import MMKitError
from mmkit.fusion.base import FusionHead, Fused, Modality


class Concat(FusionHead):
    """Late fusion: each modality's pooled features are layer-normed (so no modality's scale
    drowns the others), concatenated (image, text, audio) and passed through an MLP.
    The fused tokens are the pooled vector as one token.

    Args:
        dim: width of the fused features.
        layers: linear layers of the MLP (GELU between them); 1 is a single projection.
        dropout: dropout before each linear layer.
    """

    def __init__(self, modalities: dict[str, Modality], dim: int = 256, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        if len(modalities) < 2:
            raise MMKitError(f"concat fuses two or more modalities; the recipe has {', '.join(modalities) or 'none'}")
        if layers < 1:
            raise MMKitError(f"layers must be at least 1, got {layers}")
        self.order = list(modalities)
        self.dim = dim
        self.norms = nn.ModuleDict({m: nn.LayerNorm(modalities[m].dim) for m in self.order})
        widths = [sum(modalities[m].dim for m in self.order)] + [dim] * layers
        steps: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            steps += [nn.GELU()] if i else []
            steps += [nn.Dropout(dropout), nn.Linear(width_in, width_out)]
        self.mlp = nn.Sequential(*steps)

    def forward(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> Fused:
        pooled = self.mlp(torch.cat([self.norms[m](encoded[m].pooled) for m in self.order], dim=-1))
        mask = torch.ones(len(pooled), 1, dtype=torch.bool, device=pooled.device)
        return Fused(pooled=pooled, tokens=pooled.unsqueeze(1), mask=mask)
