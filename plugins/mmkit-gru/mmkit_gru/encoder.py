"""The GRU text encoder."""

from __future__ import annotations

import torch
from torch import nn

from mmkit.encoders.base import Encoded, Encoder
from mmkit.encoders.text import Tokenize


class GRUTextEncoder(Encoder):
    """A bidirectional GRU over BPE tokens; pooled is the mean of the real tokens' states.

    Args:
        width: token embedding and output feature width.
        layers: stacked GRU layers.
        context_length: tokens per text; longer texts are truncated.
    """

    def __init__(self, width: int = 256, layers: int = 1, context_length: int = 32):
        super().__init__()
        self.preprocess = Tokenize(context_length)
        self.dim = width
        self.embedding = nn.Embedding(self.preprocess.vocab_size, width, padding_idx=0)
        self.gru = nn.GRU(width, width // 2, num_layers=layers, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> Encoded:
        mask = ids != 0
        tokens, _ = self.gru(self.embedding(ids))
        tokens = self.norm(tokens)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask)
