"""`mmkit data check` as a user runs it before training: on a manifest, on recipes over
manifests, image folders and shards, each with one bad sample per problem it can have."""

from __future__ import annotations

import csv
import json
import re
import textwrap
from pathlib import Path

import pytest
from torch.utils.data import Dataset, IterableDataset

from conftest import TINY_MODEL, run_mmkit
from corpus import BAD_AUDIO, BAD_IMAGES, BAD_TEXT, TEST_MAX_PIXELS, image_bytes
from mmkit.data.check import check_dataset
from mmkit.data.manifest import Manifest, write_manifest
from mmkit.data.shapes import SyntheticShapes
from mmkit.data.shards import write_shards
from mmkit.data.sounds import SyntheticAudio
from mmkit.errors import MMKitError
from mmkit.samples import SampleError

CLASSES = ["cat", "dog"]


def good_samples(count: int, first: int = 0) -> list[dict]:
    """Image, audio, caption and label samples, labelled cat, dog, cat, ..."""
    shapes = SyntheticShapes(num_samples=first + count, image_size=32)
    sounds = SyntheticAudio(num_samples=first + count, clip_seconds=0.1)
    return [{"id": f"good{i}", "image": shapes[i]["image"], "audio": sounds[i]["audio"],
             "text": shapes[i]["text"], "label": i % 2} for i in range(first, first + count)]


def put(folder: Path, name: str, data: bytes | None) -> str:
    """Write a file (None: leave it missing) and return its path as a manifest lists it."""
    if data is not None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return name


def corrupted_manifest(path: Path) -> tuple[int, list[tuple[str, int, str | None]]]:
    """Four good rows written by write_manifest, then one row per bad case, the last a bad
    value; returns how many samples the file holds and each bad row's (kind, line, file)."""
    write_manifest(good_samples(4), path, class_names=CLASSES)
    folder, first_line = path.parent, 6 if path.suffix == ".csv" else 5
    image, audio = f"images/{path.stem}/000000.jpg", f"audio/{path.stem}/000000.wav"  # as write_manifest names them
    good = {"image": image, "text": "a caption", "audio": audio, "label": "cat"}
    rows, expected = [], []
    for kind, data in BAD_IMAGES.items():
        rows.append({**good, "image": put(folder, f"images/bad_{kind.replace(' ', '_')}.png", data)})
        expected.append((kind, rows[-1]["image"]))
    for kind, data in BAD_AUDIO.items():
        rows.append({**good, "audio": put(folder, f"audio/bad_{kind.replace(' ', '_')}.wav", data)})
        expected.append((kind, rows[-1]["audio"]))
    for kind, text in BAD_TEXT.items():
        rows.append({**good, "text": text})
        expected.append((kind, None))
    rows.append({**good, "label": "bird"})
    expected.append(("unknown label", None))
    with path.open("a", newline="") as file:
        if path.suffix == ".csv":
            csv.DictWriter(file, ["image", "text", "audio", "label", "id"]).writerows(rows)
            file.write(f"{image},a caption,{audio},cat,one,cell too many\n")
        else:
            file.writelines(json.dumps(row) + "\n" for row in rows)
            file.write(json.dumps({**good, "label": True}) + "\n")
    expected.append(("bad value", None))
    return 4 + len(expected), [(kind, first_line + n, file) for n, (kind, file) in enumerate(expected)]


def kind_counts(stdout: str) -> dict[str, int]:
    """The table's count per kind, as a person reads it off the screen."""
    kinds = "|".join(map(re.escape, SampleError.KINDS))
    rows = re.finditer(rf"^  ({kinds}) +([\d,]+)  ", stdout, re.M)
    return {row[1]: int(row[2].replace(",", "")) for row in rows}


def write_recipe(folder: Path, data: str) -> Path:
    path = folder / "check.toml"
    path.write_text(textwrap.dedent(data) + "\n" + TINY_MODEL)
    return path


