"""Turning registered names and recipe tables into modules and datasets."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from mmkit.errors import MMKitError
from mmkit.plugins import get_registry
from mmkit.recipe import MODALITIES, Recipe
from mmkit.registry import KINDS, Component, Registry, check_type
from mmkit.tasks.base import Task


def build(kind: str, name: str, **params: Any) -> Any:
    """Build one registered component, checking ``params`` against its schema first.

    ``build("image_encoders", "timm", model_name="resnet18", image_size=64)``
    """
    return instantiate(get_registry().get(kind, name), params)


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


def _params(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k not in ("name", "val")}


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


def build_parts(recipe: Recipe, registry: Registry) -> Parts:
    """Build encoders, fusion head, task and datasets from a checked recipe."""
    encoders = {}
    for modality in recipe.modalities:
        table = recipe.table("model", modality)
        encoders[modality] = instantiate(registry.get(MODALITIES[modality], table["name"]), _params(table))
    fusion = None
    if "fusion" in recipe.table("model"):
        table = recipe.table("model", "fusion")
        fusion = instantiate(registry.get("fusion_heads", table["name"]), _params(table), encoders=encoders)
    task_table = recipe.table("task")
    task = instantiate(registry.get("tasks", task_table["name"]), _params(task_table),
                       encoders=encoders, fusion=fusion)
    data = recipe.table("data")
    dataset = registry.get("datasets", data["name"])
    train_set = instantiate(dataset, _params(data))
    val_set = instantiate(dataset, {**_params(data), **data["val"]}) if "val" in data else None
    return Parts(task, encoders, train_set, val_set)
