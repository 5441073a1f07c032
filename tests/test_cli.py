"""The command line as a user types it."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_mmkit


def test_help_and_import_stay_light():
    code = ("import sys, mmkit, mmkit.cli\n"
            "sys.argv = ['mmkit', '--help']\n"
            "try:\n    mmkit.cli.main()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Commands:" in out and out.strip().endswith("False")


def test_list_filters_by_kind_and_pattern():
    everything = run_mmkit("list").stdout
    assert "image_encoders:" in everything and "tasks:" in everything and "clip_retrieval" in everything
    shapes = run_mmkit("list", "datasets", "*shapes").stdout
    assert shapes.splitlines()[0] == "datasets:" and "synthetic_shapes" in shapes and "synthetic_audio" not in shapes


def test_info_shows_parameters_from_the_signature():
    out = run_mmkit("info", "tasks", "clip_retrieval").stdout
    assert out.startswith('task "clip_retrieval" from plugin mmkit.tasks')
    assert "embed_dim: int  (default 256)" in out and "width of the shared embedding space." in out
    assert "encoders" not in out.split("parameters:")[1]


def test_unknown_names_get_one_line_and_a_suggestion():
    out = run_mmkit("info", "datasets", "synthetic_shape")
    assert out.returncode == 2
    assert out.stderr.strip() == ("mmkit: error: unknown dataset 'synthetic_shape'; did you mean "
                                  "'synthetic_shapes'? see `mmkit list datasets`")


def test_pretrained_weights_offline_fail_in_one_line(tiny_recipe, tmp_path):
    # As a user without network meets it: no offline flag set, a hub that cannot be reached, an empty cache.
    unreachable = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
                   "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
    out = run_mmkit("run", tiny_recipe, "model.image.pretrained=true", env=unreachable)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"mmkit: error: {tiny_recipe}: model.image: timm model 'test_vit': "
                               "pretrained weights could not be loaded")
    assert "set pretrained to a local weights file, or set pretrained = false" in lines[0]


def test_debug_shows_the_traceback(tiny_recipe):
    out = run_mmkit("--debug", "run", tiny_recipe, "model.image.pretrained=true", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_version():
    assert run_mmkit("--version").stdout.startswith("mmkit, version 0.1.0")
