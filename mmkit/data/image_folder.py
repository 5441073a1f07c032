"""image_folder: images in one sub-folder per class, torchvision's ImageFolder layout."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mmkit.data.read import MAX_IMAGE_PIXELS, Where, file_bytes, read_image
from mmkit.errors import MMKitError
from mmkit.samples import DatasetInfo

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"]  # torchvision's


class ImageFolder(Dataset):
    """Images in one sub-folder per class, ``root/<class>/<file>``, as torchvision reads them.

    Files at any depth under a class folder count; hidden files and folders (".name") and
    files with other suffixes are skipped. Samples are in sorted order (class folder, then
    path), so an index names the same file on every machine, and a sample's id is its path
    relative to ``root``. Listing the folders is all construction does: bad images raise
    SampleError when loaded.

    Args:
        root: the folder holding one sub-folder per class.
        classes: class names in label index order; unset, the sorted sub-folder names. Images
            in a sub-folder not named here fail as "unknown label".
        extensions: the file suffixes read as images, in any case.
        caption: a template like "a photo of a {label}" giving each sample a "text"; unset, none.
        max_image_pixels: larger images are bad samples ("image too large"), refused undecoded.
    """

    def __init__(self, root: str, classes: list[str] | None = None,
                 extensions: list[str] = IMAGE_EXTENSIONS, caption: str | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.source = str(root)
        self.root = Path(root)
        self.caption = caption
        self.max_image_pixels = max_image_pixels
        folders = class_folders(self.root, self.source)
        self.class_names = tuple(folders if classes is None else classes)
        if not self.class_names or len(set(self.class_names)) < len(self.class_names):
            raise MMKitError(f"image folder {self.source}: classes must name each class once, got {classes!r}")
        if caption is not None:
            check_caption(caption, self.source)
        suffixes = tuple("." + extension.lower().lstrip(".") for extension in extensions)
        self.files = [path for folder in folders for path in list_images(self.root, folder, suffixes)]
        if not self.files:
            raise MMKitError(f"image folder {self.source} has no {', '.join(suffixes)} files in its class "
                             f"sub-folders ({', '.join(folders)}); put the images there or set extensions")
        self.class_index = {name: index for index, name in enumerate(self.class_names)}
        keys = ("id", "image", "text", "label") if caption is not None else ("id", "image", "label")
        self.info = DatasetInfo(keys=keys, class_names=self.class_names, label_kind="single")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        where = Where(self.source, None, path)
        folder = path.split("/", 1)[0]
        if folder not in self.class_index:
            count = len(self.class_names)
            shown = ", ".join(self.class_names[:5]) + (", ..." if count > 5 else "")
            raise where.error("unknown label", f"folder {folder!r} is not one of the {count} classes ({shown})")
        sample = {"id": path, "image": read_image(file_bytes(self.root / path, where), where, self.max_image_pixels)}
        if self.caption is not None:
            sample["text"] = self.caption.format(label=folder)
        sample["label"] = self.class_index[folder]
        return sample


def class_folders(root: Path, source: str) -> list[str]:
    """The sorted names of root's sub-folders, hidden ones left out."""
    if not root.is_dir():
        raise MMKitError(f"image folder {source} not found (or not a folder); check the dataset's root")
    folders = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise MMKitError(f"image folder {source} has no class sub-folders; put each class's images "
                         f"in {source}/<class name>/")
    return folders


def list_images(root: Path, folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """The visible image files at any depth under root/folder, as sorted paths relative to root."""
    found = []
    for parent, folders, names in os.walk(root / folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(parent, name).relative_to(root) for name in names
                  if not name.startswith(".") and name.lower().endswith(suffixes)]
    return [path.as_posix() for path in sorted(found, key=lambda path: path.parts)]


def check_caption(caption: str, source: str) -> None:
    """Refuse a caption template that does not format with a class name alone, or leaves it out."""
    try:
        text = caption.format(label="x")
    except (AttributeError, KeyError, IndexError, ValueError) as error:
        raise MMKitError(f"image folder {source}: caption {caption!r} does not format ({error!r}); "
                         'write it like "a photo of a {label}"') from None
    if not text.strip():
        raise MMKitError(f"image folder {source}: caption is empty; write it like \"a photo of a {{label}}\"")
    if text == caption.format(label="y"):  # every class would get the same text
        raise MMKitError(f"image folder {source}: caption {caption!r} does not name the class; write {{label}} "
                         'where it goes, like "a photo of a {label}"')


def write_image_folder(samples: Iterable[dict[str, Any]], root: str | Path, class_names: Sequence[str]) -> Path:
    """Write samples' images as JPEGs at root/<class name>/<id>.jpg (ids made file-safe)."""
    root = Path(root)
    written = set()
    for index, sample in enumerate(samples):
        name = re.sub(r"[^\w-]", "_", str(sample.get("id", f"{index:06d}")))
        path = root / class_names[sample["label"]] / f"{name}.jpg"
        if path in written:
            raise ValueError(f"two samples would both be written to {path}; give them distinct ids")
        written.add(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sample["image"].convert("RGB").save(path, "JPEG", quality=95)
    return root
