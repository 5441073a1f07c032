"""The keys every [model.*] table takes: freeze, lora, init_from and lr_scale, applied by mmkit
to any part, and the parameter counts a run reports."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmkit.components import build_parts
from mmkit.data.loader import EpochBatches, Preprocessed, train_loader
from mmkit.engine.loop import optimizer_step, step_batches
from mmkit.engine.run import Run
from mmkit.engine.schedule import adamw
from mmkit.errors import MMKitError, RecipeError
from mmkit.plugins import get_registry
from mmkit.recipe import check_recipe, load_recipe
from mmkit.specs import TrainSpec


def parts_of(recipe_path: Path, *overrides: str):
    recipe = load_recipe(recipe_path, overrides)
    check_recipe(recipe, get_registry())
    return build_parts(recipe, get_registry())


def one_training_step(parts, lr: float = 1e-2) -> None:
    """An optimizer step as the engine takes it, on the recipe's first batch."""
    from accelerate import Accelerator

    dataset = Preprocessed(parts.train_set, parts.transforms)
    collate, on_device = parts.batching(torch.device("cpu"))
    loader = train_loader(dataset, EpochBatches(len(dataset), 16, seed=0), 0, False, collate)
    optimizer = adamw(parts.task, lr, 0.1, parts.scaled())
    parts.task.train()
    batches = step_batches(parts.task, iter(loader), 1, torch.device("cpu"), on_device)
    optimizer_step(parts.task, optimizer, batches, TrainSpec(batch_size=16), Accelerator(cpu=True))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_a_frozen_part_keeps_its_weights_and_norm_statistics(tiny_recipe):
    parts = parts_of(tiny_recipe, "model.image.model_name=test_resnet", "model.image.freeze=true")
    image, text = snapshot(parts.encoders["image"]), snapshot(parts.encoders["text"])
    counts = parts.parameters()
    assert counts["image"]["trainable"] == 0 and counts["image"]["total"] > 0
    assert counts["text"]["trainable"] == counts["text"]["total"]
    one_training_step(parts)
    assert not parts.encoders["image"].training  # batch norm uses its running statistics
    assert all(torch.equal(image[k], v) for k, v in parts.encoders["image"].state_dict().items())  # stats included
    assert any(not torch.equal(text[k], v) for k, v in parts.encoders["text"].state_dict().items())


def test_freezing_by_globs_freezes_just_those(tiny_recipe):
    parts = parts_of(tiny_recipe, "model.image.freeze=['model.patch_embed.*', 'model.cls_token']")
    image = parts.encoders["image"]
    frozen = image.model.patch_embed.proj.weight.numel() + image.model.patch_embed.proj.bias.numel() \
        + image.model.cls_token.numel()
    counts = parts.parameters()["image"]
    assert counts["total"] - counts["trainable"] == frozen
    with pytest.raises(MMKitError, match=r"model.image: freeze: 'blocks.\*' matches no parameter \(they are named "
                                         r"like 'model.cls_token'\)"):
        parts_of(tiny_recipe, "model.image.freeze=['blocks.*']")


def test_lora_trains_only_its_adapters(tiny_recipe):
    # width 32, one block: linear1 32 -> 128 and linear2 128 -> 32 get rank-4 adapters, 4 x (32 + 128) each
    parts = parts_of(tiny_recipe, "model.text.lora={r=4, alpha=8}")
    text = parts.encoders["text"]
    assert parts.parameters()["text"]["trainable"] == 2 * 4 * (32 + 128)
    assert sorted(n for n, p in text.named_parameters() if p.requires_grad) == [
        "blocks.layers.0.linear1.lora_A.default.weight", "blocks.layers.0.linear1.lora_B.default.weight",
        "blocks.layers.0.linear2.lora_A.default.weight", "blocks.layers.0.linear2.lora_B.default.weight"]
    before = snapshot(text)
    one_training_step(parts)
    after = text.state_dict()
    changed = sorted(k for k in after if not torch.equal(before[k], after[k]))
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed)  # B starts at zero, so the update reaches the output


def test_lora_on_named_layers(tiny_recipe):
    parts = parts_of(tiny_recipe, "model.text.lora={r=2, target_modules=['linear1']}")
    assert parts.parameters()["text"]["trainable"] == 2 * (32 + 128)


def test_lr_scale_shows_in_the_optimizers_groups(tiny_recipe):
    parts = parts_of(tiny_recipe, "model.image.lr_scale=0.02")
    optimizer = adamw(parts.task, 1e-3, 0.1, parts.scaled())
    image = {id(p) for p in parts.encoders["image"].parameters()}
    for group in optimizer.param_groups:
        in_image = {id(p) in image for p in group["params"]}
        assert len(in_image) == 1  # a group is all image or no image
        assert group["lr"] == pytest.approx(2e-5 if in_image == {True} else 1e-3, rel=1e-12)
    assert sum(len(g["params"]) for g in optimizer.param_groups if g["lr_scale"] == 0.02) == len(image)


