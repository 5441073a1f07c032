"""The manifest dataset read as a user writes one: CSV and JSONL files listing real image and
audio files, good rows and one row per problem a bad sample can have."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from corpus import BAD_AUDIO, BAD_IMAGES, BAD_TEXT, TEST_MAX_PIXELS, audio_bytes, image_bytes
from mmkit.data.manifest import Manifest, write_manifest
from mmkit.data.shapes import SyntheticShapes
from mmkit.data.sounds import SyntheticAudio
from mmkit.errors import MMKitError
from mmkit.samples import SampleError


def write_rows(path: Path, rows: list[dict]) -> Path:
    """A manifest of these rows: CSV (None an empty cell) or JSONL (None a null), by suffix."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def put(folder: Path, name: str, data: bytes | None) -> str:
    """Write a file (None: leave it missing) and return its path as a manifest lists it."""
    if data is not None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return name


def good_row(folder: Path, seed: int, label: str) -> dict:
    return {"id": f"good{seed}", "image": put(folder, f"images/good{seed}.jpg", image_bytes(seed)),
            "audio": put(folder, f"audio/good{seed}.wav", audio_bytes(seed)),
            "text": f"caption {seed}", "label": label}


def corpus(folder: Path) -> tuple[list[dict], list[tuple[str, str | None] | None]]:
    """Good rows, then one row per bad case; per row, None or the (kind, path) it must raise."""
    rows = [good_row(folder, seed, label) for seed, label in enumerate(["cat", "dog", "cat"])]
    absolute = good_row(folder, 3, "dog")
    absolute["image"] = str(folder / absolute["image"])
    rows.append(absolute)
    expected: list = [None] * len(rows)
    for kind, data in BAD_IMAGES.items():
        rows.append({**good_row(folder, 10, "cat"), "id": kind,
                     "image": put(folder, f"images/bad_{kind.replace(' ', '_')}.png", data)})
        expected.append((kind, rows[-1]["image"]))
    for kind, data in BAD_AUDIO.items():
        rows.append({**good_row(folder, 11, "cat"), "id": kind,
                     "audio": put(folder, f"audio/bad_{kind.replace(' ', '_')}.wav", data)})
        expected.append((kind, rows[-1]["audio"]))
    for kind, text in BAD_TEXT.items():
        rows.append({**good_row(folder, 12, "cat"), "id": kind, "text": text})
        expected.append((kind, None))
    for label in ("bird", "7"):  # a name not among the classes, an index past them
        rows.append({**good_row(folder, 13, "cat"), "id": f"label {label}", "label": label})
        expected.append(("unknown label", None))
    return rows, expected


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_every_bad_row_raises_its_kind_at_its_line_and_good_rows_read(tmp_path, suffix):
    rows, expected = corpus(tmp_path)
    path = write_rows(tmp_path / f"data{suffix}", rows)
    data = Manifest(str(path), classes=["cat", "dog"], max_image_pixels=TEST_MAX_PIXELS)
    first_line = 2 if suffix == ".csv" else 1  # a CSV's header is line 1
    assert len(data) == len(rows)
    assert data.info.keys == ("id", "image", "audio", "text", "label", "files")
    assert data.info.class_names == ("cat", "dog") and data.info.label_kind == "single"
    for index, (row, problem) in enumerate(zip(rows, expected)):
        if problem is None:
            sample = data[index]
            assert list(sample) == list(data.info.keys)
            assert sample["id"] == row["id"] and sample["text"] == row["text"]
            assert sample["label"] == ["cat", "dog"].index(row["label"])
            assert sample["image"].size == (32, 32) and sample["image"].mode == "RGB"
            assert sample["audio"].samples.shape == (1, 1600) and sample["audio"].sample_rate == 16000
        else:
            with pytest.raises(SampleError) as caught:
                data[index]
            error = caught.value
            assert (error.kind, error.row, error.path) == (*problem[:1], first_line + index, problem[1]), row["id"]
            assert error.source == str(path)
    assert {problem[0] for problem in expected if problem} == {*BAD_IMAGES, *BAD_AUDIO, *BAD_TEXT, "unknown label"}


