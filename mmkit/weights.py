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


# Suffixes that make a weights setting a file path rather than the name of published weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def names_a_file(value: str) -> bool:
    """Whether a weights setting is a path (it exists, or looks like one) rather than a name
    such as "IMAGENET1K_V1" or "laion2b_s34b_b79k"."""
    path = Path(value)
    return path.exists() or path.suffix in WEIGHT_SUFFIXES or "/" in value or "\\" in value


def load_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load ``weights`` into ``module`` when every name and shape fits; otherwise say in one line
    which names are missing, unexpected or of another shape, and load nothing."""
    problems = fit_problems(module, weights)
    if problems:
        raise MMKitError(f"{what}: the weights do not fit the model: {problems}")
    module.load_state_dict(weights)


def fit_problems(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str:
    """Which names of ``weights`` are missing, unexpected or of another shape for ``module``, a few
    of each, in one line; empty when all fit (also for loaders other than ``load_into``)."""
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model has {tuple(own[k].shape)})"
             for k, v in weights.items() if k in own and v.shape != own[k].shape]
    problems = [(label, names) for label, names in (("missing", [k for k in own if k not in weights]),
                                                    ("unexpected", [k for k in weights if k not in own]),
                                                    ("other shape", wrong)) if names]
    return "; ".join(f"{label}: {_some(names)}" for label, names in problems)


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
