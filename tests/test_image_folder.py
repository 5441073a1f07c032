"""The image_folder dataset on a real root/<class>/<file> tree: what it lists, in which order,
what a good image gives and what every bad one raises."""

from __future__ import annotations

from pathlib import Path

import pytest

from corpus import BAD_IMAGES, TEST_MAX_PIXELS, image_bytes
from mmkit.data.image_folder import ImageFolder, write_image_folder
from mmkit.data.shapes import SyntheticShapes
from mmkit.errors import MMKitError
from mmkit.samples import SampleError


def put(root: Path, name: str, data: bytes) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """cat/ and dog/ with good images (nested, upper-case suffix), bad/ with one file per bad
    image case (a dangling link for "missing file"), bird/ outside the classes, and files
    that are not samples: hidden, not images, or outside a class folder."""
    root = tmp_path / "photos"
    for seed, name in enumerate(["cat/b.jpg", "cat/sub/a.png", "cat/sub-x/f.jpg", "cat/C.JPG", "dog/d.jpeg",
                                 "bird/e.jpg", "cat/.hidden.jpg", ".cache/x.jpg", "dog/.thumbs/y.jpg", "stray.jpg"]):
        put(root, name, image_bytes(seed, fmt="PNG" if name.endswith("png") else "JPEG"))
    put(root, "cat/notes.txt", b"not a sample\n")
    for kind, data in BAD_IMAGES.items():
        name = f"bad/{kind.replace(' ', '_')}.png"
        if data is None:
            (root / "bad").mkdir(exist_ok=True)
            (root / name).symlink_to(root / "bad/deleted.png")
        else:
            put(root, name, data)
    return root


BAD_IDS = {f"bad/{kind.replace(' ', '_')}.png": kind for kind in BAD_IMAGES}


def test_files_are_listed_in_class_then_path_order_and_bad_ones_raise_their_kind(root):
    data = ImageFolder(str(root), classes=["cat", "dog", "bad"], max_image_pixels=TEST_MAX_PIXELS)
    assert data.files == [*sorted(BAD_IDS), "bird/e.jpg", "cat/C.JPG", "cat/b.jpg", "cat/sub/a.png", "cat/sub-x/f.jpg",
                          "dog/d.jpeg"]  # by path parts: "sub" before "sub-x", though "/" sorts after "-"
    assert data.info.keys == ("id", "image", "label") and data.info.class_names == ("cat", "dog", "bad")
    good = [data[i] for i in range(len(data)) if data.files[i].split("/")[0] in ("cat", "dog")]
    assert [(s["id"], s["label"], s["image"].size, s["image"].mode) for s in good] == [
        ("cat/C.JPG", 0, (32, 32), "RGB"), ("cat/b.jpg", 0, (32, 32), "RGB"),
        ("cat/sub/a.png", 0, (32, 32), "RGB"), ("cat/sub-x/f.jpg", 0, (32, 32), "RGB"),
        ("dog/d.jpeg", 1, (32, 32), "RGB")]
    for index, path in enumerate(data.files):
        expected = BAD_IDS.get(path, "unknown label" if path.startswith("bird/") else None)
        if expected:
            with pytest.raises(SampleError) as caught:
                data[index]
            error = caught.value
            assert (error.kind, error.source, error.row, error.path) == (expected, str(root), None, path)


def test_classes_default_to_the_sorted_sub_folders_and_a_caption_gives_text(root):
    data = ImageFolder(str(root), caption="a photo of a {label}")
    assert data.info.class_names == ("bad", "bird", "cat", "dog")
    assert data.info.keys == ("id", "image", "text", "label")
    sample = data[data.files.index("dog/d.jpeg")]
    assert list(sample) == ["id", "image", "text", "label"]
    assert (sample["text"], sample["label"]) == ("a photo of a dog", 3)


def test_extensions_are_matched_in_any_case(root):
    data = ImageFolder(str(root), extensions=["JPG", ".png"])
    assert [path for path in data.files if not path.startswith("bad/")] == [
        "bird/e.jpg", "cat/C.JPG", "cat/b.jpg", "cat/sub/a.png", "cat/sub-x/f.jpg"]


@pytest.mark.parametrize("layout, params, message", [
    ({}, {}, r"image folder .*photos not found \(or not a folder\)"),
    ({"a.jpg": b"x", ".git/b.jpg": b"x"}, {}, r"image folder .*photos has no class sub-folders"),
    ({"cat/notes.txt": b"x"}, {},
     r"image folder .*photos has no .jpg, .jpeg, .*\.webp files in its class sub-folders \(cat\)"),
    ({"cat/a.jpg": b"x"}, {"caption": "a photo of a {name}"},
     r"image folder .*photos: caption 'a photo of a \{name\}' does not format"),
    ({"cat/a.jpg": b"x"}, {"caption": "a photo of a label"},
     r"image folder .*photos: caption 'a photo of a label' does not name the class; write \{label\} where it goes"),
    ({"cat/a.jpg": b"x"}, {"classes": []}, r"image folder .*photos: classes must name each class once"),
])
def test_a_folder_without_classes_or_images_fails_construction_in_one_line(tmp_path, layout, params, message):
    for name, data in layout.items():
        put(tmp_path / "photos", name, data)
    with pytest.raises(MMKitError, match=message) as caught:
        ImageFolder(str(tmp_path / "photos"), **params)
    assert "\n" not in str(caught.value)


def test_written_samples_read_back_equal(tmp_path):
    shapes = SyntheticShapes(num_samples=5, image_size=32)
    names = ["circle", "square", "cross"]
    originals = [{**shapes[i], "label": i % 3} for i in range(5)]
    assert write_image_folder(originals, tmp_path / "out", names) == tmp_path / "out"
    data = ImageFolder(str(tmp_path / "out"), classes=names)
    assert sorted((s["id"], s["label"], s["image"].size) for s in data) == sorted(
        (f"{names[s['label']]}/{s['id']}.jpg", s["label"], (32, 32)) for s in originals)
    with pytest.raises(ValueError, match="distinct ids"):
        write_image_folder([originals[0], originals[0]], tmp_path / "again", names)
