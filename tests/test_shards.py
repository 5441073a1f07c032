"""webdataset shards: what the writer writes reads back; an epoch's shares are disjoint and
whole, resume where they left off, and report bad records, missing and broken shards."""

from __future__ import annotations

import errno
import os
import tarfile
from pathlib import Path

import pytest
import torch

from corpus import BAD_AUDIO, BAD_IMAGES, BAD_TEXT, TEST_MAX_PIXELS, audio_bytes, image_bytes
from mmkit.data.shapes import SyntheticShapes
from mmkit.data.shards import WebDataset, read_shard, write_shards
from mmkit.data.sounds import SyntheticAudio
from mmkit.errors import MMKitError
from mmkit.samples import SampleError

CLASSES = ["cat", "dog", "eel"]


def text_shards(folder: Path, shards: int = 6, per_shard: int = 5) -> WebDataset:
    """Caption-only shards: record i (key r0000i) is in shard i // per_shard."""
    samples = ({"id": f"r{i:05d}", "text": f"caption {i}"} for i in range(shards * per_shard))
    write_shards(samples, folder / "text-%06d.tar", per_shard)
    return WebDataset(str(folder / f"text-{{000000..{shards - 1:06d}}}.tar"), fields={"text": "txt"})


def ids(items) -> list[str]:
    return [item["id"] for item in items]


def comparable(items) -> list:
    """Items with SampleErrors as plain dicts (two reads give two distinct error objects)."""
    return [item.record() if isinstance(item, SampleError) else item for item in items]


def test_written_shards_read_back_as_the_samples(tmp_path):
    shapes = SyntheticShapes(num_samples=10, image_size=16)
    written = [shapes[i] for i in range(len(shapes))]
    paths = write_shards(iter(written), tmp_path / "train-%06d.tar", per_shard=4,
                         class_names=shapes.info.class_names)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no partial files left

    dataset = WebDataset(str(tmp_path / "train-{000000..000002}.tar"),
                         fields={"image": "jpg", "text": "txt", "label": "cls"}, classes=list(shapes.info.class_names))
    assert dataset.info.keys == ("id", "image", "text", "label") and dataset.info.label_kind == "single"
    read = sorted(dataset, key=lambda sample: sample["id"])
    assert ids(read) == [sample["id"] for sample in written]
    assert [(s["text"], s["label"], s["image"].size, s["image"].mode) for s in read] == \
           [(s["text"], s["label"], (16, 16), "RGB") for s in written]


def test_audio_and_sanitised_keys_round_trip(tmp_path):
    clips = SyntheticAudio(num_samples=2, clip_seconds=0.1)
    written = [{**clips[i], "id": f"clip.{i}/a b"} for i in range(2)]
    write_shards(written, tmp_path / "audio-%d.tar", per_shard=8)
    read = list(WebDataset(str(tmp_path / "audio-0.tar"), fields={"audio": "wav", "text": "txt"}))
    assert ids(read) == ["clip_0_a_b", "clip_1_a_b"]  # no dots or slashes in keys
    for sample, original in zip(read, written):
        assert sample["audio"].sample_rate == original["audio"].sample_rate
        assert torch.equal(sample["audio"].samples, original["audio"].samples.reshape(1, -1))


def test_the_writer_refuses_what_it_cannot_name(tmp_path):
    with pytest.raises(MMKitError, match="placeholder"):
        write_shards([{"id": "a", "text": "x"}], tmp_path / "train.tar", per_shard=2)
    with pytest.raises(MMKitError, match="already used"):
        write_shards([{"id": "a.b", "text": "x"}, {"id": "a_b", "text": "y"}], tmp_path / "t-%d.tar", per_shard=2)
    assert list(tmp_path.iterdir()) == []  # the shard that failed is not left half-written


def test_an_epoch_order_comes_from_seed_and_epoch_alone(tmp_path):
    dataset = text_shards(tmp_path)
    assert dataset.shard_order(3, seed=7) == text_shards(tmp_path).shard_order(3, seed=7)
    orders = {tuple(dataset.shard_order(epoch, seed=7)) for epoch in range(4)}
    assert len(orders) == 4 and all(sorted(order) == dataset.shards for order in orders)
    assert dataset.shard_order(0, seed=7) != dataset.shard_order(0, seed=8)