def test_a_jsonl_row_without_the_text_key_is_missing_text(tmp_path):
    put(tmp_path, "a.jpg", image_bytes(0))
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.jpg", "text": "a cat"}\n\n{"image": "a.jpg"}\n{"image": "a.jpg", "text": ""}\n')
    data = Manifest(str(path))
    assert [data[0]["text"], data[0]["id"]] == ["a cat", "1"]  # no id column: the line number
    for index, (kind, line) in enumerate([("missing text", 3), ("empty text", 4)], start=1):
        with pytest.raises(SampleError, match=kind) as caught:
            data[index]
        assert (caught.value.kind, caught.value.row) == (kind, line)


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    put(tmp_path, "a.jpg", image_bytes(0))
    path = tmp_path / "data.csv"
    path.write_text('id,image,text\na,a.jpg,"two\nlines, quoted"\nb,gone.jpg,fine\n\nc,a.jpg,   \nd,a.jpg,x,extra\n')
    data = Manifest(str(path))
    assert data[0]["text"] == "two\nlines, quoted"
    expected = [("missing file", 4, "gone.jpg"), ("empty text", 6, None), ("bad value", 7, None)]
    for index, (kind, line, file) in enumerate(expected, start=1):
        with pytest.raises(SampleError) as caught:
            data[index]
        assert (caught.value.kind, caught.value.row, caught.value.path) == (kind, line, file)
    assert caught.value.message == "the row has 4 cells and the header 3 (a comma in an unquoted value?)"


def test_open_clip_filepath_title_csv_reads_with_a_column_mapping(tmp_path):
    rows = [{"filepath": put(tmp_path, f"img/{seed}.jpg", image_bytes(seed)), "title": f"photo {seed}"}
            for seed in range(3)]
    path = write_rows(tmp_path / "train.csv", rows)
    with pytest.raises(MMKitError, match=r"train.csv: no image, audio or text column \(it has filepath, title\)"):
        Manifest(str(path))
    data = Manifest(str(path), columns={"image": "filepath", "text": "title"})
    assert data.info.keys == ("id", "image", "text", "files") and data.info.label_kind == "none"
    assert [(s["id"], s["text"], s["image"].size) for s in data] == [
        ("2", "photo 0", (32, 32)), ("3", "photo 1", (32, 32)), ("4", "photo 2", (32, 32))]


def test_a_list_of_caption_columns_gives_one_sample_per_caption(tmp_path):
    put(tmp_path, "a.jpg", image_bytes(0))
    rows = [{"id": "a", "image": "a.jpg", "c1": "first", "c2": "second", "c3": None},
            {"id": "b", "image": "a.jpg", "c1": "", "c2": None, "c3": "third"},
            {"id": "c", "image": "a.jpg", "c1": None, "c2": None, "c3": None}]
    for suffix, lines in [(".jsonl", [1, 1, 2, 3]), (".csv", [2, 2, 3, 4])]:
        path = write_rows(tmp_path / f"coco{suffix}", rows)
        data = Manifest(str(path), columns={"text": ["c1", "c2", "c3"]})
        assert len(data) == 4 and data.info.keys == ("id", "image", "text", "files")
        assert [(data[i]["id"], data[i]["text"]) for i in range(3)] == [
            ("a#c1", "first"), ("a#c2", "second"), ("b#c3", "third")]
        with pytest.raises(SampleError) as caught:  # a row with no caption is not dropped unseen
            data[3]
        assert (caught.value.kind, caught.value.row) == ("missing text", lines[3])


