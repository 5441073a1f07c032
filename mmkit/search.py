"""`mmkit embed` and `mmkit search`: a finished run's embeddings of files on disk, kept in one
safetensors file with what each row is, and the rows nearest a query."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.image_folder import IMAGE_EXTENSIONS
from mmkit.data.read import Where, file_bytes, read_audio, read_image
from mmkit.errors import MMKitError
from mmkit.samples import SampleError

SUFFIXES = {**dict.fromkeys(IMAGE_EXTENSIONS, "image"), **dict.fromkeys((".wav", ".flac", ".ogg"), "audio"),
            ".txt": "text"}

EMBED_ARGUMENT = {"image": "images", "text": "texts", "audio": "audio"}  # Trained.embed's argument for each


@dataclass
class Items:
    """What to embed, by modality: each item's name (its path, or the text itself) and raw
    value; and the files that could not be read, where they were skipped."""

    names: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[Any]] = field(default_factory=dict)
    skipped: list[SampleError] = field(default_factory=list)

    def add(self, modality: str, name: str, value: Any) -> None:
        self.names.setdefault(modality, []).append(name)
        self.values.setdefault(modality, []).append(value)


def gather(sources: Sequence[Path], on_error: Literal["raise", "skip"] = "raise") -> Items:
    """Image and audio files (a folder's, in path order, sub-folders too) and each non-blank
    line of the .txt files named; an unreadable file stops with its path, or is skipped and
    listed."""
    items = Items()
    for path in files_of(sources):
        try:
            modality, value = read_file(path)
            if modality == "text":
                for line in value:
                    items.add("text", line, line)
            else:
                items.add(modality, str(path), value)
        except SampleError as error:
            if on_error == "raise":
                raise MMKitError(f"{error.line()}; --on-error skip leaves such files out") from None
            items.skipped.append(error)
    if not items.names:
        raise MMKitError(f"nothing to embed in {', '.join(map(str, sources))}: give images ({suffixes('image')}), "
                         f"audio ({suffixes('audio')}) or .txt files of one text a line, or folders of them")
    return items


def suffixes(modality: str) -> str:
    """The file suffixes read as ``modality``, for a message."""
    return ", ".join(suffix for suffix, kind in SUFFIXES.items() if kind == modality)


def files_of(sources: Sequence[Path]) -> list[Path]:
    """The files named, and the image and audio files under the folders named (a folder's
    .txt files are notes, not texts to embed: name them), each once."""
    files: dict[Path, Path] = {}
    for source in sources:
        if source.is_dir():
            found = sorted(p for p in source.rglob("*")
                           if p.is_file() and SUFFIXES.get(p.suffix.lower()) in ("image", "audio"))
        elif source.suffix.lower() in SUFFIXES or not source.exists():
            found = [source]  # a missing file fails as a sample, with its path
        else:
            raise MMKitError(f"{source}: not an image, audio or .txt file (by its suffix); rename it or leave it out")
        for path in found:
            files.setdefault(path.resolve(), path)
    return list(files.values())


def read_file(path: Path) -> tuple[str, Any]:
    """A file's modality (by its suffix) and what it holds: an image, a waveform, or a text
    file's non-blank lines; a SampleError naming it where it cannot be read."""
    where = Where(str(path), path=str(path))
    modality, data = SUFFIXES[path.suffix.lower()], file_bytes(path, where)
    readers = {"image": read_image, "audio": read_audio, "text": texts}
    return modality, readers[modality](data, where)


def texts(data: bytes, where: Where) -> list[str]:
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise where.error("bad value", f"not UTF-8 text ({error})") from None
    return [line.strip() for line in lines if line.strip()]


def weights_stamp(run: Path) -> str:
    """The run's weights file as it is now (size and modification time): an index made from
    other weights is refused, not searched with vectors that no longer match."""
    stat = (run / "model.safetensors").stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def write_index(path: Path, run: Path, embeddings: dict[str, torch.Tensor], names: dict[str, list[str]],
                shared: bool) -> None:
    """One safetensors file: a [rows, dim] tensor per modality, and in its metadata the run,
    its weights' stamp, whether the modalities share a space and each row's name."""
    from safetensors.torch import save_file

    from mmkit.files import atomic_path

    metadata = {"run": str(run.resolve()), "weights": weights_stamp(run), "shared": json.dumps(shared),
                **{f"names/{m}": json.dumps(names[m]) for m in embeddings}}
    with atomic_path(path) as partial:
        save_file({m: e.contiguous() for m, e in embeddings.items()}, str(partial), metadata=metadata)


@dataclass
class Index:
    """An index written by ``write_index``."""

    run: Path
    embeddings: dict[str, torch.Tensor]
    names: dict[str, list[str]]
    shared: bool


def read_index(path: Path) -> Index:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MMKitError(f"{path}: no such index; write one with `mmkit embed RUN FILES... --out {path}`")
    try:
        with safe_open(str(path), "pt") as opened:
            metadata = opened.metadata() or {}
            embeddings = {key: opened.get_tensor(key) for key in opened.keys()}
        run = Path(metadata["run"])
        names = {m: json.loads(metadata[f"names/{m}"]) for m in embeddings}
        shared = json.loads(metadata["shared"])
        stamp = metadata["weights"]
    except (KeyError, OSError, ValueError, SafetensorError) as error:  # JSONDecodeError is a ValueError
        raise MMKitError(f"{path}: not an index written by `mmkit embed` ({error})") from None
    if not (run / "model.safetensors").is_file():
        raise MMKitError(f"{path} was made with the run {run}, which has no model.safetensors now")
    if weights_stamp(run) != stamp:
        raise MMKitError(f"{path} was made with other weights of {run} than it holds now; embed the files again")
    return Index(run, embeddings, names, shared)


def query_value(query: str, text: bool = False) -> tuple[str, Any]:
    """A query's modality and raw value: the text itself with ``text``, else the image or
    audio file it names (by its suffix), else the text."""
    path = Path(query)
    modality = SUFFIXES.get(path.suffix.lower())
    if not text and modality in ("image", "audio"):
        if not path.is_file():
            raise MMKitError(f"{query}: no such {modality} file; to search for these words, add --text")
        try:
            return read_file(path)
        except SampleError as error:
            raise MMKitError(error.line()) from None
    return "text", query


def nearest(index: Index, query: torch.Tensor, modality: str, top: int) -> list[tuple[str, str, float]]:
    """The ``top`` rows most similar (cosine) to ``query`` [dim], as (modality, name, score),
    most similar first: rows of every modality where the run's modalities share a space (a
    contrastive run), else only rows of the query's own modality (encoders' pooled features)."""
    if modality not in index.embeddings and not index.shared:
        raise MMKitError(f"the index holds {', '.join(index.embeddings)} features of a run whose modalities share "
                         f"no space (not a contrastive run): a query is compared with rows of its own kind, not {modality}")
    searched = list(index.embeddings) if index.shared else [modality]
    rows = [(m, name) for m in searched for name in index.names[m]]
    vectors = torch.cat([F.normalize(index.embeddings[m].float(), dim=-1) for m in searched])
    scores = vectors @ F.normalize(query.float(), dim=-1)
    best = scores.topk(min(top, len(rows)))
    return [(*rows[i], score) for score, i in zip(best.values.tolist(), best.indices.tolist())]
