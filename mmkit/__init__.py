"""mmkit: a plugin-based multimodal deep-learning toolkit.

``from mmkit import build, load_recipe, Run``. Names are imported on first use, so
importing mmkit stays cheap (no torch until something needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build": "mmkit.components",
    "load_recipe": "mmkit.recipe",
    "check_recipe": "mmkit.recipe",
    "Run": "mmkit.engine.run",
    "build_parts": "mmkit.components",
    "train": "mmkit.trained",
    "load_run": "mmkit.trained",
    "metrics_table": "mmkit.trained",
    "Trained": "mmkit.trained",
    "Encoded": "mmkit.encoders.base",
    "Encoder": "mmkit.encoders.base",
    "Task": "mmkit.tasks.base",
    "FusionHead": "mmkit.fusion.base",
    "Fused": "mmkit.fusion.base",
    "Modality": "mmkit.fusion.base",
    "MMKitError": "mmkit.errors",
    "hookimpl": "mmkit.hookspecs",
    "get_registry": "mmkit.plugins",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
