"""What datasets hand over and encoders take: sample value types and a dataset's declaration.

Both sides import them from here, so a dataset never depends on an encoder module.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmkit.errors import MMKitError


@dataclass
class Waveform:
    """A mono or multi-channel clip and its sample rate, as datasets hand audio over."""

    samples: torch.Tensor  # [T] or [C, T], float in [-1, 1]
    sample_rate: int


UNCERTAIN = {"negative": 0.0, "positive": 1.0, "ignore": float("nan")}
"""What an uncertain finding (CheXpert's -1, a hedged "possible nodule") becomes in a multi-hot
label, by the recipe's policy: absent, present, or not known (NaN, left out of loss and metrics)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset gives, known without loading a sample: the keys of its samples and,
    for labelled data, the class names and whether a sample has one label or several.

    A single label is an int (the class index); multi-label values are float multi-hot
    tensors [num_classes], so batches stack into [B, num_classes] targets. A NaN entry is a
    label not known for that sample (an uncertain finding under ``uncertain = "ignore"``):
    tasks leave it out of their loss and metrics."""

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

    def label_problem(self, label: Any) -> str | None:
        """What is wrong with a sample's label, as the dataset declares its labels, or None: a
        single label is a class index, a multi-label one a value of 0, 1 or NaN per class."""
        classes = self.num_classes
        if self.label_kind == "single":
            value = label.item() if isinstance(label, torch.Tensor) and label.numel() == 1 and \
                not label.is_floating_point() else label
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < classes:
                return f"label {label!r} is not a class index (0 to {classes - 1})"
        elif self.label_kind == "multi":
            if not isinstance(label, torch.Tensor) or not label.is_floating_point() or label.shape != (classes,) \
                    or not bool(((label == 0) | (label == 1) | label.isnan()).all()):
                return f"label {label!r} is not a float tensor of {classes} values, each 0, 1 or NaN (one per class)"
        return None


class SampleError(MMKitError):
    """One sample that cannot be used: where it is (the file it was listed in and its row or
    key, the path it names) and what is wrong, as a short ``kind`` and a sentence.

    Datasets raise it for bad data; mmkit's loaders turn it into a counted skip or a
    one-line error, as ``data.on_error`` says. Any other exception is a bug, not bad data.
    """

    KINDS = ("missing file", "empty file", "truncated image", "not an image", "image too large",
             "unreadable audio", "empty audio", "nan audio", "empty text", "missing text",
             "unknown label", "bad value", "unreadable shard")

    def __init__(self, kind: str, message: str, source: str, row: int | str | None = None,
                 path: str | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown sample problem {kind!r}; one of {self.KINDS}")
        self.kind, self.message, self.source, self.row, self.path = kind, message, source, row, path
        super().__init__(self.line())

    def line(self) -> str:
        """``source row 7: images/a.jpg: truncated image (...)``, the form errors and logs use."""
        where = self.source + (f" {self.row}" if isinstance(self.row, str) else
                               f" row {self.row}" if self.row is not None else "")
        return f"{where}: {self.path + ': ' if self.path else ''}{self.kind}: {self.message}"

    def record(self) -> dict[str, Any]:
        """A plain dict (it crosses worker processes and goes into summary.json)."""
        return {"kind": self.kind, "source": self.source, "row": self.row, "path": self.path,
                "message": self.message}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SampleError:
        return cls(record["kind"], record["message"], record["source"], record["row"], record["path"])