@pytest.mark.parametrize("suffix, workers", [(".csv", "0"), (".jsonl", "2")])
def test_a_manifest_path_lists_every_bad_row_by_kind(tmp_path, suffix, workers):
    path = tmp_path / f"data{suffix}"
    samples, bad = corrupted_manifest(path)
    out = run_mmkit("data", "check", path, f"max_image_pixels={TEST_MAX_PIXELS}", 'classes=["cat", "dog"]',
                    "--workers", workers)  # unset, the classes would be every label in the file, bird too
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == [f"train: {samples} samples read, {len(bad)} problems", "  kind              count  first 3"]
    assert kind_counts(out.stdout) == {"missing file": 2, "empty file": 2, **dict.fromkeys(
        ["truncated image", "not an image", "image too large", "unreadable audio", "empty audio", "nan audio",
         "missing text", "empty text", "unknown label", "bad value"], 1)}
    for kind, line, file in bad:  # every bad row named by its line, as SampleError.line() says it
        assert re.search(rf"  {re.escape(f'{path} row {line}: ' + (f'{file}: ' if file else '') + kind)}: ",
                         out.stdout), (kind, line)
    assert len(lines) == 2 + len(bad)  # nothing else on stdout: one line per problem here


def test_a_recipe_checks_the_held_out_set_with_the_training_classes(tmp_path):
    train = write_manifest(good_samples(4), tmp_path / "train" / "train.csv", class_names=CLASSES)
    held_out = [*good_samples(2, first=4), {**good_samples(1, first=6)[0], "label": 2}]
    val = write_manifest(held_out, tmp_path / "val" / "val.csv", class_names=[*CLASSES, "eel"])
    recipe = write_recipe(tmp_path, f"""
        [data]
        name = "manifest"
        path = "{train}"

        [data.val]
        path = "{val}"
        """)
    out = run_mmkit("data", "check", recipe)
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines() == [
        "train: 4 samples read, no problems",
        "val: 3 samples read, 1 problem",
        "  kind           count  first 3",
        f"  unknown label      1  {val} row 4: unknown label: 'eel' is not one of the 2 classes (cat, dog) "
        "nor a class index below 2"]


def test_a_clean_manifest_with_mapped_columns_says_no_problems_per_split_and_exits_0(tmp_path):
    path = tmp_path / "clip.csv"
    rows = [[put(tmp_path, f"img/{seed}.jpg", image_bytes(seed)), f"photo {seed}", f"view {seed}" if seed else "",
             "val" if seed == 2 else "train"] for seed in range(3)]
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([["filepath", "title", "alt", "split"], *rows])
    out = run_mmkit("data", "check", path, "--column", "image=filepath", "--column", "text=title",
                    "--column", "text=alt")  # two text columns: one sample per caption a row has
    assert (out.returncode, out.stdout) == (0, "train: 3 samples read, no problems\n"
                                               "val: 2 samples read, no problems\n"), out.stderr


def test_an_image_folder_recipe_finds_bad_images_and_unknown_class_folders(tmp_path):
    train, val = tmp_path / "photos", tmp_path / "held_out"
    for seed, name in enumerate(["cat/a.jpg", "cat/b.jpg", "dog/c.jpg", "eel/d.jpg"]):
        put(train, name, image_bytes(seed))
    for kind, data in BAD_IMAGES.items():
        name = f"dog/bad_{kind.replace(' ', '_')}.png"
        if data is None:
            (train / name).symlink_to(train / "dog/deleted.png")  # a dangling link: listed, then missing
        else:
            put(train, name, data)
    for seed, name in enumerate(["cat/e.jpg", "dog/f.jpg"]):
        put(val, name, image_bytes(seed))
    recipe = write_recipe(tmp_path, f"""
        [data]
        name = "image_folder"
        root = "{train}"
        classes = ["cat", "dog"]
        caption = "a photo of a {{label}}"
        max_image_pixels = {TEST_MAX_PIXELS}

        [data.val]
        root = "{val}"
        """)
    out = run_mmkit("data", "check", recipe, "--workers", "2")
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "train: 9 samples read, 6 problems" and lines[-1] == "val: 2 samples read, no problems"
    assert kind_counts(out.stdout) == dict.fromkeys([*BAD_IMAGES, "unknown label"], 1)
    assert f"{train}: eel/d.jpg: unknown label: folder 'eel' is not one of the 2 classes (cat, dog)" in out.stdout
    assert f"{train}: dog/bad_missing_file.png: missing file: no such file" in out.stdout


