"""Learning-rate schedule and optimizer construction."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, weight_decay: float,
                 lr_scales: Mapping[nn.Module, float] | None = None) -> list[dict[str, Any]]:
    """The trainable parameters grouped by learning-rate scale (a part's ``lr_scale``) and by
    decay: matrices decay; biases, norms, embeddings' scales and temperatures are left alone,
    as CLIP and timm do. Each group carries its ``lr_scale``."""
    scale_of = {id(p): scale for part, scale in (lr_scales or {}).items() for p in part.parameters()}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((scale_of.get(id(p), 1.0), p.ndim < 2), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
            for (scale, no_decay), params in sorted(groups.items(), key=lambda item: item[0])]


def adamw(model: nn.Module, lr: float, weight_decay: float, lr_scales: Mapping[nn.Module, float] | None = None,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """Fused AdamW over ``param_groups``: it decays matrices only, and a group trains at lr x
    its scale. Fused (on the CPU too), so a step with a non-finite loss is skipped on the device."""
    groups = [{**group, "lr": lr * group["lr_scale"]} for group in param_groups(model, weight_decay, lr_scales)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
