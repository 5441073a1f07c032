"""Recipes: extends, overrides, validation messages, and the resolved recipe a run writes."""

from __future__ import annotations

import itertools
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, TINY_MODEL, run_mmkit
from mmkit.errors import MMKitError, RecipeError
from mmkit.plugins import get_registry
from mmkit.components import build_parts
from mmkit.engine.run import Run
from mmkit.recipe import check_recipe, load_recipe, resolved_tree


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def problems(recipe_path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        check_recipe(load_recipe(recipe_path, overrides), get_registry())
    return caught.value.problems


def test_a_table_parameter_s_values_are_checked(tiny_recipe):
    assert problems(tiny_recipe, 'task={name="zero_shot", embed_dim=32, prompts={red=3}}') == [
        f"{tiny_recipe} (command line): task.prompts: expected table of list[str] | none, got {{'red': 3}}"]


def test_extends_merges_tables_and_overrides_win(tmp_path, tiny_recipe):
    child = write(tmp_path / "child.toml", """
        extends = "tiny.toml"
        [train]
        lr = 0.01
        [model.text]
        layers = 2
    """)
    recipe = load_recipe(child, ["train.max_steps=9", "model.image.model_args.depth=1", "run.name=x"])
    assert recipe.table("train")["lr"] == 0.01
    assert recipe.table("train")["batch_size"] == 16
    assert recipe.table("train")["max_steps"] == 9
    assert recipe.table("model", "text") == {"name": "transformer", "width": 32, "layers": 2, "heads": 2,
                                             "context_length": 16}
    assert recipe.table("model", "image")["model_args"] == {"depth": 1}
    assert recipe.spec("run").name == "x"
    check_recipe(recipe, get_registry())


def test_naming_another_component_drops_the_old_ones_params(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["model.text.name=transformer", "model.image.name=timm"])
    assert recipe.table("model", "image")["model_name"] == "test_vit"  # same name: params kept
    swapped = load_recipe(tiny_recipe, ["data.name=synthetic_audio"])
    assert swapped.table("data") == {"name": "synthetic_audio", "val": {"split": "val", "num_samples": 32}}


def test_overrides_are_one_layer_whatever_their_order(tiny_recipe):
    for order in (["model.text.width=64", "model.text.name=gru"], ["model.text.name=gru", "model.text.width=64"]):
        assert load_recipe(tiny_recipe, order).table("model", "text") == {"name": "gru", "width": 64}
    table, inside = "model.image={name='timm', model_args={depth=1, num_heads=2}}", "model.image.model_args={}"
    for order in ([table, inside], [inside, table]):
        assert load_recipe(tiny_recipe, order).table("model", "image") == {"name": "timm", "model_args": {}}


@pytest.mark.parametrize("overrides", [["train.lr=1", "train.lr=2"], ["train.lr.x={}", "train.lr=1"],
                                       ["train={lr=1}", "train={lr=2}"]])
def test_overrides_that_set_the_same_key_are_refused(tiny_recipe, overrides):
    with pytest.raises(MMKitError, match=f"overrides {overrides[0]!r} and {overrides[1]!r} both set "):
        load_recipe(tiny_recipe, overrides)


def test_a_dataset_switch_keeps_data_val_unless_the_layer_brings_its_own(tmp_path, tiny_recipe):
    child = write(tmp_path / "child.toml", """
        extends = "tiny.toml"
        [data]
        name = "synthetic_audio"
        [data.val]
        num_samples = 8
    """)
    assert load_recipe(child).table("data") == {"name": "synthetic_audio", "val": {"num_samples": 8}}


def test_an_inline_table_override_replaces_the_table(tmp_path, tiny_recipe):
    child = write(tmp_path / "child.toml", 'extends = "tiny.toml"\n[model.image]\nmodel_args = { depth = 1 }\n')
    recipe = load_recipe(child, ["model.image.model_name=resnet10t", "model.image.model_args={}"])
    assert recipe.table("model", "image")["model_args"] == {}
    check_recipe(recipe, get_registry())
    merged = load_recipe(child, ["model.image.model_args.num_heads=1"])
    assert merged.table("model", "image")["model_args"] == {"depth": 1, "num_heads": 1}


def test_an_empty_table_in_a_file_clears_the_inherited_one(tmp_path, tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace('image_size = 32\n\n[model.text]',
                                                           'image_size = 32\nmodel_args = { depth = 4 }\n\n[model.text]'))
    child = write(tmp_path / "child.toml", 'extends = "tiny.toml"\n[model.image]\nmodel_args = {}\n')
    assert load_recipe(child).table("model", "image")["model_args"] == {}
    assert load_recipe(tiny_recipe).table("model", "image")["model_args"] == {"depth": 4}


def test_a_dataset_switch_in_a_file_drops_the_old_datasets_example_files(tmp_path):
    write(tmp_path / "files.toml", """
        [data]
        name = "manifest"
        path = "data/shapes.csv"
        on_error = "skip"
        example = { name = "synthetic_shapes", train = 40, val = 8 }
        [data.val]
        path = "data/val.csv"
    """ + TINY_MODEL)
    child = write(tmp_path / "child.toml", """
        extends = "files.toml"
        [data]
        name = "synthetic_shapes"
        num_samples = 8
        [data.val]
    """)
    recipe = load_recipe(child)
    assert recipe.table("data") == {"name": "synthetic_shapes", "num_samples": 8, "on_error": "skip", "val": {}}
    check_recipe(recipe, get_registry())


def test_setting_epochs_drops_max_steps_from_the_layers_below(tmp_path, tiny_recipe):
    assert load_recipe(tiny_recipe, ["train.epochs=3"]).spec("train").max_steps is None
    child = write(tmp_path / "child.toml", 'extends = "tiny.toml"\n[train]\nepochs = 2\n')
    assert load_recipe(child).spec("train").max_steps is None
    assert load_recipe(child, ["train.max_steps=4"]).spec("train").epochs is None
    assert load_recipe(child, ["train.max_steps=0"]).spec("train").epochs == 2  # 0: use epochs
    assert problems(tiny_recipe, "train.epochs=3", "train.max_steps=4") == [
        f"{tiny_recipe} (command line): train.max_steps: set train.epochs or train.max_steps, not both"]


def test_dates_in_overrides_stay_strings(tiny_recipe):
    assert load_recipe(tiny_recipe, ["run.name=2024-01-01"]).spec("run").name == "2024-01-01"


def test_override_values_are_parsed_as_toml(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["train.lr=3e-4", "train.clip_grad=1", "task.modalities=['text','image']",
                                       "model.image.model_name=resnet10t"])
    assert recipe.table("train")["lr"] == 3e-4
    assert recipe.table("task")["modalities"] == ["text", "image"]
    assert recipe.table("model", "image")["model_name"] == "resnet10t"
    with pytest.raises(MMKitError, match="expected KEY=VALUE"):
        load_recipe(tiny_recipe, ["train.lr"])


def test_every_problem_is_reported_with_file_and_key(tiny_recipe):
    found = problems(tiny_recipe, "train.lrr=1", "train.batch_size=big", "model.image.name=tim",
                     "model.text.widht=3", "runn.seed=1", "run.device=tpu", "task.nmae=x")
    source = f"{tiny_recipe} (command line)"
    assert f"{source}: train.lrr: unknown key; did you mean 'lr'?" in found
    assert f"{source}: train.batch_size: expected int, got 'big'" in found
    assert (f"{source}: model.image.name: unknown image encoder 'tim'; did you mean 'timm'? "
            "see `mmkit list image_encoders`") in found
    assert f"{source}: model.text.widht: unknown key; did you mean 'width'?" in found
    assert f"{source}: runn: unknown table; did you mean 'run'?" in found
    assert f"{source}: run.device: expected 'auto' | 'cpu' | 'cuda', got 'tpu'" in found
    assert f"{source}: task.nmae: unknown key; did you mean 'name'?" in found
    assert len(found) == 7


def test_missing_pieces_are_named(tmp_path):
    bare = write(tmp_path / "bare.toml", """
        [data]
        name = "synthetic_shapes"
        [data.val]
        num_sample = 3
    """)
    found = problems(bare)
    assert f"{bare}: task: missing table" in found
    assert any("model: expected at least one of [model.image]" in p for p in found)
    assert f"{bare}: data.val.num_sample: unknown key; did you mean 'num_samples'?" in found


def test_a_component_name_that_is_not_a_string_is_named_as_such(tiny_recipe):
    assert problems(tiny_recipe, "task.name=3") == [
        f"{tiny_recipe} (command line): task.name: expected a string naming a component, got 3, "
        "see `mmkit list tasks`"]


def test_values_that_cannot_work_are_refused(tiny_recipe):
    cli = f"{tiny_recipe} (command line)"
    assert problems(tiny_recipe, "train.batch_size=0", "train.lr=-1", "eval.every=-2") == [
        f"{cli}: train.batch_size: must be at least 1",
        f"{cli}: train.lr: must be positive",
        f"{cli}: eval.every: must not be negative",
    ]
    assert problems(tiny_recipe, "data.val=3") == [f"{cli}: data.val: expected a table of dataset parameters, got 3"]


def test_fp16_on_cpu_is_refused(tiny_recipe):
    assert problems(tiny_recipe, "run.precision=fp16") == [
        f'{tiny_recipe} (command line): run.precision: fp16 needs CUDA; use "bf16" or "fp32" on the CPU']


def test_a_mistake_in_an_extended_file_names_that_file(tmp_path, tiny_recipe):
    child = write(tmp_path / "child.toml", 'extends = "tiny.toml"\n[train]\nlr = 0.01\n')
    tiny_recipe.write_text(tiny_recipe.read_text().replace("[train]", "[train]\nlrr = 1"))
    assert problems(child, "model.text.widht=3") == [
        f"{tiny_recipe}: train.lrr: unknown key; did you mean 'lr'?",
        f"{child} (command line): model.text.widht: unknown key; did you mean 'width'?",
    ]


def test_a_mistake_in_a_key_a_child_overrides_names_the_child(tmp_path, tiny_recipe):
    middle = write(tmp_path / "middle.toml", 'extends = "tiny.toml"\n[train]\nlr = 0.01\n[model.text]\nwidth = 48\n')
    child = write(tmp_path / "child.toml", 'extends = "middle.toml"\n[train]\nlr = "fast"\n')
    assert problems(child) == [f"{child}: train.lr: expected float, got 'fast'"]
    middle.write_text(middle.read_text().replace("width = 48", 'width = "wide"'))
    assert problems(child) == [f"{child}: train.lr: expected float, got 'fast'",
                               f"{middle}: model.text.width: expected int, got 'wide'"]


def test_extends_errors(tmp_path):
    loop = write(tmp_path / "loop.toml", 'extends = "loop.toml"\n')
    with pytest.raises(MMKitError, match="loops back"):
        load_recipe(loop)
    with pytest.raises(MMKitError, match="a.toml: extends: recipe not found: .*missing.toml"):
        load_recipe(write(tmp_path / "a.toml", 'extends = "missing.toml"\n'))
    with pytest.raises(MMKitError, match="bad.toml: not valid TOML"):
        load_recipe(write(tmp_path / "bad.toml", "[train\n"))


def test_validate_command(tiny_recipe):
    ok = run_mmkit("validate", tiny_recipe)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{tiny_recipe}: ok"
    bad = run_mmkit("validate", tiny_recipe, "train.lr=fast", "model.text.name=transformr")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        f"mmkit: error: {tiny_recipe} (command line): train.lr: expected float, got 'fast'",
        f"mmkit: error: {tiny_recipe} (command line): model.text.name: unknown text encoder 'transformr'; "
        "did you mean 'transformer'? see `mmkit list text_encoders`",
    ]


