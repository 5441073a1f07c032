"""Tiny open_clip models for the tests: configs registered with open_clip once per session,
small enough to build and run in a fraction of a second."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "mmkit-tiny-vit": {"vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}},
    "mmkit-tiny-rn": {"vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16,
                                     "patch_size": None}},
    "mmkit-tiny-timm": {"vision_cfg": {"image_size": 32, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                                       "timm_pool": "", "timm_proj": "linear"}},
}


@functools.cache
def tiny_open_clip_models() -> tuple[str, ...]:
    """Register the tiny configs with open_clip (ViT, ModifiedResNet and timm image towers, each
    with a one-layer text tower); their names."""
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="mmkit-open-clip-"))
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps({"embed_dim": 16, "text_cfg": TEXT, **config}))
    open_clip.add_model_config(folder)
    return tuple(CONFIGS)


def tiny_open_clip() -> dict:
    """Settings for the open_clip image and text encoders: the tiny ViT model."""
    tiny_open_clip_models()
    return {"model_name": "mmkit-tiny-vit"}
