"""What datasets hand over and encoders take: sample value types and a dataset's declaration.

Both sides import them from here, so a dataset never depends on an encoder module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class Waveform:
    """A mono or multi-channel clip and its sample rate, as datasets hand audio over."""

    samples: torch.Tensor  # [T] or [C, T], float in [-1, 1]
    sample_rate: int


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset gives, known without loading a sample: the keys of its samples and,
    for labelled data, the class names and whether a sample has one label or several."""

    keys: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    label_kind: Literal["none", "single", "multi"] = "none"

    def __post_init__(self) -> None:
        if self.label_kind != "none" and ("label" not in self.keys or not self.class_names):
            raise ValueError(f"a dataset with {self.label_kind} labels gives a 'label' key and names its classes")

    @property
    def num_classes(self) -> int:
        """How many classes the labels index (0 for unlabelled data)."""
        return len(self.class_names)
