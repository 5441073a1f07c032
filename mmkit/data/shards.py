"""webdataset: samples streamed from tar shards, split by shard over processes and workers,
and the writer that makes such shards.

A shard is a plain tar whose files ``<key>.<ext>`` are grouped by key, in tar order, into
records (the webdataset convention): ``000012.jpg`` and ``000012.txt`` are one sample.
"""

from __future__ import annotations

import io
import json
import operator
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from mmkit.data.read import MAX_IMAGE_PIXELS, Where, read_audio, read_image, read_text
from mmkit.errors import MMKitError
from mmkit.files import publish
from mmkit.samples import DatasetInfo, SampleError, Waveform

DEFAULT_FIELDS = {"image": "jpg;jpeg;png;webp", "text": "txt"}
WRITTEN_EXTENSIONS = {"image": "jpg", "audio": "wav", "text": "txt", "label": "cls"}


@dataclass
class Record:
    """One key group of a shard: its key and, unless it was passed over unread, the wanted
    members by extension, as (member name, bytes)."""

    key: str
    members: dict[str, tuple[str, bytes]] = field(default_factory=dict)


class WebDataset(torch.utils.data.IterableDataset):
    """Samples streamed from webdataset tar shards, for data larger than memory.

    Each record's ``id`` is its key; ``fields`` says which member gives each other value.
    By key: image decodes to RGB, audio (WAV/FLAC/OGG) to a Waveform, label to a class index
    (a ``.cls`` integer, or a class name), a ``.json`` member is parsed, anything else is
    UTF-8 text. Shards are read when streamed, never when the dataset is built.

    Args:
        urls: shard paths or brace patterns such as "data/train-{000000..000009}.tar".
        fields: sample key -> member extensions separated by ";", the first present is used.
        classes: class names, in index order; required when fields maps a label.
        max_image_pixels: images with more pixels are bad samples (decompression bombs).
    """

    def __init__(self, urls: str | list[str], fields: dict[str, str] = DEFAULT_FIELDS,
                 classes: list[str] | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.shards = expand_urls(urls)
        self.fields = parse_fields(fields)
        check_classes(self.fields, classes)
        self.class_index = {name: index for index, name in enumerate(classes or ())}
        self.max_image_pixels = max_image_pixels
        self.extensions = frozenset(chain.from_iterable(self.fields.values()))
        self.info = DatasetInfo(keys=("id", *self.fields), class_names=tuple(classes or ()),
                                label_kind="single" if "label" in self.fields else "none")

    @property
    def max_parts(self) -> int:
        """How many disjoint shares the stream can be split into: one shard each at least."""
        return len(self.shards)

    def shard_order(self, epoch: int, seed: int) -> list[str]:
        """The epoch's shard order: a permutation drawn from (seed, epoch) alone."""
        mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(mixed))
        return [self.shards[i] for i in order.tolist()]

    def records(self, epoch: int, part: int, parts: int, seed: int,
                start: int = 0) -> Iterator[dict[str, Any] | SampleError]:
        """Share ``part`` of ``parts`` of an epoch: every record of its shards, in order.

        The epoch's shard order is a permutation of ``shards`` drawn from (seed, epoch) only;
        the share takes ``order[part::parts]``, so the shares are disjoint and together
        hold every record once. Each record comes out as a sample dict, or as a SampleError
        (yielded, not raised) when it is bad; a missing shard, and a broken one after its
        last whole record, each come out as one SampleError too. ``start`` skips the
        share's first ``start`` items without decoding them: the result is the tail of the
        whole share. ``parts`` above ``max_parts`` is refused (an MMKitError, raised here).
        """
        if parts > self.max_parts:
            raise MMKitError(f"{plural(self.max_parts, 'shard')} cannot feed {parts} shares (processes x "
                             f"workers); write more shards or lower train.num_workers")
        if not 0 <= part < parts or start < 0:
            raise ValueError(f"need 0 <= part < parts and start >= 0, got part={part}, parts={parts}, start={start}")
        return self._share(self.shard_order(epoch, seed)[part::parts], start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every sample of epoch 0 in one share; a bad record raises its SampleError."""
        for item in self.records(epoch=0, part=0, parts=1, seed=0):
            if isinstance(item, SampleError):
                raise item
            yield item

    def _share(self, shards: list[str], start: int) -> Iterator[dict[str, Any] | SampleError]:
        """The shards' items from the ``start``-th on; those before are passed over unread."""
        done = 0
        for shard in shards:
            for item in read_shard(shard, self.extensions, unread=max(0, start - done)):
                if done >= start:
                    yield item if isinstance(item, SampleError) else self.decode(item, shard)
                done += 1

    def decode(self, record: Record, shard: str) -> dict[str, Any] | SampleError:
        """A record's sample, or the SampleError of its first bad field."""
        try:
            return {"id": record.key, **{key: self._value(key, record, shard) for key in self.fields}}
        except SampleError as error:
            return error

    def _value(self, key: str, record: Record, shard: str) -> Any:
        """One field's value from the first of its extensions the record has."""
        extensions = self.fields[key]
        ext = next((e for e in extensions if e in record.members), None)
        if ext is None:
            tried = ", ".join(f"{record.key}.{e}" for e in extensions)
            raise Where(shard, f"key {record.key}").error(
                "missing text" if key == "text" else "missing file", f"the record has none of {tried}")
        name, data = record.members[ext]
        where = Where(shard, f"key {record.key}", name)
        if key == "image":
            return read_image(data, where, self.max_image_pixels)
        if key == "audio":
            return read_audio(data, where)
        text = read_text(utf8(data, where), where)
        if key == "label":
            return self._label(text.strip(), ext, where)
        return parse_json(text, where) if ext == "json" else text

    def _label(self, text: str, ext: str, where: Where) -> int:
        """A class index from a ``.cls`` integer or from a class name."""
        classes = plural(len(self.class_index), "class")
        if ext == "cls" and text.isdecimal():
            if int(text) < len(self.class_index):
                return int(text)
            raise where.error("unknown label", f"class index {text} is not below the {classes} given")
        if text not in self.class_index:
            raise where.error("unknown label", f"{text!r} is not one of the {classes} given")
        return self.class_index[text]


def read_shard(path: str, extensions: frozenset[str], unread: int = 0) -> Iterator[Record | SampleError]:
    """A shard's records in tar order, streamed; the first ``unread`` ones carry no bytes.

    A missing shard is one SampleError; a broken one (truncated, not a tar) gives its whole
    records, then one SampleError in place of the rest.
    """
    try:
        file = open(path, "rb")
    except OSError as error:
        yield SampleError("missing file", f"cannot open the shard ({error.strerror})", path)
        return
    with file:
        try:
            yield from _tar_records(file, extensions, unread)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            yield SampleError("unreadable shard", f"the tar breaks off ({error}); "
                              "the shard's later records are lost", path)


def _tar_records(file: BinaryIO, extensions: frozenset[str], unread: int) -> Iterator[Record]:
    """Group a streamed tar's members by key; a record comes out once the next key (or the
    tar's end) shows it whole. Only wanted members of read records are read into memory."""
    stream = tarfile.open(fileobj=file, mode="r|*")
    record, count = None, 0
    while (info := stream.next()) is not None:
        stream.members.clear()  # a streamed TarFile would otherwise keep every header
        key, ext = split_name(info.name)
        if not info.isreg() or key is None:
            continue
        if record is None or key != record.key:
            if record is not None:
                yield record
                count += 1
            record = Record(key)
        if count >= unread and ext in extensions:
            record.members[ext] = (info.name, stream.extractfile(info).read())
    # tarfile ends quietly at a cut header or a missing end marker: the end-of-archive block
    # must have been read whole
    if stream.fileobj.tell() < stream.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError("the file ends before the tar's end-of-archive block")
    if record is not None:
        yield record


def split_name(name: str) -> tuple[str | None, str]:
    """``dir/000012.seg.PNG`` -> (``dir/000012``, ``seg.png``): the key ends at the first dot
    of the file name (webdataset's rule); names without one are not sample members."""
    match = re.fullmatch(r"((?:.*/)?[^./]+)\.([^/]*)", name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard paths from paths and brace patterns, in pattern order."""
    import braceexpand

    shards = [shard for url in ([urls] if isinstance(urls, str) else urls)
              for shard in braceexpand.braceexpand(str(url))]
    if not shards:
        raise MMKitError("webdataset: urls names no shard; give paths or a pattern like "
                         "'shards/train-{000000..000009}.tar'")
    return shards


def parse_fields(fields: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """{key: "jpg;png"} -> {key: ("jpg", "png")}, refusing an empty mapping or list."""
    parsed = {key: tuple(e.strip().lstrip(".").lower() for e in exts.split(";") if e.strip())
              for key, exts in fields.items()}
    if not parsed:
        raise MMKitError("webdataset: fields maps no sample key; e.g. {image = 'jpg;png', text = 'txt'}")
    if "id" in parsed:
        raise MMKitError("webdataset: fields.id cannot be mapped: a record's id is its key")
    if empty := [key for key, exts in parsed.items() if not exts]:
        raise MMKitError(f"webdataset: fields.{empty[0]} names no extension; e.g. 'jpg;png'")
    return parsed


def check_classes(fields: dict[str, tuple[str, ...]], classes: list[str] | None) -> None:
    """Labels need their class names up front (a stream cannot be scanned for them)."""
    if "label" in fields and not classes:
        raise MMKitError("webdataset: fields.label needs classes, the class names in index order "
                         "(a stream cannot be scanned for them)")
    if classes and "label" not in fields:
        raise MMKitError("webdataset: classes are given but fields maps no label; add e.g. label = 'cls'")
    if classes and len(set(classes)) < len(classes):
        raise MMKitError("webdataset: classes names a class twice")


def utf8(data: bytes, where: Where) -> str:
    """A member's bytes as text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise where.error("bad value", f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def parse_json(text: str, where: Where) -> Any:
    """A ``.json`` member's value."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise where.error("bad value", f"not JSON ({error})") from None


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('s') else 's'}"


def write_shards(samples: Iterable[dict[str, Any]], pattern: str | Path, per_shard: int,
                 class_names: Sequence[str] = ()) -> list[Path]:
    """Write samples as webdataset shards of ``per_shard`` records each, streaming.

    Shard ``i`` is ``pattern % i`` (e.g. "shards/train-%06d.tar"), written under a temporary
    name and renamed when whole. A record's key is the sample's ``id`` with every character
    but letters, digits, "_" and "-" made "_". Values: an image -> ``.jpg``, a Waveform ->
    ``.wav``, text -> ``.txt``, a label (an index, or a name in ``class_names``) -> ``.cls``
    holding the index; another key's text is written under the key as extension; bytes
    are written as they are, and a None value writes no member.
    """
    if per_shard < 1:
        raise MMKitError(f"per_shard must be at least 1, got {per_shard}")
    pattern = str(pattern)
    try:
        numbered = pattern % 0 != pattern % 1
    except (TypeError, ValueError):
        numbered = False
    if not numbered:
        raise MMKitError(f"shard pattern {pattern!r} needs one %d-style placeholder, e.g. 'train-%06d.tar'")
    samples, paths = iter(samples), []
    for first in samples:
        paths.append(_write_shard(Path(pattern % len(paths)), chain([first], islice(samples, per_shard - 1)),
                                  class_names))
    return paths


def _write_shard(path: Path, samples: Iterable[dict[str, Any]], class_names: Sequence[str]) -> Path:
    """One shard, complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    keys: set[str] = set()
    try:
        with tarfile.open(partial, "w") as tar:
            for sample in samples:
                key = record_key(sample, keys, path)
                for name, value in sample.items():
                    if name != "id" and value is not None:
                        ext, data = member_bytes(name, value, class_names)
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        publish(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def record_key(sample: dict[str, Any], keys: set[str], path: Path) -> str:
    """The sample's id made a tar key (no dots or slashes), new within its shard."""
    if "id" not in sample:
        raise MMKitError(f"a sample for {path} has no 'id'; write_shards names records by it")
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(sample["id"]))
    if not key or key in keys:
        raise MMKitError(f"sample id {sample['id']!r} gives key {key!r}, " +
                         ("empty" if not key else f"already used in {path}") + "; ids must be unique")
    keys.add(key)
    return key


def member_bytes(name: str, value: Any, class_names: Sequence[str]) -> tuple[str, bytes]:
    """A sample value as (extension, file bytes)."""
    ext = WRITTEN_EXTENSIONS.get(name, name)
    if isinstance(value, bytes):
        return ext, value
    out = io.BytesIO()
    if name == "image" and isinstance(value, Image.Image):
        value.convert("RGB").save(out, "JPEG", quality=95)
    elif name == "audio" and isinstance(value, Waveform):
        import soundfile

        soundfile.write(out, value.samples.numpy().T, value.sample_rate, format="WAV", subtype="FLOAT")
    elif name == "label":
        return ext, str(class_index(value, class_names)).encode()
    elif isinstance(value, str):
        return ext, value.encode()
    else:
        raise MMKitError(f"write_shards cannot write {name} = {type(value).__name__}; it writes PIL images, "
                         "Waveforms, text, labels and bytes")
    return ext, out.getvalue()


def class_index(label: Any, class_names: Sequence[str]) -> int:
    """A label as its class index, checked against ``class_names`` when they are given."""
    if isinstance(label, str):
        if label not in class_names:
            raise MMKitError(f"label {label!r} is not one of class_names")
        return list(class_names).index(label)
    index = operator.index(label)
    if index < 0 or (class_names and index >= len(class_names)):
        raise MMKitError(f"label {index} is not a class index (0..{len(class_names) - 1})")
    return index
