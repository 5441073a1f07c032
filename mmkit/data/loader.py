"""From datasets to batches: encoders' preprocessing in workers and a resumable sampler."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import random
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from mmkit.errors import MMKitError
from mmkit.recipe import MODALITIES
from mmkit.samples import SampleError


PROBLEMS = "_problems"  # bad samples met while making a sample or batch (SampleError records)
POSITION = "_position"  # a streamed sample's place: (worker share, epoch, records read)
FATAL = "_fatal"  # a worker's reason the run cannot go on (a share with nothing readable)


def transform(sample: dict[str, Any], transforms: Mapping[str, Callable[[Any], Any]], *seed: int) -> dict[str, Any]:
    """A raw sample through each modality's ``preprocess``, the random draws seeded by ``seed``.

    A tokenized text's raw string is kept as ``raw_text``, for tasks that compare captions; a
    modality no encoder takes (the images of a text-only recipe) is left out, as nothing
    would batch or use it."""
    sample = {key: value for key, value in sample.items() if key in transforms or key not in MODALITIES}
    if "text" in transforms and isinstance(sample.get("text"), str):
        sample["raw_text"] = sample["text"]
    with _seeded(*seed):
        for key, function in transforms.items():
            if key not in sample:
                raise KeyError(f"sample {sample.get('id')!r} has no {key!r}; the recipe has a "
                               f"model.{key} encoder, but the dataset gives {sorted(sample)}")
            sample[key] = function(sample[key])
    return sample


def labelled(sample: dict[str, Any], dataset: Any, index: int | None = None) -> dict[str, Any]:
    """The sample, if its label is what its dataset declares (a class index, or a value of 0,
    1 or NaN per class): a bad one is a bad sample, found in the workers before it trains
    or is scored, not a crash (or silently wrong targets) in the loss."""
    info = getattr(dataset, "info", None)
    if info is not None and "label" in sample and (problem := info.label_problem(sample["label"])):
        row = index if index is not None else sample.get("id")
        raise SampleError("bad value", f"{problem}; see `mmkit info datasets`", type(dataset).__name__, row)
    return sample


def streamed_sample(record: dict[str, Any] | SampleError, stream: Any) -> dict[str, Any]:
    """A stream's record as a labelled sample; a bad record (a SampleError the stream yields
    in its place) or a bad label raises, so every reader of streams handles both alike."""
    if isinstance(record, SampleError):
        raise record
    return labelled(record, stream)


class Preprocessed(Dataset):
    """A dataset whose samples pass through each modality's ``preprocess`` (in workers).

    Items are an index, or ``(index, epoch_seed)`` from EpochBatches: the transforms' random
    draws (torch's CPU generator, ``random``, ``numpy.random``) are seeded by the item alone,
    so augmentation is the same whichever worker runs it and however far into the epoch a
    resumed run starts. A sample that raises SampleError is reported under ``_problems``;
    with ``fill`` the next readable sample takes its place (training batches stay full),
    without it the item carries only the report (held-out sets keep each item once).
    """

    def __init__(self, dataset: Dataset, transforms: Mapping[str, Callable[[Any], Any]], fill: bool = True):
        self.dataset = dataset
        self.transforms = dict(transforms)
        self.fill = fill

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch_seed = item if isinstance(item, tuple) else (item, 0)
        problems = []
        for tried in range(len(self.dataset)):
            at = (index + tried) % len(self.dataset)
            try:
                sample = transform(labelled(self.dataset[at], self.dataset, at), self.transforms, epoch_seed, at)
            except SampleError as error:
                if tried == 0:  # the item itself; bad ones passed over for a replacement count when visited
                    problems.append({**error.record(), "index": at})
                if not self.fill:
                    return {PROBLEMS: problems}
                continue
            return {**sample, PROBLEMS: problems} if problems else sample
        raise MMKitError(f"no sample of the dataset can be read; the first: {SampleError.from_record(problems[0]).line()}")


class Streamed(IterableDataset):
    """A stream's samples for one process, preprocessed in workers and never ending.

    Worker w of process r reads share r x workers + w of each epoch of the stream (see
    ``records`` of mmkit.data.shards.WebDataset), epoch after epoch, so no share runs dry
    before another. Batches come from the workers in turn; ``resume`` puts each share back
    at its (epoch, records read) and turns the workers so the next batch comes from the
    share that was next.
    """

    def __init__(self, stream: Any, transforms: Mapping[str, Callable[[Any], Any]], seed: int,
                 rank: int = 0, world: int = 1, workers: int = 0):
        self.stream, self.transforms, self.seed = stream, dict(transforms), seed
        self.rank, self.world, self.num_workers, self.workers = rank, world, workers, max(workers, 1)
        self.positions: dict[int, tuple[int, int]] = {}
        self.turn = 0
        if stream.max_parts < self.world * self.workers:
            raise MMKitError(f"{stream.max_parts} shards cannot feed {self.world} processes x {self.workers} "
                             "workers; write more shards or lower train.num_workers")

    def resume(self, positions: Mapping[int, tuple[int, int]], batches_read: int) -> None:
        """Continue each share where it stood after ``batches_read`` batches of this process."""
        self.positions, self.turn = dict(positions), batches_read % self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        share = ((info.id if info else 0) + self.turn) % self.workers
        part, parts = self.rank * self.workers + share, self.world * self.workers
        epoch, read = self.positions.get(share, (0, 0))
        problems: list[dict[str, Any]] = []
        while True:
            yielded, whole = False, read == 0  # a resumed share may start at its epoch's end
            for record in self.stream.records(epoch, part, parts, self.seed, start=read):
                read += 1
                try:
                    sample = transform(streamed_sample(record, self.stream), self.transforms, self.seed, epoch, part,
                                       read)
                except SampleError as error:
                    problems.append(error.record())
                    continue
                yield {**sample, PROBLEMS: problems, POSITION: (share, epoch, read)}
                problems, yielded = [], True
            if whole and not yielded:  # reported to the main process, which stops in one line
                first = f"; the first problem: {SampleError.from_record(problems[0]).line()}" if problems else ""
                yield {FATAL: f"share {part} of {parts} of the stream has no readable sample in epoch "
                              f"{epoch} ({read} records){first}"}
                return
            epoch, read = epoch + 1, 0


class StreamedOnce(IterableDataset):
    """One pass over a stream for evaluation, read in the main process (no loader workers):
    process r reads share r of ``world`` of epoch 0; a bad record is reported in a sample-less
    item. The caller refuses a stream with fewer shards than processes."""

    def __init__(self, stream: Any, transforms: Mapping[str, Callable[[Any], Any]], seed: int,
                 rank: int = 0, world: int = 1):
        self.stream, self.transforms, self.seed, self.rank, self.world = stream, dict(transforms), seed, rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for read, record in enumerate(self.stream.records(0, self.rank, self.world, self.seed), 1):
            try:
                yield transform(streamed_sample(record, self.stream), self.transforms, self.seed, 0, self.rank, read)
            except SampleError as error:
                yield {PROBLEMS: [error.record()]}


MASK64 = (1 << 64) - 1


def mix_seed(*key: int) -> int:
    """Any tuple of integers (each taken modulo 2**64) -> a 32-bit seed, by splitmix64 over
    its parts: different keys ((a, b) vs (b, a), a longer key) give unrelated seeds, in a
    microsecond (numpy's SeedSequence takes ten)."""
    state = len(key)
    for part in key:
        state = (state ^ (part & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & MASK64
        state ^= state >> 29
    return state >> 32


@contextmanager
def _seeded(*key: int) -> Iterator[None]:
    """Seed the CPU RNGs (torch, random, numpy) from ``key`` for a block, then put the
    caller's streams back: dropout and the GPU generators are never touched. In a loader
    worker nothing else draws from them, so there they are only seeded (saving and
    restoring them cost 15% of an image's loading time)."""
    seed = mix_seed(*key)
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        yield
        return
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
    torch's default_collate (dicts of tensors become dicts of batched tensors). The bad
    samples' reports are joined under ``_problems``, the last sample's stream position kept;
    items that are only a report (a bad held-out sample) are left out of the batch. ``finish``:
    encoders' on_device steps run here, in the workers, for a run whose device is the CPU."""

    def __init__(self, collates: Mapping[str, Callable[[list[Any]], Any]] | None = None,
                 finish: Mapping[str, Callable[[Any], Any]] | None = None):
        self.collates, self.finish = dict(collates or {}), dict(finish or {})

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {PROBLEMS: [p for sample in samples for p in sample.get(PROBLEMS, ())]}
        if POSITION in samples[-1]:
            batch[POSITION] = samples[-1][POSITION]
        if fatal := [sample[FATAL] for sample in samples if FATAL in sample]:
            return {**batch, FATAL: fatal[0]}
        kept = [sample for sample in samples if set(sample) - {PROBLEMS, POSITION}]
        for key in kept[0] if kept else ():
            if key not in (PROBLEMS, POSITION):
                batch[key] = self.collates.get(key, default_collate)([sample[key] for sample in kept])
        return finished(batch, self.finish)


def train_loader(dataset: Dataset, sampler: EpochBatches, num_workers: int, pin_memory: bool,
                 collate: Collate | None = None) -> DataLoader:
    """A loader with its own generator (seeded by the run), so starting an iterator never
    draws from the global RNG that dropout uses: resumed runs stay exact."""
    stop_workers_at_exit()
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate or Collate(), persistent_workers=num_workers > 0,
                      worker_init_fn=leave_signals_to_the_main_process,
                      generator=torch.Generator().manual_seed(sampler.seed))


def stream_loader(stream: Streamed, batch_size: int, pin_memory: bool, collate: Collate | None = None) -> DataLoader:
    """Batches of a never-ending stream, each made whole in one worker from its own share."""
    stop_workers_at_exit()
    return DataLoader(stream, batch_size=batch_size, num_workers=stream.num_workers, pin_memory=pin_memory,
                      collate_fn=collate or Collate(), worker_init_fn=leave_signals_to_the_main_process,
                      generator=torch.Generator())


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool,
                collate: Collate | None = None) -> DataLoader:
    """Held-out batches in order; workers stay up between evaluations."""
    stop_workers_at_exit()
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate or Collate(), persistent_workers=num_workers > 0,
                      worker_init_fn=leave_signals_to_the_main_process, generator=torch.Generator())


def to_device(value: Any, device: torch.device,
              on_device: Mapping[str, Callable[[Any], Any]] | None = None) -> Any:
    """A batch on ``device``: its tensors, also those inside nested dicts (input_ids +
    attention_mask); then each modality named in ``on_device`` through its encoder's step
    there (uint8 pixels scaled and normalised)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if not isinstance(value, dict):
        return value
    return finished({key: to_device(inner, device) for key, inner in value.items()}, on_device or {})


def finished(batch: dict[str, Any], steps: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """``batch`` with each modality that ``steps`` names through its step (in place)."""
    for key, step in steps.items():
        if key in batch:
            batch[key] = step(batch[key])
    return batch


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM: the main process checkpoints, then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@functools.cache
def stop_workers_at_exit() -> None:
    """Once per process: at exit, kill the daemon children (loader workers) still running.
    Loader workers ignore SIGTERM, which is all multiprocessing's own exit handler sends
    before it waits for them, so a script or run that ends (or fails) with a loader alive
    would otherwise wait forever. Handlers run last-registered first: this one runs first."""
    atexit.register(_kill_workers)


def _kill_workers() -> None:
    # Daemon children: the loader workers, and any other daemon process, which multiprocessing
    # would stop at exit anyway (with SIGTERM); a Process records no target once started.
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as failures
    for worker in workers:
        worker.kill()
