"""cross_attention: softmax(QKᵀ/√d)·V by hand, padding ignored, residual + norm + feed-forward
blocks as written, both directions, and the pair of modalities it fuses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmkit import build
from mmkit.encoders.base import Encoded
from mmkit.errors import MMKitError
from mmkit.fusion.base import Modality
from mmkit.fusion.cross_attention import MultiHeadAttention, streams

WIDTHS = {"image": Modality(6, 6), "text": Modality(4, 4)}


def tokens(batch: int, length: int, dim: int, seed: int, real: list[int] | None = None) -> Encoded:
    """Random tokens; ``real`` gives each item's count of real tokens (the rest padding)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, length, dim, generator=g)
    mask = torch.arange(length) < torch.tensor(real or [length] * batch).unsqueeze(1)
    return Encoded(tokens=values, pooled=values.mean(1), mask=mask)


def head(**params):
    torch.manual_seed(0)
    return build("fusion_heads", "cross_attention", modalities=WIDTHS, **params).eval()


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def test_one_head_is_softmax_of_scaled_query_key_products_times_values():
    attention = MultiHeadAttention(dim=8, heads=1).eval()
    x, context = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    out, weights = attention(x, context, torch.ones(2, 5, dtype=torch.bool))
    q, k, v = linear(attention.query, x), linear(attention.key, context), linear(attention.value, context)
    by_hand = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
    assert torch.allclose(weights[:, 0], by_hand, atol=1e-6)
    assert torch.allclose(out, linear(attention.out, by_hand @ v), atol=1e-5)


def test_each_head_attends_with_its_own_slice_of_the_projections():
    attention = MultiHeadAttention(dim=8, heads=2).eval()
    x, context = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    out, weights = attention(x, context, torch.ones(1, 4, dtype=torch.bool))
    q, k, v = linear(attention.query, x), linear(attention.key, context), linear(attention.value, context)
    heads = []
    for h, part in enumerate((slice(0, 4), slice(4, 8))):
        w = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(4), dim=-1)  # √d_k of one head
        assert torch.allclose(weights[:, h], w, atol=1e-6)
        heads.append(w @ v[..., part])
    assert torch.allclose(out, linear(attention.out, torch.cat(heads, dim=-1)), atol=1e-5)


def test_rows_sum_to_one_and_padded_keys_get_no_weight_and_change_nothing():
    fusion = head(dim=8, heads=2, layers=2)
    text, image = tokens(2, 3, 4, seed=1), tokens(2, 5, 6, seed=2, real=[5, 3])
    fused = fusion({"image": image, "text": text}, {})
    for name in ("text->image/0", "text->image/1"):
        weights = fused.attention[name]
        assert weights.shape == (2, 2, 3, 5)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 3), atol=1e-6)
        assert torch.all(weights[1, :, :, 3:] == 0) and torch.all(weights[0] > 0)
    image.tokens[1, 3:] = 1e3  # padding's values must not reach the output
    assert torch.allclose(fusion({"image": image, "text": text}, {}).pooled, fused.pooled, atol=1e-6)


def test_a_one_layer_head_is_attention_then_feed_forward_each_with_residual_and_norm():
    fusion = head(dim=8, heads=1, layers=1, ffn=2)
    text, image = tokens(2, 3, 4, seed=3, real=[3, 2]), tokens(2, 5, 6, seed=4)
    fused = fusion({"image": image, "text": text}, {})
    layer = fusion.forward_layers[0]
    x, context = linear(fusion.inputs["text"], text.tokens), linear(fusion.inputs["image"], image.tokens)
    q, k, v = (linear(getattr(layer.attention, n), t) for n, t in (("query", x), ("key", context), ("value", context)))
    attended = linear(layer.attention.out, torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v)
    x = F.layer_norm(x + attended, (8,), layer.attention_norm.weight, layer.attention_norm.bias)
    hidden = linear(layer.feed_forward[3], F.gelu(linear(layer.feed_forward[0], x)))
    x = F.layer_norm(x + hidden, (8,), layer.feed_forward_norm.weight, layer.feed_forward_norm.bias)
    assert torch.allclose(fused.tokens, x, atol=1e-5) and torch.equal(fused.mask, text.mask)
    pooled = torch.stack([x[0].mean(0), x[1, :2].mean(0)])  # the mean over real query tokens
    assert torch.allclose(fused.pooled, pooled, atol=1e-5)


