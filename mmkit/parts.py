"""What mmkit does to every built part (each [model.<part>] table): LoRA adapters, init_from,
freezing, and counting what trains. One implementation for every encoder and fusion head,
builtin or plugin; the learning-rate scale is applied where the optimizer is built."""

from __future__ import annotations

import fnmatch
import functools
import os
from pathlib import Path

from torch import nn

from mmkit.errors import MMKitError, one_line
from mmkit.specs import InitFrom, LoraSpec, PartSpec
from mmkit.weights import load_weights


# Where each kind of part sits in a task's weights: a run folder's init_from default prefix.
PLACES = {"image_encoders": "encoders.image.", "text_encoders": "encoders.text.",
          "audio_encoders": "encoders.audio.", "fusion_heads": "fusion."}


def place(key: str) -> str:
    """Where the part of ``[model.<key>]`` sits in a task's weights."""
    return PLACES["fusion_heads"] if key == "fusion" else f"encoders.{key}."


def prepare_part(module: nn.Module, spec: PartSpec, where: str, place: str) -> dict[str, int] | None:
    """Apply ``spec`` to a freshly built part: adapters first (so init_from may fill a LoRA run's
    adapters too), then the weights, then freezing. ``place`` is the part's key prefix in a
    task's weights ("encoders.text."); returns init_from's counts, if it ran."""
    if spec.lora is not None:
        add_lora(module, LoraSpec(**spec.lora), where)
    counts = None
    if spec.init_from is not None:
        source = InitFrom(spec.init_from) if isinstance(spec.init_from, str) else InitFrom(**spec.init_from)
        counts = init_from(module, source, where, place)
        if os.environ.get("RANK", "0") == "0":  # once, not from every process of a launch
            print(f"{where}: init_from {source.path}: {counts['loaded']} tensors loaded, "
                  f"{counts['skipped']} skipped, {counts['created']} newly created")
    if spec.freeze:
        freeze(module, spec.freeze, where)
    return counts


def add_lora(module: nn.Module, lora: LoraSpec, where: str) -> None:
    """Wrap the target layers with peft's LoRA in place; only the adapters of this part train."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora.target_modules or linear_layers(module)
    if not targets:
        raise MMKitError(f"{where}: lora: the part has no linear layers to adapt; name them in lora.target_modules")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    try:
        inject_adapter_in_model(config, module)
    except ValueError as error:  # e.g. a target_modules name that matches nothing
        raise MMKitError(f"{where}: lora: {one_line(error)}") from None


def linear_layers(module: nn.Module) -> list[str]:
    """Names of the linear layers a LoRA adapter can wrap: not the output projection inside
    nn.MultiheadAttention, whose forward reads its weight directly."""
    inside_attention = {f"{name}.out_proj" for name, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and name not in inside_attention]


def init_from(module: nn.Module, source: InitFrom, where: str, place: str) -> dict[str, int]:
    """Copy the tensors of ``source`` whose names (after the prefix) the part has; a shape that
    differs is refused by name. A layer LoRA wrapped takes the plain weight of the same layer."""
    path = Path(source.path)
    if not path.exists():
        recipe = Path("recipes") / f"{path.name}.toml"
        first = f"`mmkit run {recipe}` makes it" if recipe.is_file() else "finish the run that writes it first"
        raise MMKitError(f"{where}: init_from: {path} does not exist: {first}, or point init_from at a run "
                         "folder or a weights file")
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise MMKitError(f"{where}: init_from: {path} is no run folder (it has no model.safetensors)")
        path, prefix = path / "model.safetensors", place if source.prefix is None else source.prefix
    else:
        prefix = source.prefix or ""
    tensors = {k[len(prefix):]: v for k, v in load_weights(path, f"{where}: init_from").items() if k.startswith(prefix)}
    if not tensors:
        raise MMKitError(f"{where}: init_from: {path} has no tensors under the prefix {prefix!r}; "
                         "set init_from = {path = ..., prefix = ...}")
    state = module.state_dict()
    if (adapters := sorted(k for k in tensors if ".lora_" in k)) and not any(".lora_" in k for k in state):
        raise MMKitError(f"{where}: init_from {path} holds LoRA adapters ({prefix}{adapters[0]}, ...), which "
                         "this part lacks; give it the lora table of the run that trained them")
    chosen, used = {}, set()
    for key, current in state.items():
        name = key if key in tensors else key.replace(".base_layer.", ".")
        if name not in tensors:
            continue
        if tensors[name].shape != current.shape:
            raise MMKitError(f"{where}: init_from {path}: {prefix}{name} is {list(tensors[name].shape)} there, "
                             f"{list(current.shape)} here")
        chosen[key] = tensors[name]
        used.add(name)
    if not chosen:
        raise MMKitError(f"{where}: init_from {path}: none of its tensors under {prefix!r} is named like this "
                         f"part's (e.g. {next(iter(state), '-')!r}); set init_from = {{path = ..., prefix = ...}}")
    module.load_state_dict(chosen, strict=False)
    return {"loaded": len(chosen), "skipped": len(tensors) - len(used), "created": len(state) - len(chosen)}


def freeze(module: nn.Module, which: bool | list[str], where: str) -> None:
    """Stop training the whole part (kept in eval mode) or the parameters matching globs."""
    if which is True:
        module.requires_grad_(False)
        keep_in_eval(module)
        return
    names = [name for name, _ in module.named_parameters()]
    for pattern in which:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            like = f"they are named like {names[0]!r}" if names else "the part has none"
            raise MMKitError(f"{where}: freeze: {pattern!r} matches no parameter ({like})")
    for name, parameter in module.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in which):
            parameter.requires_grad_(False)


def keep_in_eval(module: nn.Module) -> None:
    """Make ``module.train()`` keep this module in eval mode, so a frozen backbone's batch-norm
    statistics and dropout stay fixed however its task switches modes (picklable, for workers
    and spawned processes)."""
    module.eval()
    module.train = functools.partial(_train_in_eval, module)


def _train_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (each tensor once, however often it is shared)."""
    unique = {id(p): p for p in module.parameters()}.values()
    return {"trainable": sum(p.numel() for p in unique if p.requires_grad), "total": sum(p.numel() for p in unique)}