def test_two_image_columns_give_two_views_and_other_keys_pass_through(tmp_path):
    rows = [{"front": put(tmp_path, "f.jpg", image_bytes(1)), "side": put(tmp_path, "s.jpg", image_bytes(2, side=16)),
             "report": "no finding", "findings": "none"}]
    data = Manifest(str(write_rows(tmp_path / "views.csv", rows)),
                    columns={"image": ["front", "side"], "text": "report", "findings": "findings"})
    assert data.info.keys == ("id", "image", "text", "findings", "files")
    assert [(s["id"], s["image"].size, s["findings"]) for s in data] == [
        ("2#front", (32, 32), "none"), ("2#side", (16, 16), "none")]


def test_the_split_column_picks_rows_and_all_splits_share_the_classes(tmp_path):
    put(tmp_path, "a.jpg", image_bytes(0))
    rows = [{"image": "a.jpg", "label": label, "fold": split}
            for label, split in [("cat", "train"), ("dog", "train"), ("bird", "val"), ("cat", "val"), ("dog", "test")]]
    path = write_rows(tmp_path / "data.csv", rows)
    train = Manifest(str(path), split_column="fold")
    val = Manifest(str(path), split="val", split_column="fold")
    assert train.info.class_names == val.info.class_names == ("bird", "cat", "dog")
    assert [(s["id"], s["label"]) for s in train] == [("2", 1), ("3", 2)]
    assert [(s["id"], s["label"]) for s in val] == [("4", 0), ("5", 1)]
    with pytest.raises(MMKitError, match=r"data.csv: no row has fold = 'holdout' \(it holds test, train, val\)"):
        Manifest(str(path), split="holdout", split_column="fold")
    assert len(Manifest(str(path))) == 5  # no "split" column: every row is train
    with pytest.raises(MMKitError, match=r"data.csv: no 'split' column, so no 'val' split; "
                                         r"give \[data.val\] its own path"):
        Manifest(str(path), split="val")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_labels_by_name_or_index(tmp_path, suffix):
    put(tmp_path, "a.jpg", image_bytes(0))

    def labels(values: list, **params) -> tuple[tuple[str, ...], list[int]]:
        path = write_rows(tmp_path / f"labels{suffix}", [{"image": "a.jpg", "label": value} for value in values])
        data = Manifest(str(path), **params)
        return data.info.class_names, [data[i]["label"] for i in range(len(data))]

    assert labels(["dog", "cat", "dog"]) == (("cat", "dog"), [1, 0, 1])  # sorted names
    assert labels(["dog", "cat"], classes=["dog", "cat"]) == (("dog", "cat"), [0, 1])
    assert labels([2, 0]) == (("0", "1", "2"), [2, 0])  # ints in JSONL, digits in CSV: "0".."max"
    assert labels([1, "cat"], classes=["cat", "dog"]) == (("cat", "dog"), [1, 0])  # an index into classes
    assert labels(["10", "cat"]) == (("10", "cat"), [0, 1])  # mixed: every label is a name
    path = write_rows(tmp_path / f"labels{suffix}", [{"image": "a.jpg", "label": value} for value in [2, -1, None]])
    data = Manifest(str(path), classes=["cat", "dog"])
    for index, message in enumerate(["'2' is not one of the 2 classes (cat, dog) nor a class index below 2",
                                     "'-1' is not one of the 2 classes (cat, dog) nor a class index below 2",
                                     "the row has no label"]):
        with pytest.raises(SampleError) as caught:
            data[index]
        assert (caught.value.kind, caught.value.message) == ("unknown label", message)


@pytest.mark.parametrize("suffix, cells", [
    (".csv", ["cat;dog", "", "dog", '["cat"]']),
    (".jsonl", [["cat", "dog"], [], "dog", ["cat"]]),
])
def test_multi_label_rows_give_multi_hot_vectors(tmp_path, suffix, cells):
    put(tmp_path, "a.jpg", image_bytes(0))
    path = write_rows(tmp_path / f"multi{suffix}", [{"image": "a.jpg", "label": cell} for cell in [*cells, "cat;bird"]])
    data = Manifest(str(path), multi_label=True, label_separator=";", classes=["cat", "dog"])
    assert data.info.label_kind == "multi"
    assert [data[i]["label"].tolist() for i in range(4)] == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert data[0]["label"].dtype == torch.float32
    with pytest.raises(SampleError, match="'bird' is not one of the 2 classes") as caught:
        data[4]
    assert (caught.value.kind, caught.value.row) == ("unknown label", 6 if suffix == ".csv" else 5)
    assert Manifest(str(path), multi_label=True, label_separator=";").info.class_names == ("bird", "cat", "dog")


