"""Where the data stands: batches per epoch and process, a resume's start, and augmentation
seeded by the item and its epoch, never by the worker."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmkit.data.loader import EpochBatches, Preprocessed, StreamedOnce, train_loader
from mmkit.engine.feed import micro_batches


class Items(torch.utils.data.Dataset):
    """Sample i is {"i": i, "x": zeros}: batches show which items they hold."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"i": index, "x": torch.zeros(3)}


def _add_noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.tensor([torch.rand(1).item(), random.random(), np.random.rand()])


def test_an_epoch_is_a_shuffle_split_over_processes_without_remainder():
    epochs = []
    for epoch in (0, 1):
        ranks = []
        for rank in (0, 1):
            sampler = EpochBatches(23, batch_size=4, seed=7, rank=rank, world=2)
            sampler.set_epoch(epoch)
            assert len(sampler) == 2  # 23 items over 2 processes of batch 4: two full batches each
            ranks.append([index for batch in sampler for index, _ in batch])
        assert all(len(r) == 8 for r in ranks) and not set(ranks[0]) & set(ranks[1])
        epochs.append(ranks)
    assert epochs[0] != epochs[1]  # each epoch has its own order


def test_micro_batches_resume_at_their_place_across_epochs():
    dataset = Preprocessed(Items(20), {})
    sampler = EpochBatches(len(dataset), batch_size=3, seed=1)  # 6 batches an epoch, 2 items left out
    loader = train_loader(dataset, sampler, num_workers=0, pin_memory=False)
    whole = [b["i"].tolist() for b in itertools.islice(micro_batches(loader, sampler, start=0), 20)]
    for start in (1, 5, 6, 13):  # inside the first epoch, its last batch, the next epoch's first, the third epoch
        resumed = [b["i"].tolist() for b in itertools.islice(micro_batches(loader, sampler, start=start), 20 - start)]
        assert resumed == whole[start:], start
    assert whole[:6] != whole[6:12]  # the next epoch is a new shuffle


def epoch_noise(dataset: Preprocessed, epoch: int, workers: int, start: int = 0) -> dict[int, torch.Tensor]:
    sampler = EpochBatches(len(dataset), batch_size=4, seed=2**31 - 1)
    sampler.set_epoch(epoch, start)
    found = {}
    for batch in train_loader(dataset, sampler, workers, pin_memory=False):
        found |= dict(zip(batch["i"].tolist(), batch["x"]))
    return found


def test_augmentation_is_the_items_and_the_epochs_not_the_workers():
    dataset = Preprocessed(Items(24), {"x": _add_noise})
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    third = epoch_noise(dataset, epoch=3, workers=0)
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    assert torch.equal(after[0], before[0]) and after[1] == before[1]  # dropout's streams are left alone
    assert np.array_equal(after[2], before[2])
    assert len(torch.stack(list(third.values())).unique()) == 24 * 3  # every item draws its own, from each RNG
    assert all(torch.equal(third[i], x) for i, x in epoch_noise(dataset, 3, workers=2).items())
    resumed = epoch_noise(dataset, 3, workers=2, start=2)
    assert len(resumed) == 16 and all(torch.equal(third[i], x) for i, x in resumed.items())
    fourth = epoch_noise(dataset, epoch=4, workers=2)
    assert fourth.keys() == third.keys()
    assert all((fourth[i] != third[i]).all() for i in third)  # a new epoch, new draws for the same item


def test_closing_a_training_feed_ends_its_persistent_workers():
    import multiprocessing

    from mmkit.engine.feed import TrainFeed

    dataset = Preprocessed(Items(24), {})
    source = EpochBatches(len(dataset), 4, seed=0)
    feed = TrainFeed(train_loader(dataset, source, 2, False), source, "raise", print)
    feed.start(0)
    before = set(multiprocessing.active_children())  # other tests' processes, if any
    assert next(feed)["i"].shape == (4,)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2  # alive between batches and epochs
    feed.close()
    assert not workers & set(multiprocessing.active_children())
    feed.start(6)  # a feed closed and started again reads on from its place
    assert next(feed)["i"].tolist() == [i for batch in itertools.islice(micro_batches(
        train_loader(dataset, source, 0, False), source, 6), 1) for i in batch["i"].tolist()]
    feed.close()


def test_item_seeds_are_32_bit_and_differ_for_order_sign_and_length():
    from mmkit.data.loader import mix_seed

    seeds = [mix_seed(0, 1), mix_seed(1, 0), mix_seed(0, 1, 0), mix_seed(-1, 1), mix_seed(1, 1), mix_seed(0)]
    assert len(set(seeds)) == len(seeds) and all(0 <= seed < 2**32 for seed in seeds)
    assert mix_seed(7, 3) == mix_seed(7, 3)
    many = {mix_seed(epoch, index) for epoch in range(4) for index in range(5000)}
    assert len(many) >= 20000 - 2  # a 32-bit seed: a collision or two among 20,000 at most


def test_a_modality_no_encoder_takes_is_left_out_of_batches():
    """A text-only recipe on image-text data: the images would not batch (PIL), nor be used."""
    from mmkit import build
    from mmkit.data.loader import Collate

    text = build("text_encoders", "transformer", width=32, layers=1, heads=2, context_length=8)
    shapes = build("datasets", "synthetic_shapes", num_samples=4, image_size=16)
    batch = Collate()([Preprocessed(shapes, {"text": text.preprocess})[i] for i in range(4)])
    assert "image" not in batch and batch["text"].shape == (4, 8) and batch["label"].shape == (4,)
    assert batch["raw_text"] == [shapes[i]["text"] for i in range(4)]


SCRIPT = """
from mmkit import build
from mmkit.data.loader import EpochBatches, Preprocessed, train_loader

shapes = build("datasets", "synthetic_shapes", num_samples=8, image_size=16)
loader = train_loader(Preprocessed(shapes, {{}}), EpochBatches(8, 4, seed=0), num_workers=1, pin_memory=False)
next(iter(loader))
{ending}
"""


@pytest.mark.parametrize("ending, code", [("print('done')", 0), ("raise RuntimeError('the step failed')", 1)])
def test_a_process_ending_with_loader_workers_alive_exits(ending, code):
    """Workers ignore SIGTERM (the main process checkpoints first), which is all that
    multiprocessing's exit handler sends before waiting for them: mmkit kills them at exit."""
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(ending=ending)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    assert "killed by signal" not in done.stderr and ("the step failed" in done.stderr) == bool(code)


class Stream:
    """A stream of 10 records, record i in share i % parts."""

    max_parts = 4

    def records(self, epoch: int, part: int, parts: int, seed: int, start: int = 0):
        return ({"id": str(i)} for i in range(10) if i % parts == part)


def test_an_evaluation_pass_over_a_stream_reads_each_record_once_over_the_processes():
    shares = [[item["id"] for item in StreamedOnce(Stream(), {}, seed=0, rank=rank, world=3)] for rank in range(3)]
    assert shares == [["0", "3", "6", "9"], ["1", "4", "7"], ["2", "5", "8"]]
