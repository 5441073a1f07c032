"""The task contract: a module that owns the model, its losses, its metrics and its plots."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset


class Task(nn.Module):
    """Base class for tasks. ``forward`` is ``training_step``, so DDP wrapping works."""

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms for one batch; ``loss`` is what the optimizer minimises, the rest is logged."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Metrics over held-out batches; keys under ``chance/`` give the chance level."""
        raise NotImplementedError

    @torch.no_grad()
    def figures(self, dataset: Dataset, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Matplotlib figures for the run report, by file stem; ``dataset`` holds raw samples."""
        return {}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)