def test_factories_refusing_their_parameters_fail_in_one_line(tiny_recipe):
    bad = run_mmkit("run", tiny_recipe, "model.text.heads=3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith(f"mmkit: error: {tiny_recipe}: model.text (transformer): cannot build: ")
    assert not (tiny_recipe.parent / "runs").exists()  # a failed build leaves no half run folder


def test_an_encoder_the_dataset_cannot_feed_is_named(tiny_recipe):
    bad = run_mmkit("run", tiny_recipe, "model.audio.name=logmel_cnn")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"mmkit: error: {tiny_recipe}: model.audio: dataset 'synthetic_shapes' has no "
                                  "'audio' in its samples (it gives id, image, label, text); remove [model.audio] "
                                  "or pick a dataset with audio")


def test_run_with_a_bad_recipe_builds_nothing(tiny_recipe):
    bad = run_mmkit("run", tiny_recipe, "train.max_step=3")
    assert bad.returncode == 2 and "train.max_step: unknown key; did you mean 'max_steps'?" in bad.stderr
    assert not (tiny_recipe.parent / "runs").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    check_recipe(load_recipe(path), get_registry())


def header_commands() -> list:
    """Each `mmkit run` command a shipped recipe's header comment shows, as its recipe and overrides."""
    commands = []
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        header = itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines())
        for line in "\n".join(line[1:] for line in header).replace("\\\n", " ").splitlines():
            if line.split()[:2] == ["mmkit", "run"]:
                args = shlex.split(line, comments=True)
                commands.append(pytest.param(ROOT / args[2], args[3:], id=" ".join(args[2:])))
    return commands


