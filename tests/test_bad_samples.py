"""Bad samples through every file format and the engine: skipped ones are counted exactly and
batches stay full; under on_error = "raise" the first one stops the run in one line."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_IMAGE_TEXT, run_mmkit
from corpus import BAD_IMAGES, BAD_TEXT, TEST_MAX_PIXELS, image_bytes
from mmkit.data.image_folder import ImageFolder
from mmkit.data.loader import EpochBatches, Preprocessed, Streamed, stream_loader, train_loader
from mmkit.data.manifest import Manifest
from mmkit.data.read import Where, read_image
from mmkit.data.shards import WebDataset, write_shards
from mmkit.engine.feed import TrainFeed
from mmkit.errors import MMKitError
from mmkit.samples import SampleError

BATCH = 4
GOOD = 12  # good samples in the shards: three full batches of 4
# map-style sets: good + bad is a whole number of batches, so one epoch visits every sample
GOOD_MANIFEST = 13  # + 5 bad images + 2 bad texts = 20
GOOD_FOLDER = 15  # + 5 bad images = 20


def small(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.resize((8, 8)))).float()


def manifest_corpus(folder: Path) -> tuple[Manifest, set[tuple[str, str]]]:
    """GOOD rows, then one row per bad image and bad text, mixed in; (kind, path) of the bad."""
    (folder / "images").mkdir(parents=True)
    rows, bad = [], set()
    for i in range(GOOD_MANIFEST):
        (folder / "images" / f"good{i}.jpg").write_bytes(image_bytes(i))
        rows.append({"image": f"images/good{i}.jpg", "text": f"caption {i}"})
    for n, (kind, data) in enumerate(BAD_IMAGES.items()):
        name = f"images/{kind.replace(' ', '_')}.jpg"
        if data is not None:
            (folder / name).write_bytes(data)
        rows.insert(2 * n + 1, {"image": name, "text": "fine"})
        bad.add((kind, name))
    for kind, text in BAD_TEXT.items():
        rows.insert(3, {"image": "images/good0.jpg", "text": text})
        bad.add((kind, None))
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n" for row in rows))
    return Manifest(str(path), max_image_pixels=TEST_MAX_PIXELS), bad


def folder_corpus(folder: Path) -> tuple[ImageFolder, set[tuple[str, str]]]:
    for i in range(GOOD_FOLDER):
        (folder / ("cat" if i % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        (folder / ("cat" if i % 2 else "dog") / f"good{i}.jpg").write_bytes(image_bytes(i))
    bad = set()
    for kind, data in BAD_IMAGES.items():
        if data is not None:
            (folder / "cat" / f"{kind.replace(' ', '_')}.jpg").write_bytes(data)
            bad.add((kind, f"cat/{kind.replace(' ', '_')}.jpg"))
    (folder / "cat" / "missing_file.jpg").symlink_to(folder / "nowhere.jpg")
    bad.add(("missing file", "cat/missing_file.jpg"))
    return ImageFolder(str(folder), classes=["cat", "dog"], max_image_pixels=TEST_MAX_PIXELS), bad


def shard_corpus(folder: Path) -> tuple[WebDataset, set[tuple[str, str]]]:
    """Three shards, each ending with a good record, so reading every good sample meets every bad one."""
    samples = [{"id": f"good{i}", "image": image_bytes(i), "text": f"caption {i}"} for i in range(GOOD)]
    bad = set()
    for n, (kind, data) in enumerate(BAD_IMAGES.items()):
        key = kind.replace(" ", "_")
        samples.insert(2 * n, {"id": key, "image": data, "text": "fine"})
        bad.add((kind, None if data is None else f"{key}.jpg"))
    write_shards(samples, folder / "train-%06d.tar", per_shard=(len(samples) + 2) // 3)
    return WebDataset(f"{folder}/train-{{000000..000002}}.tar", max_image_pixels=TEST_MAX_PIXELS), bad


def feed_of(dataset, on_error: str, logged: list[str]) -> TrainFeed:
    transforms = {"image": small}
    if isinstance(dataset, WebDataset):
        source = Streamed(dataset, transforms, seed=0)
        loader = stream_loader(source, BATCH, False)
    else:
        data = Preprocessed(dataset, transforms)
        source = EpochBatches(len(data), BATCH, seed=0)
        loader = train_loader(data, source, 0, False)
    feed = TrainFeed(loader, source, on_error, logged.append)
    feed.start(0)
    return feed


CORPORA = {"manifest": manifest_corpus, "image_folder": folder_corpus, "webdataset": shard_corpus}


@pytest.mark.parametrize("corpus", CORPORA)
def test_skipped_samples_are_counted_once_each_and_batches_stay_full(tmp_path, corpus):
    dataset, bad = CORPORA[corpus](tmp_path / corpus)
    logged: list[str] = []
    feed = feed_of(dataset, "skip", logged)
    epoch = [next(feed) for _ in range(GOOD // BATCH if corpus == "webdataset" else len(dataset) // BATCH)]
    assert all(len(batch["id"]) == BATCH and batch["image"].shape[0] == BATCH for batch in epoch)
    assert all(not i.startswith(("bad", "images/bad")) for batch in epoch for i in batch["id"])
    listed = feed.problems.summary()["list"]
    assert {(r["kind"], r["path"]) for r in listed} == bad
    assert len(listed) == len(bad) and len(logged) == len(bad)
    assert all(line.startswith("skipped ") for line in logged)


@pytest.mark.parametrize("corpus", CORPORA)
def test_under_raise_the_first_bad_sample_stops_in_one_line_naming_it(tmp_path, corpus):
    dataset, bad = CORPORA[corpus](tmp_path / corpus)
    feed = feed_of(dataset, "raise", [])
    with pytest.raises(MMKitError) as raised:
        for _ in range(20):
            next(feed)
    message = str(raised.value)
    assert "\n" not in message and 'set data.on_error = "skip"' in message
    assert any(f"{kind}:" in message and (path is None or path in message) for kind, path in bad)


def recipe(tmp_path: Path, data: str, *extra: str) -> Path:
    text = textwrap.dedent(TINY_IMAGE_TEXT.format(runs=tmp_path / "runs"))
    start, end = text.index("[data]"), text.index("[model.image]")
    path = tmp_path / "bad.toml"
    path.write_text(text[:start] + textwrap.dedent(data) + "\n" + text[end:] + "\n".join(extra))
    return path


def test_a_run_skips_bad_rows_and_lists_them_in_its_summary(tmp_path):
    manifest, bad = manifest_corpus(tmp_path / "data")
    path = recipe(tmp_path, f"""
        [data]
        name = "manifest"
        path = "{manifest.source}"
        max_image_pixels = {TEST_MAX_PIXELS}
        on_error = "skip"
        """)
    done = run_mmkit("run", path, "train.max_steps=5", "train.batch_size=4", "train.checkpoint_every=2")  # one epoch
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    skipped = summary["skipped_samples"]["train"]
    assert skipped["samples"] == len(bad) and {(r["kind"], r["path"]) for r in skipped["list"]} == bad
    assert all(r["source"] == str(manifest.source) and isinstance(r["row"], int) for r in skipped["list"])
    assert done.stderr.count("skipped ") + done.stdout.count("skipped ") == len(bad)


def test_a_run_that_meets_a_bad_row_under_raise_names_it_and_writes_nothing_after(tmp_path):
    manifest, _ = manifest_corpus(tmp_path / "data")
    path = recipe(tmp_path, f"""
        [data]
        name = "manifest"
        path = "{manifest.source}"
        max_image_pixels = {TEST_MAX_PIXELS}
        """)
    failed = run_mmkit("run", path, "train.max_steps=4", "train.batch_size=4", "train.checkpoint_every=1")
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mmkit: error: {manifest.source} row ") and "Traceback" not in failed.stderr
    folder = tmp_path / "runs" / "tiny"
    assert not (folder / "summary.json").exists() and not list((folder / "checkpoints").iterdir())


def test_skip_counts_and_the_data_place_survive_a_checkpoint(tmp_path):
    """A feed restarted from another's state (as --resume does) goes on with the same
    batches and the same counts as the feed that never stopped."""
    dataset, bad = manifest_corpus(tmp_path / "data")
    straight = feed_of(dataset, "skip", [])
    first = [next(straight)["id"] for _ in range(2)]
    state = straight.state()
    rest = [next(straight)["id"] for _ in range(6)]  # into the second epoch
    resumed = feed_of(dataset, "skip", [])
    resumed.start(2, state)
    assert [next(resumed)["id"] for _ in range(6)] == rest and first
    assert resumed.problems.summary() == straight.problems.summary()
    assert straight.problems.summary()["times"] > len(bad)  # met again in the second epoch


def test_a_stream_share_with_no_readable_record_stops_instead_of_waiting(tmp_path):
    samples = [{"id": f"s{i}", "image": image_bytes(i), "text": "x"} for i in range(4)]
    write_shards(samples, tmp_path / "s-%06d.tar", per_shard=4)
    wrong_fields = WebDataset(str(tmp_path / "s-000000.tar"), fields={"image": "png", "text": "txt"})
    with pytest.raises(MMKitError, match=r"share 0 of 1 of the stream has no readable sample in epoch 0 "
                                         r"\(4 records\); the first problem: .*s-000000.tar key s0: missing file"):
        next(feed_of(wrong_fields, "skip", []))


def test_a_bad_sample_passed_over_for_a_replacement_is_not_counted_again(tmp_path):
    dataset, _ = manifest_corpus(tmp_path / "data")
    data = Preprocessed(dataset, {"image": small})
    met = [record for index in range(len(data)) for record in data[index].get("_problems", [])]
    assert len(met) == 7 and len({(r["row"], r["kind"]) for r in met}) == 7  # each bad row once per pass


def test_max_image_pixels_above_pillows_own_limit_lets_a_large_scan_through():
    out = io.BytesIO()
    Image.new("1", (10_000, 9_500)).save(out, "PNG")  # 95 megapixels, over Pillow's 89; a 12 kB file
    pillows = Image.MAX_IMAGE_PIXELS
    assert read_image(out.getvalue(), Where("scan.png"), max_pixels=2 * 10**8).size == (10_000, 9_500)
    with pytest.raises(SampleError, match=r"scan.png: image too large: its size is over data.max_image_pixels "
                                          r"= 90,000,000; raise it"):
        read_image(out.getvalue(), Where("scan.png"), max_pixels=90_000_000)
    assert Image.MAX_IMAGE_PIXELS == pillows  # Pillow's own limit is back for everyone else


class Labelled:
    """Samples with the labels given, as a dataset declaring ``kind`` labels of three classes."""

    def __init__(self, labels: list, kind: str):
        from mmkit.samples import DatasetInfo

        self.labels, self.max_parts = labels, 1
        self.info = DatasetInfo(keys=("id", "label"), class_names=("a", "b", "c"), label_kind=kind)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"id": f"s{index}", "label": self.labels[index]}

    def records(self, epoch: int, part: int, parts: int, seed: int, start: int = 0):
        return (self[i] for i in range(start, len(self)))

    class Map:
        """The same samples without ``records``: a map-style dataset."""

        def __init__(self, data: Labelled):
            self.data, self.info = data, data.info

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: int) -> dict:
            return self.data[index]


@pytest.mark.parametrize("kind, labels, message", [
    ("single", [0, 2, 3, np.int64(1)], "label 3 is not a class index (0 to 2)"),
    ("single", [0, 2, -1, torch.tensor(1)], "label -1 is not a class index (0 to 2)"),
    ("multi", [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, float("nan"), 1.0]), torch.tensor([1.0, 2.0, 0.0]),
               torch.tensor([0.0, 0.0, 1.0])], "is not a float tensor of 3 values, each 0, 1 or NaN"),
    ("multi", [torch.zeros(3), torch.ones(3), torch.ones(2), torch.zeros(3)], "is not a float tensor of 3 values")])
def test_a_label_outside_what_the_dataset_declares_is_a_bad_sample(kind, labels, message):
    from mmkit.data.loader import PROBLEMS, StreamedOnce

    data = Labelled(labels, kind)
    held_out = Preprocessed(data, {}, fill=False)
    assert [held_out[i]["id"] for i in (0, 1, 3)] == ["s0", "s1", "s3"]
    problem = held_out[2][PROBLEMS][0]
    assert (problem["kind"], problem["source"], problem["row"]) == ("bad value", "Labelled", 2)
    assert message in problem["message"]
    filled = Preprocessed(data, {}, fill=True)[2]  # training: the next sample takes its place, the bad one counted
    assert filled["id"] == "s3" and message in filled[PROBLEMS][0]["message"]
    streamed = list(StreamedOnce(data, {}, seed=0))
    assert [item.get("id") for item in streamed] == ["s0", "s1", None, "s3"] and message in streamed[2][PROBLEMS][0]["message"]
    assert streamed[2][PROBLEMS][0]["row"] == "s2"
    training_stream = iter(Streamed(data, {}, seed=0))
    first = [next(training_stream) for _ in range(3)]
    assert [item["id"] for item in first] == ["s0", "s1", "s3"] and message in first[2][PROBLEMS][0]["message"]
    from mmkit.data.check import check_dataset

    for checked, row in ((check_dataset(data), "s2"), (check_dataset(Labelled.Map(data)), 2)):  # `mmkit data check`
        assert checked.read == 4 and [(p.row, p.kind) for p in checked.problems] == [(row, "bad value")]
