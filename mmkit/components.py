"""Turning registered names and recipe tables into modules and datasets."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from mmkit.data.loader import Collate
from mmkit.errors import MMKitError, one_line
from mmkit.plugins import get_registry
from mmkit.recipe import MODALITIES, Recipe, val_params
from mmkit.registry import KINDS, PROVIDED, Component, Registry, check_type
from mmkit.samples import DatasetInfo
from mmkit.tasks.base import Task


def build(kind: str, name: str, **params: Any) -> Any:
    """Build one registered component, checking ``params`` against its schema first.

    ``build("image_encoders", "timm", model_name="resnet18", image_size=64)``; a task also
    takes the ``encoders`` (and ``fusion``) that a recipe run would build for it.
    """
    component = get_registry().get(kind, name)
    provided = {k: params.pop(k) for k in PROVIDED.get(component.kind, ()) if k in params}
    return instantiate(component, params, **provided)


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
    """What a recipe builds: the task (which holds the model), its encoders and the datasets."""

    task: Task
    encoders: dict[str, Any]
    train_set: Dataset
    val_set: Dataset | None

    @property
    def transforms(self) -> dict[str, Any]:
        """Each modality's preprocessing, applied to samples in DataLoader workers."""
        return {m: encoder.preprocess for m, encoder in self.encoders.items()}

    @property
    def collate(self) -> Collate:
        """Batching with the encoders' own collate functions where they bring one."""
        return Collate({m: e.collate for m, e in self.encoders.items() if getattr(e, "collate", None)})


def build_parts(recipe: Recipe, registry: Registry) -> Parts:
    """Build encoders, fusion head, task and datasets from a checked recipe."""

    def make(key: str, kind: str, extra: dict[str, Any] | None = None, **provided: Any) -> Any:
        keys = key.split(".")
        name = recipe.table(*keys)["name"]
        component = registry.get(kind, name)
        try:
            return instantiate(component, {**recipe.params(*keys), **(extra or {})}, **provided)
        except MMKitError as error:
            raise MMKitError(f"{recipe.source}: {key}: {error}") from None
        except Exception as error:  # the factory refused its parameters
            raise MMKitError(f"{recipe.source}: {key} ({name}): cannot build: {one_line(error)}") from error

    train_set = make("data", "datasets")
    val_set = make("data", "datasets", extra=val_params(recipe, registry)) if "val" in recipe.table("data") else None
    info = _check_modalities(recipe, train_set)
    encoders = {m: make(f"model.{m}", MODALITIES[m]) for m in recipe.modalities}
    fusion = make("model.fusion", "fusion_heads", encoders=encoders) if "fusion" in recipe.table("model") else None
    task = make("task", "tasks", encoders=encoders, fusion=fusion, data=info)
    return Parts(task, encoders, train_set, val_set)


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
    if not len(dataset):
        raise MMKitError(f"{recipe.source}: data: dataset {name!r} is empty")
    info = dataset_info(dataset, name)
    for modality in recipe.modalities:
        if modality not in info.keys:
            raise MMKitError(f"{recipe.source}: model.{modality}: dataset {name!r} "
                             f"has no {modality!r} in its samples (it gives {', '.join(sorted(info.keys))}); "
                             f"remove [model.{modality}] or pick a dataset with {modality}")
    return info