@pytest.mark.parametrize("path, overrides", header_commands())
def test_the_commands_in_recipe_headers_validate(path, overrides):
    recipe = load_recipe(path, overrides)
    check_recipe(recipe, get_registry())
    changes_model = any(o.startswith("model.") for o in overrides)
    downloads = any("pretrained=true" in o or "init_from" in o for o in overrides)
    if changes_model and not downloads:  # a model's own arguments are checked only when it is built
        build_parts(recipe, get_registry())


@pytest.mark.parametrize("override, says", [
    ("data.image_size=0", "data (synthetic_shapes): cannot build: ValueError: image_size must be at least 16 pixels"),
    ("data.num_samples=0", "data (synthetic_shapes): cannot build: ValueError: num_samples must be at least 1"),
    ("model.text.context_length=0", "model.text (transformer): cannot build: ValueError: context_length must be"),
])
def test_values_a_component_refuses_stop_the_run_before_its_folder(tiny_recipe, override, says):
    with pytest.raises(MMKitError, match=re.escape(f"{tiny_recipe}: {says}")):
        Run(load_recipe(tiny_recipe, [override])).fit()
    assert not (tiny_recipe.parent / "runs").exists()


def test_the_held_out_set_is_the_val_split_unless_it_says_otherwise(tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace('split = "val"\n', ""))
    recipe = load_recipe(tiny_recipe)
    parts = build_parts(recipe, get_registry())
    assert (parts.train_set.split, parts.val_set.split) == ("train", "val")
    assert resolved_tree(recipe, get_registry(), {})["data"]["val"] == {"num_samples": 32, "split": "val"}


