"""From datasets to batches: encoders' preprocessing in workers and a resumable sampler."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


class Preprocessed(Dataset):
    """A dataset whose samples pass through each modality's ``preprocess`` (in workers).

    Items are an index, or ``(index, epoch_seed)`` from EpochBatches: the transforms' random
    draws (torch's CPU generator, ``random``, ``numpy.random``) are seeded by the item alone,
    so augmentation is the same whichever worker runs it and however far into the epoch a
    resumed run starts. A tokenized text's raw string is kept as ``raw_text``, for tasks that
    compare captions.
    """

    def __init__(self, dataset: Dataset, transforms: Mapping[str, Callable[[Any], Any]]):
        self.dataset = dataset
        self.transforms = dict(transforms)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch_seed = item if isinstance(item, tuple) else (item, 0)
        sample = dict(self.dataset[index])
        if "text" in self.transforms and isinstance(sample.get("text"), str):
            sample["raw_text"] = sample["text"]
        with _seeded(epoch_seed, index):
            for key, transform in self.transforms.items():
                if key not in sample:
                    raise KeyError(f"sample {sample.get('id', index)!r} has no {key!r}; the recipe "
                                   f"has a model.{key} encoder, but the dataset gives {sorted(sample)}")
                sample[key] = transform(sample[key])
        return sample


@contextmanager
def _seeded(*key: int) -> Iterator[None]:
    """Seed the CPU RNGs (torch, random, numpy) from ``key`` for a block, then put the
    caller's streams back: dropout and the GPU generators are never touched."""
    seed = int(np.random.SeedSequence(key).generate_state(1)[0])  # any key -> a 32-bit seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochBatches(Sampler[list[int]]):
    """Batches of a shuffle seeded by (seed, epoch), sharded over processes, able to start
    part-way into an epoch, so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Each batch as (index, epoch_seed) items, the seed for Preprocessed's transforms."""
        generator = torch.Generator().manual_seed(self.epoch_seed)
        order = torch.randperm(self.size, generator=generator)
        mine = [(index, self.epoch_seed) for index in order[self.rank :: self.world].tolist()]
        for i in range(self.start, len(self)):
            yield mine[i * self.batch_size : (i + 1) * self.batch_size]


class Collate:
    """Samples -> a batch: a key with its encoder's own ``collate`` uses it, every other key
    torch's default_collate (dicts of tensors become dicts of batched tensors)."""

    def __init__(self, collates: Mapping[str, Callable[[list[Any]], Any]] | None = None):
        self.collates = dict(collates or {})

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: self.collates.get(key, default_collate)([sample[key] for sample in samples])
                for key in samples[0]}


def train_loader(dataset: Dataset, sampler: EpochBatches, num_workers: int, pin_memory: bool,
                 collate: Collate | None = None) -> DataLoader:
    """A loader with its own generator (seeded by the run), so starting an iterator never
    draws from the global RNG that dropout uses: resumed runs stay exact."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate or Collate(), persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(sampler.seed))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool,
                collate: Collate | None = None) -> DataLoader:
    """Held-out batches in order; workers stay up between evaluations."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=collate or Collate(),
                      persistent_workers=num_workers > 0, generator=torch.Generator())
