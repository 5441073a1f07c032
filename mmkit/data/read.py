"""Reading one sample's files and values, each failure a SampleError saying where and what.

Manifests, image folders and shards share these, so a truncated JPEG reads the same
(and fails the same) whichever way it arrives: as a path on disk or as bytes in a tar.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmkit.samples import SampleError, Waveform

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
PIXEL_LIMIT_LOCK = threading.Lock()  # guards Pillow's limit, a module global, while pixel_limit changes it


@dataclass(frozen=True)
class Where:
    """A sample's place: the file listing it (manifest, folder, shard), its row or key, and
    the path of the file it names, if any."""

    source: str
    row: int | str | None = None
    path: str | None = None

    def error(self, kind: str, message: str) -> SampleError:
        return SampleError(kind, message, self.source, self.row, self.path)


def file_bytes(path: Path, where: Where) -> bytes:
    """A file's contents; missing, unopenable and 0-byte files are sample problems."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise where.error("missing file", f"no such file ({path})") from None
    except IsADirectoryError:
        raise where.error("missing file", f"{path} is a folder, not a file") from None
    except OSError as error:  # a name too long, no permission, a symlink loop: the row's path is wrong
        raise where.error("missing file", f"cannot open {path} ({error.strerror or error})") from None
    except ValueError as error:  # os functions refuse a path holding a NUL byte
        raise where.error("bad value", f"the path cannot name a file ({error})") from None
    if not data:
        raise where.error("empty file", "the file has 0 bytes")
    return data


def read_image(data: bytes, where: Where, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image completely (a truncated file fails here, not in a worker's transform)
    as RGB; one larger than ``max_pixels`` is refused from its header, before decoding."""
    if not data:
        raise where.error("empty file", "the image has 0 bytes")
    with pixel_limit(max_pixels):
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except UnidentifiedImageError:
            raise where.error("not an image", "no image format recognises its bytes") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise where.error("image too large", f"its size is over data.max_image_pixels = {max_pixels:,}; "
                              f"raise it if the image is genuine (Pillow: {error})") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise where.error("truncated image", f"cannot decode it ({error})") from None
    return image if image.mode == "RGB" else image.convert("RGB")


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow's decompression-bomb check refuse images over ``max_pixels`` (from their
    header, before decoding) for a block: its own default would refuse a larger limit's images."""
    with PIXEL_LIMIT_LOCK, warnings.catch_warnings():  # the lock: a thread restores what it found
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        default, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = default


def read_audio(data: bytes, where: Where) -> Waveform:
    """Decode WAV/FLAC/OGG with soundfile into a [channels, frames] float waveform."""
    import soundfile

    if not data:
        raise where.error("empty file", "the audio file has 0 bytes")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise where.error("unreadable audio", f"soundfile cannot decode it ({error})") from None
    if samples.shape[0] == 0:
        raise where.error("empty audio", "the clip has no frames")
    if not np.isfinite(samples).all():
        raise where.error("nan audio", "the clip holds NaN or infinite samples")
    return Waveform(torch.from_numpy(np.ascontiguousarray(samples.T)), int(rate))


def read_text(value: Any, where: Where) -> str:
    """A caption or report: missing (None, NaN) and blank values are sample problems."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise where.error("missing text", "the text is missing")
    if not isinstance(value, str):
        raise where.error("bad value", f"expected text, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise where.error("empty text", "the text is empty")
    return value
