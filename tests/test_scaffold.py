"""`mmkit new-plugin`: each kind's package installs with pip, registers through its entry
point, passes its own test and trains in the recipe the command suggests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import run_mmkit
from test_plugins import fake_installed
from mmkit.errors import MMKitError
from mmkit.plugins import get_registry
from mmkit.scaffold import STARTERS, new_plugin

TINY = ["train.max_steps=2", "train.batch_size=8", "train.num_workers=0", "eval.every=0", "data.num_samples=16",
        "data.val.num_samples=8"]


def test_each_kind_s_plugin_installs_registers_passes_its_test_and_trains(tmp_path):
    tries = {}
    for kind in STARTERS:
        folder, written, tries[kind] = new_plugin(f"mmkit-my-{kind}", kind, tmp_path, get_registry())
        assert {p.relative_to(folder).as_posix() for p in written} >= {"pyproject.toml", f"tests/test_my_{kind}.py"}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), *(str(tmp_path / f"mmkit-my-{kind}") for kind in STARTERS)], check=True,
                   timeout=300)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "MMKIT_PLUGINS": ",".join(f"my_{kind}" for kind in STARTERS)}
    listed = run_mmkit("plugins", env=env)
    for kind in STARTERS:
        assert f"my_{kind} 0.1.0\n  {kind}: my_{kind}\n" in listed.stdout, listed.stdout + listed.stderr
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *(str(tmp_path / f"mmkit-my-{kind}" / "tests") for kind in STARTERS)],
                            capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=300)
    assert tested.returncode == 0 and f"{len(STARTERS)} passed" in tested.stdout, tested.stdout[-3000:]
    commands = [[*command.split()[2:], *TINY, f"run.output_dir={tmp_path / 'runs'}", f"run.name={kind}"]
                for kind, command in tries.items()]
    trained = subprocess.run([sys.executable, "-c", TRAIN_EACH, repr(commands)], capture_output=True, text=True,
                             env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for kind in STARTERS:
        assert (tmp_path / "runs" / kind / "model.safetensors").exists()


TRAIN_EACH = textwrap.dedent("""
    import ast, sys
    from mmkit import Run, load_recipe
    for recipe, *overrides in ast.literal_eval(sys.argv[1]):
        Run(load_recipe(recipe, overrides)).fit()
""")


def test_new_plugin_is_a_cli_command_that_says_what_to_do_next(tmp_path):
    done = run_mmkit("new-plugin", "mmkit-edge", "--kind", "image_encoder", "--dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "mmkit run recipes/clip_retrieval.toml model.image.name=edge" in done.stdout
    assert f"pip install -e {tmp_path / 'mmkit-edge'}" in done.stdout
    hook = (tmp_path / "mmkit-edge" / "mmkit_edge" / "__init__.py").read_text()
    assert "def register_image_encoders(register):" in hook and 'register("edge", EdgeEncoder)' in hook
    assert 'edge = "mmkit_edge"' in (tmp_path / "mmkit-edge" / "pyproject.toml").read_text()


@pytest.mark.parametrize("name, kind, message", [
    ("mmkit-gate", "tasks", "new-plugin makes image_encoders, text_encoders, audio_encoders, fusion_heads, datasets"),
    ("mmkit-timm", "image_encoders", r'image encoder "timm" is registered already \(by mmkit.encoders\)'),
    ("my encoder", "image_encoders", "'my encoder' is not a package name"),
    ("mmkit-2d", "image_encoders", "component 2d must be Python names that start with a letter"),
    ("lambda", "datasets", "module lambda and component lambda must be Python names"),
    ("torch", "datasets", "a module torch is installed already"),
    ("mmkit-lagged", "datasets", 'a plugin named "lagged" is installed already'),
    ("mmkit-edge", "image_encoders", "exists: new-plugin writes a new folder and changes none")])
def test_a_plugin_that_would_clash_or_overwrite_is_refused(tmp_path, monkeypatch, name, kind, message):
    (tmp_path / "mmkit-edge").mkdir()
    site = tmp_path / "mmkit-edge"  # an installed plugin "lagged" of another kind: its entry point's name is taken
    fake_installed(site, "lagging", "lagging_plugin", "", entry="lagged")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(MMKitError, match=message):
        new_plugin(name, kind, tmp_path, get_registry())
    assert [p.name for p in tmp_path.iterdir()] == ["mmkit-edge"]
