"""Shared fixtures: tiny recipes, a real `mmkit` subprocess, and no stray plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Entry-point plugins installed on a developer's machine must not leak into the tests;
# tests that need one install it and set MMKIT_PLUGINS themselves.
os.environ["MMKIT_PLUGINS"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = """
[model.image]
name = "timm"
model_name = "test_vit"
image_size = 32

[model.text]
name = "transformer"
width = 32
layers = 1
heads = 2
context_length = 16

[task]
name = "clip_retrieval"
embed_dim = 32
"""  # tiny image and text towers aligned by clip_retrieval

TINY_IMAGE_TEXT = """
[run]
name = "tiny"
seed = 0
output_dir = "{runs}"
device = "cpu"

[data]
name = "synthetic_shapes"
num_samples = 64
image_size = 32

[data.val]
split = "val"
num_samples = 32

""" + TINY_MODEL.replace("{", "{{").replace("}", "}}") + """

[train]
max_steps = 6
batch_size = 16
lr = 1e-3
warmup = 2
log_every = 2
checkpoint_every = 3

[eval]
every = 3
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe that trains a tiny image-text model for a few steps in seconds."""
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY_IMAGE_TEXT.format(runs=tmp_path / "runs")))
    return path


def run_mmkit(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `mmkit` command line in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mmkit", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)
