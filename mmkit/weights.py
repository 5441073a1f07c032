"""Reading weight files without ever unpickling code: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mmkit.errors import MMKitError, one_line

# Inside a folder, the files tried in turn (Hugging Face, timm and open_clip layouts).
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def weights_file(path: str | Path, what: str) -> Path:
    """``path`` itself, or for a folder the weights file inside it."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise MMKitError(f"{what}: no weights in {path} (looked for {', '.join(WEIGHT_FILES)})")
        return found
    if not path.is_file():
        raise MMKitError(f"{what}: weights file not found: {path}")
    return path


def load_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (or folder), by name, on the CPU.

    A checkpoint that wraps its weights ({"state_dict": ...}, {"model": ...}) is unwrapped.
    A .bin/.pt file that needs pickled Python objects is refused: loading it could run code.
    """
    path = weights_file(path, what)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:
            raise MMKitError(f"{what}: cannot read {path}: {one_line(error)}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MMKitError(f"{what}: {path} needs pickled Python objects to load, which mmkit refuses "
                         "(loading them could run code); save its tensors as .safetensors and use that") from None
    except Exception as error:
        raise MMKitError(f"{what}: cannot read {path}: {one_line(error)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise MMKitError(f"{what}: {path} holds a {type(loaded).__name__}, not named tensors")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
