"""Plugins as a third party ships them: installed packages with entry points, run through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_mmkit


@pytest.fixture(scope="session")
def gru_site(tmp_path_factory) -> Path:
    """plugins/mmkit-gru installed with pip into its own site folder."""
    source = tmp_path_factory.mktemp("src") / "mmkit-gru"
    shutil.copytree(ROOT / "plugins" / "mmkit-gru", source)
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True)
    return site


def fake_installed(site: Path, dist: str, module: str, source: str, entry: str | None = None) -> None:
    """Lay out an installed distribution (module + dist-info with an mmkit entry point, named
    ``entry`` or as the distribution)."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mmkit]\n{entry or dist} = {module}\n")


def test_installed_plugin_is_listed_and_documented(gru_site):
    env = {"PYTHONPATH": str(gru_site), "MMKIT_PLUGINS": "gru"}
    plugins = run_mmkit("plugins", env=env)
    assert plugins.returncode == 0, plugins.stderr
    assert "gru 0.1.0\n  text_encoders: gru" in plugins.stdout
    listed = run_mmkit("list", "text_encoders", env=env).stdout
    assert "gru" in listed and "[gru]" in listed and "transformer" in listed
    info = run_mmkit("info", "text_encoders", "gru", env=env).stdout
    assert "width: int  (default 256)" in info and "token embedding and output feature width" in info


def test_installed_plugin_component_trains_from_a_recipe(gru_site, tiny_recipe):
    env = {"PYTHONPATH": str(gru_site), "MMKIT_PLUGINS": "gru"}
    done = run_mmkit("run", tiny_recipe, "model.text.name=gru", "model.text.width=32", env=env)
    assert done.returncode == 0, done.stderr
    folder = tiny_recipe.parent / "runs" / "tiny"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["versions"]["plugins"]["gru"] == "0.1.0"
    assert 'name = "gru"' in (folder / "recipe.toml").read_text()


def test_plugins_can_be_chosen_and_disabled(gru_site):
    env = {"PYTHONPATH": str(gru_site)}
    assert "gru" not in run_mmkit("list", "text_encoders", env={**env, "MMKIT_PLUGINS": ""}).stdout
    disabled = run_mmkit("list", "text_encoders", env={**env, "MMKIT_PLUGINS": "gru", "MMKIT_DISABLE_PLUGINS": "gru"})
    assert "gru" not in disabled.stdout
    no_audio = run_mmkit("list", env={**env, "MMKIT_DISABLE_PLUGINS": "mmkit.encoders"}).stdout
    assert "timm" not in no_audio and "synthetic_shapes" in no_audio


def test_broken_plugin_is_reported_in_one_line_and_the_rest_works(tmp_path, gru_site):
    fake_installed(tmp_path, "broken", "broken_plugin", "raise ImportError('needs the package nope')\n")
    env = {"PYTHONPATH": f"{tmp_path}:{gru_site}", "MMKIT_PLUGINS": "broken,gru"}
    listed = run_mmkit("list", env=env)
    assert listed.returncode == 0
    assert listed.stderr.strip() == 'mmkit: error importing plugin "broken": ImportError: needs the package nope'
    assert "gru" in listed.stdout and "timm" in listed.stdout


def test_a_plugin_failing_on_import_in_any_way_is_isolated_and_named(tmp_path, gru_site):
    broken = {
        "runtime": "raise RuntimeError('no GPU driver')\n",
        "syntax": "def register_tasks(register:\n",
        "attribute": "import os\nos.no_such_function()\n",
        "exits": "import sys\nsys.exit(3)\n",
    }
    for name, source in broken.items():
        fake_installed(tmp_path, name, f"{name}_plugin", source)
    env = {"PYTHONPATH": f"{tmp_path}:{gru_site}", "MMKIT_PLUGINS": ",".join([*broken, "gru"])}
    listed = run_mmkit("list", "text_encoders", env=env)
    assert listed.returncode == 0 and "gru" in listed.stdout and "transformer" in listed.stdout
    lines = listed.stderr.splitlines()
    assert len(lines) == 4, listed.stderr
    assert 'mmkit: error importing plugin "runtime": RuntimeError: no GPU driver' in lines
    assert any(line.startswith('mmkit: error importing plugin "syntax": SyntaxError: ') for line in lines)
    assert "mmkit: error importing plugin \"attribute\": AttributeError: module 'os' has no attribute " \
           "'no_such_function'" in lines
    assert 'mmkit: error importing plugin "exits": SystemExit: 3' in lines