def test_data_keys_mmkit_applies_are_checked_and_kept_across_a_dataset_switch(tmp_path, tiny_recipe):
    assert problems(tiny_recipe, "data.on_error=maybe", "data.example={name='synthetic_shapes', trian=3}") == [
        f"{tiny_recipe} (command line): data.on_error: expected 'raise' | 'skip', got 'maybe'",
        f"{tiny_recipe} (command line): data.example.trian: unknown key; did you mean 'train'?"]
    child = write(tmp_path / "child.toml", """
        extends = "tiny.toml"
        [data]
        on_error = "skip"
    """)
    switched = load_recipe(child, ["data={name='synthetic_audio', num_samples=8}"])
    assert switched.data().on_error == "raise"  # an inline table replaces [data] whole
    grandchild = write(tmp_path / "grandchild.toml", """
        extends = "child.toml"
        [data]
        name = "synthetic_audio"
    """)
    assert load_recipe(grandchild).data().on_error == "skip"
    assert "on_error" not in load_recipe(grandchild).params("data")


def test_typos_in_data_example_are_named_at_validate():
    manifest = ROOT / "recipes" / "clip_retrieval_manifest.toml"
    cli = f"{manifest} (command line)"
    assert problems(manifest, "data.example.name=synthetic_shape") == [
        f"{cli}: data.example.name: unknown dataset 'synthetic_shape'; did you mean 'synthetic_shapes'? "
        "see `mmkit list datasets`"]
    assert problems(manifest, "data.example.params.imgsize=3", "data.example.params.seed=x") == [
        f"{cli}: data.example.params.imgsize: unknown key; did you mean 'image_size'?",
        f"{cli}: data.example.params.seed: expected int, got 'x'"]


def test_a_dataset_cannot_declare_a_key_mmkit_applies_to_every_data_table():
    from mmkit.registry import Registry

    def files(path: str = "", on_error: str = "raise"):
        """Reads files."""

    with pytest.raises(MMKitError, match="registers dataset \"files\" with the parameter 'on_error', a key mmkit "
                                         "applies to every \\[data\\] table itself; rename it"):
        Registry().add("datasets", "files", files, "plugin-x")


def test_a_held_out_set_with_its_own_file_is_not_told_split_val_but_gets_the_training_classes(tmp_path):
    from mmkit.components import held_out_params
    from mmkit.samples import DatasetInfo

    recipe = write(tmp_path / "r.toml", """
        [data]
        name = "manifest"
        path = "train.csv"
        [data.val]
        path = "val.csv"
    """)
    info = DatasetInfo(keys=("image", "label"), class_names=("cat", "dog"), label_kind="single")
    assert held_out_params(load_recipe(recipe), get_registry(), info) == {"path": "val.csv", "classes": ["cat", "dog"]}
    same_file = load_recipe(recipe, ["data.val={}"])
    assert held_out_params(same_file, get_registry(), info) == {"split": "val", "classes": ["cat", "dog"]}