def test_both_directions_attend_each_way_from_the_others_previous_layer():
    fusion = head(dim=8, heads=2, layers=2, both=True)
    text, image = tokens(2, 3, 4, seed=5, real=[3, 1]), tokens(2, 5, 6, seed=6)
    fused = fusion({"image": image, "text": text}, {})
    assert set(fused.attention) == {"text->image/0", "image->text/0", "text->image/1", "image->text/1"}
    assert fused.attention["image->text/1"].shape == (2, 2, 5, 3)
    assert torch.all(fused.attention["image->text/0"][1, :, :, 1:] == 0)  # the text padding
    assert fused.tokens.shape == (2, 8, 8) and fused.mask.tolist()[1] == [True, False, False] + [True] * 5
    x, context = linear(fusion.inputs["text"], text.tokens), linear(fusion.inputs["image"], image.tokens)
    first, _ = fusion.forward_layers[0](x, context, image.mask)
    second, _ = fusion.backward_layers[0](context, x, text.mask)  # from the text before layer 0 updated it
    x, _ = fusion.forward_layers[1](first, second, image.mask)
    assert torch.allclose(fused.tokens[:, :3], x, atol=1e-5)


@pytest.mark.parametrize("names, query, context, pair", [
    (["image", "text"], None, None, ("text", "image")),
    (["text", "audio"], None, None, ("text", "audio")),
    (["image", "text"], "image", None, ("image", "text")),
    (["image", "text"], None, "text", ("image", "text")),
    (["image"], None, None, ("image", "image")),
    (["image", "text", "audio"], "audio", "image", ("audio", "image")),
])
def test_the_pair_defaults_to_text_asking_the_other(names, query, context, pair):
    assert streams({m: Modality(4, 4) for m in names}, query, context) == pair


@pytest.mark.parametrize("names, params, message", [
    (["image", "text", "audio"], {}, "the recipe has 3 encoders \\(image, text, audio\\): name the pair"),
    (["image", "text"], {"query": "audio"}, "query 'audio' is none of the recipe's encoders \\(image, text\\)"),
    (["image", "text"], {"dim": 10, "heads": 4}, "dim 10 does not split into 4 heads"),
])
def test_bad_pairs_and_widths_fail_in_one_line(names, params, message):
    with pytest.raises(MMKitError, match=message):
        build("fusion_heads", "cross_attention", modalities={m: Modality(4, 4) for m in names}, **params)


def test_a_classifier_fused_by_cross_attention_draws_where_its_words_attend(tiny_recipe):
    from mmkit.engine.run import Run
    from mmkit.recipe import load_recipe

    recipe = load_recipe(tiny_recipe, ["model.fusion={name='cross_attention', dim=32, heads=2}",
                                       "task={name='classification'}", "data.label_by=colour", "data.omit=['colour']"])
    Run(recipe).fit()
    folder = tiny_recipe.parent / "runs" / "tiny"
    assert (folder / "attention_maps.png").exists()
    assert 'src="attention_maps.png"' in (folder / "report.html").read_text()


def test_the_attention_maps_show_the_words_that_tell_the_texts_apart():
    from mmkit.tasks.shown import SHOWN_WORDS, shown_positions

    ids = torch.tensor([[9, 1, 2, 3, 4, 8, 0], [9, 1, 2, 5, 8, 0, 0], [9, 1, 2, 8, 0, 0, 0]])
    real = ids != 0
    # 9 and 8 are start and end; 1 and 2 ("frontal chest") are in every text
    assert shown_positions(ids, real, {9, 8}) == [[3, 4], [3], [1, 2]]  # the last has nothing else: its own words
    assert shown_positions(ids[:1], real[:1], {9, 8}) == [[1, 2, 3, 4]]  # one text: nothing is common
    many = torch.arange(1, 12).unsqueeze(0)
    assert len(shown_positions(many, many > 0, set())[0]) == SHOWN_WORDS
