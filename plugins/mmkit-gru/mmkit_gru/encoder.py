"""The GRU text encoder."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmkit.encoders.base import Encoded, Encoder, masked_mean
from mmkit.encoders.text import Tokenize, TrimPadding


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
        self.collate = TrimPadding(self.preprocess.pad_id)  # a batch cut after its longest text
        self.dim = width
        self.vocab_size, self.pad_id, self.mask_id = self.preprocess.vocab_size, self.preprocess.pad_id, self.preprocess.mask_id
        self.embedding = nn.Embedding(self.vocab_size, width, padding_idx=self.pad_id)
        self.gru = nn.GRU(width, width // 2, num_layers=layers, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> Encoded:
        mask = ids != self.pad_id
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        states, _ = self.gru(packed)  # packing keeps padding out of the backward direction
        tokens, _ = pad_packed_sequence(states, batch_first=True, total_length=ids.shape[1])
        tokens = self.norm(tokens)
        return Encoded(tokens=tokens, pooled=masked_mean(tokens, mask), mask=mask)