@pytest.mark.parametrize("parts", [1, 2, 3, 6])
def test_shares_are_disjoint_and_hold_every_record_once(tmp_path, parts):
    dataset = text_shards(tmp_path)
    every = [f"r{i:05d}" for i in range(30)]
    for epoch in (0, 1):
        shares = [ids(dataset.records(epoch, part, parts, seed=5)) for part in range(parts)]
        assert sorted(sum(shares, [])) == every  # disjoint, and whole
        order = dataset.shard_order(epoch, seed=5)
        for part, share in enumerate(shares):  # each share reads its shards whole, in the epoch's order
            shard_numbers = [int(Path(shard).stem[-6:]) for shard in order[part::parts]]
            assert share == [f"r{n * 5 + i:05d}" for n in shard_numbers for i in range(5)]


def test_start_resumes_at_the_tail_without_decoding_what_it_skips(tmp_path):
    dataset = text_shards(tmp_path)
    whole = list(dataset.records(1, 0, 2, seed=0))
    assert len(whole) == 15
    for start in (0, 1, 5, 14, 15, 20):  # first, second, a shard boundary, last, the end, past it
        assert list(dataset.records(1, 0, 2, seed=0, start=start)) == whole[start:], start

    class Counted(WebDataset):
        """Remembers which records it decodes."""

        decoded: list[str] = []

        def decode(self, record, shard):
            self.decoded.append(record.key)
            return super().decode(record, shard)

    samples = [{"id": f"i{i}", "image": image_bytes(i), "text": "fine"} for i in range(6)]
    samples[1]["image"] = BAD_IMAGES["truncated image"]
    write_shards(samples, tmp_path / "images-%d.tar", per_shard=6)
    images = Counted(str(tmp_path / "images-0.tar"))
    assert [type(item) for item in images.records(0, 0, 1, seed=0)][:2] == [dict, SampleError]
    images.decoded.clear()
    assert ids(images.records(0, 0, 1, seed=0, start=2)) == ["i2", "i3", "i4", "i5"]
    assert images.decoded == ["i2", "i3", "i4", "i5"]  # the corrupt image was passed over, not decoded
    records = list(read_shard(images.shards[0], images.extensions, unread=2))
    assert [bool(r.members) for r in records] == [False, False, True, True, True, True]  # nor read


def bad_record_corpus() -> tuple[list[dict], dict[str, tuple[str, str | None]]]:
    """Image/text/label records, each bad one between good ones; the bad ids with the SampleError
    kind and member path each must give."""
    good = lambda n: {"id": f"good{n}", "image": image_bytes(n), "text": "a photo", "label": 1}  # noqa: E731
    bad = {f"image-{kind.replace(' ', '-')}": ({"image": data}, kind, "jpg") for kind, data in BAD_IMAGES.items()}
    bad |= {f"text-{kind.replace(' ', '-')}": ({"text": text}, kind, "txt") for kind, text in BAD_TEXT.items()}
    bad |= {"label-name": ({"label": b"zebra"}, "unknown label", "cls"),
            "label-index": ({"label": b"3"}, "unknown label", "cls")}
    samples = [good(0)]
    for n, (key, (fields, _, _)) in enumerate(bad.items(), start=1):
        samples += [{**good(n), "id": key, **fields}, good(n)]
    expected = {key: (kind, None if kind.startswith("missing") else f"{key}.{ext}")
                for key, (_, kind, ext) in bad.items()}
    return samples, expected


def test_each_bad_record_is_one_sample_error_and_the_good_ones_come_through(tmp_path):
    samples, expected = bad_record_corpus()
    [shard] = write_shards(samples, tmp_path / "bad-%d.tar", per_shard=100, class_names=CLASSES)
    dataset = WebDataset(str(shard), fields={"image": "jpg", "text": "txt", "label": "cls"}, classes=CLASSES,
                         max_image_pixels=TEST_MAX_PIXELS)
    items = list(dataset.records(0, 0, 1, seed=0))
    assert ids(i for i in items if isinstance(i, dict)) == ids(s for s in samples if s["id"].startswith("good"))
    errors = [item for item in items if isinstance(item, SampleError)]
    assert {error.row: (error.kind, error.source, error.path) for error in errors} == \
           {f"key {key}": (kind, str(shard), path) for key, (kind, path) in expected.items()}
    with pytest.raises(SampleError, match="image-missing-file"):
        list(dataset)  # plain iteration raises the first


