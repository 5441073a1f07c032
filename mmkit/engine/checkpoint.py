"""Resumable checkpoints in safetensors + JSON: nothing in them is ever unpickled.

A checkpoint is a folder ``step_00000100`` holding the model, the optimizer's tensors and
each process's RNG state as safetensors, and the schedule, step and the rest as JSON. It
is written under a temporary name and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from mmkit.errors import MMKitError
from mmkit.files import atomic_path, partial_path, publish

PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first (temporary folders are not complete)."""
    return sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit())


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, accelerator: Any, layout: dict[str, int], keep: int,
                    progress: dict[str, Any], data: dict[str, Any]) -> Path:
    """Write a checkpoint atomically: every process adds its RNG state and its ``data``
    state (stream positions, bad samples met), the main one the rest.

    ``layout`` (processes, batch size, accumulation) fixes where in the data a step ends,
    so resuming checks it is unchanged; ``progress`` (training seconds, skipped steps)
    carries totals across resumes."""
    final = folder / checkpoint_name(step)
    partial = partial_path(final)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_model(model, str(partial / "model.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, partial / "optimizer.safetensors")
        state = {"step": step, "layout": layout, "optimizer": meta, "scheduler": scheduler.state_dict(), **progress}
        if accelerator.scaler is not None:  # fp16 loss scaling
            state["scaler"] = accelerator.scaler.state_dict()
        (partial / "trainer.json").write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    _save_rng(partial, accelerator.process_index)
    (partial / f"data_{accelerator.process_index}.json").write_text(json.dumps(data))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish(partial, final)
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_checkpoint(path: Path, model: nn.Module, param_groups: list[dict[str, Any]],
                     layout: dict[str, int], settings: dict[str, float]) -> int:
    """The step ``path`` reached, once sure it fits ``model``, the optimizer's ``param_groups``
    and ``settings`` (``optimizer_settings``, which a resume would not apply: the optimizer's
    state holds its own) and the data ``layout``; checked before a resume writes or loads anything."""
    state = json.loads((path / "trainer.json").read_text())
    saved = state["layout"]  # a key a checkpoint did not record yet is taken as unchanged
    if changed := [f"{LAYOUT_KEYS.get(k, k)} {v} -> {layout.get(k)}" for k, v in saved.items() if layout.get(k) != v]:
        raise MMKitError(f"cannot resume from {path}: it was written with another data layout "
                         f"({', '.join(changed)}); resume with the recipe and process count it was written with")
    kept = saved_settings(state["optimizer"]["param_groups"])
    if changed := [f"{k} {kept[k]:g} -> {v:g}" for k, v in settings.items() if not math.isclose(kept[k], v, rel_tol=1e-9)]:
        raise MMKitError(f"cannot resume from {path}: {', '.join(changed)}; a resumed run keeps the optimizer "
                         "settings its checkpoint holds, so resume with the recipe.toml of that run")
    mismatch = weights_mismatch(path / "model.safetensors", model)
    if mismatch:
        raise MMKitError(f"cannot resume from {path}: the recipe builds another model ({mismatch}); "
                         "resume with the recipe.toml of that run")
    saved_groups = [_group_layout(group) for group in state["optimizer"]["param_groups"]]
    groups = [_group_layout(group) for group in param_groups]
    if saved_groups != groups:
        raise MMKitError(f"cannot resume from {path}: the recipe trains other parameters (optimizer groups of "
                         f"{_show(saved_groups)} there, {_show(groups)} here: was freeze, lora or lr_scale "
                         "changed?); resume with the recipe.toml of that run")
    return int(state["step"])


def load_trained_weights(model: nn.Module, path: Path) -> None:
    """A finished run's weights into ``model``, which must have the same parameters (names and
    shapes); read from safetensors, nothing unpickled."""
    if not path.exists():
        raise MMKitError(f"{path} does not exist: evaluate a finished run's folder (one with model.safetensors)")
    if mismatch := weights_mismatch(path, model):
        raise MMKitError(f"{path} does not fit the model this recipe builds ({mismatch}); the task and the "
                         "encoders must be the run's own, only data and evaluation settings may change")
    load_model(model, path, strict=True)


def load_trained_parts(parts: dict[str, nn.Module], path: Path) -> None:
    """Each part (``model.<key>``) from a finished run's weights, from where the run's task keeps
    it (``encoders.<modality>.``, ``fusion.``); every tensor of a part must be there."""
    from mmkit.parts import place
    from mmkit.weights import load_into

    saved = load_file(path)
    for key, module in parts.items():
        prefix = place(key)
        tensors = {name[len(prefix):]: tensor for name, tensor in saved.items() if name.startswith(prefix)}
        if not tensors:
            raise MMKitError(f"{path} has no model.{key} (no tensors under {prefix!r}); evaluate a run that trained one")
        load_into(module, tensors, f"{path}: model.{key}")


LAYOUT_KEYS = {"batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "num_workers": "train.num_workers",
               "seed": "run.seed", "samples": "training samples"}  # data layout keys as a recipe names them


def optimizer_settings(train: Any) -> dict[str, float]:
    """The recipe's optimizer settings, by recipe key, that a checkpoint's optimizer state holds."""
    return {"train.lr": train.lr, "train.weight_decay": train.weight_decay, "train.beta1": train.beta1,
            "train.beta2": train.beta2, "train.eps": train.eps}


def saved_settings(groups: list[dict[str, Any]]) -> dict[str, float]:
    """``optimizer_settings`` as a checkpoint's optimizer groups hold them (each group's base
    rate is train.lr x its scale; matrices decay at train.weight_decay, the rest not at all)."""
    group = groups[0]
    return {"train.lr": group["initial_lr"] / group.get("lr_scale", 1.0),
            "train.weight_decay": max(g["weight_decay"] for g in groups),
            "train.beta1": group["betas"][0], "train.beta2": group["betas"][1], "train.eps": group["eps"]}


def _group_layout(group: dict[str, Any]) -> tuple[int, float, float]:
    """What an optimizer group trains and how: its parameter count, lr scale and decay."""
    return len(group["params"]), group.get("lr_scale", 1.0), group["weight_decay"]


def _show(groups: list[tuple[int, float, float]]) -> str:
    return "[" + ", ".join(f"{n} at lr x {scale:g}" + (" decayed" if decay else "") for n, scale, decay in groups) + "]"


def weights_mismatch(path: Path, model: nn.Module) -> str | None:
    """How the saved weights differ from ``model``'s in names or shapes, if they do."""
    with safe_open(path, "pt") as saved_file:
        saved = {key: tuple(saved_file.get_slice(key).get_shape()) for key in saved_file.keys()}
    state = model.state_dict()
    for key, tensor in state.items():
        if key in saved and saved[key] != tuple(tensor.shape):
            return f"{key} is {list(saved[key])} in the checkpoint, {list(tensor.shape)} here"
    if unexpected := sorted(set(saved) - set(state)):
        return f"the checkpoint has {unexpected[0]}, which this model lacks"
    stored = {_storage(state[key]) for key in saved}  # tensors sharing storage (tied weights) are saved once
    if missing := [key for key in state if key not in saved and _storage(state[key]) not in stored]:
        return f"this model's {missing[0]} is not in the checkpoint"
    return None


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    accelerator: Any) -> tuple[int, dict[str, Any]]:
    """Restore model, optimizer, schedule and this process's RNG from a checkpoint that
    ``check_checkpoint`` accepted; return the step reached and the progress totals (and
    train.profile's window, once profiled) and this process's data state saved with it."""
    state = json.loads((path / "trainer.json").read_text())
    load_model(model, path / "model.safetensors", strict=True)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    _load_rng(path, accelerator.process_index)
    data = path / f"data_{accelerator.process_index}.json"
    progress = {"seconds": state.get("seconds", 0.0), "skipped_steps": state.get("skipped_steps", 0),
                "profile": state.get("profile"), "data": json.loads(data.read_text()) if data.exists() else None}
    return int(state["step"]), progress


def write_atomic_model(model: nn.Module, path: Path) -> None:
    """Save a model's weights as safetensors under a temporary name, then rename."""
    with atomic_path(path) as partial:
        save_model(model, str(partial))
        os.chmod(partial, 0o644)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["plain"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, folder / f"rng_{rank}.safetensors")
    numpy_state = np.random.get_state()
    plain = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    (folder / f"rng_{rank}.json").write_text(json.dumps(plain))


def _load_rng(folder: Path, rank: int) -> None:
    tensors = load_file(folder / f"rng_{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    plain = json.loads((folder / f"rng_{rank}.json").read_text())
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

