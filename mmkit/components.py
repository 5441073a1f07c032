"""Turning registered names and recipe tables into modules and datasets."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from mmkit.data.loader import Collate
from mmkit.errors import MMKitError, one_line
from mmkit.fusion.base import Modality
from mmkit.parts import PLACES, parameter_counts, prepare_part
from mmkit.plugins import get_registry
from mmkit.recipe import MODALITIES, Recipe, val_params
from mmkit.registry import KINDS, PROVIDED, Component, Registry, check_type
from mmkit.samples import DatasetInfo
from mmkit.specs import PART_KEYS, PartSpec
from mmkit.tasks.base import Task


def build(kind: str, name: str, **params: Any) -> Any:
    """Build one registered component, checking ``params`` against its schema first.

    ``build("image_encoders", "timm", model_name="resnet18", image_size=64)``; a task also
    takes the ``encoders`` (and ``fusion``, ``data``) that a recipe run would build for it, a
    fusion head the ``modalities`` (each encoder's widths, mmkit.fusion.base.Modality).
    Encoders and fusion heads take the part keys too (``freeze``, ``lora``, ``init_from``).
    """
    component = get_registry().get(kind, name)
    provided = {k: params.pop(k) for k in PROVIDED.get(component.kind, ()) if k in params}
    if component.kind not in PLACES:
        return instantiate(component, params, **provided)
    spec = PartSpec(**{k: params.pop(k) for k in PART_KEYS if k in params})
    where = f"{KINDS[component.kind]} {component.name!r}"
    if spec.lr_scale != 1.0:
        raise MMKitError(f"{where}: lr_scale sets a learning rate for training; give it in a recipe's [model.<part>]")
    if problems := spec.problems():
        raise MMKitError(f"{where}: " + "; ".join(f"{key}: {message}" for key, message in problems.items()))
    part = instantiate(component, params, **provided)
    prepare_part(part, spec, where, PLACES[component.kind])
    return part


def instantiate(component: Component, params: dict[str, Any], **provided: Any) -> Any:
    """Call a component's factory with recipe params (checked) and what mmkit provides."""
    where = f"{KINDS[component.kind]} {component.name!r}"
    for key, value in params.items():
        param = component.params.get(key)
        if param is None:
            raise MMKitError(f"{where} has no parameter {key!r}; see `mmkit info {component.kind} {component.name}`")
        if not check_type(value, param.annotation):
            raise MMKitError(f"{where}: {key} expects {param.type_name}, got {value!r}")
    wanted = inspect.signature(component.factory).parameters
    extra = {k: v for k, v in provided.items() if k in wanted and v is not None}
    return component.factory(**params, **extra)


@dataclass
class Parts:
    """What a recipe builds: the task (which holds the model), its parts (encoders by modality,
    and the fusion head), the datasets, and each part's learning-rate scale."""

    task: Task
    encoders: dict[str, Any]
    train_set: Dataset
    val_set: Dataset | None
    fusion: Any = None
    lr_scales: dict[str, float] = field(default_factory=dict)

    @property
    def transforms(self) -> dict[str, Any]:
        """Each modality's preprocessing, applied to samples in DataLoader workers."""
        return {m: encoder.preprocess for m, encoder in self.encoders.items()}

    def batching(self, device: torch.device) -> tuple[Collate, dict[str, Any]]:
        """How a run on ``device`` batches: the loader's workers collate (with the encoders' own
        collate where they bring one), then the encoders' on_device steps finish each batch
        after its copy to the accelerator (uint8 pixels normalised); on the CPU the workers
        finish batches too, as the main process is the one computing."""
        collates = {m: e.collate for m, e in self.encoders.items() if getattr(e, "collate", None)}
        finish = {m: e.on_device for m, e in self.encoders.items() if getattr(e, "on_device", None)}
        if device.type == "cpu":
            return Collate(collates, finish), {}
        return Collate(collates), finish

    @property
    def modules(self) -> dict[str, Any]:
        """Every part by its [model.<key>] name."""
        return {**self.encoders, **({"fusion": self.fusion} if self.fusion is not None else {})}

    def parameters(self) -> dict[str, dict[str, int]]:
        """Trainable and total parameters of each part and of the whole task."""
        return {**{key: parameter_counts(part) for key, part in self.modules.items()},
                "task": parameter_counts(self.task)}

    def scaled(self) -> dict[Any, float]:
        """The parts whose learning rate is scaled, for the optimizer's groups."""
        return {self.modules[key]: scale for key, scale in self.lr_scales.items() if scale != 1.0}


def build_parts(recipe: Recipe, registry: Registry, trained: bool = False) -> Parts:
    """Build datasets, encoders (with their part keys applied), fusion head and task. With
    ``trained`` they are a finished run's, whose own weights are loaded next: init_from is not
    read, as its source may be gone (another machine, a deleted run) and would be overwritten."""

    def make(key: str, kind: str, extra: dict[str, Any] | None = None, **provided: Any) -> Any:
        keys = key.split(".")
        component = registry.get(kind, recipe.table(*keys)["name"])
        return build_table(recipe, key, component, {**recipe.params(*keys), **(extra or {})}, **provided)

    def make_part(key: str, kind: str, **provided: Any) -> Any:
        part = make(f"model.{key}", kind, **provided)
        spec = replace(recipe.part(key), init_from=None) if trained else recipe.part(key)
        prepare_part(part, spec, f"{recipe.origin(f'model.{key}')}: model.{key}", PLACES[kind])
        return part

    train_set, val_set, info = build_datasets(recipe, registry)
    encoders = {m: make_part(m, MODALITIES[m]) for m in recipe.modalities}
    widths = {m: Modality.of(encoder) for m, encoder in encoders.items()}
    fusion = make_part("fusion", "fusion_heads", modalities=widths) if "fusion" in recipe.table("model") else None
    task = make("task", "tasks", encoders=encoders, fusion=fusion, data=info)
    scales = {key: recipe.part(key).lr_scale for key in recipe.table("model")}
    return Parts(task, encoders, train_set, val_set, fusion, scales)


def build_datasets(recipe: Recipe, registry: Registry) -> tuple[Dataset, Dataset | None, DatasetInfo]:
    """[data] and [data.val] as a run builds them (the held-out set given the training set's
    classes), and what they give, checked against the recipe's encoders; nothing else is built."""
    component = registry.get("datasets", recipe.table("data")["name"])
    train = build_table(recipe, "data", component, recipe.params("data"))
    info = _check_modalities(recipe, train)
    held_out = {**recipe.params("data"), **held_out_params(recipe, registry, info)}
    val = build_table(recipe, "data.val", component, held_out) if "val" in recipe.table("data") else None
    return train, val, info


def build_table(recipe: Recipe, key: str, component: Component, params: dict[str, Any], **provided: Any) -> Any:
    """``component`` built from recipe table ``key``; a refusal is one line naming the recipe and key."""
    try:
        return instantiate(component, params, **provided)
    except MMKitError as error:
        raise MMKitError(f"{recipe.source}: {key}: {error}") from None
    except Exception as error:  # the factory refused its parameters
        raise MMKitError(f"{recipe.source}: {key} ({component.name}): cannot build: {one_line(error)}") from error


def held_out_params(recipe: Recipe, registry: Registry, train: DatasetInfo) -> dict[str, Any]:
    """[data.val]'s parameters; a dataset taking ``classes`` is given the training set's, so
    label i means the same class in both (a held-out label outside them is a bad sample)."""
    params = val_params(recipe, registry)
    if "classes" in registry.get("datasets", recipe.table("data")["name"]).params and train.class_names:
        params.setdefault("classes", list(train.class_names))
    return params


def dataset_info(dataset: Dataset, name: str) -> DatasetInfo:
    """What a dataset declares it gives; a plugin dataset that declares nothing is told how."""
    info = getattr(dataset, "info", None)
    if not isinstance(info, DatasetInfo):
        raise MMKitError(f"dataset {name!r} declares nothing: give it an `info` attribute, an "
                         "mmkit.samples.DatasetInfo naming its sample keys (and class names, if labelled)")
    return info


def _check_modalities(recipe: Recipe, dataset: Dataset) -> DatasetInfo:
    """Every encoder needs its key in the samples; say so before anything else is built."""
    name = recipe.table("data")["name"]
    if not isinstance(dataset, IterableDataset) and not len(dataset):
        raise MMKitError(f"{recipe.source}: data: dataset {name!r} is empty")
    info = dataset_info(dataset, name)
    for modality in recipe.modalities:
        if modality not in info.keys:
            raise MMKitError(f"{recipe.source}: model.{modality}: dataset {name!r} "
                             f"has no {modality!r} in its samples (it gives {', '.join(sorted(info.keys))}); "
                             f"remove [model.{modality}] or pick a dataset with {modality}")
    return info
