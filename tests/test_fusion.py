"""The fusion-head contract: heads are built from widths (the task owns each encoder once),
concat computes what it says, and a head's own loss terms reach the optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmkit import build
from mmkit.encoders.base import Encoded
from mmkit.engine.loop import total_loss
from mmkit.errors import MMKitError
from mmkit.fusion.base import FusionHead, Fused, Modality
from mmkit.plugins import get_registry
from mmkit.samples import DatasetInfo

SHAPES = DatasetInfo(keys=("id", "image", "text", "label"), class_names=("a", "b", "c"), label_kind="single")


def encoded(batch: int, dim: int, seed: int) -> Encoded:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, 3, dim, generator=generator)
    return Encoded(tokens=tokens, pooled=torch.randn(batch, dim, generator=generator) * 5 + 2,
                   mask=torch.ones(batch, 3, dtype=torch.bool))


def tiny_encoders() -> dict:
    return {"image": build("image_encoders", "timm", model_name="test_resnet", image_size=32),
            "text": build("text_encoders", "transformer", width=32, layers=1, heads=2, context_length=8)}


def test_concat_is_a_linear_map_of_the_layer_normed_pooled_features_side_by_side():
    head = build("fusion_heads", "concat", modalities={"image": Modality(6, 6), "text": Modality(4, 4)}, dim=5, layers=1)
    features = {"image": encoded(2, 6, seed=0), "text": encoded(2, 4, seed=1)}
    fused = head(features, {})
    weight, bias = head.mlp[-1].weight, head.mlp[-1].bias
    normed = {m: F.layer_norm(features[m].pooled, (features[m].pooled.shape[1],)) for m in features}
    by_hand = normed["image"] @ weight[:, :6].T + normed["text"] @ weight[:, 6:].T + bias  # image first, then text
    assert torch.allclose(fused.pooled, by_hand, atol=1e-6)
    assert fused.tokens.shape == (2, 1, 5) and fused.mask.all() and fused.losses == {} and head.dim == 5


def test_concat_needs_two_modalities_and_a_layer():
    with pytest.raises(MMKitError, match="concat fuses two or more modalities; the recipe has image"):
        build("fusion_heads", "concat", modalities={"image": Modality(6, 6)})
    with pytest.raises(MMKitError, match="layers must be at least 1"):
        build("fusion_heads", "concat", modalities={"image": Modality(6, 6), "text": Modality(4, 4)}, layers=0)


def test_a_recipe_builds_the_head_from_widths_and_the_task_owns_each_encoder_once(tiny_recipe):
    from mmkit.components import build_parts
    from mmkit.plugins import get_registry
    from mmkit.recipe import load_recipe

    recipe = load_recipe(tiny_recipe, ["model.fusion.name=concat", "model.fusion.dim=16", "task={name='classification'}"])
    parts = build_parts(recipe, get_registry())
    encoder_parameters = {id(p) for e in parts.encoders.values() for p in e.parameters()}
    assert not encoder_parameters & {id(p) for p in parts.fusion.parameters()}  # widths in, no encoder modules
    reached = [p for _, p in parts.task.named_parameters(remove_duplicate=False)]
    assert len(reached) == len({id(p) for p in reached})  # no encoder (or head) reached twice
    assert parts.task.head[-1].in_features == 16 and parts.task.head[-1].out_features == 240
    text = parts.encoders["text"]
    assert Modality.of(text) == Modality(text.dim, text.token_dim, text.vocab_size, text.pad_id, text.mask_id,
                                         special_ids=(49406, 49407))  # start and end of text
    assert Modality.of(parts.encoders["image"]).cell == (3, 16, 16)  # test_vit's patches


class Agreement(FusionHead):
    """A head with a loss of its own: the two modalities' pooled features should agree."""

    def __init__(self, modalities: dict[str, Modality]):
        super().__init__()
        self.dim = 4
        self.project = torch.nn.ModuleDict({m: torch.nn.Linear(w.dim, 4) for m, w in modalities.items()})

    def forward(self, encoded, batch):
        image, text = (self.project[m](encoded[m].pooled) for m in ("image", "text"))
        mask = torch.ones(len(image), 1, dtype=torch.bool)
        return Fused(pooled=image + text, tokens=(image + text).unsqueeze(1), mask=mask,
                     losses={"agreement": (image - text).pow(2).mean()})


def test_the_heads_loss_terms_are_added_to_the_tasks_with_the_recipes_weights():
    encoders = tiny_encoders()
    head = Agreement({m: Modality.of(e) for m, e in encoders.items()})
    task = build("tasks", "classification", encoders=encoders, data=SHAPES, fusion=head)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.stack([encoders["text"].preprocess(c) for c in ("a red circle", "a blue cross", "a square")])
    losses = task.training_step({"image": images, "text": text, "label": torch.tensor([0, 1, 2])})
    assert set(losses) == {"loss/classification", "loss/agreement", "accuracy"}
    total = total_loss(losses, {"agreement": 0.25})
    assert total.item() == pytest.approx(losses["loss/classification"].item() + 0.25 * losses["loss/agreement"].item())
    with pytest.raises(MMKitError, match="remove task.modality, or \\[model.fusion\\]"):
        build("tasks", "classification", encoders=encoders, data=SHAPES, fusion=head, modality="image")


@pytest.mark.parametrize("name", [c.name for c in get_registry().components("fusion_heads")])
def test_every_fusion_head_fuses_tiny_encoders_and_trains(name):
    encoders = tiny_encoders()
    head = build("fusion_heads", name, modalities={m: Modality.of(e) for m, e in encoders.items()})
    task = build("tasks", "classification", encoders=encoders, data=SHAPES, fusion=head)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.stack([encoders["text"].preprocess(c) for c in ("a red circle", "a blue cross")])
    batch = task.prepare({"image": images, "text": text, "label": torch.tensor([0, 2])})  # as the engine does
    fused = head({m: e(batch[m]) for m, e in encoders.items()}, batch)
    assert fused.pooled.shape == (2, head.dim) and fused.tokens.shape[::2] == (2, head.dim)
    total_loss(task.training_step(batch), {}).backward()
    assert all(p.grad is not None for p in head.parameters()), f"{name}: a parameter got no gradient"


def test_a_head_written_for_encoders_is_told_what_changed(tiny_recipe):
    from test_components import registry_with

    from mmkit.errors import RecipeError
    from mmkit.recipe import check_recipe, load_recipe

    def old_head(encoders: dict, dim: int = 8):
        """Handed the encoder modules, as before heads were built from widths."""

    registry = registry_with(("fusion_heads", "old_head", old_head))
    recipe = load_recipe(tiny_recipe, ["model.fusion.name=old_head", "task={name='classification'}"])
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, registry)
    assert caught.value.problems == [f"{tiny_recipe} (command line): model.fusion: fusion head 'old_head' does not "
                                     "take `modalities`: a head is built from each modality's widths (mmkit.Modality), "
                                     "not handed the encoders; see the README's 'Fusion heads'"]
