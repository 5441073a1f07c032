"""cross_attention: one modality's tokens attend to another's, Attention(Q, K, V) = softmax(QKᵀ/√d_k)·V."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmkit.encoders.base import Encoded, masked_mean
from mmkit.errors import MMKitError
from mmkit.fusion.base import FusionHead, Fused, Modality


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries over keys and values from another sequence, returning
    its weights [B, heads, queries, keys]; a padded key (mask False) gets weight zero."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise MMKitError(f"dim {dim} does not split into {heads} heads; make dim a multiple of heads")
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        attended = (self.dropout(weights) @ v).transpose(1, 2).flatten(2)
        return self.out(attended), weights

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> [B, heads, T, head_dim]."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)


class CrossAttentionLayer(nn.Module):
    """Attention to the context, then a feed-forward block, each added to its input and
    layer-normed (the Transformer's post-norm residual blocks)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads, dropout)
        self.attention_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, ffn * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn * dim, dim))
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attention(x, context, mask)
        x = self.attention_norm(x + self.dropout(attended))
        return self.feed_forward_norm(x + self.dropout(self.feed_forward(x))), weights


class CrossAttention(FusionHead):
    """Cross-attention fusion: the tokens of the ``query`` modality attend to those of the
    ``context`` modality (multi-head, residual + layer norm + feed-forward, ``layers`` deep);
    with ``both``, the context attends to the query tokens too, each direction from the other's
    previous layer. Each stream's tokens are first projected to ``dim``. Fused tokens: the query
    stream's (then the context's, with ``both``); pooled: their mean over real tokens (the two
    means concatenated and projected, with ``both``). Attention weights are kept per layer as
    "<query>-><context>/<layer>".

    Args:
        query: the modality whose tokens ask (default "text" if the recipe has it, else the first).
        context: the modality attended to (default the other one; the query itself attends to itself).
        dim: width of the fused tokens.
        heads: attention heads (dim must split evenly).
        layers: cross-attention layers.
        ffn: the feed-forward block's width as a multiple of dim.
        dropout: dropout on attention weights and on each block's output.
        both: attend both ways.
    """

    def __init__(self, modalities: dict[str, Modality], query: str | None = None, context: str | None = None,
                 dim: int = 256, heads: int = 4, layers: int = 1, ffn: int = 4, dropout: float = 0.0,
                 both: bool = False):
        super().__init__()
        self.query, self.context = streams(modalities, query, context)
        if layers < 1:
            raise MMKitError(f"layers must be at least 1, got {layers}")
        self.dim, self.both = dim, both
        pair = dict.fromkeys((self.query, self.context))
        self.inputs = nn.ModuleDict({m: nn.Linear(modalities[m].token_dim, dim) for m in pair})
        self.forward_layers = nn.ModuleList(CrossAttentionLayer(dim, heads, ffn, dropout) for _ in range(layers))
        if both:
            self.backward_layers = nn.ModuleList(CrossAttentionLayer(dim, heads, ffn, dropout) for _ in range(layers))
            self.merge = nn.Linear(2 * dim, dim)

    def forward(self, encoded: dict[str, Encoded], batch: dict[str, Any]) -> Fused:
        asking, asked = encoded[self.query], encoded[self.context]
        x, context = self.inputs[self.query](asking.tokens), self.inputs[self.context](asked.tokens)
        attention = {}
        for i, layer in enumerate(self.forward_layers):
            updated, attention[f"{self.query}->{self.context}/{i}"] = layer(x, context, asked.mask)
            if self.both:
                context, attention[f"{self.context}->{self.query}/{i}"] = self.backward_layers[i](context, x, asking.mask)
            x = updated
        pooled = masked_mean(x, asking.mask)
        if not self.both:
            return Fused(pooled=pooled, tokens=x, mask=asking.mask, attention=attention)
        pooled = self.merge(torch.cat([pooled, masked_mean(context, asked.mask)], dim=-1))
        return Fused(pooled=pooled, tokens=torch.cat([x, context], dim=1),
                     mask=torch.cat([asking.mask, asked.mask], dim=1), attention=attention)


def streams(modalities: dict[str, Modality], query: str | None, context: str | None) -> tuple[str, str]:
    """The (query, context) modalities a cross-attention head pairs, checked against the recipe's."""
    names = list(modalities)
    for key, value in (("query", query), ("context", context)):
        if value is not None and value not in modalities:
            raise MMKitError(f"{key} {value!r} is none of the recipe's encoders ({', '.join(names)})")
    if query is None:
        query = "text" if "text" in names and context != "text" else next((m for m in names if m != context), names[0])
    if context is None:
        others = [m for m in names if m != query]
        if len(others) > 1:
            raise MMKitError(f"the recipe has {len(names)} encoders ({', '.join(names)}): name the pair with "
                             "query and context")
        context = others[0] if others else query
    return query, context
