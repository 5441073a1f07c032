"""From datasets to batches: encoders' preprocessing in workers and a resumable sampler."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class Preprocessed(Dataset):
    """A dataset whose samples pass through each modality's ``preprocess`` (in workers)."""

    def __init__(self, dataset: Dataset, transforms: Mapping[str, Callable[[Any], torch.Tensor]]):
        self.dataset = dataset
        self.transforms = dict(transforms)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        for key, transform in self.transforms.items():
            if key not in sample:
                raise KeyError(f"sample {sample.get('id', index)!r} has no {key!r}; the recipe "
                               f"has a model.{key} encoder, but the dataset gives {sorted(sample)}")
            sample[key] = transform(sample[key])
        return sample


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

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.epoch_seed)
        order = torch.randperm(self.size, generator=generator)
        mine = order[self.rank :: self.world].tolist()
        for i in range(self.start, len(self)):
            yield mine[i * self.batch_size : (i + 1) * self.batch_size]


def train_loader(dataset: Dataset, sampler: EpochBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """A loader with its own generator (reseeded each epoch by the loop), so starting an
    iterator never draws from the global RNG that dropout uses: resumed runs stay exact."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator())


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory)