def test_a_bad_label_value_is_a_bad_value(tmp_path):
    put(tmp_path, "a.jpg", image_bytes(0))
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.jpg", "label": "cat"}\n{"image": "a.jpg", "label": true}\n'
                    '{"image": "a.jpg", "label": ["cat"]}\n')
    data = Manifest(str(path))
    assert data.info.class_names == ("cat",) and data[0]["label"] == 0
    for index in (1, 2):
        with pytest.raises(SampleError, match="expected label names or whole numbers") as caught:
            data[index]
        assert (caught.value.kind, caught.value.row) == ("bad value", index + 1)


def test_constructing_opens_no_sample_file(tmp_path):
    rows = [{"image": f"missing{i}.jpg", "audio": f"missing{i}.wav", "text": "t"} for i in range(3)]
    data = Manifest(str(write_rows(tmp_path / "data.csv", rows)))
    assert len(data) == 3 and data.info.keys == ("id", "image", "audio", "text", "files")


@pytest.mark.parametrize("name, content, params, message", [
    ("absent.csv", None, {}, r"manifest .*absent.csv not found"),
    ("data.txt", "image\na.jpg\n", {}, r"manifest .*data.txt: unknown suffix '.txt'; write it as .csv or .jsonl"),
    ("data.csv", "image,text\n", {}, r"manifest .*data.csv has no rows"),
    ("data.csv", "image,text\na.jpg,x\n", {"columns": {"text": "title"}},
     r"data.csv: columns.text names 'title', not a column of the file \(it has image, text\)"),
    ("data.csv", "image,image\na.jpg,b.jpg\n", {}, r"data.csv: column 'image' appears twice"),
    ("data.csv", "image,label\na.jpg,\n", {}, r"data.csv: column 'label' \(columns.label\) holds no labels"),
    ("data.csv", "image,label\na.jpg,x\n", {"classes": ["x", "x"]}, r"data.csv: classes names a class twice"),
    ("data.csv", "image,label\na.jpg,x\n", {"classes": []}, r"data.csv: classes is empty"),
    ("data.csv", "a,b\n1,2\n", {"columns": {"image": ["a"], "text": ["b"]}},
     r"data.csv: columns.image and columns.text both list several columns"),
    ("data.csv", "a,b\n1,2\n", {"columns": {"image": "a", "label": ["b"]}}, r"data.csv: columns.label lists several"),
    ("data.csv", 'image,text\na.jpg,"a dog\nb.jpg,a cat\n', {},  # a stray quote, not a cell swallowing b.jpg
     r"data.csv: the row from line 2 to 3 is not valid CSV \(unexpected end of data\); check its quotes"),
    ("data.jsonl", '{"image": "a.jpg"}\n{"image": \n', {}, r"data.jsonl: line 2 is not JSON"),
    ("data.jsonl", '["a.jpg"]\n', {}, r"data.jsonl: line 1 holds a list, not a JSON object"),
])
def test_whole_file_problems_fail_construction_in_one_line(tmp_path, name, content, params, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(MMKitError, match=message) as caught:
        Manifest(str(path), **params)
    assert "\n" not in str(caught.value) and not isinstance(caught.value, SampleError)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_written_image_samples_read_back_equal(tmp_path, suffix):
    shapes = SyntheticShapes(num_samples=6, image_size=32)
    originals = [{**shapes[i], "split": "val" if i % 3 == 2 else "train"} for i in range(6)]
    originals[0]["text"] = 'a "quoted", two-line\ncaption'
    names = shapes.info.class_names
    path = write_manifest(iter(originals), tmp_path / "out" / f"shapes{suffix}", class_names=names)
    assert path == tmp_path / "out" / f"shapes{suffix}" and sorted(p.name for p in path.parent.iterdir()) == [
        "images", path.name]
    train = Manifest(str(path), classes=list(names))
    assert train.info.keys == ("id", "image", "text", "label", "files")
    kept = [s for s in originals if s["split"] == "train"]
    assert [(s["id"], s["text"], s["label"], s["image"].size) for s in train] == [
        (s["id"], s["text"], s["label"], s["image"].size) for s in kept]
    val = Manifest(str(path), split="val")  # classes read from the names written
    held_out = [names[s["label"]] for s in originals if s["split"] == "val"]
    assert [val.info.class_names[s["label"]] for s in val] == held_out
    by_index = Manifest(str(write_manifest(originals, tmp_path / f"indices{suffix}")))
    assert [s["label"] for s in by_index] == [s["label"] for s in kept]


def test_written_audio_and_multi_label_samples_read_back_equal(tmp_path):
    sounds = SyntheticAudio(num_samples=3, clip_seconds=0.1)
    originals = [{**sounds[i], "label": torch.tensor([1.0, 0.0, float(i % 2)])} for i in range(3)]
    for suffix in (".csv", ".jsonl"):
        path = write_manifest(originals, tmp_path / f"sounds{suffix}", class_names=["a", "b", "c"])
        data = Manifest(str(path), multi_label=True, classes=["a", "b", "c"])
        for original, sample in zip(originals, data):
            assert torch.equal(sample["audio"].samples, original["audio"].samples.reshape(1, -1))
            assert sample["audio"].sample_rate == original["audio"].sample_rate
            assert torch.equal(sample["label"], original["label"]) and sample["text"] == original["text"]


def test_split_cells_are_read_without_surrounding_spaces(tmp_path):
    put(tmp_path, "a.jpg", image_bytes(0))
    rows = [{"image": "a.jpg", "text": f"photo {i}", "split": split} for i, split in enumerate(["train ", " val", "train"])]
    path = write_rows(tmp_path / "data.csv", rows)  # as a spreadsheet exports a cell typed "train "
    assert [s["text"] for s in Manifest(str(path))] == ["photo 0", "photo 2"]
    assert [s["text"] for s in Manifest(str(path), split="val")] == ["photo 1"]


def test_manifests_sharing_a_folder_keep_their_own_image_files(tmp_path):
    shapes = SyntheticShapes(num_samples=4, image_size=32)
    train = write_manifest([shapes[0], shapes[1]], tmp_path / "train.csv")
    first = Manifest(str(train))[0]["image"]
    val = write_manifest([shapes[2], shapes[3]], tmp_path / "val.csv")  # same folder, so same file names before
    assert Manifest(str(train))[0]["image"].tobytes() == first.tobytes()
    assert Manifest(str(val))[0]["image"].tobytes() != first.tobytes()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg")) == [
        "images/train/000000.jpg", "images/train/000001.jpg", "images/val/000000.jpg", "images/val/000001.jpg"]


def test_uncertain_findings_are_refused_not_written_as_positive(tmp_path):
    samples = [{"id": "p1", "text": "report", "label": torch.tensor([1.0, float("nan"), 0.0])}]
    with pytest.raises(MMKitError, match=r"write_manifest .*cxr.csv: sample 0 \(p1\) has uncertain \(NaN\) "
                                         r"findings.*uncertain = \"negative\" or \"positive\""):
        write_manifest(samples, tmp_path / "cxr.csv", class_names=["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_manifest_and_no_partial_file(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_manifest([{"text": "a"}, {"text": "b", "extra": object()}], tmp_path / "data.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_that_cannot_be_synced_is_not_published(tmp_path, monkeypatch):
    def fsync(descriptor: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_manifest([{"text": "a"}], tmp_path / "data.csv")
    assert list(tmp_path.iterdir()) == []
