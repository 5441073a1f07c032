"""A small text transformer trained from scratch, tokenised with open_clip's BPE vocabulary."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkit.encoders.base import Encoded, Encoder, masked_mean


class Tokenize:
    """Text -> fixed-length token ids with open_clip's byte-pair tokenizer (its vocabulary
    ships inside the package, so this works offline). Two ids past the byte-pair vocabulary
    are the mask token, which no text is tokenized to, and padding (open_clip pads with 0,
    which is also the token "!")."""

    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.tokenizer = SimpleTokenizer()
        self.context_length = context_length
        self.mask_id = len(self.tokenizer.encoder)
        self.pad_id = self.mask_id + 1
        self.vocab_size = self.pad_id + 1

    def __call__(self, text: str) -> torch.Tensor:
        ids = self.tokenizer([text], context_length=self.context_length)[0]
        return pad_after_end(ids, self.tokenizer.eot_token_id, self.pad_id)

    def words(self, ids: list[int]) -> list[str]:
        return bpe_words(self.tokenizer, ids, {self.mask_id: "[mask]", self.pad_id: "[pad]"})


def bpe_words(tokenizer: Any, ids: list[int], extra: dict[int, str]) -> list[str]:
    """open_clip byte-pair ids as text, ids past the vocabulary by ``extra``."""
    return [extra[i] if i in extra else tokenizer.decode([i]).strip() for i in ids]


class TrimPadding:
    """Texts -> one batch, cut after the last position any text of it uses: the padding all of
    them share is neither stored nor computed. Every text encoder masks padding (or attends
    causally and pools the end token), so each text's features are what the full width gives.
    Takes token ids, padded with ``pad_id``, or a tokenizer's {"input_ids", "attention_mask", ...}."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, values: list[Any]) -> torch.Tensor | dict[str, torch.Tensor]:
        from torch.utils.data import default_collate

        batch = default_collate(values)
        real = batch["attention_mask"].bool() if isinstance(batch, dict) else batch != self.pad_id
        used = real.any(dim=0).nonzero()
        width = int(used[-1]) + 1 if len(used) else 1
        if isinstance(batch, dict):
            return {key: value[:, :width] for key, value in batch.items()}
        return batch[:, :width]


def pad_after_end(ids: torch.Tensor, end_id: int, pad_id: int) -> torch.Tensor:
    """``ids`` with every position after the first end-of-text token set to ``pad_id``."""
    end = int((ids == end_id).nonzero()[0]) + 1
    padded = ids.clone()
    padded[end:] = pad_id
    return padded


class TransformerTextEncoder(Encoder):
    """A small bidirectional transformer over BPE tokens, trained from scratch.

    Args:
        width: feature width of every token.
        layers: transformer blocks.
        heads: attention heads per block.
        context_length: tokens per text; longer texts are truncated.
        dropout: dropout inside the blocks.
    """

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4,
                 context_length: int = 32, dropout: float = 0.0):
        super().__init__()
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        self.preprocess = Tokenize(context_length)
        self.collate = TrimPadding(self.preprocess.pad_id)
        self.dim = width
        self.vocab_size, self.pad_id, self.mask_id = self.preprocess.vocab_size, self.preprocess.pad_id, self.preprocess.mask_id
        self.special_ids = (self.preprocess.tokenizer.sot_token_id, self.preprocess.tokenizer.eot_token_id)
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> Encoded:
        mask = ids != self.pad_id
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        tokens = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        return Encoded(tokens=tokens, pooled=masked_mean(tokens, mask), mask=mask)

    def words(self, ids: list[int]) -> list[str]:
        return self.preprocess.words(ids)
