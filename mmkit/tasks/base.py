"""The task contract: a module that owns the model, its losses, its metrics and its plots."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset


class Task(nn.Module):
    """Base class for tasks. ``forward`` is ``training_step``, so DDP wrapping works."""

    fits = False  # whether ``fit`` learns from the training set's ``predict`` outputs

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms for one batch under ``loss/<name>`` (a fusion head's terms too), which the
        engine sums, weighted by ``train.loss_weights``, into what the optimizer minimises;
        other values (temperature, accuracy) are only logged."""
        raise NotImplementedError

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """A training batch as the model should see it, before it is encoded: the random
        corruption a fusion head learns to undo (masked tokens); held-out batches take it with
        a seeded ``generator``. The batch itself by default."""
        return batch

    def item_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """For values of ``training_step`` that are sums over items (masked tokens) rather than
        batch means: how many items ``batch`` holds, by key. The engine divides each by the
        count over the whole optimizer step, so micro-batches and processes weigh by their items."""
        return {}

    @torch.no_grad()
    def predict(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Per-item outputs of held-out batches (embeddings, scores, captions): CPU tensors
        whose first dimension is the item, or lists. Each process predicts its share of the
        held-out set; mmkit joins the shares in order before ``evaluate`` and ``figures``."""
        raise NotImplementedError

    def fit(self, outputs: dict[str, Any]) -> dict[str, float]:
        """A task whose ``fits`` is true learns here without gradient steps (a linear probe's
        classifier), from ``predict``'s outputs over the whole training set, before any
        optimizer step; returns what it chose, for the summary. A task left with nothing
        trainable then takes no optimizer step."""
        raise NotImplementedError

    def calibrate(self, outputs: dict[str, Any]) -> None:
        """Set what the task chooses on the validation split (decision thresholds) from its
        held-out ``outputs``, before ``evaluate``. A training run calls it at each evaluation;
        ``mmkit eval`` does not, so another split is judged with the run's choices."""

    def evaluate(self, outputs: dict[str, Any]) -> dict[str, float]:
        """Metrics from the whole held-out set's outputs; keys under ``chance/`` give the chance level."""
        raise NotImplementedError

    def headline(self) -> list[str]:
        """The metrics (keys of ``evaluate``) whose values over training the report plots."""
        return []

    def figures(self, dataset: Dataset | None, outputs: dict[str, Any]) -> dict[str, Any]:
        """Matplotlib figures for the run report, by file stem, from the same outputs as the
        final metrics; ``dataset`` gives item i's raw sample (None for a streamed held-out set)."""
        return {}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)
