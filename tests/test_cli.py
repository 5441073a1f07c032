"""The command line as a user types it."""

from __future__ import annotations

import subprocess
import sys

import timm
import torch
from safetensors.torch import load_file, save_file

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
    out = run_mmkit("run", tiny_recipe, "model.image.pretrained=true", env=unreachable_hub(tmp_path), timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"mmkit: error: {tiny_recipe}: model.image: timm model 'test_vit': "
                               "pretrained weights could not be loaded")
    assert "set pretrained to a local weights file, or set pretrained = false" in lines[0]


def test_cached_pretrained_weights_load_while_the_hub_is_unreachable(tiny_recipe, tmp_path):
    # timm's hub weights for test_vit, as an earlier download leaves them in the Hugging Face cache.
    weights = timm.create_model("test_vit").state_dict()
    weights["cls_token"] = torch.full_like(weights["cls_token"], 7.0)
    repo = tmp_path / "hf" / "hub" / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(weights, repo / "snapshots" / ("0" * 40) / "model.safetensors")

    out = run_mmkit("run", tiny_recipe, "model.image.pretrained=true", env=unreachable_hub(tmp_path), timeout=60)
    assert out.returncode == 0, out.stderr
    trained = load_file(tmp_path / "runs" / "tiny" / "model.safetensors")["encoders.image.model.cls_token"]
    assert torch.allclose(trained, torch.full_like(trained, 7.0), atol=0.05)  # 6 small steps away from the cache


def unreachable_hub(tmp_path) -> dict[str, str]:
    """As a user without network meets it: no offline flag, a hub that cannot be reached, no proxy."""
    proxies = {f"{kind}_proxy": "" for kind in ("http", "https", "all")}
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
            **proxies, **{key.upper(): "" for key in proxies}}


def test_debug_shows_the_traceback(tiny_recipe):
    out = run_mmkit("--debug", "run", tiny_recipe, "model.image.pretrained=true", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_version():
    assert run_mmkit("--version").stdout.startswith("mmkit, version 0.1.0")
