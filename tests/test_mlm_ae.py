"""mlm_ae and pretrain: BERT's masking, each loss term by hand, the MLM loss normalised over the
whole step under accumulation, the held-out measures and their chance levels, and a short
pretraining run in which both terms fall."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from conftest import ROOT
from mmkit import build
from mmkit.encoders.base import Encoded
from mmkit.engine.loop import optimizer_step
from mmkit.engine.run import Run
from mmkit.errors import MMKitError
from mmkit.fusion.base import Modality
from mmkit.fusion.mlm_ae import IGNORE, mask_tokens
from mmkit.recipe import load_recipe
from mmkit.specs import TrainSpec

TEXT = Modality(8, 8, vocab_size=30, pad_id=0, mask_id=1, special_ids=(2, 3))
IMAGE = Modality(6, 6, cell=(3, 4, 4))


def head(**params):
    torch.manual_seed(0)
    return build("fusion_heads", "mlm_ae", modalities={"image": IMAGE, "text": TEXT}, dim=8, heads=2, **params).eval()


def encoded_pair(batch: int = 2) -> dict[str, Encoded]:
    """Text of 5 tokens (the last padded in item 1) and an image of a class token and a 2 x 2 grid."""
    g = torch.Generator().manual_seed(1)
    text = torch.randn(batch, 5, 8, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[1, 4] = False
    image = torch.randn(batch, 5, 6, generator=g)
    return {"text": Encoded(text, text.mean(1), mask),
            "image": Encoded(image, image.mean(1), torch.ones(batch, 5, dtype=torch.bool), grid=(2, 2), prefix=1)}


def test_bert_masking_chooses_the_ratio_of_word_tokens_and_masks_80_randomises_10_keeps_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 30, (200, 200), generator=g)
    ids[:, 0], ids[:, -1], ids[:50, -20:] = 2, 3, 0  # start, end, padding
    maskable = ~torch.isin(ids, torch.tensor([0, 1, 2, 3]))
    masked, targets = mask_tokens(ids, maskable, 0.4, mask_id=1, vocab_size=30, unusable=torch.tensor([0, 1, 2, 3]),
                                  generator=torch.Generator().manual_seed(1))
    chosen = targets != IGNORE
    assert not (chosen & ~maskable).any() and torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # what is not chosen is untouched
    assert chosen.sum() / maskable.sum() == pytest.approx(0.4, abs=0.01)
    n = chosen.sum().item()
    as_mask = (masked[chosen] == 1).sum().item() / n
    as_other = (masked[chosen] != ids[chosen]).sum().item() / n - as_mask
    assert as_mask == pytest.approx(0.8, abs=0.01) and as_other == pytest.approx(0.1 * 26 / 30 * 25 / 26, abs=0.01)
    assert not torch.isin(masked[chosen & (masked != 1)], torch.tensor([0, 2, 3])).any()  # never a special token
    again, _ = mask_tokens(ids, maskable, 0.4, 1, 30, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(1))
    assert torch.equal(again, masked)  # a seeded generator masks alike


def test_prepare_masks_words_only_and_blanks_whole_cells_keeping_the_original():
    fusion = head(mask_ratio=1.0, ae_mask_ratio=0.5)
    text = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 5, 3, 0, 0, 0]])
    image = torch.randn(2, 3, 9, 8)  # a 2 x 2 grid of 4 x 4 cells, one spare row
    prepared = fusion.prepare({"text": text, "image": image}, torch.Generator().manual_seed(0))
    targets = prepared["mlm_targets"]
    assert targets.tolist() == [[IGNORE, 7, 8, 9, IGNORE, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert prepared["ae_target"] is image and prepared["ae_cells"].shape == (2, 2, 2)
    assert prepared["ae_cells"].any() and not prepared["ae_cells"].all()
    for b, r, c in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(2)).tolist():
        cell, before = prepared["image"][b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4], image[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
        blank = torch.full_like(cell, image[b].mean().item())  # a blanked cell: the item's mean value
        assert torch.allclose(cell, blank) if prepared["ae_cells"][b, r, c] else torch.equal(cell, before)
    assert torch.equal(prepared["image"][:, :, 8], image[:, :, 8])  # beyond the last whole cell: shown
    assert fusion.prepare(prepared) is prepared  # prepared once, never twice
    assert not head().prepare({"text": text, "image": image})["ae_cells"].logical_not().any()  # no blanking: all count


def test_the_mlm_term_is_the_summed_negative_log_likelihood_of_the_masked_tokens():
    fusion = head()
    encoded = encoded_pair()
    targets = torch.full((2, 5), IGNORE)
    targets[0, 1], targets[0, 3], targets[1, 2] = 7, 11, 4
    batch = {"mlm_targets": targets, "ae_target": torch.randn(2, 3, 8, 8), "ae_cells": torch.ones(2, 2, 2, dtype=torch.bool)}
    fused = fusion(encoded, batch)
    words = fused.tokens
    logits = fusion.mlm(torch.stack([words[0, 1], words[0, 3], words[1, 2]]))
    log_p = logits.log_softmax(-1)
    assert fused.losses["mlm"].item() == pytest.approx(-(log_p[0, 7] + log_p[1, 11] + log_p[2, 4]).item(), rel=1e-5)
    assert fused.logged["mlm_accuracy"].item() == (logits.argmax(-1) == torch.tensor([7, 11, 4])).sum().item()
    assert {k: v.item() for k, v in fusion.item_counts(batch).items()} == {"loss/mlm": 3, "mlm_accuracy": 3, "loss/ae": 2 * 4 * 48}


def test_the_ae_term_is_the_squared_error_of_each_decoded_cell_on_the_blanked_cells_only():
    fusion = head()
    encoded = encoded_pair()
    original = torch.randn(2, 3, 8, 8)
    cells = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    fused = fusion(encoded, {"mlm_targets": torch.full((2, 5), IGNORE), "ae_target": original, "ae_cells": cells})
    expected = 0.0
    for b, r, c in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(2)).tolist():
        patch = fusion.decoder(encoded["image"].tokens[b, 1 + 2 * r + c]).reshape(3, 4, 4)  # after the class token, row by row
        if cells[b, r, c]:
            expected += (patch - original[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]).square().sum().item()
    assert fused.losses["ae"].item() == pytest.approx(expected, rel=1e-5)
    assert fused.losses["mlm"].item() == 0 and fusion.item_counts({"mlm_targets": torch.full((2, 5), IGNORE),
                                                                   "ae_cells": cells})["loss/ae"].item() == 3 * 48


def test_held_out_measures_sit_beside_the_most_frequent_token_and_the_mean_input():
    fusion = head()
    g = torch.Generator().manual_seed(3)
    targets = [torch.randn(3, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)]
    cells = [torch.rand(3, 2, 2, generator=g) < 0.5, torch.rand(2, 2, 2, generator=g) < 0.5]
    rows = []
    for target, cell in zip(targets, cells):
        counted = fusion.pixels(cell, (8, 8)).float()
        rows.append({"mlm_nll": torch.tensor([6.0]), "mlm_correct": torch.tensor([2.0]), "mlm_count": torch.tensor([4.0]),
                     "ae_sse": torch.tensor([10.0]), "ae_count": counted.sum().reshape(1) * 3, "items": torch.tensor([len(target)]),
                     "input_sum": target.sum(0, keepdim=True), "counted_sum": (target * counted).sum(0, keepdim=True),
                     "counted_square": (target.square() * counted).sum(0, keepdim=True),
                     "counted": counted.sum(0, keepdim=True)})
    joined = {k: torch.cat([r[k] for r in rows]).double() for k in rows[0]}
    joined["mlm_targets"] = [[5, 5, 9, 5], [7, 9, 5, 5]]
    measures = fusion.measures(joined)
    every, counted = torch.cat(targets).double(), torch.cat([fusion.pixels(c, (8, 8)) for c in cells]).expand(5, 3, 8, 8)
    baseline = ((every - every.mean(0)).square()[counted]).mean().item()  # the mean image, judged where counted
    assert measures["chance/ae_mse"] == pytest.approx(baseline, rel=1e-6)
    assert measures["ae_mse"] == pytest.approx(20 / counted.sum().item())
    assert (measures["mlm_accuracy"], measures["mlm_loss"]) == (0.5, 1.5)
    assert measures["chance/mlm_accuracy"] == 5 / 8  # token 5: 5 of the 8 masked
    shares = torch.tensor([5 / 8, 2 / 8, 1 / 8])
    assert measures["chance/mlm_loss"] == pytest.approx(-(shares * shares.log()).sum().item())


def tiny_pretrain():
    torch.manual_seed(0)
    encoders = {"image": build("image_encoders", "timm", model_name="test_vit", image_size=32),
                "text": build("text_encoders", "transformer", width=32, layers=1, heads=2, context_length=12)}
    fusion = build("fusion_heads", "mlm_ae", modalities={m: Modality.of(e) for m, e in encoders.items()},
                   dim=32, heads=2, mask_ratio=0.3, ae_mask_ratio=0.5)
    return build("tasks", "pretrain", encoders=encoders, fusion=fusion)


def test_under_accumulation_the_step_loss_is_the_one_batch_loss_on_the_same_masked_tokens():
    shapes = build("datasets", "synthetic_shapes", num_samples=8, image_size=32)
    task = tiny_pretrain()
    text, image = task.encoders["text"], task.encoders["image"]
    whole = {"text": torch.stack([text.preprocess(shapes[i]["text"]) for i in range(8)]),
             "image": image.inputs([shapes[i]["image"] for i in range(8)])}
    whole = task.prepare(whole, torch.Generator().manual_seed(5))
    counts = [(whole["mlm_targets"][rows] != IGNORE).sum().item() for rows in (slice(0, 2), slice(2, 8))]
    assert counts[0] != counts[1] * 2 / 6  # the parts hold unequal shares of the masked tokens

    def step(batches, grad_accum):
        model = tiny_pretrain()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
        losses, _ = optimizer_step(model, optimizer, batches, TrainSpec(grad_accum=grad_accum), Accelerator(cpu=True))
        return losses, model.fusion.mlm[-1].weight.detach().clone()

    one, weight = step([whole], 1)
    parts = [{k: v[rows] for k, v in whole.items()} for rows in (slice(0, 2), slice(2, 8))]
    accumulated, accumulated_weight = step(parts, 2)
    for key in ("loss/mlm", "loss/ae", "mlm_accuracy", "loss"):
        assert accumulated[key].item() == pytest.approx(one[key].item(), rel=1e-5), key
    assert torch.allclose(accumulated_weight, weight, atol=1e-6)


def test_the_heads_attention_is_one_way_so_every_parameter_reaches_a_loss():
    fusion = head(layers=2)
    encoded = encoded_pair()
    targets = torch.full((2, 5), IGNORE)
    targets[:, 1] = 4
    batch = {"mlm_targets": targets, "ae_target": torch.randn(2, 3, 8, 8), "ae_cells": torch.ones(2, 2, 2, dtype=torch.bool)}
    fused = fusion(encoded, batch)
    (fused.losses["mlm"] + fused.losses["ae"]).backward()
    assert set(fused.attention) == {"text->image/0", "text->image/1"}
    assert [name for name, p in fusion.named_parameters() if p.grad is None] == []  # DDP needs no unused parameter
    with pytest.raises(MMKitError, match="has no parameter 'both'"):
        build("fusion_heads", "mlm_ae", modalities={"image": IMAGE, "text": TEXT}, both=True)


@pytest.mark.parametrize("modalities, message", [
    ({"image": IMAGE}, "mlm_ae pairs a text encoder with an image or audio one; the recipe has image"),
    ({"image": Modality(6, 6), "text": TEXT}, "the image encoder does not say what part of its input each token covers"),
    ({"image": IMAGE, "text": Modality(8, 8)}, "the text encoder gives no vocab_size, pad_id and mask_id"),
])
def test_pairs_the_head_cannot_learn_from_fail_in_one_line(modalities, message):
    with pytest.raises(MMKitError, match=message):
        build("fusion_heads", "mlm_ae", modalities=modalities, dim=8, heads=2)


def test_an_input_that_is_not_whole_cells_of_the_grid_is_named():
    fusion = head()
    encoded = encoded_pair()
    batch = {"mlm_targets": torch.full((2, 5), IGNORE), "ae_target": torch.randn(2, 3, 12, 8),
             "ae_cells": torch.ones(2, 3, 2, dtype=torch.bool)}
    with pytest.raises(MMKitError, match=r"the image encoder gives a \(2, 2\) grid where its \(12, 8\) input holds "
                                         r"\(3, 2\) cells of 4x4"):
        fusion(encoded, batch)


def test_pretrain_needs_a_head_that_learns_by_itself():
    encoders = {"image": build("image_encoders", "timm", model_name="test_vit", image_size=32),
                "text": build("text_encoders", "transformer", width=32, layers=1, heads=2)}
    with pytest.raises(MMKitError, match='add \\[model.fusion\\] with name = "mlm_ae"'):
        build("tasks", "pretrain", encoders=encoders)
    attention = build("fusion_heads", "cross_attention", modalities={m: Modality.of(e) for m, e in encoders.items()}, dim=32)
    task = build("tasks", "pretrain", encoders=encoders, fusion=attention)
    batch = {"image": torch.randn(2, 3, 32, 32), "text": torch.stack([encoders["text"].preprocess("a red circle")] * 2)}
    with pytest.raises(MMKitError, match="the fusion head CrossAttention gave no loss terms of its own"):
        task.training_step(batch)


def test_a_short_pretraining_lowers_both_terms_and_predicts_masked_words_above_chance(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "pretrain_mlm_ae.toml", [
        f"run.output_dir={tmp_path}", "train.max_steps=60", "train.batch_size=32", "train.warmup=10",
        "train.log_every=10", "data.num_samples=960", "data.val.num_samples=96", "eval.every=0",
        "train.checkpoint_every=0", "data.image_size=32", "model.image.image_size=32", "train.num_workers=0"])
    summary = Run(recipe).fit()
    records = [json.loads(line) for line in (tmp_path / "pretrain_mlm_ae" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss/mlm" in r]
    assert train[-1]["train/loss/mlm"] < train[0]["train/loss/mlm"] - 1.0
    assert train[-1]["train/loss/ae"] < train[0]["train/loss/ae"]
    metrics, chance = summary["metrics"], summary["chance"]
    assert metrics["mlm_accuracy"] > chance["mlm_accuracy"] and math.isfinite(metrics["ae_mse"])
    for figure in ("reconstructions.png", "attention_maps.png", "training_curves.png"):
        assert (tmp_path / "pretrain_mlm_ae" / figure).exists(), figure


def test_a_fine_tune_takes_every_encoder_and_head_tensor_of_a_pretraining_run_and_names_a_misfit(tiny_recipe, capsys):
    from mmkit.components import build_parts
    from mmkit.plugins import get_registry

    pretraining = ["model.fusion={name='mlm_ae', dim=32, heads=2, layers=1}", "task={name='pretrain'}",
                   "run.name=pretrained", "train.max_steps=2", "train.checkpoint_every=0", "eval.every=0"]
    Run(load_recipe(tiny_recipe, pretraining)).fit()
    run = str(tiny_recipe.parent / "runs" / "pretrained")
    capsys.readouterr()
    fine_tune = [f"model.image.init_from={run!r}", f"model.text.init_from={run!r}", "task={name='classification'}",
                 f"model.fusion={{name='cross_attention', dim=32, heads=2, layers=1, init_from={run!r}}}"]
    parts = build_parts(load_recipe(tiny_recipe, fine_tune), get_registry())
    printed = capsys.readouterr().out
    head = len(parts.fusion.state_dict())
    assert f"model.fusion: init_from {run}: {head} tensors loaded, 10 skipped, 0 newly created" in printed  # mlm + decoder skipped
    for part in ("image", "text"):
        assert f"model.{part}: init_from {run}: {len(parts.encoders[part].state_dict())} tensors loaded, 0 skipped" in printed
    wider = [*fine_tune[:-1], f"model.fusion={{name='cross_attention', dim=64, heads=2, layers=1, init_from={run!r}}}"]
    with pytest.raises(MMKitError, match=r"model.fusion: init_from .*model.safetensors: fusion.inputs.text.weight is "
                                         r"\[32, 32\] there, \[64, 32\] here"):
        build_parts(load_recipe(tiny_recipe, wider), get_registry())


def test_the_training_curves_draw_each_loss_term_beside_the_total():
    from mmkit.report import training_curves

    records = [{"step": s, "train/loss": 3.0 / s, "train/loss/mlm": 2.0 / s, "train/loss/ae": 1.0 / s, "lr": 1e-3}
               for s in (1, 2, 3)] + [{"step": 3, "val/mlm_accuracy": 0.5, "val/chance/mlm_accuracy": 0.1}]
    left, right = training_curves(records, ["mlm_accuracy"]).axes[:2]
    assert [line.get_label() for line in left.get_lines()] == ["total", "ae", "mlm"]
    assert list(left.get_lines()[2].get_ydata()) == [2.0, 1.0, 2.0 / 3]
    assert [line.get_label() for line in right.get_lines()][0] == "mlm_accuracy"
    single = [{"step": 1, "train/loss": 1.0, "train/loss/contrastive": 1.0}]
    assert [line.get_label() for line in training_curves(single, []).axes[0].get_lines()] == ["total"]
