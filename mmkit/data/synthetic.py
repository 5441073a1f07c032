"""What every generated dataset shares: a fixed size and one random stream per sample."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


class SyntheticSet(Dataset):
    """A split of a generated dataset; subclasses say how one sample is drawn.

    Sample ``index`` comes from a random stream keyed by (seed, split, index), so the set is
    the same on every machine, in every worker, and the splits never share a sample.
    """

    def __init__(self, num_samples: int, split: str, seed: int):
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        self.num_samples = num_samples
        self.split = split
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLIT_STREAMS[self.split], index])
        return {"id": f"{self.split}-{index:06d}", **self.draw(rng)}

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        """One sample's fields (all but ``id``) from its own random stream."""
        raise NotImplementedError