def test_a_webdataset_recipe_finds_bad_records_and_shards_in_the_same_order_for_any_workers(tmp_path):
    good = [{"id": f"good{i}", "image": image_bytes(i), "text": f"caption {i}", "label": i % 2} for i in range(4)]
    base = {"image": image_bytes(9), "text": "a caption", "label": 0}
    bad = [{**base, "id": kind.replace(" ", "_"), "image": data} for kind, data in BAD_IMAGES.items()]
    bad += [{**base, "id": kind.replace(" ", "_"), "text": text} for kind, text in BAD_TEXT.items()]
    bad += [{**base, "id": "label_7", "label": b"7"}, {**base, "id": "latin1", "text": "café".encode("latin-1")}]
    write_shards(good + bad, tmp_path / "shards" / "train-%06d.tar", per_shard=4)  # shards 0 to 3
    (tmp_path / "shards" / "train-000005.tar").write_bytes(b"not a tar\n" * 100)  # and 4 is missing
    recipe = write_recipe(tmp_path, f"""
        [data]
        name = "webdataset"
        urls = "{tmp_path}/shards/train-{{000000..000005}}.tar"
        fields = {{image = "jpg", text = "txt", label = "cls"}}
        classes = ["cat", "dog"]
        max_image_pixels = {TEST_MAX_PIXELS}
        """)
    one, three = (run_mmkit("data", "check", recipe, "--workers", workers) for workers in ("0", "3"))
    assert (one.returncode, three.returncode) == (1, 1), one.stderr + three.stderr
    assert one.stdout == three.stdout
    assert one.stdout.splitlines()[0] == "train: 15 samples read, 11 problems"  # 13 records, 2 broken shards
    assert kind_counts(one.stdout) == {"missing file": 2, **dict.fromkeys(
        ["empty file", "truncated image", "not an image", "image too large", "missing text", "empty text",
         "unknown label", "bad value", "unreadable shard"], 1)}
    shard = f"{tmp_path}/shards/train-00000"
    assert f"{shard}3.tar key latin1: latin1.txt: bad value: not UTF-8 text" in one.stdout
    assert f"{shard}2.tar key label_7: label_7.cls: unknown label: class index 7 is not below the 2 classes" \
        in one.stdout
    assert f"{shard}4.tar: missing file: cannot open the shard" in one.stdout
    assert f"{shard}5.tar: unreadable shard: the tar breaks off" in one.stdout


def test_whole_file_problems_exit_2_in_one_line(tmp_path):
    out = run_mmkit("data", "check", tmp_path / "absent.csv")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"mmkit: error: manifest {tmp_path / 'absent.csv'} not found; check the dataset's path\n"
    train = write_manifest(good_samples(2), tmp_path / "train.csv", class_names=CLASSES)
    recipe = write_recipe(tmp_path, f'[data]\nname = "manifest"\npath = "{train}"\n[data.val]\npath = "gone.csv"\n')
    out = run_mmkit("data", "check", recipe)  # found before a single sample is read
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"mmkit: error: {recipe}: data.val: manifest gone.csv not found; check the dataset's path\n"


class Buggy(Dataset):
    """A dataset whose third sample hits a bug (not bad data)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        if index == 2:
            raise KeyError("a bug")
        return {"id": str(index)}


def test_a_bug_in_a_dataset_is_raised_not_counted():
    with pytest.raises(KeyError, match="a bug"):
        check_dataset(Buggy())


def test_a_stream_without_records_is_refused_in_one_line():
    class Plain(IterableDataset):
        def __iter__(self):
            yield {"id": "a"}

    with pytest.raises(MMKitError, match="Plain streams samples without `records`"):
        check_dataset(Plain())


def test_a_path_no_file_can_have_is_a_counted_problem_not_a_crash(tmp_path):
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    rows = [{"image": put(tmp_path, "a.jpg", image_bytes(0)), "text": "fine"},
            {"image": "x" * 300 + ".jpg", "text": "a name too long"},
            {"image": "loop.jpg", "text": "a symlink to itself"}, {"image": "a\u0000.jpg", "text": "a NUL byte"}]
    path = tmp_path / "data.jsonl"  # JSON can hold the NUL byte
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    checked = check_dataset(Manifest(str(path)))
    assert checked.read == 4 and [(p.kind, p.row, p.path) for p in checked.problems] == [
        ("missing file", 2, "x" * 300 + ".jpg"), ("missing file", 3, "loop.jpg"), ("bad value", 4, "a\u0000.jpg")]
    assert "File name too long" in checked.problems[0].message and "symbolic links" in checked.problems[1].message