def test_misspelled_hook_is_reported(tmp_path):
    source = "from mmkit import hookimpl\n@hookimpl\ndef register_text_encoder(register):\n    pass\n"
    fake_installed(tmp_path, "typo", "typo_plugin", source)
    listed = run_mmkit("list", "tasks", env={"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "typo"})
    assert listed.returncode == 0 and "clip_retrieval" in listed.stdout
    assert listed.stderr.startswith('mmkit: plugin "typo" ignored: PluginValidationError: ')
    assert "register_text_encoder" in listed.stderr and len(listed.stderr.strip().splitlines()) == 1


def test_a_hook_with_the_wrong_arguments_is_reported_with_the_reason(tmp_path):
    source = "from mmkit import hookimpl\n@hookimpl\ndef register_tasks(reg):\n    pass\n"
    fake_installed(tmp_path, "badsig", "badsig_plugin", source)
    shown = run_mmkit("plugins", env={"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "badsig"})
    assert shown.returncode == 0 and "mmkit.encoders" in shown.stdout and "badsig" not in shown.stdout
    [line] = shown.stderr.splitlines()  # reported once, in one line, with pluggy's reason
    assert line.startswith("mmkit: plugin \"badsig\" ignored: PluginValidationError: Plugin 'badsig' for hook "
                           "'register_tasks'; ")
    assert "Argument(s) {'reg'} are declared in the hookimpl" in line


def test_a_misspelled_plugin_name_in_the_environment_is_reported(gru_site):
    env = {"PYTHONPATH": str(gru_site), "MMKIT_PLUGINS": "grux", "MMKIT_DISABLE_PLUGINS": "mmkit.dataz"}
    listed = run_mmkit("list", "text_encoders", env=env)
    assert listed.returncode == 0 and "transformer" in listed.stdout
    assert listed.stderr.splitlines() == [
        'mmkit: MMKIT_PLUGINS names "grux", which is no installed plugin (installed: gru)',
        'mmkit: MMKIT_DISABLE_PLUGINS names "mmkit.dataz", which is no installed plugin (installed: gru)',
    ]


def test_plugin_command_that_breaks_does_not_take_the_cli_down(tmp_path):
    source = (
        "from mmkit import hookimpl\n"
        "@hookimpl\n"
        "def register_commands(cli):\n"
        "    raise RuntimeError('no commands today')\n"
    )
    fake_installed(tmp_path, "noisy", "noisy_plugin", source)
    listed = run_mmkit("list", "tasks", env={"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "noisy"})
    assert listed.returncode == 0 and "clip_retrieval" in listed.stdout
    assert listed.stderr.strip() == 'mmkit: plugin "noisy" failed in register_commands: RuntimeError: no commands today'


def test_plugin_commands_are_added(tmp_path):
    source = (
        "import click\n"
        "from mmkit import hookimpl\n"
        "@hookimpl\n"
        "def register_commands(cli):\n"
        "    @cli.command()\n"
        "    def hello():\n"
        "        click.echo('hello from a plugin')\n"
    )
    fake_installed(tmp_path, "greeter", "greeter_plugin", source)
    said = run_mmkit("hello", env={"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "greeter"})
    assert said.returncode == 0 and said.stdout == "hello from a plugin\n"


def test_plugin_commands_cannot_replace_a_builtin_or_an_earlier_plugins(tmp_path):
    def source(said: str) -> str:
        return ("import click\nfrom mmkit import hookimpl\n@hookimpl\ndef register_commands(cli):\n"
                f"    @cli.command()\n    def run():\n        click.echo({said!r})\n"
                f"    @cli.command()\n    def hello():\n        click.echo({said!r})\n")

    fake_installed(tmp_path, "first", "first_plugin", source("first"))
    fake_installed(tmp_path, "second", "second_plugin", source("second"))
    env = {"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "first,second"}
    said = run_mmkit("hello", env=env)
    assert said.returncode == 0 and said.stdout == "first\n"
    assert said.stderr.splitlines() == [
        'mmkit: plugin "first" registers command "run", already registered by mmkit; ignored',
        'mmkit: plugin "second" registers command "run", already registered by mmkit; ignored',
        'mmkit: plugin "second" registers command "hello", already registered by plugin "first"; ignored',
    ]
    assert "Train and evaluate RECIPE" in run_mmkit("run", "--help", env=env).stdout


def test_plugin_taking_a_used_name_is_reported_and_ignored(tmp_path):
    source = (
        "from mmkit import hookimpl\n"
        "def encoder(width: int = 8):\n"
        "    'Not really an encoder.'\n"
        "@hookimpl\n"
        "def register_text_encoders(register):\n"
        "    register('transformer', encoder)\n"
        "    register('clash_free', encoder)\n"
    )
    fake_installed(tmp_path, "clash", "clash_plugin", source)
    env = {"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "clash"}
    listed = run_mmkit("list", "text_encoders", env=env)
    assert listed.returncode == 0
    assert listed.stderr.strip() == ('mmkit: plugin "clash" registers text encoder "transformer", '
                                     'already registered by plugin "mmkit.encoders"; ignored')
    assert "transformer" in listed.stdout and "[mmkit.encoders]" in listed.stdout
    assert "clash_free" in listed.stdout


def test_an_entry_point_named_like_a_builtin_is_reported_and_ignored(tmp_path):
    fake_installed(tmp_path, "shadow", "shadow_plugin", "raise RuntimeError('never imported')\n", entry="mmkit.data")
    listed = run_mmkit("list", "datasets", env={"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "mmkit.data"})
    assert listed.returncode == 0 and "synthetic_shapes" in listed.stdout
    assert listed.stderr.strip() == ('mmkit: plugin "mmkit.data" of shadow has the name of a builtin plugin of mmkit; '
                                     "ignored")


SLOW_DATA = '''
import time
from mmkit import hookimpl
from mmkit.data.shapes import SyntheticShapes


class SlowShapes(SyntheticShapes):
    """synthetic_shapes as if read from a slow disk: each sample takes ``seconds``."""

    def __init__(self, num_samples: int = 64, split: str = "train", image_size: int = 32, seconds: float = 0.03):
        super().__init__(num_samples, split, image_size)
        self.seconds = seconds

    def __getitem__(self, index):
        time.sleep(self.seconds)
        return super().__getitem__(index)


@hookimpl
def register_datasets(register):
    register("slow_shapes", SlowShapes)
'''


def test_a_run_on_a_slow_data_plugin_logs_that_it_waited_for_batches(tmp_path, tiny_recipe):
    """Batches of 16 samples at 30 ms each: each step waits about 0.5 s for its batch and
    computes in a fraction of that, so every log line's data_share is high, even the one after
    the held-out evaluation at step 3 (evaluation is no part of an interval), and no interval
    trains faster than the loader gives samples."""
    fake_installed(tmp_path, "slowdata", "slowdata_plugin", SLOW_DATA)
    env = {"PYTHONPATH": str(tmp_path), "MMKIT_PLUGINS": "slowdata"}
    done = run_mmkit("run", tiny_recipe, "data.name=slow_shapes", "train.num_workers=0", env=env)
    assert done.returncode == 0, done.stderr
    metrics = (tiny_recipe.parent / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    logged = [record for record in map(json.loads, metrics) if "data_share" in record]
    assert [record["step"] for record in logged] == [2, 4, 6]
    assert all(0.7 < record["data_share"] <= 1 and record["samples_per_s"] < 1 / 0.03 for record in logged), logged