def test_bad_audio_records_name_their_member(tmp_path):
    samples = [{"id": "good0", "audio": audio_bytes(0), "text": "a tone"}]
    samples += [{"id": kind.replace(" ", "-"), "audio": data, "text": "a tone"} for kind, data in BAD_AUDIO.items()]
    [shard] = write_shards(samples + [{"id": "good1", "audio": audio_bytes(1), "text": "a tone"}],
                           tmp_path / "audio-%d.tar", per_shard=100)
    items = list(WebDataset(str(shard), fields={"audio": "wav;flac", "text": "txt"}).records(0, 0, 1, seed=0))
    assert ids(items[:1] + items[-1:]) == ["good0", "good1"]
    keys = [kind.replace(" ", "-") for kind in BAD_AUDIO]
    assert [(e.kind, e.source, e.row, e.path) for e in items[1:-1]] == \
           [(kind, str(shard), f"key {key}", None if kind == "missing file" else f"{key}.wav")
            for kind, key in zip(BAD_AUDIO, keys)]


def test_a_missing_or_truncated_shard_is_one_error_and_the_stream_goes_on(tmp_path):
    dataset = text_shards(tmp_path, shards=4, per_shard=4)
    _, missing, cut_in_data, cut_at_header = dataset.shards
    os.remove(missing)
    os.truncate(cut_in_data, tarfile.open(cut_in_data).getmember("r00010.txt").offset_data + 3)
    os.truncate(cut_at_header, tarfile.open(cut_at_header).getmember("r00014.txt").offset)
    for seed in (0, 1):
        items = list(dataset.records(0, 0, 1, seed=seed))
        errors = [(item.kind, item.source) for item in items if isinstance(item, SampleError)]
        assert sorted(errors) == [("missing file", missing), ("unreadable shard", cut_in_data),
                                  ("unreadable shard", cut_at_header)]
        # a record comes out once the next one starts: r00013 may have had more members
        assert sorted(ids(item for item in items if isinstance(item, dict))) == \
               [f"r{i:05d}" for i in [0, 1, 2, 3, 8, 9, 12]]
        for start in range(len(items) + 1):
            assert comparable(dataset.records(0, 0, 1, seed=seed, start=start)) == comparable(items)[start:]


def test_refusals_are_one_line(tmp_path):
    dataset = text_shards(tmp_path)
    with pytest.raises(MMKitError, match=r"^6 shards cannot feed 7 shares \(processes x workers\); "
                                         r"write more shards or lower train.num_workers$"):
        dataset.records(0, 0, 7, seed=0)  # refused when asked, before the first record
    with pytest.raises(MMKitError, match="fields.label needs classes"):
        WebDataset(str(tmp_path / "text-000000.tar"), fields={"text": "txt", "label": "cls"})


def test_urls_expand_in_order_without_touching_the_files(tmp_path):
    dataset = WebDataset([str(tmp_path / "a-{000008..000011}.tar"), str(tmp_path / "{b,c}.tar")])
    assert dataset.shards == [str(tmp_path / name) for name in
                              ("a-000008.tar", "a-000009.tar", "a-000010.tar", "a-000011.tar", "b.tar", "c.tar")]
    assert dataset.max_parts == 6 and dataset.info.keys == ("id", "image", "text")


def test_records_stream_shards_lazily(tmp_path):
    dataset = text_shards(tmp_path, shards=4, per_shard=500)
    stream = dataset.records(0, 0, 1, seed=0)
    first = next(stream)
    order = dataset.shard_order(0, seed=0)
    os.truncate(order[0], 100_000)  # about 100 of the first shard's 500 records are left
    for shard in order[1:]:
        os.remove(shard)
    rest = list(stream)
    assert first["id"] == "r" + f"{int(order[0][-10:-4]) * 500:05d}"
    assert [item.kind for item in rest if isinstance(item, SampleError)] == ["unreadable shard"] + ["missing file"] * 3
    assert 1 + sum(isinstance(item, dict) for item in rest) < 200  # the first shard was read as it went


def test_a_shard_that_cannot_be_synced_is_not_published(tmp_path, monkeypatch):
    def fsync(descriptor: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_shards([{"id": "a", "text": "x"}], tmp_path / "t-%d.tar", per_shard=1)
    assert list(tmp_path.iterdir()) == []