def test_a_run_trains_a_scaled_part_at_its_scaled_rate(tiny_recipe):
    Run(load_recipe(tiny_recipe, ["model.text.lr_scale=0.5", "train.lr=0.002"])).fit()
    state = json.loads((tiny_recipe.parent / "runs" / "tiny" / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    groups = state["optimizer"]["param_groups"]
    assert {(g["lr_scale"], g["initial_lr"]) for g in groups} == {(1.0, 0.002), (0.5, 0.001)}
    text = dict(parts_of(tiny_recipe).encoders["text"].named_parameters())
    assert sum(len(g["params"]) for g in groups if g["lr_scale"] == 0.5) == len(text)
    rescaled = Run(load_recipe(tiny_recipe, ["model.text.lr_scale=0.25", "train.lr=0.002", "train.max_steps=9"]),
                   resume=True)
    with pytest.raises(MMKitError, match=r"optimizer groups of \[.* at lr x 0.5 decayed, .*\] there, \[.* at lr x "
                                         r"0.25 decayed, .*\] here: was freeze, lora or lr_scale changed\?"):
        rescaled.fit()


def test_init_from_a_run_folder_loads_its_towers(tiny_recipe, capsys):
    summary = Run(load_recipe(tiny_recipe)).fit()
    run = tiny_recipe.parent / "runs" / "tiny"
    trained = load_file(run / "model.safetensors")
    capsys.readouterr()
    parts = parts_of(tiny_recipe, f"model.image.init_from={str(run)!r}", f"model.text.init_from={str(run)!r}")
    for modality in ("image", "text"):
        state = parts.encoders[modality].state_dict()
        assert state and all(torch.equal(trained[f"encoders.{modality}.{k}"], v) for k, v in state.items())
    printed = capsys.readouterr().out
    assert f"model.text: init_from {run}: {len(parts.encoders['text'].state_dict())} tensors loaded, " \
           "0 skipped, 0 newly created" in printed
    assert summary["parameters"]["task"]["total"] == sum(v.numel() for v in trained.values())


def test_init_from_a_file_with_a_prefix_and_a_mismatch_named(tiny_recipe, tmp_path):
    parts = parts_of(tiny_recipe)
    source = parts.encoders["text"].state_dict()
    save_file({f"towers.text.{k}": v.contiguous() for k, v in source.items()} | {"towers.other": torch.ones(2)},
              tmp_path / "towers.safetensors")
    table = f"{{path={str(tmp_path / 'towers.safetensors')!r}, prefix='towers.text.'}}"
    loaded = parts_of(tiny_recipe, f"model.text.init_from={table}", "model.text.lora={r=2}").encoders["text"]
    base = {k.replace(".base_layer.", "."): v for k, v in loaded.state_dict().items() if ".lora_" not in k}
    assert base.keys() == source.keys() and all(torch.equal(source[k], base[k]) for k in source)
    with pytest.raises(MMKitError, match=r"model.text: init_from .*towers.safetensors: towers.text.position_embedding "
                                         r"is \[16, 32\] there, \[16, 64\] here"):
        parts_of(tiny_recipe, f"model.text.init_from={table}", "model.text.width=64")


def test_init_from_refuses_adapters_the_part_lacks_and_names_it_loads_nothing(tiny_recipe, tmp_path):
    Run(load_recipe(tiny_recipe, ["model.text.lora={r=2}", "run.name=lora"])).fit()
    run = str(tiny_recipe.parent / "runs" / "lora")
    with pytest.raises(MMKitError, match=r"model.text: init_from .*model.safetensors holds LoRA adapters "
                                         r"\(encoders.text.blocks.layers.0.linear1.lora_A.default.weight, ...\)"):
        parts_of(tiny_recipe, f"model.text.init_from={run!r}")
    adapted = parts_of(tiny_recipe, f"model.text.init_from={run!r}", "model.text.lora={r=2}").encoders["text"]
    trained = load_file(tiny_recipe.parent / "runs" / "lora" / "model.safetensors")
    assert all(torch.equal(trained[f"encoders.text.{k}"], v) for k, v in adapted.state_dict().items())
    save_file({"other.weight": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(MMKitError, match=r"none of its tensors under '' is named like this part's"):
        parts_of(tiny_recipe, f"model.text.init_from={str(tmp_path / 'other.safetensors')!r}")


def test_init_from_a_run_not_made_yet_says_which_recipe_makes_it(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "made.toml").write_text("")
    with pytest.raises(MMKitError, match=r"model.image: init_from: runs/made does not exist: "
                                         r"`mmkit run recipes/made.toml` makes it, or point init_from at a run folder"):
        parts_of(tiny_recipe, "model.image.init_from='runs/made'")
    with pytest.raises(MMKitError, match=r"init_from: runs/other does not exist: finish the run that writes it first"):
        parts_of(tiny_recipe, "model.image.init_from='runs/other'")


def test_a_frozen_part_pickles():
    from mmkit import build

    encoder = build("text_encoders", "transformer", width=32, layers=1, heads=2, context_length=16, freeze=True)
    again = pickle.loads(pickle.dumps(encoder))
    again.train()
    assert not again.training and not any(p.requires_grad for p in again.parameters())


class RunsCode:
    """A pickle that runs code when loaded: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("key", ["model.image.pretrained", "model.image.init_from"])
def test_a_pickle_that_runs_code_is_refused_and_never_run(tiny_recipe, tmp_path, key):
    marker, weights = tmp_path / "ran", tmp_path / "weights.pt"
    with weights.open("wb") as handle:
        pickle.dump({"state_dict": {"w": RunsCode(marker)}}, handle, protocol=2)
    with pytest.raises(MMKitError, match=rf"{weights} needs pickled Python objects to load, which mmkit refuses"):
        parts_of(tiny_recipe, f"{key}={str(weights)!r}")
    assert not marker.exists()


def test_a_pickle_of_plain_tensors_loads(tiny_recipe, tmp_path):
    source = parts_of(tiny_recipe).encoders["image"].model.state_dict()
    torch.save({"state_dict": source}, tmp_path / "weights.pt")
    loaded = parts_of(tiny_recipe, f"model.image.pretrained={str(tmp_path / 'weights.pt')!r}").encoders["image"]
    assert all(torch.equal(source[k], v) for k, v in loaded.model.state_dict().items())


def test_part_keys_are_checked_with_the_recipe(tiny_recipe):
    with pytest.raises(RecipeError) as caught:
        check_recipe(load_recipe(tiny_recipe, ["model.text.lora={rr=4}", "model.image.lr_scale=0",
                                               "model.image.freez=true"]), get_registry())
    cli = f"{tiny_recipe} (command line)"
    assert caught.value.problems == [
        f"{cli}: model.image.freez: unknown key; did you mean 'freeze'?",
        f"{cli}: model.text.lora.rr: unknown key; did you mean 'r'?",
    ]
    with pytest.raises(RecipeError) as caught:
        check_recipe(load_recipe(tiny_recipe, ["model.image.lr_scale=0", "model.text.freeze=true",
                                               "model.text.lora={r=0}"]), get_registry())
    assert caught.value.problems == [
        f"{cli}: model.image.lr_scale: must be positive (freeze = true stops a part training)",
        f"{cli}: model.text.lora: a part with freeze = true trains no adapters; drop one of the two",
        f"{cli}: model.text.lora.r: must be at least 1",
    ]


def test_a_run_reports_parameters_per_part(tiny_recipe):
    done = Run(load_recipe(tiny_recipe, ["model.text.lora={r=4}", "model.image.freeze=true"]))
    summary = done.fit()
    counts = summary["parameters"]
    assert counts["text"]["trainable"] == 2 * 4 * (32 + 128) and counts["image"]["trainable"] == 0
    # adapters, the projections of test_vit's 64 and the text's 32 features to 32, the temperature
    assert counts["task"]["trainable"] == 2 * 4 * (32 + 128) + 64 * 32 + 32 * 32 + 1
    written = json.loads((done.paths.folder / "summary.json").read_text())
    assert written["parameters"] == counts
    recipe = (done.paths.folder / "recipe.toml").read_text()
    assert "freeze = true" in recipe and "[model.text.lora]" in recipe


def test_info_shows_the_part_keys_and_a_component_may_not_take_one():
    from conftest import run_mmkit
    from mmkit.registry import Registry

    shown = run_mmkit("info", "text_encoders", "transformer").stdout
    assert "keys mmkit applies to every [model.*] part:" in shown and "lr_scale: float  (default 1.0)" in shown

    def encoder(width: int = 8, freeze: bool = False):
        """An encoder with its own freeze flag."""

    with pytest.raises(MMKitError, match="registers text encoder \"own_freeze\" with the parameter 'freeze', a key "
                                         "mmkit applies to every \\[model.\\*\\] table itself; rename it; ignored"):
        Registry().add("text_encoders", "own_freeze", encoder, "someone")
